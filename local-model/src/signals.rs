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
    // The model thread runs this once per sequence per step, over the whole
    // vocabulary (262,144 logits for Gemma 3): with the C library's `exp` per
    // value it took about a third of a batched decode step there.
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        if let Some(signals) = vectorized::signals(simd, logits, token) {
            return signals;
        }
    }
    signals_scalar(logits, token)
}

/// [`signals_from_logits`] one value at a time, skipping non-finite logits.
fn signals_scalar(logits: &[f32], token: usize) -> Signals {
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
    let mut top = TopTwo::default();
    for &l in logits {
        let l = l as f64;
        if !l.is_finite() {
            continue;
        }
        let e = (l - max).exp();
        sum += e;
        weighted += e * (l - max);
        top.push(l);
    }
    finish(logits, token, max, sum, weighted, top)
}

/// The two largest values seen, counting repeats (the top two of `[3, 3,
/// 1]` are 3 and 3).
#[derive(Debug, Clone, Copy)]
struct TopTwo {
    first: f64,
    second: f64,
}

impl Default for TopTwo {
    fn default() -> Self {
        Self {
            first: f64::NEG_INFINITY,
            second: f64::NEG_INFINITY,
        }
    }
}

impl TopTwo {
    fn push(&mut self, v: f64) {
        if v > self.first {
            self.second = self.first;
            self.first = v;
        } else if v > self.second {
            self.second = v;
        }
    }
}

/// The signals from the softmax's sums: `max` the largest logit, `sum` =
/// Σ e^(l - max), `weighted` = Σ e^(l - max)·(l - max).
fn finish(logits: &[f32], token: usize, max: f64, sum: f64, weighted: f64, top: TopTwo) -> Signals {
    let log_sum = sum.ln();
    let lse = max + log_sum;
    let token_logit = logits.get(token).copied().unwrap_or(f32::NEG_INFINITY) as f64;
    let logprob = (token_logit - lse).min(0.0);
    // H = -Σ p (l - lse) = lse - Σ p l = log_sum - Σ p (l - max)
    let entropy = (log_sum - weighted / sum).max(0.0);
    let p1 = (top.first - lse).exp();
    let p2 = if top.second.is_finite() {
        (top.second - lse).exp()
    } else {
        0.0
    };
    Signals {
        logprob: logprob as f32,
        entropy: entropy as f32,
        margin: (p1 - p2).max(0.0) as f32,
    }
}

/// Eight logits per instruction on AVX2/FMA: the maximum, finiteness and
/// the top two per lane in one pass; `e^(l - max)` in F32 (`simd_exp`,
/// within 2 ulp) summed in F64 in a second. Differs from the scalar path by
/// the F32 `exp` only: about 1e-7 relative in the sums.
#[cfg(target_arch = "x86_64")]
mod vectorized {
    use pulp::bytemuck;
    use pulp::x86::V3;
    use std::arch::x86_64::{__m256, __m256d};

    use super::{finish, Signals, TopTwo};
    use crate::engine::simd_exp::exp;

    const LANES: usize = 8;

