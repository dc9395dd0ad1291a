//! Q4_K weights (super-blocks of 256 four-bit values in eight sub-blocks of
//! 32, each with a 6-bit scale and a 6-bit minimum) times activations
//! quantized to 8 bits per 256 values.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::{
    activation_rows, check_layout, detect_simd, for_each_group, quantize_block, regroup,
    KernelError, Simd, ROWS_PER_GROUP,
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
            for ((run, sum), source) in values.iter_mut().zip(&mut sums).zip(flat.chunks_exact(SUB)) {
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
        Ok(for_each_group(
            &self.groups,
            row_blocks * ROWS_PER_GROUP * PACKED_BYTES,
            self.rows,
            m,
            |weights, i| {
                let row = &activations[i * row_blocks..(i + 1) * row_blocks];
                dot_group(self.simd, weights, row)
            },
        ))
    }
}

/// Dot products of one four-row group with one quantized activation row.
#[cfg(not(target_arch = "x86_64"))]
fn dot_group(simd: Simd, _weights: &[u8], _row: &[ActivationBlock]) -> [f32; ROWS_PER_GROUP] {
    match simd {}
}

/// Dot products of one four-row group with one quantized activation row.
///
/// Per sub-block `j` of a row: `d·scale_j·Σ q·y − dmin·min_j·Σ y`, times
/// the activation scale. The first term accumulates in integers across
/// the super-block (the sub-block scale multiplies in `madd`), the second
/// is a short integer dot product of minimums and activation sums.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dot_group(simd: Simd, weights: &[u8], row: &[ActivationBlock]) -> [f32; ROWS_PER_GROUP] {
    simd.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::__m256i;
            let low_nibbles = simd.avx._mm256_set1_epi8(0x0F);
            let mut acc = [simd.avx._mm256_setzero_ps(); ROWS_PER_GROUP];
            let mut min_terms = [0f32; ROWS_PER_GROUP];
            for (y, blocks) in row
                .iter()
                .zip(weights.chunks_exact(ROWS_PER_GROUP * PACKED_BYTES))
            {
                let ys: [__m256i; BLOCK / SUB] = y.values.map(bytemuck::cast);
                for ((acc, min_term), block) in acc
                    .iter_mut()
                    .zip(&mut min_terms)
                    .zip(blocks.chunks_exact(PACKED_BYTES))
                {
                    let d = f16::from_le_bytes([block[0], block[1]]).to_f32() * y.scale;
                    let dmin = f16::from_le_bytes([block[2], block[3]]).to_f32() * y.scale;
                    let scales = &block[4..12];
                    let mins = &block[12..20];
                    let mut sum = simd.avx._mm256_setzero_si256();
                    for (k, values) in block[VALUES_AT..].chunks_exact(32).enumerate() {
                        let q: __m256i = bytemuck::pod_read_unaligned(values);
                        let low = simd.avx2._mm256_and_si256(q, low_nibbles);
                        let high = simd
                            .avx2
                            ._mm256_and_si256(simd.avx2._mm256_srli_epi16::<4>(q), low_nibbles);
                        // Nibbles are unsigned (0..=15), activations signed:
                        // maddubs without sign tricks, no saturation.
                        let low = simd.avx2._mm256_madd_epi16(
                            simd.avx2._mm256_maddubs_epi16(low, ys[2 * k]),
                            simd.avx._mm256_set1_epi16(i16::from(scales[2 * k])),
                        );
                        let high = simd.avx2._mm256_madd_epi16(
                            simd.avx2._mm256_maddubs_epi16(high, ys[2 * k + 1]),
                            simd.avx._mm256_set1_epi16(i16::from(scales[2 * k + 1])),
                        );
                        sum = simd
                            .avx2
                            ._mm256_add_epi32(sum, simd.avx2._mm256_add_epi32(low, high));
                    }
                    *acc = simd.fma._mm256_fmadd_ps(
                        simd.avx._mm256_set1_ps(d),
                        simd.avx._mm256_cvtepi32_ps(sum),
                        *acc,
                    );
                    let min_dot: i32 = mins
                        .iter()
                        .zip(&y.sums)
                        .map(|(&m, &s)| i32::from(m) * s)
                        .sum();
                    *min_term += dmin * min_dot as f32;
                }
            }
            std::array::from_fn(|lane| {
                let lanes: [f32; 8] = bytemuck::cast(acc[lane]);
                lanes.iter().sum::<f32>() - min_terms[lane]
            })
        },
    )
}
