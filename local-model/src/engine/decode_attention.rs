//! The arithmetic of one query position's attention over a cache: the
//! decode step's attention, per key/value head and the query heads that
//! share it (grouped-query attention).
//!
//! In batched decode every sequence attends over its own cache, so this is
//! the one part of a step whose work grows with the batch and the context
//! but not with the weights. Written plainly (one dot product per head and
//! position, summed in one register, then `exp` and a multiply-add per
//! value), it was 14% of SmolLM2's samples at eight sequences: the dot
//! product's eight adds waited on each other, `exp` was a C library call per
//! score, and each head re-read the keys and values its group shares.
//!
//! On AVX2/FMA (`pulp::x86::V3`, checked at run time; safe intrinsics) and
//! heads of a multiple of 64 values:
//! - scores eight positions at a time, eight independent accumulators, then
//!   one transposing reduction for the eight sums;
//! - `exp` on eight lanes (`simd_exp`);
//! - the weighted sum of values 64 dimensions at a time in eight registers,
//!   one fused multiply-add per eight values and position.
//!
//! Keys and values are read as the cache holds them, F32 or F16; F16 is
//! converted in registers (F16C, eight values an instruction), where a
//! conversion into a scratch copy first wrote and re-read every value (5%
//! of SmolLM2's samples at eight sequences).
//!
//! While one head runs, the vector path asks for the next head's keys and
//! values, a block's worth per block: each head's positions lie in pages of
//! their own, where the hardware's prefetcher starts afresh. Phi-1.5 (32
//! key/value heads of 64) at eight sequences, 32 to 160 positions, on AMD
//! Zen 4: 12.7–13.1 → 10.5–10.8 ms of attention per step.
//!
//! Elsewhere the scalar loop. Either way a position's result depends only
//! on its own query and cache, never on the sequences beside it in a batch.
//!
//! Prefill runs it too, one row of a part at a time over that row's prefix
//! (`attention::prefill_rows`), so a token's attention is the same
//! arithmetic whether it ran in a prefill part or as a decode step.

use half::f16;

/// One key/value head's share of a decode step: the `group` query heads
/// that read it and its cached positions, keys and values held as `T`
/// (F32 or F16).
pub(crate) struct HeadGroup<'a, T> {
    /// `group × head_dim` query values, rotated.
    pub(crate) queries: &'a [f32],
    /// `positions × head_dim` keys, position-major.
    pub(crate) keys: &'a [T],
    /// `positions × head_dim` values, position-major.
    pub(crate) values: &'a [T],
    pub(crate) head_dim: usize,
    /// The scores' factor, `1 / √head_dim`.
    pub(crate) scale: f32,
    /// The keys and values of the head that runs next, asked for from
    /// memory while this one runs (empty for none). Each head's positions
    /// lie apart from the next head's, in pages of their own, where the
    /// hardware's prefetcher starts afresh: without this the first lines of
    /// every head wait on the memory.
    pub(crate) next_keys: &'a [T],
    pub(crate) next_values: &'a [T],
}

/// A type the KV cache holds keys and values in.
pub(crate) trait HeldValue: Copy {
    fn to_f32(self) -> f32;

    /// Runs the vector path on `group` and returns true, where the CPU has
    /// what this type's path needs.
    #[cfg(target_arch = "x86_64")]
    fn attend_vector(group: &HeadGroup<'_, Self>, scores: &mut [f32], out: &mut [f32]) -> bool;
}

impl HeldValue for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    fn attend_vector(group: &HeadGroup<'_, Self>, scores: &mut [f32], out: &mut [f32]) -> bool {
        pulp::x86::V3::try_new()
            .map(|simd| attend_group_v3(simd, group, scores, out))
            .is_some()
    }
}

impl HeldValue for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    fn attend_vector(group: &HeadGroup<'_, Self>, scores: &mut [f32], out: &mut [f32]) -> bool {
        pulp::x86::V3::try_new()
            .and_then(super::kernels::F16cAvx::try_new)
            .map(|simd| attend_group_v3(simd, group, scores, out))
            .is_some()
    }
}

/// Attention of `group`'s query heads over its cached positions; writes
/// `group × head_dim` values to `out`. `scores`: scratch of at least
/// `positions` values.
pub(crate) fn attend_group<T: HeldValue>(
    group: &HeadGroup<'_, T>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if group.head_dim.is_multiple_of(WIDTH) && T::attend_vector(group, scores, out) {
        return;
    }
    attend_group_scalar(group, scores, out);
}

