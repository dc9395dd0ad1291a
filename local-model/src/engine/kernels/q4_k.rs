//! Q4_K weights (super-blocks of 256 four-bit values in eight sub-blocks of
//! 32, each with a 6-bit scale and a 6-bit minimum) times activations
//! quantized to 8 bits per 256 values.

use candle_core::quantized::GgmlDType;
use half::f16;

#[cfg(target_arch = "x86_64")]
use super::lane_sum;
use super::{
    activation_rows, check_layout, detect_simd, for_each_group, quantize_block, regroup,
    GroupKernel, KernelError, Simd, ROWS_PER_GROUP,
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
    values: [[i8; SUB]; BLOCK / SUB],
    sums: [i32; BLOCK / SUB],
}

fn quantize(x: &[f32], cols: usize) -> Result<Vec<ActivationBlock>, KernelError> {
    activation_rows(x, cols)?;
    Ok(x.chunks_exact(BLOCK)
        .map(|chunk| {
            let mut flat = [0i8; BLOCK];
            let scale = quantize_block(chunk, &mut flat);
            let mut values = [[0i8; SUB]; BLOCK / SUB];
            let mut sums = [0i32; BLOCK / SUB];
            for ((run, sum), source) in values.iter_mut().zip(&mut sums).zip(flat.chunks_exact(SUB))
            {
                run.copy_from_slice(source);
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
    simd: Simd,
}

impl Q4KMatrix {
    /// From GGUF's layout. `None` when this CPU lacks AVX2/FMA.
    pub fn new(bytes: &[u8], rows: usize, cols: usize) -> Result<Option<Self>, KernelError> {
        check_layout(GgmlDType::Q4K, bytes, rows, cols)?;
        let Some(simd) = detect_simd() else {
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
            simd,
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
            simd: self.simd,
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
    simd: Simd,
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
        dot_group(
            self.simd,
            weights,
            std::array::from_fn(|n| self.row(first + n)),
        )
    }
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
                    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                    let dmin = f16::from_le_bytes([block[2], block[3]]).to_f32();
                    let scales = &block[4..12];
                    let mut mins = [0u8; 16];
                    mins[..8].copy_from_slice(&block[12..20]);
                    let mins = simd.avx2._mm256_cvtepu8_epi32(bytemuck::cast(mins));
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
                            let y_low: __m256i = bytemuck::cast(ys[n].values[2 * k]);
                            let y_high: __m256i = bytemuck::cast(ys[n].values[2 * k + 1]);
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
                        let min_products = simd
                            .avx2
                            ._mm256_mullo_epi32(mins, bytemuck::cast(ys[n].sums));
                        acc[n][lane] = simd.fma._mm256_fmadd_ps(
                            simd.avx._mm256_set1_ps(d * ys[n].scale),
                            simd.avx._mm256_cvtepi32_ps(sums[n]),
                            acc[n][lane],
                        );
                        acc[n][lane] = simd.fma._mm256_fnmadd_ps(
                            simd.avx._mm256_set1_ps(dmin * ys[n].scale),
                            simd.avx._mm256_cvtepi32_ps(min_products),
                            acc[n][lane],
                        );
                    }
                }
            }
            std::array::from_fn(|n| std::array::from_fn(|lane| lane_sum(acc[n][lane])))
        },
    )
}
