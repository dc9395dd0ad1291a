//! Q8_0 weights (blocks of 32 signed bytes and an F16 scale) times
//! activations quantized the same way.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::{
    activation_rows, check_blocks, check_layout, for_each_group, keep_block, quantize_block,
    regroup, regroup_one, GroupKernel, Isa, KernelError, ROWS_PER_GROUP,
};
#[cfg(target_arch = "x86_64")]
use super::{lane_sum, widen_halves, NarrowBytes, WideBytes};
#[cfg(not(target_arch = "x86_64"))]
use super::{Simd, WideSimd};

/// Values per Q8_0 block.
const BLOCK: usize = 32;
/// Bytes per Q8_0 block: an F16 scale, then 32 signed bytes.
const BLOCK_BYTES: usize = 34;
/// Bytes of one block index across a four-row group.
const STEP_BYTES: usize = ROWS_PER_GROUP * BLOCK_BYTES;
/// Where the values start in a group's step: after the four scales.
const VALUES_AT: usize = ROWS_PER_GROUP * 2;

/// Activation rows quantized to 8 bits per 32-value block, with an F32
/// scale per block (llama.cpp and candle round the scale to F16), and each
/// block's sum (scale times the sum of its rounded values) for formats
/// with a minimum (Q4_1).
#[derive(Debug, Clone)]
pub(super) struct Activations {
    scales: Vec<f32>,
    values: Vec<[i8; BLOCK]>,
    sums: Vec<f32>,
    blocks_per_row: usize,
}

impl Activations {
    pub(super) fn quantize(x: &[f32], cols: usize) -> Result<Self, KernelError> {
        activation_rows(x, cols)?;
        check_blocks(GgmlDType::Q8_0, cols)?;
        let blocks = x.len() / BLOCK;
        let mut scales = Vec::with_capacity(blocks);
        let mut values = Vec::with_capacity(blocks);
        let mut sums = Vec::with_capacity(blocks);
        for chunk in x.chunks_exact(BLOCK) {
            let mut q = [0i8; BLOCK];
            let scale = quantize_block(chunk, &mut q);
            scales.push(scale);
            sums.push(scale * q.iter().map(|&v| i32::from(v)).sum::<i32>() as f32);
            values.push(q);
        }
        Ok(Self {
            scales,
            values,
            sums,
            blocks_per_row: cols / BLOCK,
        })
    }

    /// Scales, values and sums of row `i`.
    pub(super) fn row(&self, i: usize) -> (&[f32], &[[i8; BLOCK]], &[f32]) {
        let range = i * self.blocks_per_row..(i + 1) * self.blocks_per_row;
        (
            &self.scales[range.clone()],
            &self.values[range.clone()],
            &self.sums[range],
        )
    }
}

/// Q8_0 weights, `rows x cols`, regrouped four rows at a time (see
/// `regroup`), each block index of a group held as the four rows' F16
/// scales and then their 4 x 32 values, so that the AVX-512 kernel reads
/// two rows' values in one 64-byte load and the four scales in one place.
///
/// In GGUF's layout (each row its own run of blocks) a four-row step reads
/// four streams a row apart; on this machine that ran at half the speed of
/// one sequential stream (6 against 12 GB/s on Gemma 3's 178 MB output
/// projection). Grouped, the step reads one stream.
#[derive(Debug, Clone)]
pub struct Q8_0Matrix {
    groups: Vec<u8>,
    rows: usize,
    cols: usize,
    pub(super) isa: Isa,
}

/// Why weights could not be read into the grouped layout.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Layout(#[from] KernelError),
    #[error("reading Q8_0 weights: {0}")]
    Io(#[from] std::io::Error),
}

/// Moves the four scales of one group step (four GGUF blocks side by side)
/// in front of the four rows' values.
fn scales_first(step: &mut [u8]) {
    let mut blocks = [0u8; STEP_BYTES];
    blocks.copy_from_slice(step);
    for (lane, block) in blocks.chunks_exact(BLOCK_BYTES).enumerate() {
        step[2 * lane..2 * lane + 2].copy_from_slice(&block[..2]);
        let at = VALUES_AT + lane * BLOCK;
        step[at..at + BLOCK].copy_from_slice(&block[2..]);
    }
}

impl Q8_0Matrix {
    /// From GGUF's layout. `None` when this CPU lacks AVX2/FMA.
    pub fn new(bytes: &[u8], rows: usize, cols: usize) -> Result<Option<Self>, KernelError> {
        check_layout(GgmlDType::Q8_0, bytes, rows, cols)?;
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
        groups.chunks_exact_mut(STEP_BYTES).for_each(scales_first);
        Ok(Some(Self {
            groups,
            rows,
            cols,
            isa,
        }))
    }

