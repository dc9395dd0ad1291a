//! Deferral maths: AUROC, deferral curves with random and oracle baselines, the area under the
//! curve, APGR (RouteLLM's average performance gap recovered) and thresholds.
//!
//! Conventions: scores are higher = more confident, a policy serves locally when
//! `score >= threshold` and escalates otherwise, so the deferral curve escalates the least
//! confident items first. NaN scores must be mapped to `-inf` by the caller (they escalate).
//! Items with equal scores cannot be split by a threshold: the curve is the expectation over
//! a random order within ties, which is linear between the tie group's ends.

use serde::Serialize;

/// Area under the ROC curve of `scores` as a predictor of `correct` (ties count one half);
/// `None` when all items are correct or all wrong.
pub fn auroc(scores: &[f64], correct: &[bool]) -> Option<f64> {
    let positives = correct.iter().filter(|c| **c).count();
    let negatives = correct.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let order = ascending(scores);
    // Mann-Whitney: the sum of the positives' ranks, with tied items sharing their mean rank.
    let mut rank_sum = 0.0;
    for group in tie_groups(scores, &order) {
        let mean_rank = (group.start + group.end + 1) as f64 / 2.0;
        let pos = order[group].iter().filter(|&&i| correct[i]).count();
        rank_sum += mean_rank * pos as f64;
    }
    let p = positives as f64;
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64))
}

/// Item indices sorted by ascending score.
fn ascending(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    order
}

/// Ranges of `order` whose items have equal scores.
fn tie_groups<'a>(
    scores: &'a [f64],
    order: &'a [usize],
) -> impl Iterator<Item = std::ops::Range<usize>> + 'a {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= order.len() {
            return None;
        }
        let value = scores[order[start]];
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == value {
            end += 1;
        }
        let range = start..end;
        start = end;
        Some(range)
    })
}

/// Quality and cost after escalating the `k` least confident of `n` items, for k = 0..=n.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeferralCurve {
    /// Share of correct answers (escalated items count `remote_accuracy`), index k.
    pub quality: Vec<f64>,
    /// Remote spend in USD for the escalated items, index k.
    pub cost: Vec<f64>,
}

impl DeferralCurve {
    /// The curve of a confidence rule.
    ///
    /// `cost[i]` is what escalating item `i` would cost.
    pub fn from_scores(
        scores: &[f64],
        correct: &[bool],
        cost: &[f64],
        remote_accuracy: f64,
    ) -> Self {
        let n = scores.len();
        let order = ascending(scores);
        let total_correct = correct.iter().filter(|c| **c).count() as f64;
        let mut escalated_correct = vec![0.0; n + 1];
        let mut escalated_cost = vec![0.0; n + 1];
        for group in tie_groups(scores, &order) {
            let m = group.len() as f64;
            let g = order[group.clone()].iter().filter(|&&i| correct[i]).count() as f64;
            let c: f64 = order[group.clone()].iter().map(|&i| cost[i]).sum();
            let (base_correct, base_cost) =
                (escalated_correct[group.start], escalated_cost[group.start]);
            for (j, k) in (group.start + 1..=group.end).enumerate() {
                let share = (j + 1) as f64 / m;
                escalated_correct[k] = base_correct + g * share;
                escalated_cost[k] = base_cost + c * share;
            }
        }
        let quality = (0..=n)
            .map(|k| {
                (total_correct - escalated_correct[k] + remote_accuracy * k as f64)
                    / n.max(1) as f64
            })
            .collect();
        Self {
            quality,
            cost: escalated_cost,
        }
    }

    /// Random escalation: every item equally likely, so quality and cost are linear in the rate.
    pub fn random(correct: &[bool], cost: &[f64], remote_accuracy: f64) -> Self {
        // All scores tied is exactly a random order.
        Self::from_scores(&vec![0.0; correct.len()], correct, cost, remote_accuracy)
    }

    /// The oracle: wrong answers escalated first (the best any rule could do).
    pub fn oracle(correct: &[bool], cost: &[f64], remote_accuracy: f64) -> Self {
        let scores: Vec<f64> = correct.iter().map(|&c| f64::from(u8::from(c))).collect();
        Self::from_scores(&scores, correct, cost, remote_accuracy)
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.quality.len().saturating_sub(1)
    }

    /// Whether the curve has no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Escalation rate after escalating `k` items.
    pub fn rate(&self, k: usize) -> f64 {
        k as f64 / self.len().max(1) as f64
    }

    /// Quality at an escalation rate in `[0, 1]`, linear between items.
    pub fn quality_at(&self, rate: f64) -> f64 {
        interpolate(&self.quality, rate)
    }

    /// Cost at an escalation rate in `[0, 1]`, linear between items.
    pub fn cost_at(&self, rate: f64) -> f64 {
        interpolate(&self.cost, rate)
    }

    /// Area under the curve over escalation rates 0..1 (exact: the curve is piecewise linear).
    pub fn area(&self) -> f64 {
        let n = self.len();
        if n == 0 {
            return self.quality.first().copied().unwrap_or(0.0);
        }
        let sum: f64 = self.quality.windows(2).map(|w| (w[0] + w[1]) / 2.0).sum();
        sum / n as f64
    }

