//! Q4_1 weights (blocks of 32 four-bit values with an F16 scale and an F16
//! minimum) times activations quantized to 8 bits per 32 values.
//!
//! candle 0.11 has no SIMD kernel for Q4_1; before this kernel the engine
//! converted Q4_1 to Q8_0 at load, which reads 34 bytes per block instead
//! of 20. Decoding reads every weight once per token, so the file's own
//! format is the smaller read.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::q8_0::{ActivationRow, Activations};
use super::{
    check_layout, for_each_group, keep_block, regroup, GroupKernel, Isa, KernelError,
    ROWS_PER_GROUP,
};
#[cfg(target_arch = "x86_64")]
use super::{lane_sum, widen_halves, NarrowBytes, WideBytes};
#[cfg(not(target_arch = "x86_64"))]
use super::{Simd, WideSimd};

/// Values per Q4_1 block.
const BLOCK: usize = 32;
/// Bytes per Q4_1 block: F16 scale, F16 minimum, 16 bytes of nibbles
/// (value `i` in the low nibble of byte `i`, value `16 + i` in the high).
const BLOCK_BYTES: usize = 20;
/// Bytes of one block index across a four-row group: the four scales,
/// the four minimums, then the four rows' nibbles (see `fields_first`).
const STEP_BYTES: usize = ROWS_PER_GROUP * BLOCK_BYTES;
const MINS_AT: usize = 2 * ROWS_PER_GROUP;
const VALUES_AT: usize = 4 * ROWS_PER_GROUP;
/// Bytes of nibbles per block.
const PACKED: usize = BLOCK / 2;

/// Rewrites one group step (four GGUF blocks side by side) field by field,
/// so that the AVX-512 kernel loads the four rows' nibbles in one 64-byte
/// load and their scales and minimums in one conversion.
fn fields_first(step: &mut [u8]) {
    let mut blocks = [0u8; STEP_BYTES];
    blocks.copy_from_slice(step);
    for (lane, block) in blocks.chunks_exact(BLOCK_BYTES).enumerate() {
        step[2 * lane..2 * lane + 2].copy_from_slice(&block[..2]);
        step[MINS_AT + 2 * lane..MINS_AT + 2 * lane + 2].copy_from_slice(&block[2..4]);
        let at = VALUES_AT + PACKED * lane;
        step[at..at + PACKED].copy_from_slice(&block[4..]);
    }
}

/// Q4_1 weights, `rows x cols`, regrouped four rows at a time, each block
/// index of a group held field by field.
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    groups: Vec<u8>,
    rows: usize,
    cols: usize,
    pub(super) isa: Isa,
}

impl Q4_1Matrix {
    /// From GGUF's layout. `None` when this CPU lacks AVX2/FMA.
    pub fn new(bytes: &[u8], rows: usize, cols: usize) -> Result<Option<Self>, KernelError> {
        check_layout(GgmlDType::Q4_1, bytes, rows, cols)?;
        let Some(isa) = Isa::detect() else {
            return Ok(None);
        };
        let mut groups = regroup(
            bytes,
            rows,
            cols / BLOCK,
            BLOCK_BYTES,
            BLOCK_BYTES,
            keep_block,
        );
        groups.chunks_exact_mut(STEP_BYTES).for_each(fields_first);
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
        let activations = Activations::quantize(x, self.cols)?;
        let m = x.len() / self.cols;
        let kernel = Kernel {
            isa: self.isa,
            activations: &activations,
        };
        Ok(for_each_group(
            &self.groups,
            self.cols / BLOCK * STEP_BYTES,
            self.rows,
            m,
            &kernel,
        ))
    }
}

/// The Q4_1 product over one set of quantized activations.
struct Kernel<'a> {
    isa: Isa,
    activations: &'a Activations,
}