    /// Reads `rows x cols` weights in GGUF's layout from `reader`, four
    /// rows at a time, straight into the grouped layout: a large table
    /// (Gemma 3's 178 MB embedding) is never held twice while loading.
    /// `None` when this CPU lacks AVX2/FMA (nothing is read then).
    pub fn read(
        reader: &mut impl std::io::Read,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self>, ReadError> {
        check_blocks(GgmlDType::Q8_0, cols)?;
        let Some(isa) = Isa::detect() else {
            return Ok(None);
        };
        let row_bytes = cols / BLOCK * BLOCK_BYTES;
        let group_bytes = cols / BLOCK * STEP_BYTES;
        let mut groups = vec![0u8; rows.div_ceil(ROWS_PER_GROUP) * group_bytes];
        let mut source = vec![0u8; ROWS_PER_GROUP * row_bytes];
        for (g, group) in groups.chunks_exact_mut(group_bytes).enumerate() {
            let lanes = ROWS_PER_GROUP.min(rows - g * ROWS_PER_GROUP);
            let source = &mut source[..lanes * row_bytes];
            reader.read_exact(source)?;
            regroup_one(
                source,
                group,
                cols / BLOCK,
                BLOCK_BYTES,
                BLOCK_BYTES,
                &keep_block,
            );
            group.chunks_exact_mut(STEP_BYTES).for_each(scales_first);
        }
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

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weights held.
    pub fn size_in_bytes(&self) -> usize {
        self.groups.len()
    }

    fn group_bytes(&self) -> usize {
        self.cols / BLOCK * STEP_BYTES
    }

    /// Row `row`, dequantised (an embedding lookup in a table shared with
    /// an output projection).
    pub fn row(&self, row: usize) -> Option<Vec<f32>> {
        if row >= self.rows {
            return None;
        }
        let (group, lane) = (row / ROWS_PER_GROUP, row % ROWS_PER_GROUP);
        let group = &self.groups[group * self.group_bytes()..(group + 1) * self.group_bytes()];
        let mut out = Vec::with_capacity(self.cols);
        for step in group.chunks_exact(STEP_BYTES) {
            let scale = f16::from_le_bytes([step[2 * lane], step[2 * lane + 1]]).to_f32();
            let at = VALUES_AT + lane * BLOCK;
            out.extend(
                step[at..at + BLOCK]
                    .iter()
                    .map(|&q| f32::from(q as i8) * scale),
            );
        }
        Some(out)
    }

    /// `x Wᵀ` for `x` of `m` rows of `cols` values: `m x rows` values,
    /// row-major.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>, KernelError> {
        let activations = Activations::quantize(x, self.cols)?;
        let m = x.len() / self.cols;
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(amx) = self.isa.amx {
            if m >= amx_tiles::MIN_ROWS {
                return Ok(amx_tiles::matmul(amx, self, &activations, m));
            }
        }
        let kernel = Kernel {
            isa: self.isa,
            activations: &activations,
        };
        Ok(for_each_group(
            &self.groups,
            self.group_bytes(),
            self.rows,
            m,
            &kernel,
        ))
    }
}

/// The Q8_0 product over one set of quantized activations.
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

/// Scales, values and sums of one activation row.
pub(super) type ActivationRow<'a> = (&'a [f32], &'a [[i8; BLOCK]], &'a [f32]);

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
/// weight block is loaded and its sign taken once for all `N`.
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
            use std::arch::x86_64::__m256i;
            let mut acc = [[simd.avx._mm256_setzero_ps(); ROWS_PER_GROUP]; N];
            for (b, step) in weights.chunks_exact(STEP_BYTES).enumerate() {
                let ys: [__m256i; N] = std::array::from_fn(|n| bytemuck::cast(rows[n].1[b]));
                let y_scales: [f32; N] = std::array::from_fn(|n| rows[n].0[b]);
                let (scales, values) = step.split_at(VALUES_AT);
                for (lane, block) in values.chunks_exact(BLOCK).enumerate() {
                    let x_scale =
                        f16::from_le_bytes([scales[2 * lane], scales[2 * lane + 1]]).to_f32();
                    let x: __m256i = bytemuck::pod_read_unaligned(block);
                    // maddubs multiplies unsigned by signed bytes: take |x|
                    // and move x's sign onto y.
                    let x_abs = simd.avx2._mm256_sign_epi8(x, x);
                    for n in 0..N {
                        let y_signed = simd.avx2._mm256_sign_epi8(ys[n], x);
                        let quads = bytes.quads(x_abs, y_signed);
                        acc[n][lane] = simd.fma._mm256_fmadd_ps(
                            simd.avx._mm256_cvtepi32_ps(quads),
                            simd.avx._mm256_set1_ps(x_scale * y_scales[n]),
                            acc[n][lane],
                        );
                    }
                }
            }
            acc.map(|row| row.map(lane_sum))
        },
    )
}

