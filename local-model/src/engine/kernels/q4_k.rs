//! Q4_K weights (super-blocks of 256 four-bit values in eight sub-blocks of
//! 32, each with a 6-bit scale and a 6-bit minimum) times activations
//! quantized to 8 bits per 256 values.

use candle_core::quantized::GgmlDType;
use half::f16;

#[cfg(target_arch = "x86_64")]
use super::lane_sum;
use super::{
    activation_rows, check_layout, for_each_group, quantize_block, regroup, GroupKernel, Isa,
    KernelError, Simd, WideSimd, ROWS_PER_GROUP,
};

/// Values per Q4_K super-block.
const BLOCK: usize = 256;
/// Values per sub-block (one scale, one minimum).
const SUB: usize = 32;
/// Bytes per Q4_K block in GGUF: F16 scale and minimum scale, 12 bytes of
/// packed 6-bit sub-block scales and minimums, 128 bytes of nibbles.
const BLOCK_BYTES: usize = 144;
/// Bytes per block as held here: the same, with the sub-block scales and
/// minimums unpacked to a byte each (8 + 8 instead of 12), so the kernel
/// does not unpick 6-bit fields for every block of every row.
const PACKED_BYTES: usize = 148;
/// Where the nibbles start in a held block.
const VALUES_AT: usize = 20;

/// Activation rows quantized per 256 values (one F32 scale), with the sum
/// of each 32-value run for the minimums' term.
#[derive(Debug, Clone)]
struct ActivationBlock {
    scale: f32,
    /// The eight 32-value runs, in the order `position` gives.
    values: [[i8; SUB]; BLOCK / SUB],
    /// Sums of the runs, in their own order.
    sums: [i32; BLOCK / SUB],
}

/// Where sub-block `j`'s activations are held in `ActivationBlock::values`:
/// the order `0 2 1 3 4 6 5 7`. A 64-byte load of the nibbles of sub-blocks
/// `4p..4p + 4` (two 32-byte runs, each with sub-block `2k` in its low and
/// `2k + 1` in its high nibbles) then meets, in one 64-byte load each, the
/// activations of its low nibbles (`4p`, `4p + 2`) and of its high ones.
const fn position(j: usize) -> usize {
    (j & 4) | ((j & 1) << 1) | ((j >> 1) & 1)
}

fn quantize(x: &[f32], cols: usize) -> Result<Vec<ActivationBlock>, KernelError> {
    activation_rows(x, cols)?;
    Ok(x.chunks_exact(BLOCK)
        .map(|chunk| {
            let mut flat = [0i8; BLOCK];
            let scale = quantize_block(chunk, &mut flat);
            let mut values = [[0i8; SUB]; BLOCK / SUB];
            let mut sums = [0i32; BLOCK / SUB];
            for (j, (sum, source)) in sums.iter_mut().zip(flat.chunks_exact(SUB)).enumerate() {
                values[position(j)].copy_from_slice(source);
                *sum = source.iter().map(|&v| i32::from(v)).sum();
            }
            ActivationBlock {
                scale,
                values,
                sums,
            }
        })
        .collect())
}

