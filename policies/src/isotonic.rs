//! Isotonic calibration: a non-decreasing step map from a confidence score to the probability
//! that the local answer is correct, fitted by pool-adjacent-violators (PAV).
//!
//! Why isotonic rather than a logistic fit on one score: it assumes only that a higher score is
//! never worse, so it fits sums, means, margins and learned probabilities alike, and a team's
//! threshold can then read "the chance the local answer is right" for any rule
//! (`min_p_correct`). Why a step map rather than interpolation: its inverse is exact, so a
//! `min_p_correct` becomes a plain score threshold and early exit stays exact
//! ([`IsotonicMap::lowest_score_reaching`]).

use serde::{Deserialize, Serialize};

/// Why a fit or a saved map was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IsotonicError {
    /// Nothing to fit.
    #[error("isotonic fit needs at least one scored item")]
    Empty,
    /// A NaN score cannot be ordered.
    #[error("isotonic fit got a NaN score")]
    NanScore,
    /// A saved map breaks an invariant.
    #[error("isotonic map: {0}")]
    Invalid(String),
}

/// A fitted map: block `k` covers scores in `[lower[k], lower[k + 1])` (the last block is
/// unbounded above) and gives probability `p[k]`; `lower` strictly increases and `p`
/// strictly increases too (equal neighbours are merged, so every block boundary is a real
/// step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsotonicMap {
    /// The lowest training score of each block.
    pub lower: Vec<f64>,
    /// The share of correct answers in each block.
    pub p: Vec<f64>,
    /// Training items per block; informational (how much evidence each step rests on).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub count: Vec<usize>,
}

/// One PAV block under construction.
struct Block {
    lower: f64,
    positives: f64,
    weight: f64,
}

impl Block {
    fn mean(&self) -> f64 {
        self.positives / self.weight
    }
}

impl IsotonicMap {
    /// Fits the map to `(score, correct)` pairs: the non-decreasing step function with the
    /// least squared error to the 0/1 labels (PAV). Equal scores share one block, since
    /// nothing can tell them apart. `-inf` and `+inf` scores are allowed (a token with
    /// log-probability `-inf` makes a sum infinite); NaN is rejected.
    pub fn fit(items: &[(f64, bool)]) -> Result<Self, IsotonicError> {
        if items.is_empty() {
            return Err(IsotonicError::Empty);
        }
        if items.iter().any(|(s, _)| s.is_nan()) {
            return Err(IsotonicError::NanScore);
        }
        let mut sorted: Vec<(f64, bool)> = items.to_vec();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut blocks: Vec<Block> = Vec::new();
        let mut previous_score = None;
        for (score, correct) in sorted {
            let positive = if correct { 1.0 } else { 0.0 };
            // An item with the previous item's score joins its block, which is always the
            // last one (pooling only ever merges the last blocks). `==` also treats -0.0 and
            // 0.0 as one score.
            let same_score = previous_score == Some(score);
            previous_score = Some(score);
            match blocks.last_mut() {
                Some(last) if same_score => {
                    last.positives += positive;
                    last.weight += 1.0;
                }
                _ => blocks.push(Block {
                    lower: score,
                    positives: positive,
                    weight: 1.0,
                }),
            }
            // Pool while the newest block breaks monotonicity (or merely ties: equal
            // neighbours carry no step and would only make the map longer).
            while blocks.len() >= 2 {
                let n = blocks.len();
                if blocks[n - 2].mean() < blocks[n - 1].mean() {
                    break;
                }
                if let Some(top) = blocks.pop() {
                    if let Some(prev) = blocks.last_mut() {
                        prev.positives += top.positives;
                        prev.weight += top.weight;
                    }
                }
            }
        }
        // JSON has no infinities: an infinite bound (a sum with a `-inf` token) is stored as
        // the largest finite value of its sign, which orders every finite score the same way.
        let map = Self {
            lower: blocks
                .iter()
                .map(|b| b.lower.clamp(f64::MIN, f64::MAX))
                .collect(),
            p: blocks.iter().map(Block::mean).collect(),
            count: blocks.iter().map(|b| b.weight as usize).collect(),
        };
        map.validate()?;
        Ok(map)
    }