/// `dot_group` on AVX-512: one 64-byte load takes two rows' blocks, which
/// meet the activation block repeated in both halves; AVX-512 has no
/// byte `sign`, so the activations are negated under the mask of the
/// weights' signs instead.
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
            use std::arch::x86_64::{__m512, __m512i};
            const PAIRS: usize = ROWS_PER_GROUP / 2;
            let zero = simd.avx512f._mm512_setzero_si512();
            // Spreads rows `2h` and `2h + 1`'s scales over the two halves.
            let spread = |h: i32| -> __m512i {
                let mut lanes = [2 * h; 16];
                lanes[8..].fill(2 * h + 1);
                bytemuck::cast(lanes)
            };
            let spreads: [__m512i; PAIRS] = std::array::from_fn(|h| spread(h as i32));
            let mut acc = [[simd.avx512f._mm512_setzero_ps(); PAIRS]; N];
            for (b, step) in weights.chunks_exact(STEP_BYTES).enumerate() {
                let x_scales = widen_halves(simd, &step[..VALUES_AT]);
                let ys: [__m512i; N] = std::array::from_fn(|n| {
                    simd.avx512f
                        ._mm512_broadcast_i64x4(bytemuck::cast(rows[n].1[b]))
                });
                let y_scales: [__m512; N] =
                    std::array::from_fn(|n| simd.avx512f._mm512_set1_ps(rows[n].0[b]));
                for (h, pair) in step[VALUES_AT..].chunks_exact(2 * BLOCK).enumerate() {
                    let x: __m512i = bytemuck::pod_read_unaligned(pair);
                    let x_abs = simd.avx512bw._mm512_abs_epi8(x);
                    let negative = simd.avx512bw._mm512_movepi8_mask(x);
                    let pair_scales = simd.avx512f._mm512_permutexvar_ps(spreads[h], x_scales);
                    for n in 0..N {
                        // maddubs multiplies unsigned by signed bytes: |x|
                        // times y with x's sign.
                        let y_signed = simd
                            .avx512bw
                            ._mm512_mask_sub_epi8(ys[n], negative, zero, ys[n]);
                        let quads = bytes.quads(x_abs, y_signed);
                        acc[n][h] = simd.avx512f._mm512_fmadd_ps(
                            simd.avx512f._mm512_cvtepi32_ps(quads),
                            simd.avx512f._mm512_mul_ps(pair_scales, y_scales[n]),
                            acc[n][h],
                        );
                    }
                }
            }
            std::array::from_fn(|n| {
                std::array::from_fn(|lane| {
                    let halves: [[f32; 8]; 2] = bytemuck::cast(acc[n][lane / 2]);
                    halves[lane % 2].iter().sum()
                })
            })
        },
    )
}