/// Rewrites a GGUF Q4_K block with its sub-block scales and minimums
/// unpacked (llama.cpp's `get_scale_min_k4`).
fn unpack_block(block: &[u8], out: &mut [u8]) {
    out[..4].copy_from_slice(&block[..4]);
    let packed = &block[4..16];
    for j in 0..BLOCK / SUB {
        let (scale, min) = if j < 4 {
            (packed[j] & 63, packed[j + 4] & 63)
        } else {
            (
                (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4),
                (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
            )
        };
        out[4 + j] = scale;
        out[12 + j] = min;
    }
    out[VALUES_AT..].copy_from_slice(&block[16..]);
}

/// Q4_K weights, `rows x cols`, regrouped four rows at a time with unpacked
/// sub-block scales.
#[derive(Debug, Clone)]
pub struct Q4KMatrix {
    groups: Vec<u8>,
    rows: usize,
    cols: usize,
    pub(super) isa: Isa,
}

impl Q4KMatrix {
    /// From GGUF's layout. `None` when this CPU lacks AVX2/FMA.
    pub fn new(bytes: &[u8], rows: usize, cols: usize) -> Result<Option<Self>, KernelError> {
        check_layout(GgmlDType::Q4K, bytes, rows, cols)?;
        let Some(isa) = Isa::detect() else {
            return Ok(None);
        };
        let groups = regroup(
            bytes,
            rows,
            cols / BLOCK,
            BLOCK_BYTES,
            PACKED_BYTES,
            unpack_block,
        );
        Ok(Some(Self {
            groups,
            rows,
            cols,
            isa,
        }))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of weights held.
    pub fn size_in_bytes(&self) -> usize {
        self.groups.len()
    }

    /// `x Wᵀ` for `x` of `m` rows of `cols` values: `m x rows` values,
    /// row-major.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>, KernelError> {
        let activations = quantize(x, self.cols)?;
        let m = x.len() / self.cols;
        let row_blocks = self.cols / BLOCK;
        let kernel = Kernel {
            isa: self.isa,
            activations: &activations,
            row_blocks,
        };
        Ok(for_each_group(
            &self.groups,
            row_blocks * ROWS_PER_GROUP * PACKED_BYTES,
            self.rows,
            m,
            &kernel,
        ))
    }
}

/// The Q4_K product over one set of quantized activations.
struct Kernel<'a> {
    isa: Isa,
    activations: &'a [ActivationBlock],
    row_blocks: usize,
}

impl Kernel<'_> {
    fn row(&self, i: usize) -> &[ActivationBlock] {
        &self.activations[i * self.row_blocks..(i + 1) * self.row_blocks]
    }
}

impl GroupKernel for Kernel<'_> {
    fn dot<const N: usize>(&self, weights: &[u8], first: usize) -> [[f32; ROWS_PER_GROUP]; N] {
        let rows = std::array::from_fn(|n| self.row(first + n));
        match self.isa.wide {
            Some(wide) => dot_group_wide(wide, weights, rows),
            None => dot_group(self.isa.simd, weights, rows),
        }
    }

    fn isa(&self) -> Isa {
        self.isa
    }
}

/// Dot products of one four-row group with `N` activation rows.
#[cfg(not(target_arch = "x86_64"))]
fn dot_group_wide<const N: usize>(
    simd: WideSimd,
    _weights: &[u8],
    _rows: [&[ActivationBlock]; N],
) -> [[f32; ROWS_PER_GROUP]; N] {
    match simd {}
}

/// Dot products of one four-row group with `N` activation rows.
#[cfg(not(target_arch = "x86_64"))]
fn dot_group<const N: usize>(
    simd: Simd,
    _weights: &[u8],
    _rows: [&[ActivationBlock]; N],
) -> [[f32; ROWS_PER_GROUP]; N] {
    match simd {}
}

/// A held block's scale and minimum scale, and its eight sub-block
/// minimums widened to 32 bits: what `accumulate` needs of it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn block_header(simd: Simd, block: &[u8]) -> (f32, f32, std::arch::x86_64::__m256i) {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let dmin = f16::from_le_bytes([block[2], block[3]]).to_f32();
    let mut mins = [0u8; 16];
    mins[..8].copy_from_slice(&block[12..20]);
    let mins = simd.avx2._mm256_cvtepu8_epi32(pulp::bytemuck::cast(mins));
    (d, dmin, mins)
}