/// Eight held values at a time as F32 lanes, under a token that proves the
/// CPU can: `pulp`'s `V3` for F32, [`super::kernels::F16cAvx`] for F16.
#[cfg(target_arch = "x86_64")]
trait EightLanes<T>: Copy {
    fn v3(self) -> pulp::x86::V3;
    /// Runs `f` compiled with the token's features.
    fn run<R>(self, f: impl FnOnce() -> R) -> R;
    /// `v[..8]` as F32.
    fn load(self, v: &[T]) -> std::arch::x86_64::__m256;
}

#[cfg(target_arch = "x86_64")]
impl EightLanes<f32> for pulp::x86::V3 {
    #[inline(always)]
    fn v3(self) -> pulp::x86::V3 {
        self
    }

    #[inline(always)]
    fn run<R>(self, f: impl FnOnce() -> R) -> R {
        self.vectorize(f)
    }

    #[inline(always)]
    fn load(self, v: &[f32]) -> std::arch::x86_64::__m256 {
        pulp::bytemuck::pod_read_unaligned(pulp::bytemuck::cast_slice(&v[..8]))
    }
}

#[cfg(target_arch = "x86_64")]
impl EightLanes<f16> for super::kernels::F16cAvx {
    #[inline(always)]
    fn v3(self) -> pulp::x86::V3 {
        super::kernels::F16cAvx::v3(self)
    }

    #[inline(always)]
    fn run<R>(self, f: impl FnOnce() -> R) -> R {
        self.vectorize(f)
    }

    #[inline(always)]
    fn load(self, v: &[f16]) -> std::arch::x86_64::__m256 {
        use half::slice::HalfFloatSliceExt;
        let bits: &[u16] = v[..8].reinterpret_cast();
        self.f16_to_f32(pulp::bytemuck::pod_read_unaligned(
            pulp::bytemuck::cast_slice(bits),
        ))
    }
}

/// Dimensions per pass of the vector path: eight registers of eight.
#[cfg(target_arch = "x86_64")]
const WIDTH: usize = 64;

fn attend_group_scalar<T: HeldValue>(
    group: &HeadGroup<'_, T>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let HeadGroup {
        queries,
        keys,
        values,
        head_dim,
        scale,
        ..
    } = *group;
    let positions = keys.len() / head_dim.max(1);
    let scores = &mut scores[..positions];
    for (query, mixed) in queries
        .chunks_exact(head_dim)
        .zip(out.chunks_exact_mut(head_dim))
    {
        let mut max = f32::NEG_INFINITY;
        for (key, score) in keys.chunks_exact(head_dim).zip(scores.iter_mut()) {
            *score = dot(query, key) * scale;
            max = max.max(*score);
        }
        let mut total = 0f32;
        for score in scores.iter_mut() {
            *score = (*score - max).exp();
            total += *score;
        }
        mixed.fill(0.0);
        for (value, score) in values.chunks_exact(head_dim).zip(scores.iter()) {
            let weight = score / total;
            for (m, v) in mixed.iter_mut().zip(value) {
                *m += weight * v.to_f32();
            }
        }
    }
}

/// `Σ a·b` in eight interleaved partial sums, which the compiler turns
/// into one vector multiply-add per eight values.
fn dot<T: HeldValue>(a: &[f32], b: &[T]) -> f32 {
    const LANES: usize = 8;
    let mut partial = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y.to_f32())
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            partial[i] += x[i] * y[i].to_f32();
        }
    }
    partial.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
