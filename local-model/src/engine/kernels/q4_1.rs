//! Q4_1 weights (blocks of 32 four-bit values with an F16 scale and an F16
//! minimum) times activations quantized to 8 bits per 32 values.
//!
//! candle 0.11 has no SIMD kernel for Q4_1; before this kernel the engine
//! converted Q4_1 to Q8_0 at load, which reads 34 bytes per block instead
//! of 20. Decoding reads every weight once per token, so the file's own
//! format is the smaller read.

use candle_core::quantized::GgmlDType;
use half::f16;

#[cfg(target_arch = "x86_64")]
use super::lane_sum;
use super::q8_0::{ActivationRow, Activations};
use super::{
    check_layout, detect_simd, for_each_group, regroup, GroupKernel, KernelError, Simd,
    ROWS_PER_GROUP,
};

/// Values per Q4_1 block.
const BLOCK: usize = 32;
/// Bytes per Q4_1 block: F16 scale, F16 minimum, 16 bytes of nibbles
/// (value `i` in the low nibble of byte `i`, value `16 + i` in the high).
const BLOCK_BYTES: usize = 20;

/// Q4_1 weights, `rows x cols`, regrouped four rows at a time (blocks kept
/// as they are).
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    groups: Vec<u8>,
    rows: usize,
    cols: usize,
    simd: Simd,
}

impl Q4_1Matrix {
    /// From GGUF's layout. `None` when this CPU lacks AVX2/FMA.
    pub fn new(bytes: &[u8], rows: usize, cols: usize) -> Result<Option<Self>, KernelError> {
        check_layout(GgmlDType::Q4_1, bytes, rows, cols)?;
        let Some(simd) = detect_simd() else {
            return Ok(None);
        };
        let groups = regroup(
            bytes,
            rows,
            cols / BLOCK,
            BLOCK_BYTES,
            BLOCK_BYTES,
            |block, out| out.copy_from_slice(block),
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
        let activations = Activations::quantize(x, self.cols)?;
        let m = x.len() / self.cols;
        let kernel = Kernel {
            simd: self.simd,
            activations: &activations,
        };
        Ok(for_each_group(
            &self.groups,
            self.cols / BLOCK * ROWS_PER_GROUP * BLOCK_BYTES,
            self.rows,
            m,
            &kernel,
        ))
    }
}

/// The Q4_1 product over one set of quantized activations.
struct Kernel<'a> {
    simd: Simd,
    activations: &'a Activations,
}

impl GroupKernel for Kernel<'_> {
    fn dot<const N: usize>(&self, weights: &[u8], first: usize) -> [[f32; ROWS_PER_GROUP]; N] {
        dot_group(
            self.simd,
            weights,
            std::array::from_fn(|n| self.activations.row(first + n)),
        )
    }
}

/// Dot products of one four-row group with `N` activation rows.
#[cfg(not(target_arch = "x86_64"))]
fn dot_group<const N: usize>(
    simd: Simd,
    _weights: &[u8],
    _rows: [ActivationRow<'_>; N],
) -> [[f32; ROWS_PER_GROUP]; N] {
    match simd {}
}

/// Dot products of one four-row group with `N` activation rows; each
/// weight block is unpacked once for all `N`.
///
/// Per block: `d·dy·Σ q·y + m·dy·Σ y`; the second factor of the minimum's
/// term comes with the activations.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dot_group<const N: usize>(
    simd: Simd,
    weights: &[u8],
    rows: [ActivationRow<'_>; N],
) -> [[f32; ROWS_PER_GROUP]; N] {
    simd.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::{__m128i, __m256i};
            let low_nibbles = simd.avx._mm256_set1_epi8(0x0F);
            let ones = simd.avx._mm256_set1_epi16(1);
            let mut acc = [[simd.avx._mm256_setzero_ps(); ROWS_PER_GROUP]; N];
            let mut min_terms = [[0f32; ROWS_PER_GROUP]; N];
            for (b, blocks) in weights
                .chunks_exact(ROWS_PER_GROUP * BLOCK_BYTES)
                .enumerate()
            {
                let ys: [__m256i; N] = std::array::from_fn(|n| bytemuck::cast(rows[n].1[b]));
                let y_scales: [f32; N] = std::array::from_fn(|n| rows[n].0[b]);
                let y_sums: [f32; N] = std::array::from_fn(|n| rows[n].2[b]);
                for (lane, block) in blocks.chunks_exact(BLOCK_BYTES).enumerate() {
                    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                    let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
                    let packed: __m128i = bytemuck::pod_read_unaligned(&block[4..]);
                    // Low nibbles are values 0..16, high nibbles 16..32.
                    let both = simd.avx2._mm256_inserti128_si256::<1>(
                        simd.avx._mm256_castsi128_si256(packed),
                        simd.sse2._mm_srli_epi16::<4>(packed),
                    );
                    let q = simd.avx2._mm256_and_si256(both, low_nibbles);
                    for n in 0..N {
                        let pairs = simd.avx2._mm256_maddubs_epi16(q, ys[n]);
                        let quads = simd.avx2._mm256_madd_epi16(pairs, ones);
                        acc[n][lane] = simd.fma._mm256_fmadd_ps(
                            simd.avx._mm256_cvtepi32_ps(quads),
                            simd.avx._mm256_set1_ps(d * y_scales[n]),
                            acc[n][lane],
                        );
                        min_terms[n][lane] += m * y_sums[n];
                    }
                }
            }
            std::array::from_fn(|n| {
                std::array::from_fn(|lane| lane_sum(acc[n][lane]) + min_terms[n][lane])
            })
        },
    )
}