/// Adds one super-block of one row to its accumulator: `sums` are the
/// eight lanes of `Σ scale_j·q·y`; the minimums' term multiplies the eight
/// minimums by the eight activation sums in one vector.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn accumulate(
    simd: Simd,
    acc: std::arch::x86_64::__m256,
    sums: std::arch::x86_64::__m256i,
    (d, dmin, mins): (f32, f32, std::arch::x86_64::__m256i),
    y: &ActivationBlock,
) -> std::arch::x86_64::__m256 {
    let min_products = simd
        .avx2
        ._mm256_mullo_epi32(mins, pulp::bytemuck::cast(y.sums));
    let acc = simd.fma._mm256_fmadd_ps(
        simd.avx._mm256_set1_ps(d * y.scale),
        simd.avx._mm256_cvtepi32_ps(sums),
        acc,
    );
    simd.fma._mm256_fnmadd_ps(
        simd.avx._mm256_set1_ps(dmin * y.scale),
        simd.avx._mm256_cvtepi32_ps(min_products),
        acc,
    )
}

/// Dot products of one four-row group with `N` activation rows; each
/// weight block is unpacked once for all `N`.
///
/// Per sub-block `j` of a row: `d·scale_j·Σ q·y − dmin·min_j·Σ y`, times
/// the activation scale. The first term accumulates in integers across
/// the super-block (the sub-block scale multiplies in `madd`), the second
/// multiplies the eight minimums by the eight activation sums in one
/// vector and joins the same accumulator.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dot_group<const N: usize>(
    simd: Simd,
    weights: &[u8],
    rows: [&[ActivationBlock]; N],
) -> [[f32; ROWS_PER_GROUP]; N] {
    simd.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::__m256i;
            let low_nibbles = simd.avx._mm256_set1_epi8(0x0F);
            let mut acc = [[simd.avx._mm256_setzero_ps(); ROWS_PER_GROUP]; N];
            for (b, blocks) in weights
                .chunks_exact(ROWS_PER_GROUP * PACKED_BYTES)
                .enumerate()
            {
                let ys: [&ActivationBlock; N] = std::array::from_fn(|n| &rows[n][b]);
                for (lane, block) in blocks.chunks_exact(PACKED_BYTES).enumerate() {
                    let header = block_header(simd, block);
                    let scales = &block[4..12];
                    let mut sums = [simd.avx._mm256_setzero_si256(); N];
                    for (k, values) in block[VALUES_AT..].chunks_exact(32).enumerate() {
                        let q: __m256i = bytemuck::pod_read_unaligned(values);
                        let low = simd.avx2._mm256_and_si256(q, low_nibbles);
                        let high = simd
                            .avx2
                            ._mm256_and_si256(simd.avx2._mm256_srli_epi16::<4>(q), low_nibbles);
                        let low_scale = simd.avx._mm256_set1_epi16(i16::from(scales[2 * k]));
                        let high_scale = simd.avx._mm256_set1_epi16(i16::from(scales[2 * k + 1]));
                        for n in 0..N {
                            // Nibbles are unsigned (0..=15), activations
                            // signed: maddubs needs no sign trick and
                            // cannot saturate.
                            let y_low: __m256i = bytemuck::cast(ys[n].values[position(2 * k)]);
                            let y_high: __m256i = bytemuck::cast(ys[n].values[position(2 * k + 1)]);
                            let low = simd.avx2._mm256_madd_epi16(
                                simd.avx2._mm256_maddubs_epi16(low, y_low),
                                low_scale,
                            );
                            let high = simd.avx2._mm256_madd_epi16(
                                simd.avx2._mm256_maddubs_epi16(high, y_high),
                                high_scale,
                            );
                            sums[n] = simd
                                .avx2
                                ._mm256_add_epi32(sums[n], simd.avx2._mm256_add_epi32(low, high));
                        }
                    }
                    for n in 0..N {
                        acc[n][lane] = accumulate(simd, acc[n][lane], sums[n], header, ys[n]);
                    }
                }
            }
            std::array::from_fn(|n| std::array::from_fn(|lane| lane_sum(acc[n][lane])))
        },
    )
}