    /// `None` when a logit is not finite (the scalar path skips those).
    pub(super) fn signals(simd: V3, logits: &[f32], token: usize) -> Option<Signals> {
        simd.vectorize(
            #[inline(always)]
            || {
                let (chunks, tail) = logits.split_at(logits.len() - logits.len() % LANES);
                let chunks: &[[f32; LANES]] = bytemuck::cast_slice(chunks);
                let tail_finite = tail.iter().all(|v| v.is_finite());
                let lowest = simd.avx._mm256_set1_ps(f32::NEG_INFINITY);
                let (mut top1, mut top2) = (lowest, lowest);
                let mut not_finite = simd.avx._mm256_setzero_ps();
                for chunk in chunks {
                    let v: __m256 = bytemuck::cast(*chunk);
                    // v - v is NaN exactly where v is infinite or NaN.
                    let d = simd.avx._mm256_sub_ps(v, v);
                    not_finite = simd.avx._mm256_or_ps(
                        not_finite,
                        simd.avx._mm256_cmp_ps::<3>(d, d), // unordered
                    );
                    top2 = simd
                        .avx
                        ._mm256_max_ps(top2, simd.avx._mm256_min_ps(top1, v));
                    top1 = simd.avx._mm256_max_ps(top1, v);
                }
                if simd.avx._mm256_movemask_ps(not_finite) != 0 || !tail_finite {
                    return None;
                }
                let lanes: [f32; 2 * LANES] = bytemuck::cast([top1, top2]);
                let mut top = TopTwo::default();
                for &v in lanes.iter().chain(tail) {
                    top.push(f64::from(v));
                }
                let max = top.first;
                if !max.is_finite() {
                    return None;
                }
                let max32 = simd.avx._mm256_set1_ps(max as f32);
                let zero = simd.avx._mm256_setzero_pd();
                let (mut sum, mut weighted) = ([zero; 2], [zero; 2]);
                for chunk in chunks {
                    let shifted = simd.avx._mm256_sub_ps(bytemuck::cast(*chunk), max32);
                    let e = exp(simd, shifted);
                    let ew = simd.avx._mm256_mul_ps(e, shifted);
                    for (half, (e, ew)) in [
                        (
                            simd.avx._mm256_castps256_ps128(e),
                            simd.avx._mm256_castps256_ps128(ew),
                        ),
                        (
                            simd.avx._mm256_extractf128_ps::<1>(e),
                            simd.avx._mm256_extractf128_ps::<1>(ew),
                        ),
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        sum[half] = simd
                            .avx
                            ._mm256_add_pd(sum[half], simd.avx._mm256_cvtps_pd(e));
                        weighted[half] = simd
                            .avx
                            ._mm256_add_pd(weighted[half], simd.avx._mm256_cvtps_pd(ew));
                    }
                }
                let total = |v: [__m256d; 2]| -> f64 {
                    let lanes: [f64; 8] = bytemuck::cast(v);
                    lanes.iter().sum()
                };
                let (mut sum, mut weighted) = (total(sum), total(weighted));
                for &l in tail {
                    let shifted = f64::from(l) - max;
                    let e = shifted.exp();
                    sum += e;
                    weighted += e * shifted;
                }
                Some(finish(logits, token, max, sum, weighted, top))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_vectorised_path_agrees_with_the_scalar_one() {
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        // Whole chunks of eight and tails; flat, peaked, and tied maxima.
        for len in [1, 7, 8, 9, 50, 1000, 49_152, 262_147] {
            for shape in 0..3 {
                let mut logits: Vec<f32> = (0..len).map(|_| 30.0 * next() - 15.0).collect();
                match shape {
                    1 => logits[len / 2] = 40.0,
                    2 if len > 1 => {
                        logits[0] = 25.0;
                        logits[len - 1] = 25.0;
                    }
                    _ => {}
                }
                let token = len / 3;
                let fast = super::signals_from_logits(&logits, token);
                let exact = super::signals_scalar(&logits, token);
                let what = format!("{len} logits, shape {shape}: {fast:?} against {exact:?}");
                assert!((fast.logprob - exact.logprob).abs() <= 1e-5, "{what}");
                assert!((fast.entropy - exact.entropy).abs() <= 1e-5, "{what}");
                assert!((fast.margin - exact.margin).abs() <= 1e-6, "{what}");
            }
        }
    }

    #[test]
    fn non_finite_logits_are_skipped_on_every_path() {
        let mut logits = vec![0.0f32; 20];
        logits[3] = 2.0;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [5, 18] {
                let mut with_bad = logits.clone();
                with_bad[at] = bad;
                let mut without = logits.clone();
                without.remove(at);
                let got = super::signals_from_logits(&with_bad, 3);
                let want = super::signals_from_logits(&without, 3);
                assert!((got.logprob - want.logprob).abs() < 1e-6, "{bad} at {at}");
                assert!((got.entropy - want.entropy).abs() < 1e-6, "{bad} at {at}");
            }
        }
    }

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
