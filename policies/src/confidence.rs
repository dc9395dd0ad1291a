//! Token-level confidence: per-token signals, their aggregates, and exact early exit.
//!
//! Sign convention: every aggregate's score is "higher = more confident", so a policy always
//! serves locally when `score >= threshold`. Entropy is therefore negated.
//!
//! Domain of the signals (what the local model produces from raw logits): `logprob <= 0`
//! (may be `-inf`), `entropy >= 0`, `0 <= margin <= 1`. Early exit relies on it: the best any
//! future token can do is `logprob = 0`, `entropy = 0`, `margin = 1`.
//!
//! NaN policy: a NaN in the signal an aggregate reads makes the score NaN, which never passes a
//! threshold, so a broken signal escalates instead of silently serving.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::calibrated::CalibratedRule;
use crate::learned::LearnedRule;
use crate::probe::{HiddenState, ProbeRule};

/// Confidence signals of one generated token, computed from the raw logits before temperature
/// or top-p.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenSignal {
    /// Natural log-probability of the emitted token (`<= 0`).
    pub logprob: f32,
    /// Entropy of the next-token distribution in nats (`>= 0`).
    pub entropy: f32,
    /// Top-1 minus top-2 probability (`0..=1`).
    pub margin: f32,
}

/// How per-token signals are reduced to one confidence score (higher = more confident).
///
/// In configuration: `aggregate = { kind = "quantile", q = 0.1 }`.
///
/// Not `Copy`: a `learned` aggregate shares its fitted rule through an `Arc`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Aggregate {
    /// Mean token log-probability; range `(-inf, 0]`.
    MeanLogprob,
    /// Sum of token log-probabilities, the log-probability of the whole answer; range
    /// `(-inf, 0]`. Length-biased (longer answers score lower), which on SmolLM2-135M helps:
    /// its wrong answers run longer. The default: best cross-validated deferral curve on the
    /// development sets (docs/confidence.md), with [`DEFAULT_THRESHOLD`], and it exits early
    /// without a length bound.
    #[default]
    SumLogprob,
    /// Lowest token log-probability: one unsure token is enough to escalate.
    MinLogprob,
    /// Sum of token log-probabilities divided by `n^alpha` (`n` tokens); range `(-inf, 0]`.
    /// `alpha = 0` is the sum, `alpha = 1` the mean: in between, a long answer pays for its
    /// length less than under the sum, so a right answer with a worked line is not ranked
    /// below a short guess, while a short sure answer still beats a long hesitant one.
    NormalizedLogprob {
        /// Length exponent in `[0, 1]`.
        alpha: f64,
    },
    /// The `q`-quantile of token log-probabilities, by nearest rank (see [`Aggregate::score`]).
    Quantile {
        /// Quantile in `[0, 1]`; 0 is the minimum, 1 the maximum.
        q: f64,
    },
    /// Fraction of tokens whose log-probability is `>= bound`; range `[0, 1]`.
    FractionAbove {
        /// Log-probability bound (finite).
        bound: f64,
    },
    /// NEGATED mean entropy, so that higher is more confident; range `(-inf, 0]`.
    MeanEntropy,
    /// Mean top-1 minus top-2 margin; range `[0, 1]`.
    MeanMargin,
    /// A rule fitted by `cascade calibrate` (see [`crate::learned`]): the probability that the
    /// answer is correct; range `[0, 1]`. Written as `{ kind = "learned", name = "..." }`; the
    /// gateway loads the rule file and attaches it with [`crate::learned::resolve_learned`]
    /// before validation, which rejects a rule that is not attached.
    Learned {
        /// The rule's name (its file is `<name>.json`).
        name: String,
        /// The fitted rule, attached at configuration load.
        #[serde(skip)]
        rule: Option<Arc<LearnedRule>>,
    },
    /// A fixed aggregate calibrated by `cascade calibrate` (see [`crate::calibrated`]): its
    /// score mapped by isotonic regression to the probability that the answer is correct;
    /// range `[0, 1]`. Written as `{ kind = "calibrated", name = "..." }`, usually with
    /// `min_p_correct`; attached like a learned rule, with
    /// [`crate::calibrated::resolve_calibrated`].
    Calibrated {
        /// The rule's name (its file is `<name>.json`).
        name: String,
        /// The fitted rule, attached at configuration load.
        #[serde(skip)]
        rule: Option<Arc<CalibratedRule>>,
    },
    /// A hidden-state probe fitted by `cascade calibrate --probe` (see [`crate::probe`]): the
    /// probability that the answer is correct from the local model's own hidden states and
    /// log-probs; range `[0, 1]`. Written as `{ kind = "probe", name = "..." }`, usually with
    /// `min_p_correct`; attached like a learned rule, with [`crate::probe::resolve_probe`].
    /// Scored only where the engine returns hidden states ([`Aggregate::score_with`]);
    /// elsewhere the score is NaN and the request escalates.
    Probe {
        /// The rule's name (its file is `<name>.json`).
        name: String,
        /// The fitted rule, attached at configuration load.
        #[serde(skip)]
        rule: Option<Arc<ProbeRule>>,
    },
}