    /// The lowest escalation rate at which quality reaches `target`, linear between items;
    /// `None` when it never does.
    pub fn rate_to_reach(&self, target: f64) -> Option<f64> {
        let k = self.quality.iter().position(|&q| q >= target)?;
        if k == 0 {
            return Some(0.0);
        }
        let (q0, q1) = (self.quality[k - 1], self.quality[k]);
        let fraction = if q1 > q0 {
            (target - q0) / (q1 - q0)
        } else {
            1.0
        };
        Some(self.rate(k - 1) + fraction / self.len() as f64)
    }
}

/// Linear interpolation of a per-item curve at a rate in [0, 1].
fn interpolate(values: &[f64], rate: f64) -> f64 {
    let n = values.len().saturating_sub(1);
    if n == 0 {
        return values.first().copied().unwrap_or(0.0);
    }
    let x = rate.clamp(0.0, 1.0) * n as f64;
    let k = (x.floor() as usize).min(n - 1);
    let t = x - k as f64;
    values[k] * (1.0 - t) + values[k + 1] * t
}

/// APGR: the share of the local-to-remote quality gap recovered, averaged over escalation
/// rates (RouteLLM, Ong et al. 2024): `(area - local) / (remote - local)`. Random escalation
/// scores 0.5. `None` when the remote model is no better than the local one.
pub fn apgr(area: f64, local_accuracy: f64, remote_accuracy: f64) -> Option<f64> {
    let gap = remote_accuracy - local_accuracy;
    (gap > 1e-12).then(|| (area - local_accuracy) / gap)
}

/// A threshold and what it does on the data it was chosen on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct OperatingPoint {
    /// Serve locally when `score >= threshold`.
    pub threshold: f64,
    /// Share of items escalated.
    pub rate: f64,
    /// Quality at that rate (`None` without labels).
    pub quality: Option<f64>,
}

/// Thresholds a policy can actually use: escalating `k` items is possible only where the
/// k-th and (k+1)-th smallest scores differ. Yields `(k, threshold)`, the threshold midway
/// between the two scores (any value in between splits the data the same way; the middle is
/// the least sensitive to new data).
pub fn realizable_thresholds(scores: &[f64]) -> Vec<(usize, f64)> {
    let mut sorted: Vec<f64> = scores.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let mut out = Vec::new();
    for k in 0..=n {
        let lo = if k == 0 {
            f64::NEG_INFINITY
        } else {
            sorted[k - 1]
        };
        let hi = if k == n { f64::INFINITY } else { sorted[k] };
        if lo >= hi {
            continue;
        }
        let threshold = match (lo.is_finite(), hi.is_finite()) {
            (true, true) => {
                let mid = lo + (hi - lo) / 2.0;
                if mid > lo {
                    mid
                } else {
                    hi
                }
            }
            (false, true) => hi,
            // Escalating everything needs a threshold above the largest score.
            (true, false) => lo + lo.abs().max(1.0) * 1e-9,
            (false, false) => continue,
        };
        out.push((k, threshold));
    }
    out
}

/// The rate and quality a threshold gives on labeled data.
pub fn apply_threshold(
    scores: &[f64],
    correct: &[bool],
    threshold: f64,
    remote_accuracy: f64,
) -> (f64, f64) {
    let n = scores.len().max(1) as f64;
    let mut escalated = 0usize;
    let mut right = 0.0;
    for (&s, &c) in scores.iter().zip(correct) {
        if s >= threshold {
            right += f64::from(u8::from(c));
        } else {
            escalated += 1;
            right += remote_accuracy;
        }
    }
    (escalated as f64 / n, right / n)
}