    /// Checks the invariants [`IsotonicMap::probability`] and
    /// [`IsotonicMap::lowest_score_reaching`] rely on (for maps read from files).
    pub fn validate(&self) -> Result<(), IsotonicError> {
        let invalid = |m: &str| Err(IsotonicError::Invalid(m.to_owned()));
        if self.lower.is_empty() {
            return invalid("no blocks");
        }
        if self.lower.len() != self.p.len() {
            return invalid("`lower` and `p` differ in length");
        }
        if !self.count.is_empty() && self.count.len() != self.p.len() {
            return invalid("`count` and `p` differ in length");
        }
        if self.lower.iter().any(|x| !x.is_finite()) {
            return invalid("`lower` must be finite");
        }
        if self.p.iter().any(|p| !(0.0..=1.0).contains(p)) {
            return invalid("every `p` must lie in [0, 1]");
        }
        if self.lower.windows(2).any(|w| w[0] >= w[1]) {
            return invalid("`lower` must strictly increase");
        }
        if self.p.windows(2).any(|w| w[0] >= w[1]) {
            return invalid("`p` must strictly increase");
        }
        Ok(())
    }

    /// The calibrated probability of a score: the `p` of the last block whose lower bound is
    /// at most the score. A score below every training score gets the lowest block's `p`
    /// (the map extends flat); NaN stays NaN, so a broken signal never passes a threshold.
    pub fn probability(&self, score: f64) -> f64 {
        if score.is_nan() {
            return f64::NAN;
        }
        let above = self.lower.partition_point(|&x| x <= score);
        self.p
            .get(above.saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    }

    /// The score threshold equivalent to `probability(score) >= min_p`: the lower bound of
    /// the first block with `p >= min_p`. `None` when no block reaches `min_p` (then no
    /// answer is served locally). When the lowest block already reaches it, the answer is
    /// `-inf`: every score qualifies, as the flat extension of the map says.
    pub fn lowest_score_reaching(&self, min_p: f64) -> Option<f64> {
        let first = self.p.iter().position(|&p| p >= min_p)?;
        Some(if first == 0 {
            f64::NEG_INFINITY
        } else {
            self.lower[first]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fit(items: &[(f64, bool)]) -> IsotonicMap {
        IsotonicMap::fit(items).unwrap()
    }

    #[test]
    fn pav_pools_a_violating_pair_by_hand() {
        // Sorted labels 0, 1, 0, 1: the middle pair violates order and pools to 0.5.
        let m = fit(&[(3.0, false), (1.0, false), (4.0, true), (2.0, true)]);
        assert_eq!(m.lower, [1.0, 2.0, 4.0]);
        assert_eq!(m.p, [0.0, 0.5, 1.0]);
        assert_eq!(m.count, [1, 2, 1]);
    }

    #[test]
    fn pav_pools_back_through_several_blocks() {
        // Labels by score: 1, 1, 0, 0, 0, 1: the zeros pull the ones down; the result is the
        // least-squares non-decreasing fit: the first five pool to 2/5, then 1.
        let m = fit(&[
            (1.0, true),
            (2.0, true),
            (3.0, false),
            (4.0, false),
            (5.0, false),
            (6.0, true),
        ]);
        assert_eq!(m.lower, [1.0, 6.0]);
        assert_eq!(m.p, [0.4, 1.0]);
        assert_eq!(m.count, [5, 1]);
    }

    #[test]
    fn equal_scores_share_a_block_and_equal_means_merge() {
        // Score 1 holds one right and one wrong answer; score 2 one wrong: all pool to 1/3.
        let m = fit(&[(1.0, true), (1.0, false), (2.0, false), (3.0, true)]);
        assert_eq!(m.lower, [1.0, 3.0]);
        assert!((m.p[0] - 1.0 / 3.0).abs() < 1e-15);
        assert_eq!(m.p[1], 1.0);
        // Two blocks with the same share are one step, not two.
        let m = fit(&[(1.0, true), (2.0, false), (3.0, true), (4.0, false)]);
        assert_eq!(
            (m.lower.as_slice(), m.p.as_slice()),
            (&[1.0][..], &[0.5][..])
        );
        // -0.0 and 0.0 are one score.
        let m = fit(&[(-0.0, true), (0.0, false)]);
        assert_eq!(m.count, [2]);
    }

    #[test]
    fn probability_is_the_step_below_the_score() {
        let m = fit(&[(3.0, false), (1.0, false), (4.0, true), (2.0, true)]);
        assert_eq!(m.probability(0.0), 0.0); // below the data: flat extension
        assert_eq!(m.probability(1.5), 0.0);
        assert_eq!(m.probability(2.0), 0.5);
        assert_eq!(m.probability(3.99), 0.5);
        assert_eq!(m.probability(100.0), 1.0);
        assert_eq!(m.probability(f64::NEG_INFINITY), 0.0);
        assert!(m.probability(f64::NAN).is_nan());
    }

    #[test]
    fn the_score_threshold_is_exactly_the_probability_threshold() {
        let m = fit(&[
            (f64::NEG_INFINITY, false),
            (-6.0, false),
            (-5.0, true),
            (-4.5, false),
            (-3.0, true),
            (-2.0, false),
            (-1.0, true),
            (-0.5, true),
        ]);
        m.validate().unwrap();
        for min_p in [0.0, 0.1, 0.3, 0.5, 0.6, 0.75, 0.9, 1.0] {
            let threshold = m.lowest_score_reaching(min_p);
            for i in -80..=10 {
                let score = f64::from(i) / 10.0;
                let served = threshold.is_some_and(|t| score >= t);
                assert_eq!(
                    served,
                    m.probability(score) >= min_p,
                    "p {min_p} score {score}"
                );
            }
        }
        assert_eq!(m.lowest_score_reaching(0.0), Some(f64::NEG_INFINITY));
        let all_right = fit(&[(-1.0, true), (-2.0, true)]);
        assert_eq!(
            all_right.lowest_score_reaching(1.0),
            Some(f64::NEG_INFINITY)
        );
        let all_wrong = fit(&[(-1.0, false)]);
        assert_eq!(all_wrong.lowest_score_reaching(0.01), None);
    }

    #[test]
    fn bad_input_and_bad_maps_are_rejected() {
        assert_eq!(IsotonicMap::fit(&[]), Err(IsotonicError::Empty));
        assert_eq!(
            IsotonicMap::fit(&[(f64::NAN, true)]),
            Err(IsotonicError::NanScore)
        );
        let good = fit(&[(1.0, false), (2.0, true)]);
        good.validate().unwrap();
        for broken in [
            IsotonicMap {
                lower: vec![2.0, 1.0],
                ..good.clone()
            },
            IsotonicMap {
                p: vec![1.0, 0.0],
                ..good.clone()
            },
            IsotonicMap {
                p: vec![0.0, 1.5],
                ..good.clone()
            },
            IsotonicMap {
                p: vec![0.0],
                ..good.clone()
            },
            IsotonicMap {
                count: vec![1],
                ..good.clone()
            },
            IsotonicMap {
                lower: vec![],
                p: vec![],
                count: vec![],
            },
        ] {
            assert!(broken.validate().is_err(), "{broken:?}");
        }
    }

    #[test]
    fn a_map_round_trips_through_json() {
        let m = fit(&[(f64::NEG_INFINITY, false), (-1.0, true), (-2.0, false)]);
        // The -inf score is stored as f64::MIN: JSON has no infinities.
        assert_eq!(m.lower[0], f64::MIN);
        let json = serde_json::to_string(&m).unwrap();
        let back: IsotonicMap = serde_json::from_str(&json).unwrap();
        back.validate().unwrap();
        assert_eq!(back, m);
        for s in [f64::NEG_INFINITY, -10.0, -2.0, -1.5, -1.0, 0.0] {
            assert_eq!(back.probability(s), m.probability(s));
        }
    }
}