/// The threshold measured to go with the default aggregate (`sum_logprob`): serve locally when
/// the whole answer has probability >= e^-3.4 (about 3%). The mean of the thresholds chosen
/// on the training folds of a 5-fold cross-validation on the development sets with
/// SmolLM2-135M (-3.37, docs/confidence.md); recalibrate with `cascade calibrate` for another
/// model or other traffic.
pub const DEFAULT_THRESHOLD: f64 = -3.4;

/// Why aggregate parameters were rejected.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum AggregateError {
    /// `q` outside `[0, 1]` or NaN.
    #[error("quantile q must be within [0, 1], got {0}")]
    QuantileOutOfRange(f64),
    /// `alpha` outside `[0, 1]` or NaN.
    #[error("normalized_logprob alpha must be within [0, 1], got {0}")]
    AlphaOutOfRange(f64),
    /// `bound` NaN or infinite.
    #[error("fraction_above bound must be finite, got {0}")]
    BoundNotFinite(f64),
    /// A `learned` aggregate whose rule file was not loaded and attached.
    #[error("learned rule is not loaded (the gateway attaches it from its file at start-up)")]
    LearnedNotLoaded,
    /// A `calibrated` aggregate whose rule file was not loaded and attached.
    #[error("calibrated rule is not loaded (the gateway attaches it from its file at start-up)")]
    CalibratedNotLoaded,
    /// A `probe` aggregate whose rule file was not loaded and attached.
    #[error("probe rule is not loaded (the gateway attaches it from its file at start-up)")]
    ProbeNotLoaded,
}

/// Largest count that converts to f64 exactly; above it the fraction bound is not tracked.
const EXACT_COUNT: usize = 1 << 53;

impl Aggregate {
    /// Checks the parameters; run at configuration time.
    pub fn validate(&self) -> Result<(), AggregateError> {
        match *self {
            Self::Quantile { q } if !(0.0..=1.0).contains(&q) => {
                Err(AggregateError::QuantileOutOfRange(q))
            }
            Self::FractionAbove { bound } if !bound.is_finite() => {
                Err(AggregateError::BoundNotFinite(bound))
            }
            Self::NormalizedLogprob { alpha } if !(0.0..=1.0).contains(&alpha) => {
                Err(AggregateError::AlphaOutOfRange(alpha))
            }
            Self::Learned { rule: None, .. } => Err(AggregateError::LearnedNotLoaded),
            Self::Calibrated { rule: None, .. } => Err(AggregateError::CalibratedNotLoaded),
            Self::Probe { rule: None, .. } => Err(AggregateError::ProbeNotLoaded),
            _ => Ok(()),
        }
    }

    /// The closed range every score lies in, used to reject thresholds of the wrong sign
    /// (a positive threshold on a log-probability aggregate would escalate everything).
    pub fn score_range(&self) -> (f64, f64) {
        match self {
            Self::FractionAbove { .. }
            | Self::MeanMargin
            | Self::Learned { .. }
            | Self::Calibrated { .. }
            | Self::Probe { .. } => (0.0, 1.0),
            _ => (f64::NEG_INFINITY, 0.0),
        }
    }

    /// Stable name for metrics and headers: `mean_logprob`, `quantile_0.1`,
    /// `fraction_above_-1.5`, ...
    pub fn name(&self) -> String {
        match self {
            Self::MeanLogprob => "mean_logprob".to_owned(),
            Self::SumLogprob => "sum_logprob".to_owned(),
            Self::MinLogprob => "min_logprob".to_owned(),
            Self::Quantile { q } => format!("quantile_{q}"),
            Self::NormalizedLogprob { alpha } => format!("normalized_logprob_{alpha}"),
            Self::FractionAbove { bound } => format!("fraction_above_{bound}"),
            Self::MeanEntropy => "mean_entropy".to_owned(),
            Self::MeanMargin => "mean_margin".to_owned(),
            Self::Learned { name, .. } => format!("learned_{name}"),
            Self::Calibrated { name, .. } => format!("calibrated_{name}"),
            Self::Probe { name, .. } => format!("probe_{name}"),
        }
    }