fn attend_group_v3<T, L: EightLanes<T>>(
    lanes: L,
    group: &HeadGroup<'_, T>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let HeadGroup {
        queries,
        keys,
        values,
        head_dim,
        scale,
        next_keys,
        next_values,
    } = *group;
    let simd = lanes.v3();
    lanes.run(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::__m256;
            let load = |v: &[f32]| -> __m256 {
                bytemuck::pod_read_unaligned(bytemuck::cast_slice(&v[..8]))
            };
            let held = |v: &[T]| lanes.load(v);
            // Asks for the cache lines of `next[range]` (those that exist).
            let prefetch = |next: &[T], range: std::ops::Range<usize>| {
                let end = range.end.min(next.len());
                let bytes = end.saturating_sub(range.start) * std::mem::size_of::<T>();
                if let Some(first) = next.get(range.start..end) {
                    let at = first.as_ptr().cast::<u8>();
                    for line in (0..bytes).step_by(64) {
                        simd.sse._mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                            at.wrapping_add(line).cast(),
                        );
                    }
                }
            };
            let zero = simd.avx._mm256_setzero_ps();
            let positions = keys.len() / head_dim;
            let scores = &mut scores[..positions];
            for (g, (query, mixed)) in queries
                .chunks_exact(head_dim)
                .zip(out.chunks_exact_mut(head_dim))
                .enumerate()
            {
                // The group's first query head asks for the next head's lines.
                let (next_keys, next_values) = if g == 0 {
                    (next_keys, next_values)
                } else {
                    (&[][..], &[][..])
                };
                // Scores, eight positions at a time: `sums[j]` holds eight
                // partial sums of position j's dot product.
                let mut blocks = keys.chunks_exact(8 * head_dim);
                let mut at = 0;
                for block in blocks.by_ref() {
                    prefetch(next_keys, at * head_dim..(at + 8) * head_dim);
                    let mut sums = [zero; 8];
                    for d in (0..head_dim).step_by(8) {
                        let q = load(&query[d..]);
                        for (j, sum) in sums.iter_mut().enumerate() {
                            *sum =
                                simd.fma
                                    ._mm256_fmadd_ps(q, held(&block[j * head_dim + d..]), *sum);
                        }
                    }
                    let dots = transpose_sums(simd, sums);
                    let dots = simd.avx._mm256_mul_ps(dots, simd.avx._mm256_set1_ps(scale));
                    scores[at..at + 8].copy_from_slice(&bytemuck::cast::<_, [f32; 8]>(dots));
                    at += 8;
                }
                for key in blocks.remainder().chunks_exact(head_dim) {
                    let mut sum = zero;
                    for d in (0..head_dim).step_by(8) {
                        sum = simd
                            .fma
                            ._mm256_fmadd_ps(load(&query[d..]), held(&key[d..]), sum);
                    }
                    let lanes: [f32; 8] = bytemuck::cast(sum);
                    scores[at] = lanes.iter().sum::<f32>() * scale;
                    at += 1;
                }
                // Softmax: the largest score, then e^(s - max) and their sum.
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let mut total = 0f32;
                let mut eights = scores.chunks_exact_mut(8);
                let mut totals = zero;
                for eight in eights.by_ref() {
                    let e = crate::engine::simd_exp::exp(
                        simd,
                        simd.avx
                            ._mm256_sub_ps(load(eight), simd.avx._mm256_set1_ps(max)),
                    );
                    totals = simd.avx._mm256_add_ps(totals, e);
                    eight.copy_from_slice(&bytemuck::cast::<_, [f32; 8]>(e));
                }
                for score in eights.into_remainder() {
                    *score = (*score - max).exp();
                    total += *score;
                }
                let lanes: [f32; 8] = bytemuck::cast(totals);
                total += lanes.iter().sum::<f32>();
                let inverse = 1.0 / total;
                // The weighted sum of values, 64 dimensions at a time.
                for (d, mixed) in mixed.chunks_exact_mut(WIDTH).enumerate() {
                    let mut acc = [zero; WIDTH / 8];
                    for (p, (value, &score)) in
                        values.chunks_exact(head_dim).zip(scores.iter()).enumerate()
                    {
                        if d == 0 {
                            prefetch(next_values, p * head_dim..(p + 1) * head_dim);
                        }
                        let weight = simd.avx._mm256_set1_ps(score);
                        let value = &value[d * WIDTH..(d + 1) * WIDTH];
                        for (k, acc) in acc.iter_mut().enumerate() {
                            *acc = simd
                                .fma
                                ._mm256_fmadd_ps(weight, held(&value[8 * k..]), *acc);
                        }
                    }
                    for (k, acc) in acc.iter().enumerate() {
                        let scaled = simd
                            .avx
                            ._mm256_mul_ps(*acc, simd.avx._mm256_set1_ps(inverse));
                        mixed[8 * k..8 * k + 8]
                            .copy_from_slice(&bytemuck::cast::<_, [f32; 8]>(scaled));
                    }
                }
            }
        },
    )
}

