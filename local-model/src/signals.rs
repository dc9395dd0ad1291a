//! Per-token confidence signals computed from the raw logits.
//!
//! They are computed before temperature or top-p so that the confidence of a
//! token does not depend on how it was sampled.

use serde::{Deserialize, Serialize};

/// One generated token with its confidence signals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Vocabulary id of the token.
    pub id: u32,
    /// Text this token completed (may be empty while a multi-byte character
    /// is still incomplete; the pieces of all tokens concatenate to the text).
    pub text: String,
    /// Natural-log probability of the token under the raw distribution (≤ 0).
    pub logprob: f32,
    /// Entropy of the raw distribution in nats (≥ 0).
    pub entropy: f32,
    /// Probability of the most likely token minus the second most likely.
    pub margin: f32,
}

/// Confidence signals of one distribution over the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signals {
    pub logprob: f32,
    pub entropy: f32,
    pub margin: f32,
}

/// Computes log-prob of `token`, entropy and top-1/top-2 margin from logits.
///
/// Uses f64 accumulation: vocabularies are 50k+ entries and the sums of
/// small probabilities lose precision in f32.
pub fn signals_from_logits(logits: &[f32], token: usize) -> Signals {
    let max = logits
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() {
        return Signals {
            logprob: f32::NEG_INFINITY,
            entropy: 0.0,
            margin: 0.0,
        };
    }
    let mut sum = 0f64;
    let mut weighted = 0f64;
    let (mut top1, mut top2) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &l in logits {
        let l = l as f64;
        if !l.is_finite() {
            continue;
        }
        let e = (l - max).exp();
        sum += e;
        weighted += e * (l - max);
        if l > top1 {
            top2 = top1;
            top1 = l;
        } else if l > top2 {
            top2 = l;
        }
    }
    let log_sum = sum.ln();
    let lse = max + log_sum;
    let token_logit = logits.get(token).copied().unwrap_or(f32::NEG_INFINITY) as f64;
    let logprob = (token_logit - lse).min(0.0);
    // H = -Σ p (l - lse) = lse - Σ p l = log_sum - Σ p (l - max)
    let entropy = (log_sum - weighted / sum).max(0.0);
    let p1 = (top1 - lse).exp();
    let p2 = if top2.is_finite() {
        (top2 - lse).exp()
    } else {
        0.0
    };
    Signals {
        logprob: logprob as f32,
        entropy: entropy as f32,
        margin: (p1 - p2).max(0.0) as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_distribution_has_log_n_entropy_and_zero_margin() {
        let s = signals_from_logits(&[1.0; 4], 2);
        assert!((s.logprob as f64 - (0.25f64).ln()).abs() < 1e-6);
        assert!((s.entropy as f64 - (4f64).ln()).abs() < 1e-6);
        assert!(s.margin.abs() < 1e-6);
    }

    #[test]
    fn peaked_distribution_matches_hand_computation() {
        // p = softmax([2, 0, 0]) = [e²/(e²+2), 1/(e²+2), 1/(e²+2)]
        let z = 2f64.exp() + 2.0;
        let p = [2f64.exp() / z, 1.0 / z, 1.0 / z];
        let s = signals_from_logits(&[2.0, 0.0, 0.0], 0);
        assert!((s.logprob as f64 - p[0].ln()).abs() < 1e-6);
        let h: f64 = -p.iter().map(|x| x * x.ln()).sum::<f64>();
        assert!((s.entropy as f64 - h).abs() < 1e-6);
        assert!((s.margin as f64 - (p[0] - p[1])).abs() < 1e-6);
        let s1 = signals_from_logits(&[2.0, 0.0, 0.0], 1);
        assert!((s1.logprob as f64 - p[1].ln()).abs() < 1e-6);
    }

    #[test]
    fn huge_logits_do_not_overflow() {
        let s = signals_from_logits(&[1000.0, 999.0, -1000.0], 0);
        assert!(s.logprob.is_finite() && s.logprob <= 0.0);
        assert!(s.entropy.is_finite() && s.entropy >= 0.0);
    }
}