    /// Whether the score is a probability that the answer is correct (`learned`,
    /// `calibrated`, `probe`): the aggregates a `min_p_correct` applies to.
    pub fn is_probability(&self) -> bool {
        matches!(
            self,
            Self::Learned { .. } | Self::Calibrated { .. } | Self::Probe { .. }
        )
    }

    /// Whether the score reads the local model's hidden states (a `probe`): the gateway then
    /// passes them to [`Aggregate::score_with`].
    pub fn needs_hidden_state(&self) -> bool {
        matches!(self, Self::Probe { .. })
    }

    /// [`Aggregate::score`] with the answer's hidden states, where the engine returned them:
    /// a `probe` scores from them (NaN without them, so the request escalates); every other
    /// aggregate ignores them.
    pub fn score_with(
        &self,
        tokens: &[TokenSignal],
        hidden: Option<&HiddenState<'_>>,
    ) -> Option<f64> {
        match self {
            Self::Probe { rule, .. } => {
                if tokens.is_empty() {
                    return None;
                }
                match (rule, hidden) {
                    (Some(rule), Some(hidden)) => rule.probability(tokens, hidden),
                    _ => Some(f64::NAN),
                }
            }
            _ => self.score(tokens),
        }
    }

    /// The aggregate whose [`Aggregate::name`] is `name` (`mean_logprob`, `quantile_0.1`,
    /// `fraction_above_-2`, ...): the one parser of rule names, for reports, `cascade
    /// calibrate --rule` and the configuration. `None` for an unknown name, an invalid
    /// parameter, or a learned rule (which needs its file).
    pub fn from_name(name: &str) -> Option<Self> {
        let aggregate = match name {
            "mean_logprob" => Self::MeanLogprob,
            "sum_logprob" => Self::SumLogprob,
            "min_logprob" => Self::MinLogprob,
            "mean_entropy" => Self::MeanEntropy,
            "mean_margin" => Self::MeanMargin,
            other => {
                if let Some(q) = other.strip_prefix("quantile_") {
                    Self::Quantile { q: q.parse().ok()? }
                } else if let Some(alpha) = other.strip_prefix("normalized_logprob_") {
                    Self::NormalizedLogprob {
                        alpha: alpha.parse().ok()?,
                    }
                } else if let Some(bound) = other.strip_prefix("fraction_above_") {
                    Self::FractionAbove {
                        bound: bound.parse().ok()?,
                    }
                } else {
                    return None;
                }
            }
        };
        aggregate.validate().ok().map(|()| aggregate)
    }

    /// The confidence score of a complete answer; `None` when there are no tokens.
    ///
    /// - `Quantile { q }` uses the nearest rank: the `max(1, ceil(q * n))`-th smallest
    ///   log-probability (no interpolation, so the score is always an observed value and early
    ///   exit stays exact).
    /// - `MeanEntropy` is `-(sum of entropies) / n`.
    /// - `MeanMargin` is computed as `1 - mean(1 - margin)`, equal to the mean margin up to
    ///   rounding; this form lets early exit be exact in floating point.
    /// - `Learned` and `Calibrated` are the rule's probability; NaN when the rule is not
    ///   attached.
    /// - `Probe` is NaN here: it needs the hidden states ([`Aggregate::score_with`]).
    pub fn score(&self, tokens: &[TokenSignal]) -> Option<f64> {
        if tokens.is_empty() {
            return None;
        }
        if let Self::Learned { rule, .. } = self {
            return Some(
                rule.as_ref()
                    .and_then(|r| r.probability(tokens))
                    .unwrap_or(f64::NAN),
            );
        }
        if let Self::Calibrated { rule, .. } = self {
            return match rule {
                Some(r) => r.probability(tokens),
                None => Some(f64::NAN),
            };
        }
        if tokens.iter().any(|t| self.signal(t).is_nan()) {
            return Some(f64::NAN);
        }
        let n = tokens.len();
        Some(match *self {
            // Returned above.
            Self::Learned { .. } | Self::Calibrated { .. } | Self::Probe { .. } => f64::NAN,
            Self::MeanLogprob | Self::MeanEntropy | Self::MeanMargin => {
                self.offset() - self.penalty_sum(tokens) / n as f64
            }
            Self::SumLogprob => tokens.iter().map(|t| f64::from(t.logprob)).sum(),
            Self::NormalizedLogprob { alpha } => normalized_sum(tokens, alpha, n),
            Self::MinLogprob => min_logprob(tokens),
            Self::Quantile { q } => kth_smallest_logprob(tokens, nearest_rank(q, n) - 1),
            Self::FractionAbove { bound } => count_at_least(tokens, bound) as f64 / n as f64,
        })
    }