/// Eight vectors to the vector of their sums: lane j is `Σ sums[j]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn transpose_sums(
    simd: pulp::x86::V3,
    sums: [std::arch::x86_64::__m256; 8],
) -> std::arch::x86_64::__m256 {
    let avx = simd.avx;
    // Pairwise: lanes of hadd(a, b) are a0+a1, a2+a3, b0+b1, b2+b3 per
    // 128-bit half.
    let ab = avx._mm256_hadd_ps(sums[0], sums[1]);
    let cd = avx._mm256_hadd_ps(sums[2], sums[3]);
    let ef = avx._mm256_hadd_ps(sums[4], sums[5]);
    let gh = avx._mm256_hadd_ps(sums[6], sums[7]);
    // Now each half holds a partial of sums 0..3 (abcd) and 4..7 (efgh).
    let abcd = avx._mm256_hadd_ps(ab, cd);
    let efgh = avx._mm256_hadd_ps(ef, gh);
    // Low halves of abcd and efgh, then their high halves: add.
    let low = avx._mm256_permute2f128_ps::<0x20>(abcd, efgh);
    let high = avx._mm256_permute2f128_ps::<0x31>(abcd, efgh);
    avx._mm256_add_ps(low, high)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        crate::engine::test_values(n, seed)
            .into_iter()
            .map(|v| v * 4.0 - 2.0)
            .collect()
    }

    /// Softmax attention in F64, one head at a time.
    fn exact(query: &[f32], keys: &[f32], values: &[f32], head_dim: usize, scale: f32) -> Vec<f64> {
        let scores: Vec<f64> = keys
            .chunks_exact(head_dim)
            .map(|k| {
                query
                    .iter()
                    .zip(k)
                    .map(|(&q, &k)| f64::from(q) * f64::from(k))
                    .sum::<f64>()
                    * f64::from(scale)
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        (0..head_dim)
            .map(|d| {
                values
                    .chunks_exact(head_dim)
                    .zip(&weights)
                    .map(|(v, w)| f64::from(v[d]) * w / total)
                    .sum()
            })
            .collect()
    }

    /// Both paths against F64 for head sizes of SmolLM2 and Phi (64),
    /// Gemma 3 (256) and one the vector path does not take (80), for
    /// position counts around the blocks of eight.
    #[test]
    fn each_path_matches_exact_attention() {
        for head_dim in [64, 80, 256] {
            for positions in [1, 7, 8, 9, 17, 100] {
                let group = 3;
                let scale = 1.0 / (head_dim as f32).sqrt();
                let queries = random(group * head_dim, 1);
                let keys = random(positions * head_dim, 2);
                let values = random(positions * head_dim, 3);
                let mut scores = vec![0f32; positions];
                let mut fast = vec![0f32; group * head_dim];
                let mut plain = vec![0f32; group * head_dim];
                let heads = HeadGroup {
                    queries: &queries,
                    keys: &keys,
                    values: &values,
                    head_dim,
                    scale,
                    next_keys: &[],
                    next_values: &[],
                };
                attend_group(&heads, &mut scores, &mut fast);
                attend_group_scalar(&heads, &mut scores, &mut plain);
                // The same keys and values held in F16: both paths against
                // exact attention over the rounded values.
                let keys16: Vec<f16> = keys.iter().map(|&k| f16::from_f32(k)).collect();
                let values16: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
                let mut fast16 = vec![0f32; group * head_dim];
                let mut plain16 = vec![0f32; group * head_dim];
                let heads16 = HeadGroup {
                    queries: &queries,
                    keys: &keys16,
                    values: &values16,
                    head_dim,
                    scale,
                    // Any lines may be asked for: the F16 run asks for its own.
                    next_keys: &keys16,
                    next_values: &values16,
                };
                attend_group(&heads16, &mut scores, &mut fast16);
                attend_group_scalar(&heads16, &mut scores, &mut plain16);
                let rounded = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
                let (keys_r, values_r) = (rounded(&keys16), rounded(&values16));
                for (g, query) in queries.chunks_exact(head_dim).enumerate() {
                    let want = exact(query, &keys, &values, head_dim, scale);
                    let want16 = exact(query, &keys_r, &values_r, head_dim, scale);
                    for d in 0..head_dim {
                        for (path, got, want) in [
                            ("fast", &fast, want[d]),
                            ("scalar", &plain, want[d]),
                            ("fast F16", &fast16, want16[d]),
                            ("scalar F16", &plain16, want16[d]),
                        ] {
                            let got = f64::from(got[g * head_dim + d]);
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{path}, head_dim {head_dim}, {positions} positions, head {g}, dim {d}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