impl GroupKernel for Kernel<'_> {
    fn dot<const N: usize>(&self, weights: &[u8], first: usize) -> [[f32; ROWS_PER_GROUP]; N] {
        let rows = std::array::from_fn(|n| self.activations.row(first + n));
        if let Some(vnni) = self.isa.wide_vnni {
            return dot_group_wide(vnni, weights, rows);
        }
        if let Some(wide) = self.isa.wide {
            return dot_group_wide(wide, weights, rows);
        }
        match self.isa.simd_vnni {
            Some(vnni) => dot_group(vnni, weights, rows),
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
    _rows: [ActivationRow<'_>; N],
) -> [[f32; ROWS_PER_GROUP]; N] {
    match simd {}
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
fn dot_group<B: NarrowBytes, const N: usize>(
    bytes: B,
    weights: &[u8],
    rows: [ActivationRow<'_>; N],
) -> [[f32; ROWS_PER_GROUP]; N] {
    let simd = bytes.v3();
    bytes.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::{__m128i, __m256i};
            let low_nibbles = simd.avx._mm256_set1_epi8(0x0F);
            let mut acc = [[simd.avx._mm256_setzero_ps(); ROWS_PER_GROUP]; N];
            let mut min_terms = [[0f32; ROWS_PER_GROUP]; N];
            for (b, step) in weights.chunks_exact(STEP_BYTES).enumerate() {
                let ys: [__m256i; N] = std::array::from_fn(|n| bytemuck::cast(rows[n].1[b]));
                let y_scales: [f32; N] = std::array::from_fn(|n| rows[n].0[b]);
                let y_sums: [f32; N] = std::array::from_fn(|n| rows[n].2[b]);
                for (lane, packed) in step[VALUES_AT..].chunks_exact(PACKED).enumerate() {
                    let half = |at: usize| f16::from_le_bytes([step[at], step[at + 1]]).to_f32();
                    let d = half(2 * lane);
                    let m = half(MINS_AT + 2 * lane);
                    let packed: __m128i = bytemuck::pod_read_unaligned(packed);
                    // Low nibbles are values 0..16, high nibbles 16..32.
                    let both = simd.avx2._mm256_inserti128_si256::<1>(
                        simd.avx._mm256_castsi128_si256(packed),
                        simd.sse2._mm_srli_epi16::<4>(packed),
                    );
                    let q = simd.avx2._mm256_and_si256(both, low_nibbles);
                    for n in 0..N {
                        let quads = bytes.quads(q, ys[n]);
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

/// `dot_group` on AVX-512: one 64-byte load takes the four rows' nibbles,
/// 128 bits a row, which meet the activation block's first and second
/// halves repeated in every 128-bit lane; element `e` of the sums belongs
/// to row `e / 4`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dot_group_wide<B: WideBytes, const N: usize>(
    bytes: B,
    weights: &[u8],
    rows: [ActivationRow<'_>; N],
) -> [[f32; ROWS_PER_GROUP]; N] {
    let simd = bytes.v4();
    bytes.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::{__m128i, __m512, __m512i};
            let low_nibbles = simd.avx512f._mm512_set1_epi8(0x0F);
            // From the converted scales [d0..d3, m0..m3, ...]: each row's
            // scale, and its minimum, over its four elements.
            let row_scales: __m512i =
                bytemuck::cast(std::array::from_fn::<i32, 16, _>(|e| e as i32 / 4));
            let row_mins: __m512i =
                bytemuck::cast(std::array::from_fn::<i32, 16, _>(|e| 4 + e as i32 / 4));
            let mut acc = [simd.avx512f._mm512_setzero_ps(); N];
            let mut min_terms = [simd.avx512f._mm512_setzero_ps(); N];
            for (b, step) in weights.chunks_exact(STEP_BYTES).enumerate() {
                let halves = widen_halves(simd, &step[..VALUES_AT]);
                let ds = simd.avx512f._mm512_permutexvar_ps(row_scales, halves);
                let ms = simd.avx512f._mm512_permutexvar_ps(row_mins, halves);
                let q: __m512i = bytemuck::pod_read_unaligned(&step[VALUES_AT..]);
                // Low nibbles are values 0..16 of each row, high 16..32.
                let low = simd.avx512f._mm512_and_si512(q, low_nibbles);
                let high = simd
                    .avx512f
                    ._mm512_and_si512(simd.avx512bw._mm512_srli_epi16::<4>(q), low_nibbles);
                for n in 0..N {
                    let [first, second]: [__m128i; 2] = bytemuck::cast(rows[n].1[b]);
                    let first = simd.avx512f._mm512_broadcast_i32x4(first);
                    let second = simd.avx512f._mm512_broadcast_i32x4(second);
                    // Nibbles are unsigned: no sign trick, and two pair
                    // sums (at most 2 x 15 x 127 each) fit 16 bits.
                    let quads = bytes.quads2(low, first, high, second);
                    acc[n] = simd.avx512f._mm512_fmadd_ps(
                        simd.avx512f._mm512_cvtepi32_ps(quads),
                        simd.avx512f
                            ._mm512_mul_ps(ds, simd.avx512f._mm512_set1_ps(rows[n].0[b])),
                        acc[n],
                    );
                    min_terms[n] = simd.avx512f._mm512_fmadd_ps(
                        ms,
                        simd.avx512f._mm512_set1_ps(rows[n].2[b]),
                        min_terms[n],
                    );
                }
            }
            std::array::from_fn(|n| {
                let sums: [[f32; 4]; ROWS_PER_GROUP] = bytemuck::cast::<__m512, _>(acc[n]);
                let mins: [[f32; 4]; ROWS_PER_GROUP] = bytemuck::cast::<__m512, _>(min_terms[n]);
                // Every element of a row holds its whole minimum term.
                std::array::from_fn(|lane| sums[lane].iter().sum::<f32>() + mins[lane][0])
            })
        },
    )
}