/// Expected calibration error of probabilities against outcomes, with `bins` equal-width bins,
/// and the reliability table (mean prediction, observed accuracy, count) per non-empty bin.
pub fn calibration(
    probabilities: &[f64],
    correct: &[bool],
    bins: usize,
) -> (f64, Vec<(f64, f64, usize)>) {
    let bins = bins.max(1);
    let mut sums = vec![(0.0, 0.0, 0usize); bins];
    for (&p, &c) in probabilities.iter().zip(correct) {
        if !p.is_finite() {
            continue;
        }
        let b = ((p * bins as f64) as usize).min(bins - 1);
        sums[b].0 += p;
        sums[b].1 += f64::from(u8::from(c));
        sums[b].2 += 1;
    }
    let total: usize = sums.iter().map(|s| s.2).sum();
    let table: Vec<(f64, f64, usize)> = sums
        .into_iter()
        .filter(|s| s.2 > 0)
        .map(|(p, c, m)| (p / m as f64, c / m as f64, m))
        .collect();
    let ece = table
        .iter()
        .map(|(p, c, m)| *m as f64 / total.max(1) as f64 * (p - c).abs())
        .sum();
    (ece, table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn auroc_on_hand_computed_cases() {
        // Perfect, reversed, and one swapped pair out of 2 x 2 = 4 pairs.
        assert_eq!(
            auroc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
            Some(1.0)
        );
        assert_eq!(
            auroc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
        assert!(close(
            auroc(&[0.1, 0.8, 0.2, 0.9], &[false, false, true, true]).unwrap(),
            0.75
        ));
        // A tie between a positive and a negative counts a half: pairs (p=0.5 vs n=0.5) 0.5,
        // (p=0.5 vs n=0.1) 1, (p=0.9 vs both) 2 -> 3.5 / 4.
        assert!(close(
            auroc(&[0.5, 0.5, 0.1, 0.9], &[true, false, false, true]).unwrap(),
            0.875
        ));
        assert_eq!(auroc(&[0.1, 0.2], &[true, true]), None);
        // Infinite scores are ordinary ranks.
        assert_eq!(auroc(&[f64::NEG_INFINITY, 0.0], &[false, true]), Some(1.0));
    }

    #[test]
    fn deferral_curve_on_a_hand_computed_case() {
        // Scores ascending: item 2 (wrong), item 0 (right), item 3 (wrong), item 1 (right).
        let scores = [0.2, 0.9, 0.1, 0.5];
        let correct = [true, true, false, false];
        let cost = [1.0, 1.0, 1.0, 1.0];
        let curve = DeferralCurve::from_scores(&scores, &correct, &cost, 1.0);
        // k=0: 2/4; escalate item 2 (wrong -> right): 3/4; item 0 (right -> right): 3/4;
        // item 3: 4/4; item 1: 4/4.
        assert_eq!(curve.quality, vec![0.5, 0.75, 0.75, 1.0, 1.0]);
        assert_eq!(curve.cost, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        // Trapezoids: 0.625 + 0.75 + 0.875 + 1 = 3.25, over 4 rates.
        assert!(close(curve.area(), 0.8125));
        assert!(close(apgr(curve.area(), 0.5, 1.0).unwrap(), 0.625));
        assert!(close(curve.rate_to_reach(0.75).unwrap(), 0.25));
        assert!(close(curve.rate_to_reach(0.875).unwrap(), 0.625));
        assert!(close(curve.quality_at(0.125), 0.625));
    }

    #[test]
    fn remote_accuracy_below_one_can_make_escalation_hurt() {
        let curve = DeferralCurve::from_scores(&[0.1, 0.9], &[false, true], &[0.0, 0.0], 0.5);
        assert_eq!(curve.quality, vec![0.5, 0.75, 0.5]);
    }

    #[test]
    fn ties_are_escalated_in_expectation() {
        // All tied: one of two right -> each escalation adds half a wrong answer fixed.
        let curve = DeferralCurve::from_scores(&[0.3, 0.3], &[true, false], &[2.0, 4.0], 1.0);
        assert_eq!(curve.quality, vec![0.5, 0.75, 1.0]);
        assert_eq!(curve.cost, vec![0.0, 3.0, 6.0]);
    }

    #[test]
    fn random_scores_half_and_oracle_recovers_most_of_the_gap() {
        let correct = [true, false, false, true, false];
        let cost = [1.0; 5];
        let random = DeferralCurve::random(&correct, &cost, 1.0);
        assert!(close(apgr(random.area(), 0.4, 1.0).unwrap(), 0.5));
        let oracle = DeferralCurve::oracle(&correct, &cost, 1.0);
        assert_eq!(oracle.quality, vec![0.4, 0.6, 0.8, 1.0, 1.0, 1.0]);
        // Area = (0.5 + 0.7 + 0.9 + 1 + 1) / 5 = 0.82; APGR = 0.42 / 0.6.
        assert!(close(oracle.area(), 0.82));
        assert!(close(apgr(oracle.area(), 0.4, 1.0).unwrap(), 0.7));
        assert_eq!(apgr(0.9, 1.0, 1.0), None);
    }

    #[test]
    fn thresholds_split_where_scores_differ() {
        let scores = [-1.0, -3.0, -1.0, f64::NEG_INFINITY];
        let t = realizable_thresholds(&scores);
        // Sorted: -inf, -3, -1, -1. k=0 impossible (-inf always escalates); k=3 splits a tie.
        assert_eq!(t, vec![(1, -3.0), (2, -2.0), (4, -1.0 + 1e-9)]);
        let (rate, quality) = apply_threshold(&scores, &[true, false, true, false], -2.0, 1.0);
        assert!(close(rate, 0.5));
        assert!(close(quality, 1.0));
    }

    #[test]
    fn calibration_error_on_hand_computed_bins() {
        // Bin [0.8, 0.9): predictions 0.8, 0.8, observed 1 of 2 -> |0.8 - 0.5| weighted 2/4;
        // bin [0.2, 0.3): 0.2, 0.2, observed 0 -> 0.2 weighted 2/4. ECE = 0.15 + 0.1.
        let (ece, table) = calibration(&[0.8, 0.8, 0.2, 0.2], &[true, false, false, false], 10);
        assert!(close(ece, 0.25));
        assert_eq!(table.len(), 2);
    }
}