    /// Early exit with no known limit on further tokens: true only when no continuation, of
    /// any length, can bring the final score to `>= threshold`.
    ///
    /// Without a length limit, only `min_logprob`, `sum_logprob` and `quantile` with `q = 0`
    /// can settle at a realistic threshold; prefer [`Aggregate::settled_below_within`] with
    /// the request's remaining `max_tokens`, which also settles the means and quantiles.
    pub fn settled_below(&self, tokens_so_far: &[TokenSignal], threshold: f64) -> bool {
        self.settled_below_within(tokens_so_far, threshold, usize::MAX)
    }

    /// Early exit when at most `max_more_tokens` further tokens can follow: true only when no
    /// continuation of up to that many in-domain tokens (including none) can bring the final
    /// score to `>= threshold`.
    ///
    /// Exact in floating point, not just in real arithmetic: when it returns false, the best
    /// continuation (the limit of tokens with `logprob = 0`, `entropy = 0`, `margin = 1`, or
    /// none for `sum`/`min`) scores `>= threshold` through [`Aggregate::score`]. Exceptions
    /// that answer a conservative `false`: tokens so far outside the signal domain,
    /// `fraction_above` past 2^53 tokens, `learned` (its features move in opposite
    /// directions, so no cheap bound is exact) and `probe` (its hidden states are known only at
    /// the end). A NaN so far answers true (the score stays NaN).
    /// `calibrated` is exact through its base aggregate (its map is monotone); not attached,
    /// it answers false.
    pub fn settled_below_within(
        &self,
        tokens_so_far: &[TokenSignal],
        threshold: f64,
        max_more_tokens: usize,
    ) -> bool {
        if let Self::Calibrated { rule, .. } = self {
            return rule.as_ref().is_some_and(|r| {
                r.settled_below_within(tokens_so_far, threshold, max_more_tokens)
            });
        }
        if tokens_so_far.iter().any(|t| self.signal(t).is_nan()) {
            return true;
        }
        if matches!(self, Self::Learned { .. } | Self::Probe { .. })
            || !tokens_so_far.iter().all(|t| self.in_domain(t))
        {
            return false;
        }
        let n = tokens_so_far.len();
        let max_len = n.saturating_add(max_more_tokens);
        if max_len == 0 {
            // No token can ever arrive: there will be no score at all.
            return true;
        }
        let best = match *self {
            // Returned above.
            Self::Learned { .. } | Self::Calibrated { .. } | Self::Probe { .. } => return false,
            // Each future token adds a penalty >= 0 and the divisor grows: the best final
            // score has the longest run of zero-penalty tokens.
            Self::MeanLogprob | Self::MeanEntropy | Self::MeanMargin => {
                self.offset() - self.penalty_sum(tokens_so_far) / max_len as f64
            }
            // Future log-probs are <= 0: sum and min can only fall, so stop now.
            Self::SumLogprob => tokens_so_far.iter().map(|t| f64::from(t.logprob)).sum(),
            // The sum so far can only fall, and a longer answer divides it by more: the best
            // continuation is the longest run of logprob-0 tokens. The sum of those is
            // bit-identical to the sum so far, and correctly rounded division by a larger
            // divisor never moves a non-positive number down, so this is exact.
            Self::NormalizedLogprob { alpha } => normalized_sum(tokens_so_far, alpha, max_len),
            Self::MinLogprob if n == 0 => 0.0,
            Self::MinLogprob => min_logprob(tokens_so_far),
            // The rank grows with the length, and the best future tokens (logprob 0) sort
            // above everything so far; the longest continuation is the best.
            Self::Quantile { q } => {
                let rank = nearest_rank(q, max_len);
                if rank > n {
                    0.0
                } else {
                    kth_smallest_logprob(tokens_so_far, rank - 1)
                }
            }
            Self::FractionAbove { bound } => {
                let above = count_at_least(tokens_so_far, bound);
                if bound > 0.0 {
                    // No future token can count; more tokens only dilute.
                    if n == 0 {
                        0.0
                    } else {
                        above as f64 / n as f64
                    }
                } else if max_len > EXACT_COUNT {
                    1.0
                } else {
                    (above + (max_len - n)) as f64 / max_len as f64
                }
            }
        };
        best < threshold
    }