/// Q8_0 products on AMX tiles, for several activation rows at a time
/// (batched decode, prefill): per 32-value block, one `tdpbssd` takes four
/// weight rows (as they lie in a group step) against 16 activation rows (in
/// the VNNI layout the tile wants, built once per product), and the 4 × 16
/// integer sums are scaled and added in F32. The integer sums are those of
/// the AVX kernels; the F32 sums are added in another order (whole blocks
/// instead of four-value lanes), so results differ in the last bits.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx_tiles {
    use std::sync::atomic::{AtomicU32, Ordering};

    use half::f16;

    use super::super::unsafe_simd::{
        Amx, AMX_ACTIVATION_ROWS, AMX_ACTIVATION_TILE, AMX_BLOCK, AMX_WEIGHT_ROWS,
    };
    use super::{Activations, Q8_0Matrix, BLOCK, STEP_BYTES, VALUES_AT};
    use crate::engine::kernels::ROWS_PER_GROUP;

    /// Fewer activation rows take the AVX kernels. A tile computes 16
    /// columns whatever the rows: with one row (single-stream decode) it
    /// halved Gemma 3's decode speed against the AVX-512 VNNI kernel.
    pub(super) const MIN_ROWS: usize = 16;

    const _: () = assert!(AMX_WEIGHT_ROWS == ROWS_PER_GROUP && AMX_BLOCK == BLOCK);
    const _: () = assert!(STEP_BYTES - VALUES_AT == AMX_WEIGHT_ROWS * AMX_BLOCK);

    /// Activation rows `16c..16c+16` of every block, as tiles, and their scales.
    struct ActivationTiles {
        tiles: Vec<[u8; AMX_ACTIVATION_TILE]>,
        scales: Vec<[f32; AMX_ACTIVATION_ROWS]>,
        blocks_per_row: usize,
    }

    impl ActivationTiles {
        fn new(activations: &Activations, m: usize, blocks_per_row: usize) -> Self {
            let chunks = m.div_ceil(AMX_ACTIVATION_ROWS);
            let mut tiles = vec![[0u8; AMX_ACTIVATION_TILE]; chunks * blocks_per_row];
            let mut scales = vec![[0f32; AMX_ACTIVATION_ROWS]; chunks * blocks_per_row];
            for i in 0..m {
                let (row_scales, values, _) = activations.row(i);
                let (chunk, n) = (i / AMX_ACTIVATION_ROWS, i % AMX_ACTIVATION_ROWS);
                for (b, (block, scale)) in values.iter().zip(row_scales).enumerate() {
                    let at = chunk * blocks_per_row + b;
                    for (k, &v) in block.iter().enumerate() {
                        tiles[at][(k / 4) * 4 * AMX_ACTIVATION_ROWS + 4 * n + k % 4] = v as u8;
                    }
                    scales[at][n] = *scale;
                }
            }
            Self {
                tiles,
                scales,
                blocks_per_row,
            }
        }
    }

    pub(super) fn matmul(
        amx: Amx,
        matrix: &Q8_0Matrix,
        activations: &Activations,
        m: usize,
    ) -> Vec<f32> {
        let rows = matrix.rows;
        let blocks_per_row = matrix.cols / BLOCK;
        let tiles = ActivationTiles::new(activations, m, blocks_per_row);
        let group_bytes = matrix.group_bytes();
        let chunks = m.div_ceil(AMX_ACTIVATION_ROWS);
        // As in `for_each_group`: each output written once, by its group's owner.
        let out: Vec<AtomicU32> = (0..m * rows).map(|_| AtomicU32::new(0)).collect();
        candle_core::utils::barrier_pool().execute_chunked(
            rows.div_ceil(ROWS_PER_GROUP),
            |range| {
                amx.with_tiles(|t| {
                    let mut sums = [[0i32; AMX_ACTIVATION_ROWS]; AMX_WEIGHT_ROWS];
                    for group in range {
                        let weights =
                            &matrix.groups[group * group_bytes..(group + 1) * group_bytes];
                        let first = group * ROWS_PER_GROUP;
                        let lanes = ROWS_PER_GROUP.min(rows - first);
                        for chunk in 0..chunks {
                            let mut acc = [[0f32; AMX_ACTIVATION_ROWS]; AMX_WEIGHT_ROWS];
                            for (b, step) in weights.chunks_exact(STEP_BYTES).enumerate() {
                                let Some(values) = step[VALUES_AT..].first_chunk() else {
                                    continue;
                                };
                                let at = chunk * tiles.blocks_per_row + b;
                                t.block(values, &tiles.tiles[at], &mut sums);
                                let y_scales = &tiles.scales[at];
                                for (r, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
                                    let x_scale =
                                        f16::from_le_bytes([step[2 * r], step[2 * r + 1]]).to_f32();
                                    for ((acc, &sum), &y_scale) in
                                        acc.iter_mut().zip(sums).zip(y_scales)
                                    {
                                        *acc += sum as f32 * (x_scale * y_scale);
                                    }
                                }
                            }
                            let valid = AMX_ACTIVATION_ROWS.min(m - chunk * AMX_ACTIVATION_ROWS);
                            for (r, acc) in acc.iter().enumerate().take(lanes) {
                                for (n, value) in acc.iter().enumerate().take(valid) {
                                    let i = chunk * AMX_ACTIVATION_ROWS + n;
                                    out[i * rows + first + r]
                                        .store(value.to_bits(), Ordering::Relaxed);
                                }
                            }
                        }
                    }
                })
            },
        );
        out.into_iter()
            .map(|v| f32::from_bits(v.into_inner()))
            .collect()
    }
}
