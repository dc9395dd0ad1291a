//! Per-variant statistics of an experiment with 95% confidence intervals.
//!
//! Pure functions over ledger rows, shared by the admin API and
//! `cascade report` so both always show the same numbers.

use serde::Serialize;

use crate::storage::VariantSample;

/// z for a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// A point estimate with its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// What one variant of an experiment did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantStats {
    pub variant: String,
    pub requests: u64,
    /// Share of requests answered by a remote model (Wilson interval).
    pub escalation_rate: Option<Estimate>,
    /// Mean cost of 1,000 requests in USD (normal interval on the mean).
    pub cost_per_1k_requests_usd: Option<Estimate>,
    /// Median latency in ms (distribution-free order-statistic interval).
    pub latency_p50_ms: Option<Estimate>,
    /// 95th percentile latency in ms (order-statistic interval).
    pub latency_p95_ms: Option<Estimate>,
    /// Requests that received feedback.
    pub feedback_count: u64,
    /// Mean feedback score in [0, 1] (normal interval, clamped).
    pub mean_feedback: Option<Estimate>,
}

/// Groups samples by variant (sorted by name) and summarises each.
pub fn variant_stats(samples: &[VariantSample]) -> Vec<VariantStats> {
    let mut names: Vec<&str> = samples.iter().map(|s| s.variant.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let rows: Vec<&VariantSample> = samples.iter().filter(|s| s.variant == name).collect();
            summarise(name, &rows)
        })
        .collect()
}

fn summarise(name: &str, rows: &[&VariantSample]) -> VariantStats {
    let n = rows.len() as u64;
    let escalated = rows.iter().filter(|r| r.route == "remote").count() as u64;
    let costs: Vec<f64> = rows
        .iter()
        .map(|r| r.cost_nanos as f64 / 1e9 * 1000.0)
        .collect();
    let mut latencies: Vec<f64> = rows.iter().map(|r| r.latency_ms as f64).collect();
    latencies.sort_by(f64::total_cmp);
    let feedback: Vec<f64> = rows.iter().filter_map(|r| r.feedback).collect();
    VariantStats {
        variant: name.to_string(),
        requests: n,
        escalation_rate: wilson(escalated, n),
        cost_per_1k_requests_usd: mean_interval(&costs, None),
        latency_p50_ms: quantile_interval(&latencies, 0.5),
        latency_p95_ms: quantile_interval(&latencies, 0.95),
        feedback_count: feedback.len() as u64,
        mean_feedback: mean_interval(&feedback, Some((0.0, 1.0))),
    }
}

/// Wilson score interval for a proportion `k / n`.
pub fn wilson(k: u64, n: u64) -> Option<Estimate> {
    if n == 0 {
        return None;
    }
    let n_f = n as f64;
    let p = k as f64 / n_f;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n_f;
    let centre = (p + z2 / (2.0 * n_f)) / denom;
    let half = Z95 * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt() / denom;
    Some(Estimate {
        value: p,
        low: (centre - half).max(0.0),
        high: (centre + half).min(1.0),
    })
}

/// Mean with a normal-approximation interval (sample standard deviation);
/// a single value gets a zero-width interval.
pub fn mean_interval(values: &[f64], clamp: Option<(f64, f64)>) -> Option<Estimate> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let half = if values.len() > 1 {
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        Z95 * (var / n).sqrt()
    } else {
        0.0
    };
    let (lo, hi) = clamp.unwrap_or((f64::NEG_INFINITY, f64::INFINITY));
    Some(Estimate {
        value: mean,
        low: (mean - half).max(lo),
        high: (mean + half).min(hi),
    })
}

/// Quantile `q` of sorted values (nearest rank) with the distribution-free
/// interval from the binomial distribution of order statistics (normal
/// approximation of the ranks).
pub fn quantile_interval(sorted: &[f64], q: f64) -> Option<Estimate> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = |r: f64| -> usize { (r.ceil().max(1.0) as usize).min(n) - 1 };
    let nf = n as f64;
    let spread = Z95 * (nf * q * (1.0 - q)).sqrt();
    Some(Estimate {
        value: sorted[rank(nf * q)],
        low: sorted[rank(nf * q - spread)],
        high: sorted[rank(nf * q + spread + 1.0)],
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample(
        variant: &str,
        route: &str,
        cost_nanos: u64,
        latency_ms: u64,
        feedback: Option<f64>,
    ) -> VariantSample {
        VariantSample {
            variant: variant.into(),
            route: route.into(),
            cost_nanos,
            latency_ms,
            feedback,
            status: 200,
        }
    }

    #[test]
    fn wilson_interval_matches_the_textbook_value() {
        // 20 of 100: Wilson 95% interval is [0.1333, 0.2888].
        let e = wilson(20, 100).unwrap();
        assert!((e.value - 0.2).abs() < 1e-12);
        assert!((e.low - 0.1333).abs() < 1e-3, "{e:?}");
        assert!((e.high - 0.2888).abs() < 1e-3, "{e:?}");
        // 0 of 10 still has a non-zero upper bound.
        let zero = wilson(0, 10).unwrap();
        assert_eq!(zero.low, 0.0);
        assert!(zero.high > 0.2 && zero.high < 0.35);
        assert!(wilson(0, 0).is_none());
    }

    #[test]
    fn mean_interval_uses_the_sample_standard_deviation() {
        // mean 2, sample sd 1, n 3 → half width 1.96 / sqrt(3).
        let e = mean_interval(&[1.0, 2.0, 3.0], None).unwrap();
        assert!((e.value - 2.0).abs() < 1e-12);
        assert!((e.high - e.value - Z95 / 3f64.sqrt()).abs() < 1e-9);
        let clamped = mean_interval(&[0.0, 1.0], Some((0.0, 1.0))).unwrap();
        assert_eq!((clamped.low, clamped.high), (0.0, 1.0));
    }

    #[test]
    fn quantile_interval_brackets_the_estimate() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p50 = quantile_interval(&v, 0.5).unwrap();
        assert_eq!(p50.value, 50.0);
        assert!(p50.low < 50.0 && p50.low >= 39.0, "{p50:?}");
        assert!(p50.high > 50.0 && p50.high <= 62.0, "{p50:?}");
        let p95 = quantile_interval(&v, 0.95).unwrap();
        assert_eq!(p95.value, 95.0);
        assert!(p95.low <= 95.0 && p95.high <= 100.0);
    }

    #[test]
    fn variants_are_summarised_separately() {
        let samples = vec![
            sample("a", "local", 0, 10, Some(1.0)),
            sample("a", "remote", 2_000_000, 30, None),
            sample("b", "remote", 4_000_000, 50, Some(0.0)),
        ];
        let stats = variant_stats(&samples);
        assert_eq!(stats.len(), 2);
        let a = &stats[0];
        assert_eq!((a.variant.as_str(), a.requests), ("a", 2));
        assert!((a.escalation_rate.unwrap().value - 0.5).abs() < 1e-12);
        // (0 + 0.002 USD) / 2 requests × 1000 = 1 USD per 1k requests.
        assert!((a.cost_per_1k_requests_usd.unwrap().value - 1.0).abs() < 1e-9);
        assert_eq!(a.feedback_count, 1);
        let b = &stats[1];
        assert!((b.escalation_rate.unwrap().value - 1.0).abs() < 1e-12);
        assert_eq!(b.mean_feedback.unwrap().value, 0.0);
    }
}