    /// The per-token value this aggregate reads, as f64.
    fn signal(&self, t: &TokenSignal) -> f64 {
        match self {
            Self::MeanEntropy => f64::from(t.entropy),
            Self::MeanMargin => f64::from(t.margin),
            _ => f64::from(t.logprob),
        }
    }

    /// Whether a token's signal lies in the domain early exit reasons about.
    fn in_domain(&self, t: &TokenSignal) -> bool {
        let v = self.signal(t);
        match self {
            Self::MeanEntropy => v >= 0.0,
            Self::MeanMargin => (0.0..=1.0).contains(&v),
            _ => v <= 0.0,
        }
    }

    /// Mean aggregates are `offset - mean(penalty)` with penalty >= 0 and 0 for a perfect token.
    fn offset(&self) -> f64 {
        match self {
            Self::MeanMargin => 1.0,
            _ => 0.0,
        }
    }

    /// Sum of penalties, in token order (the order matters for exact early exit).
    fn penalty_sum(&self, tokens: &[TokenSignal]) -> f64 {
        tokens
            .iter()
            .map(|t| match self {
                Self::MeanEntropy => f64::from(t.entropy),
                Self::MeanMargin => 1.0 - f64::from(t.margin),
                _ => -f64::from(t.logprob),
            })
            .sum()
    }
}

/// 1-based nearest rank `max(1, ceil(q * len))`, capped at `len`; non-decreasing in `len`.
fn nearest_rank(q: f64, len: usize) -> usize {
    // Float-to-int `as` saturates, and NaN becomes 0, which the max turns into rank 1.
    let rank = (q * len as f64).ceil() as usize;
    rank.clamp(1, len.max(1))
}

/// The sum of the log-probabilities over `len^alpha`, summed in token order as the sum is.
fn normalized_sum(tokens: &[TokenSignal], alpha: f64, len: usize) -> f64 {
    let sum: f64 = tokens.iter().map(|t| f64::from(t.logprob)).sum();
    sum / (len.max(1) as f64).powf(alpha)
}

/// Smallest log-probability (callers ensure at least one token and no NaN).
fn min_logprob(tokens: &[TokenSignal]) -> f64 {
    tokens
        .iter()
        .map(|t| f64::from(t.logprob))
        .fold(f64::INFINITY, f64::min)
}

/// The `index`-th smallest log-probability (0-based), in O(n).
fn kth_smallest_logprob(tokens: &[TokenSignal], index: usize) -> f64 {
    let mut values: Vec<f64> = tokens.iter().map(|t| f64::from(t.logprob)).collect();
    if values.is_empty() {
        return f64::NAN;
    }
    let index = index.min(values.len() - 1);
    *values.select_nth_unstable_by(index, f64::total_cmp).1
}