/// `dot_group` on AVX-512: each 64-byte load takes four sub-blocks' nibbles
/// (two 32-byte runs), and the sub-block scales are spread over the
/// 16-bit lanes by one permutation per half.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dot_group_wide<const N: usize>(
    simd: WideSimd,
    weights: &[u8],
    rows: [&[ActivationBlock]; N],
) -> [[f32; ROWS_PER_GROUP]; N] {
    simd.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::{__m128i, __m512i};
            let low_nibbles = simd.avx512f._mm512_set1_epi8(0x0F);
            // For the runs `2p` and `2p + 1`: the low nibbles' scales are
            // those of sub-blocks `4p` (first 32 bytes) and `4p + 2`, the
            // high nibbles' those of `4p + 1` and `4p + 3`.
            let spread = |first: i16, second: i16| -> __m512i {
                let mut lanes = [first; 32];
                lanes[16..].fill(second);
                bytemuck::cast(lanes)
            };
            let scale_spreads = [[spread(0, 2), spread(1, 3)], [spread(4, 6), spread(5, 7)]];
            let mut acc = [[simd.avx._mm256_setzero_ps(); ROWS_PER_GROUP]; N];
            for (b, blocks) in weights
                .chunks_exact(ROWS_PER_GROUP * PACKED_BYTES)
                .enumerate()
            {
                let ys: [&ActivationBlock; N] = std::array::from_fn(|n| &rows[n][b]);
                for (lane, block) in blocks.chunks_exact(PACKED_BYTES).enumerate() {
                    let header = block_header(*simd, block);
                    let mut scale_bytes = [0u8; 16];
                    scale_bytes[..8].copy_from_slice(&block[4..12]);
                    let scales: __m128i =
                        simd.sse4_1._mm_cvtepu8_epi16(bytemuck::cast(scale_bytes));
                    let scales = simd.avx512f._mm512_broadcast_i32x4(scales);
                    let mut sums = [simd.avx512f._mm512_setzero_si512(); N];
                    for (p, values) in block[VALUES_AT..].chunks_exact(64).enumerate() {
                        let q: __m512i = bytemuck::pod_read_unaligned(values);
                        let low = simd.avx512f._mm512_and_si512(q, low_nibbles);
                        let high = simd
                            .avx512f
                            ._mm512_and_si512(simd.avx512bw._mm512_srli_epi16::<4>(q), low_nibbles);
                        let low_scale = simd
                            .avx512bw
                            ._mm512_permutexvar_epi16(scale_spreads[p][0], scales);
                        let high_scale = simd
                            .avx512bw
                            ._mm512_permutexvar_epi16(scale_spreads[p][1], scales);
                        for n in 0..N {
                            let runs = &ys[n].values[4 * p..4 * p + 4];
                            let y_low: __m512i =
                                bytemuck::pod_read_unaligned(bytemuck::cast_slice(&runs[..2]));
                            let y_high: __m512i =
                                bytemuck::pod_read_unaligned(bytemuck::cast_slice(&runs[2..]));
                            let low = simd.avx512bw._mm512_madd_epi16(
                                simd.avx512bw._mm512_maddubs_epi16(low, y_low),
                                low_scale,
                            );
                            let high = simd.avx512bw._mm512_madd_epi16(
                                simd.avx512bw._mm512_maddubs_epi16(high, y_high),
                                high_scale,
                            );
                            sums[n] = simd.avx512f._mm512_add_epi32(
                                sums[n],
                                simd.avx512f._mm512_add_epi32(low, high),
                            );
                        }
                    }
                    for n in 0..N {
                        let sum = simd.avx2._mm256_add_epi32(
                            simd.avx512f._mm512_castsi512_si256(sums[n]),
                            simd.avx512f._mm512_extracti64x4_epi64::<1>(sums[n]),
                        );
                        acc[n][lane] = accumulate(*simd, acc[n][lane], sum, header, ys[n]);
                    }
                }
            }
            std::array::from_fn(|n| std::array::from_fn(|lane| lane_sum(acc[n][lane])))
        },
    )
}