/// How many tokens have `logprob >= bound`.
fn count_at_least(tokens: &[TokenSignal], bound: f64) -> usize {
    tokens
        .iter()
        .filter(|t| f64::from(t.logprob) >= bound)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(values: &[f32]) -> Vec<TokenSignal> {
        values
            .iter()
            .map(|&logprob| TokenSignal {
                logprob,
                entropy: 0.0,
                margin: 1.0,
            })
            .collect()
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    const ALL: [Aggregate; 9] = [
        Aggregate::MeanLogprob,
        Aggregate::SumLogprob,
        Aggregate::MinLogprob,
        Aggregate::Quantile { q: 0.0 },
        Aggregate::Quantile { q: 0.25 },
        Aggregate::Quantile { q: 1.0 },
        Aggregate::FractionAbove { bound: -1.0 },
        Aggregate::MeanEntropy,
        Aggregate::MeanMargin,
    ];

    #[test]
    fn rule_names_parse_back_to_their_aggregate() {
        for a in [
            Aggregate::MeanLogprob,
            Aggregate::SumLogprob,
            Aggregate::MinLogprob,
            Aggregate::Quantile { q: 0.1 },
            Aggregate::FractionAbove { bound: -2.0 },
            Aggregate::MeanEntropy,
            Aggregate::MeanMargin,
        ] {
            assert_eq!(
                Aggregate::from_name(&a.name()),
                Some(a.clone()),
                "{}",
                a.name()
            );
        }
        for bad in [
            "quantile_1.5",
            "quantile_NaN",
            "fraction_above_inf",
            "learned_x",
            "median",
        ] {
            assert_eq!(Aggregate::from_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_aggregate_scores_none_without_tokens() {
        for agg in ALL {
            assert_eq!(agg.score(&[]), None, "{}", agg.name());
        }
    }

    #[test]
    fn logprob_aggregates_on_hand_computed_input() {
        let t = lp(&[-0.5, -2.0, -0.25, -1.25]);
        assert!(close(Aggregate::MeanLogprob.score(&t), -1.0));
        assert!(close(Aggregate::SumLogprob.score(&t), -4.0));
        assert!(close(Aggregate::MinLogprob.score(&t), -2.0));
        // Sorted: -2.0, -1.25, -0.5, -0.25. Nearest rank = max(1, ceil(q * 4)).
        assert!(close(Aggregate::Quantile { q: 0.0 }.score(&t), -2.0));
        assert!(close(Aggregate::Quantile { q: 0.25 }.score(&t), -2.0));
        assert!(close(Aggregate::Quantile { q: 0.26 }.score(&t), -1.25));
        assert!(close(Aggregate::Quantile { q: 0.5 }.score(&t), -1.25));
        assert!(close(Aggregate::Quantile { q: 0.75 }.score(&t), -0.5));
        assert!(close(Aggregate::Quantile { q: 1.0 }.score(&t), -0.25));
        // logprob >= bound, inclusive.
        assert!(close(
            Aggregate::FractionAbove { bound: -0.5 }.score(&t),
            0.5
        ));
        assert!(close(
            Aggregate::FractionAbove { bound: -1.25 }.score(&t),
            0.75
        ));
        assert!(close(
            Aggregate::FractionAbove { bound: 0.0 }.score(&t),
            0.0
        ));
    }

    #[test]
    fn mean_entropy_is_negated_so_higher_is_more_confident() {
        let t = [
            TokenSignal {
                logprob: 0.0,
                entropy: 1.0,
                margin: 0.25,
            },
            TokenSignal {
                logprob: 0.0,
                entropy: 3.0,
                margin: 0.75,
            },
        ];
        assert!(close(Aggregate::MeanEntropy.score(&t), -2.0));
        assert!(close(Aggregate::MeanMargin.score(&t), 0.5));
        let calmer = [TokenSignal {
            logprob: 0.0,
            entropy: 0.5,
            margin: 0.9,
        }];
        assert!(Aggregate::MeanEntropy.score(&calmer) > Aggregate::MeanEntropy.score(&t));
    }

    #[test]
    fn nan_signal_scores_nan_and_is_settled() {
        let t = lp(&[-0.1, f32::NAN]);
        for agg in ALL
            .into_iter()
            .filter(|a| !matches!(a, Aggregate::MeanEntropy | Aggregate::MeanMargin))
        {
            assert!(agg.score(&t).is_some_and(f64::is_nan), "{}", agg.name());
            assert!(agg.settled_below(&t, -100.0), "{}", agg.name());
        }
    }

    #[test]
    fn normalized_logprob_lies_between_sum_and_mean_by_hand() {
        let t = lp(&[-1.0, -2.0, -1.0, -0.5]);
        let sum = -4.5;
        let at = |alpha| Aggregate::NormalizedLogprob { alpha }.score(&t);
        assert!(close(at(0.0), sum));
        assert!(close(at(1.0), sum / 4.0));
        assert!(close(at(0.5), sum / 2.0));
        // A right answer of 8 sure tokens against a wrong 2-token guess: the sum prefers the
        // guess, alpha 0.5 does not.
        let long = lp(&[-0.3; 8]);
        let guess = lp(&[-1.0, -0.5]);
        let sum_of = |t: &[TokenSignal]| Aggregate::SumLogprob.score(t);
        assert!(sum_of(&long) < sum_of(&guess));
        let half = Aggregate::NormalizedLogprob { alpha: 0.5 };
        assert!(half.score(&long) > half.score(&guess));
        assert_eq!(
            Aggregate::from_name("normalized_logprob_0.5"),
            Some(half.clone())
        );
        assert_eq!(half.name(), "normalized_logprob_0.5");
        assert_eq!(
            Aggregate::NormalizedLogprob { alpha: 1.5 }.validate(),
            Err(AggregateError::AlphaOutOfRange(1.5))
        );
        assert!(Aggregate::from_name("normalized_logprob_-1").is_none());
        // Unbounded, it never settles at a realistic threshold: length can lift it to 0.
        assert!(!half.settled_below(&lp(&[-9.0]), -0.1));
        assert!(half.settled_below_within(&lp(&[-9.0]), -3.0, 3));
        assert!(!half.settled_below_within(&lp(&[-9.0]), -3.0, 8));
    }

    #[test]
    fn names_are_stable() {
        let names: Vec<String> = ALL.iter().map(Aggregate::name).collect();
        assert_eq!(
            names,
            [
                "mean_logprob",
                "sum_logprob",
                "min_logprob",
                "quantile_0",
                "quantile_0.25",
                "quantile_1",
                "fraction_above_-1",
                "mean_entropy",
                "mean_margin"
            ]
        );
    }

    #[test]
    fn deserializes_tagged_snake_case_and_validates_parameters() {
        let q: Aggregate =
            serde_json::from_value(serde_json::json!({"kind": "quantile", "q": 0.1})).unwrap();
        assert_eq!(q, Aggregate::Quantile { q: 0.1 });
        let m: Aggregate =
            serde_json::from_value(serde_json::json!({"kind": "mean_entropy"})).unwrap();
        assert_eq!(m, Aggregate::MeanEntropy);
        assert_eq!(Aggregate::default(), Aggregate::SumLogprob);
        assert!(Aggregate::Quantile { q: 1.5 }.validate().is_err());
        assert!(Aggregate::Quantile { q: f64::NAN }.validate().is_err());
        assert!(Aggregate::Quantile { q: 0.0 }.validate().is_ok());
        assert!(Aggregate::FractionAbove {
            bound: f64::NEG_INFINITY
        }
        .validate()
        .is_err());
        assert!(Aggregate::FractionAbove { bound: -2.0 }.validate().is_ok());
    }

    #[test]
    fn min_settles_on_first_token_under_threshold_and_not_before() {
        let agg = Aggregate::MinLogprob;
        assert!(
            !agg.settled_below(&lp(&[-0.5, -1.0]), -1.0),
            "equal can still pass"
        );
        assert!(agg.settled_below(&lp(&[-0.5, -1.01]), -1.0));
        assert!(!agg.settled_below(&[], -1.0));
    }

    #[test]
    fn sum_settles_once_the_sum_is_under_threshold() {
        let agg = Aggregate::SumLogprob;
        assert!(!agg.settled_below(&lp(&[-1.0, -1.0]), -2.0));
        assert!(agg.settled_below(&lp(&[-1.0, -1.5]), -2.0));
    }

    #[test]
    fn means_never_settle_unbounded_at_a_reachable_threshold() {
        // A long enough run of perfect tokens lifts any mean back over -0.001.
        let t = lp(&[-50.0, -50.0]);
        assert!(!Aggregate::MeanLogprob.settled_below(&t, -0.001));
        assert!(!Aggregate::Quantile { q: 0.5 }.settled_below(&t, -0.001));
        assert!(!Aggregate::FractionAbove { bound: -1.0 }.settled_below(&t, 0.99));
        // But a positive threshold on a log-prob mean is unreachable.
        assert!(Aggregate::MeanLogprob.settled_below(&t, 0.5));
    }

    #[test]
    fn bounded_mean_settles_when_even_perfect_remaining_tokens_cannot_lift_it() {
        // Sum -6 over 2 tokens; with 4 more perfect tokens the best mean is -6 / 6 = -1.
        let t = lp(&[-3.0, -3.0]);
        let agg = Aggregate::MeanLogprob;
        assert!(
            !agg.settled_below_within(&t, -1.0, 4),
            "-1 is reachable exactly"
        );
        assert!(
            agg.settled_below_within(&t, -1.0, 3),
            "best is -6 / 5 = -1.2"
        );
        assert!(agg.settled_below_within(&t, -0.999, 4));
    }

    #[test]
    fn bounded_quantile_and_fraction_settle_exactly() {
        // Sorted so far: -3, -2. Median by nearest rank over 2 + r tokens.
        let t = lp(&[-2.0, -3.0]);
        let median = Aggregate::Quantile { q: 0.5 };
        // r = 1: rank ceil(1.5) = 2 -> -2.0 at best.
        assert!(!median.settled_below_within(&t, -2.0, 1));
        assert!(median.settled_below_within(&t, -1.9, 1));
        // r = 2: rank 2 of 4 -> still -2.0; r = 3: rank 3 of 5 -> a perfect token, 0.0.
        assert!(median.settled_below_within(&t, -1.9, 2));
        assert!(!median.settled_below_within(&t, -1.9, 3));

        // 1 of 2 above -2.5; with r more perfect tokens: (1 + r) / (2 + r).
        let frac = Aggregate::FractionAbove { bound: -2.5 };
        assert!(!frac.settled_below_within(&t, 0.75, 2));
        assert!(frac.settled_below_within(&t, 0.75, 1));
        // A positive bound can never be met by a log-probability.
        let never = Aggregate::FractionAbove { bound: 0.5 };
        assert!(never.settled_below_within(&t, 0.1, 1000));
        assert!(!never.settled_below_within(&t, 0.0, 1000));
    }

    #[test]
    fn settled_with_no_tokens_and_no_room_means_there_will_be_no_score() {
        for agg in ALL {
            assert!(agg.settled_below_within(&[], -1e9, 0), "{}", agg.name());
            assert!(!agg.settled_below_within(&[], -1e9, 1), "{}", agg.name());
        }
    }

    #[test]
    fn out_of_domain_tokens_never_settle_early() {
        let t = lp(&[0.5, -10.0]);
        assert!(!Aggregate::MeanLogprob.settled_below_within(&t, -0.1, 0));
        let bad_margin = [TokenSignal {
            logprob: 0.0,
            entropy: 0.0,
            margin: 1.5,
        }];
        assert!(!Aggregate::MeanMargin.settled_below_within(&bad_margin, 2.0, 0));
    }

    /// Deterministic xorshift so the property test needs no extra dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32
        }
        fn token(&mut self) -> TokenSignal {
            let u = self.unit();
            TokenSignal {
                // A quarter of tokens are perfect, to exercise ties with the best continuation.
                logprob: if self.next().trailing_zeros() >= 2 {
                    0.0
                } else {
                    -4.0 * u * u
                },
                entropy: 3.0 * self.unit(),
                margin: self.unit(),
            }
        }
        fn below(&mut self, n: u64) -> usize {
            (self.next() % n) as usize
        }
    }

    /// The best continuation of exactly `k` tokens for an aggregate over the signal domain.
    fn best_continuation(k: usize) -> Vec<TokenSignal> {
        vec![
            TokenSignal {
                logprob: 0.0,
                entropy: 0.0,
                margin: 1.0
            };
            k
        ]
    }

    #[test]
    fn settled_below_within_is_exact_in_both_directions() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let extra = [
            Aggregate::Quantile { q: 0.1 },
            Aggregate::Quantile { q: 0.5 },
            Aggregate::Quantile { q: 0.9 },
            Aggregate::FractionAbove { bound: -0.5 },
            Aggregate::NormalizedLogprob { alpha: 0.25 },
            Aggregate::NormalizedLogprob { alpha: 0.5 },
            Aggregate::NormalizedLogprob { alpha: 1.0 },
        ];
        let aggregates: Vec<Aggregate> = ALL.into_iter().chain(extra).collect();
        for _ in 0..3000 {
            let n = rng.below(12);
            let r = rng.below(12);
            let prefix: Vec<TokenSignal> = (0..n).map(|_| rng.token()).collect();
            for agg in &aggregates {
                // Thresholds at, just around and away from real scores exercise the ties.
                let mut full = prefix.clone();
                full.extend(best_continuation(r));
                let reference = agg.score(&full).unwrap_or(-1.0);
                let thresholds = [
                    reference,
                    reference + 1e-9,
                    reference - 1e-9,
                    f64::from(rng.unit()) - 1.0,
                ];
                for threshold in thresholds {
                    let settled = agg.settled_below_within(&prefix, threshold, r);
                    // Best over every continuation length 0..=r (exhaustive: the best token
                    // is known, so this covers every continuation's upper bound).
                    let reachable = (0..=r).any(|k| {
                        let mut seq = prefix.clone();
                        seq.extend(best_continuation(k));
                        agg.score(&seq).is_some_and(|s| s >= threshold)
                    });
                    assert_eq!(
                        settled,
                        !reachable,
                        "{} prefix={prefix:?} r={r} threshold={threshold}",
                        agg.name()
                    );
                    // And no random continuation beats a settled verdict.
                    if settled {
                        let k = rng.below(r as u64 + 1);
                        let mut seq = prefix.clone();
                        seq.extend((0..k).map(|_| rng.token()));
                        assert!(
                            !agg.score(&seq).is_some_and(|s| s >= threshold),
                            "{}",
                            agg.name()
                        );
                    }
                }
            }
        }
    }
}
