//! Q4_K weights (super-blocks of 256 four-bit values in eight sub-blocks of
//! 32, each with a 6-bit scale and a 6-bit minimum) times activations
//! quantized to 8 bits per 256 values.
//!
//! Sixteen weight rows are held side by side: lane `r` of every vector is
//! row `r` of the group, the way llama.cpp's repacked Q4_K kernels hold
//! eight. A Q4_K super-block has to be scaled per sub-block and then per
//! block in F32; with one row per vector (the layout Q8_0 and Q4_1 use
//! here) that tail, the horizontal sums and the sub-block scales' spread
//! over the lanes cost as much as the byte products themselves. Side by
//! side, one instruction scales sixteen rows, four activation bytes are
//! broadcast to every lane, and no lane is ever summed across. Each 32-bit
//! lane of a step holds four of a row's values in its low nibbles and the
//! next four in its high ones, so a step is two byte products per
//! activation row: one `vpdpbusd` each on VNNI.

use candle_core::quantized::GgmlDType;
#[cfg(target_arch = "x86_64")]
use half::f16;

#[cfg(target_arch = "x86_64")]
use super::q4_1::nibbles_narrow;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
use super::unsafe_simd::{
    WideSums, WideTiles, WideWeights, AMX_WIDE_PARTS, AMX_WIDE_RUNS, AMX_WIDE_STEPS,
    AMX_WIDE_WEIGHT_TILE,
};
#[cfg(not(target_arch = "x86_64"))]
use super::WideSimd;
use super::{
    activation_rows, check_layout, for_each_group, quantize_block, side_tiles, GroupKernel, Isa,
    KernelError, Simd,
};
#[cfg(target_arch = "x86_64")]
use super::{NarrowBytes, WideBytes};

/// Values per Q4_K super-block.
const BLOCK: usize = 256;
/// Values per sub-block (one scale, one minimum).
const SUB: usize = 32;
/// Sub-blocks per super-block.
const SUBS: usize = BLOCK / SUB;
/// Bytes per Q4_K block in GGUF: F16 scale and minimum scale, 12 bytes of
/// packed 6-bit sub-block scales and minimums, 128 bytes of nibbles.
const BLOCK_BYTES: usize = 144;
/// Weight rows held side by side.
const LANES: usize = 16;
/// Bytes per row and block as held: the same as GGUF's, with the 6-bit
/// scales and minimums unpacked to a byte each (8 + 8 instead of 12).
const PACKED_BYTES: usize = 148;
/// Bytes of one super-block of the group's sixteen rows: F16 scales, F16
/// minimum scales, sub-block scales (sub-block by sub-block, a byte per
/// row), sub-block minimums (in pairs of sub-blocks, two bytes per row),
/// then the nibbles, step by step.
const STEP_BYTES: usize = LANES * PACKED_BYTES;
const D_AT: usize = 0;
const DMIN_AT: usize = 2 * LANES;
const SCALES_AT: usize = 4 * LANES;
const MINS_AT: usize = SCALES_AT + SUBS * LANES;
const VALUES_AT: usize = MINS_AT + SUBS * LANES;
/// Eight values per row and step: four in the low nibbles, four in the high.
const STEP_VALUES: usize = 8;
/// Steps per sub-block.
const STEPS: usize = SUB / STEP_VALUES;
/// Bytes per step: four bytes a row.
const QUAD_BYTES: usize = 4 * LANES;
/// How far ahead the AVX-512 kernel asks for weights, in super-blocks, and
/// how many cache lines it asks for per sub-block (all of a super-block's
/// 37 lines over its eight sub-blocks).
const PREFETCH_STEPS: usize = 2;
/// How far ahead below four activation rows, where the CPU gains
/// (`Isa::prefetch_ahead`): the loads then wait on the memory itself.
/// Phi-1.5 alone on AMD Zen 5: 70 tok/s at 3 or 4 super-blocks, about 60 at
/// 6 or 8, 47–58 with none.
const STREAM_PREFETCH_STEPS: usize = 4;
/// Activation rows from which the products run on AMX tiles, where the
/// CPU has them: below, laying a super-block's weights out as tiles costs
/// more than the tiles save (`kernel_bench q4k 2048 2048 M` on an Intel
/// Xeon: 16 rows 0.39 against 0.29 ms, 32 even, 64 0.92 against 1.03).
const TILE_MIN_ROWS: usize = 64;
const PREFETCH_LINES: usize = STEP_BYTES.div_ceil(64).div_ceil(SUBS);

/// One super-block of one activation row, quantized to 8 bits.
#[derive(Debug, Clone)]
struct ActivationBlock {
    scale: f32,
    /// The 256 values, four to a little-endian word: what a step broadcasts.
    quads: [i32; BLOCK / 4],
    /// Sums of sub-blocks `2p` (low 16 bits) and `2p + 1` (high 16 bits),
    /// each within ±32·127: the minimums' term takes both in one `madd`.
    sum_pairs: [i32; SUBS / 2],
}

fn quantize(simd: Simd, x: &[f32], cols: usize) -> Result<Vec<ActivationBlock>, KernelError> {
    activation_rows(x, cols)?;
    Ok(x.chunks_exact(BLOCK)
        .map(|chunk| {
            let mut flat = [0i8; BLOCK];
            let mut sub_sums = [0i32; SUBS];
            let scale = quantize_block(simd, chunk, &mut flat, &mut sub_sums);
            let quads = std::array::from_fn(|k| {
                i32::from_le_bytes(std::array::from_fn(|t| flat[4 * k + t].to_le_bytes()[0]))
            });
            let sum_pairs = std::array::from_fn(|p| {
                // Each sum fits 16 bits (|sum| ≤ 4064): keep its low half.
                let low = sub_sums[2 * p] & 0xFFFF;
                let high = sub_sums[2 * p + 1] & 0xFFFF;
                low | (high << 16)
            });
            ActivationBlock {
                scale,
                quads,
                sum_pairs,
            }
        })
        .collect())
}

/// A GGUF Q4_K block's sub-block scales and minimums, unpacked from their
/// 6-bit fields (llama.cpp's `get_scale_min_k4`).
fn scales_and_mins(packed: &[u8]) -> ([u8; SUBS], [u8; SUBS]) {
    let mut scales = [0u8; SUBS];
    let mut mins = [0u8; SUBS];
    for j in 0..SUBS {
        (scales[j], mins[j]) = if j < 4 {
            (packed[j] & 63, packed[j + 4] & 63)
        } else {
            (
                (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4),
                (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
            )
        };
    }
    (scales, mins)
}

/// Writes one GGUF block of weight row `lane` into `step`, the held
/// super-block of its group (layout at [`STEP_BYTES`]).
fn pack_block(block: &[u8], lane: usize, step: &mut [u8]) {
    step[D_AT + 2 * lane..D_AT + 2 * lane + 2].copy_from_slice(&block[..2]);
    step[DMIN_AT + 2 * lane..DMIN_AT + 2 * lane + 2].copy_from_slice(&block[2..4]);
    let (scales, mins) = scales_and_mins(&block[4..16]);
    for j in 0..SUBS {
        step[SCALES_AT + LANES * j + lane] = scales[j];
        step[MINS_AT + 2 * LANES * (j / 2) + 2 * lane + j % 2] = mins[j];
    }
    // GGUF: bytes 32c..32c + 32 hold values 64c.. in their low nibbles and
    // 64c + 32.. in their high ones.
    let mut values = [0u8; BLOCK];
    for (c, bytes) in block[16..].chunks_exact(32).enumerate() {
        for (l, &byte) in bytes.iter().enumerate() {
            values[64 * c + l] = byte & 0xF;
            values[64 * c + 32 + l] = byte >> 4;
        }
    }
    for (k, eight) in values.chunks_exact(STEP_VALUES).enumerate() {
        let at = VALUES_AT + k * QUAD_BYTES + 4 * lane;
        for t in 0..4 {
            step[at + t] = eight[t] | (eight[t + 4] << 4);
        }
    }
}

/// Q4_K weights, `rows x cols`, held sixteen rows side by side.
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
        let row_blocks = cols / BLOCK;
        let row_bytes = row_blocks * BLOCK_BYTES;
        let group_bytes = row_blocks * STEP_BYTES;
        // The last group's missing rows stay zero (scales 0): their
        // products are computed and dropped.
        let mut groups = vec![0u8; rows.div_ceil(LANES) * group_bytes];
        for (source, group) in bytes
            .chunks(LANES * row_bytes)
            .zip(groups.chunks_exact_mut(group_bytes))
        {
            for (lane, row) in source.chunks_exact(row_bytes).enumerate() {
                for (block, step) in row
                    .chunks_exact(BLOCK_BYTES)
                    .zip(group.chunks_exact_mut(STEP_BYTES))
                {
                    pack_block(block, lane, step);
                }
            }
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

    /// Bytes of weights held.
    pub fn size_in_bytes(&self) -> usize {
        self.groups.len()
    }

    /// `x Wᵀ` for `x` of `m` rows of `cols` values: `m x rows` values,
    /// row-major.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>, KernelError> {
        let activations = quantize(self.isa.simd, x, self.cols)?;
        let m = x.len() / self.cols;
        let row_blocks = self.cols / BLOCK;
        let kernel = Kernel {
            isa: self.isa,
            activations: &activations,
            row_blocks,
            rows: (m >= TILE_MIN_ROWS)
                .then(|| {
                    side_tiles::ActivationRows::new(&self.isa, m, row_blocks, BLOCK, |i, b, out| {
                        let block = &activations[i * row_blocks + b];
                        out.copy_from_slice(pulp::bytemuck::cast_slice(&block.quads));
                    })
                })
                .flatten(),
        };
        Ok(for_each_group(
            &self.groups,
            row_blocks * STEP_BYTES,
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
    /// The activations of each whole run of 16 rows as bytes for AMX
    /// tiles, where the products run on tiles.
    rows: Option<side_tiles::ActivationRows>,
}

impl Kernel<'_> {
    fn row(&self, i: usize) -> &[ActivationBlock] {
        &self.activations[i * self.row_blocks..(i + 1) * self.row_blocks]
    }
}

impl GroupKernel<LANES> for Kernel<'_> {
    fn dot<const N: usize>(&self, weights: &[u8], first: usize) -> [[f32; LANES]; N] {
        let rows = std::array::from_fn(|n| self.row(first + n));
        let ahead = self
            .isa
            .prefetch_ahead(N, PREFETCH_STEPS, STREAM_PREFETCH_STEPS);
        if let Some(vnni) = self.isa.wide_vnni {
            return dot_group_wide(vnni, weights, rows, ahead);
        }
        if let Some(wide) = self.isa.wide {
            return dot_group_wide(wide, weights, rows, ahead);
        }
        match self.isa.simd_vnni {
            Some(vnni) => dot_group(vnni, weights, rows),
            None => dot_group(self.isa.simd, weights, rows),
        }
    }

    fn isa(&self) -> Isa {
        self.isa
    }

    /// Eight on AVX-512: the unpacked nibbles then serve eight activation
    /// rows, with one accumulator each (24 of the 32 registers).
    fn rows_per_step(&self) -> usize {
        if self.isa.wide.is_some() {
            8
        } else {
            4
        }
    }

    fn on_worker(&self, work: impl FnOnce()) {
        match &self.rows {
            Some(rows) => rows.on_worker(work),
            None => work(),
        }
    }

    fn dot_runs(&self, weights: &[u8], store: &impl Fn(usize, &[f32; LANES])) -> usize {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(rows) = &self.rows {
            return rows.with_tiles(|t, wide| {
                let runs = Runs {
                    t,
                    rows,
                    activations: self.activations,
                    row_blocks: self.row_blocks,
                };
                match wide {
                    side_tiles::Wide::Vnni(vnni) => dot_runs_tiles(vnni, &runs, weights, store),
                    side_tiles::Wide::Plain(v4) => dot_runs_tiles(v4, &runs, weights, store),
                }
            });
        }
        let _ = (weights, store);
        0
    }
}

/// Dot products of one sixteen-row group with `N` activation rows.
#[cfg(not(target_arch = "x86_64"))]
fn dot_group_wide<const N: usize>(
    simd: WideSimd,
    _weights: &[u8],
    _rows: [&[ActivationBlock]; N],
    _ahead: usize,
) -> [[f32; LANES]; N] {
    match simd {}
}

/// Dot products of one sixteen-row group with `N` activation rows.
#[cfg(not(target_arch = "x86_64"))]
fn dot_group<const N: usize>(
    simd: Simd,
    _weights: &[u8],
    _rows: [&[ActivationBlock]; N],
) -> [[f32; LANES]; N] {
    match simd {}
}

/// Dot products of one sixteen-row group with `N` activation rows; each
/// step of weights is loaded and unpacked once for all `N`.
///
/// Per row and super-block: `d·y_scale·Σ_j scale_j·Σ q·y` minus
/// `dmin·y_scale·Σ_j min_j·Σ y`. Both sums over `j` are exact integers,
/// formed the same way on every path (VNNI or not only changes how the
/// four-byte products are added), and the F32 tail is the same lane-wise
/// sequence of operations on every path, so all paths give the same bits.
/// Each super-block asks for the weights `ahead` super-blocks on (none for
/// 0).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dot_group_wide<B: WideBytes, const N: usize>(
    bytes: B,
    weights: &[u8],
    rows: [&[ActivationBlock]; N],
    ahead: usize,
) -> [[f32; LANES]; N] {
    let simd = bytes.v4();
    bytes.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::{__m128i, __m512i};
            let low_nibbles = simd.avx512f._mm512_set1_epi8(0x0F);
            let zero = simd.avx512f._mm512_setzero_si512();
            let mut acc = [simd.avx512f._mm512_setzero_ps(); N];
            for (b, step) in weights.chunks_exact(STEP_BYTES).enumerate() {
                let ys: [&ActivationBlock; N] = std::array::from_fn(|n| &rows[n][b]);
                let mut scaled = [zero; N];
                for j in 0..SUBS {
                    // The hardware's prefetcher alone leaves the loads and
                    // the products in turn when products are many per byte
                    // (prefill, batches): ask for the step after next. (With
                    // few rows the loads wait on the memory itself; whether
                    // asking further ahead helps depends on the CPU: see
                    // `Isa::prefetch_ahead`.)
                    for line in 0..if ahead > 0 { PREFETCH_LINES } else { 0 } {
                        let wanted = step
                            .as_ptr()
                            .wrapping_add(ahead * STEP_BYTES + (j * PREFETCH_LINES + line) * 64);
                        simd.sse
                            ._mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(wanted.cast());
                    }
                    let at = SCALES_AT + LANES * j;
                    let scales: __m128i = bytemuck::pod_read_unaligned(&step[at..at + LANES]);
                    let scales = simd.avx512f._mm512_cvtepu8_epi32(scales);
                    // Two chains per row when the rows are few, so that the
                    // adds of one step need not wait for the previous step's.
                    let mut sums = [[zero; 2]; N];
                    for s in 0..STEPS {
                        let at = VALUES_AT + (j * STEPS + s) * QUAD_BYTES;
                        let q: __m512i = bytemuck::pod_read_unaligned(&step[at..at + QUAD_BYTES]);
                        let low = simd.avx512f._mm512_and_si512(q, low_nibbles);
                        let high = simd
                            .avx512f
                            ._mm512_and_si512(simd.avx512bw._mm512_srli_epi16::<4>(q), low_nibbles);
                        let k = (j * STEPS + s) * 2;
                        for n in 0..N {
                            // Nibbles are unsigned (0..=15) and the
                            // activations within ±127: a pair of products
                            // of each half stays within ±3810, their sum
                            // within 16 bits.
                            let y_low = simd.avx512f._mm512_set1_epi32(ys[n].quads[k]);
                            let y_high = simd.avx512f._mm512_set1_epi32(ys[n].quads[k + 1]);
                            let chain = if N >= 4 { 0 } else { s % 2 };
                            sums[n][chain] =
                                bytes.add_quads2(sums[n][chain], low, y_low, high, y_high);
                        }
                    }
                    for n in 0..N {
                        let sum = simd.avx512f._mm512_add_epi32(sums[n][0], sums[n][1]);
                        scaled[n] = simd.avx512f._mm512_add_epi32(
                            scaled[n],
                            simd.avx512f._mm512_mullo_epi32(sum, scales),
                        );
                    }
                }
                finish_block(simd, step, ys, scaled, &mut acc);
            }
            acc.map(bytemuck::cast)
        },
    )
}

/// Adds one super-block to `acc`, given each row's `Σ_j scale_j·Σ q·y`
/// (`scaled`): `d·y_scale·scaled` minus `dmin·y_scale·Σ_j min_j·Σ y`, lane
/// by lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn finish_block<const N: usize>(
    simd: pulp::x86::V4,
    step: &[u8],
    ys: [&ActivationBlock; N],
    scaled: [std::arch::x86_64::__m512i; N],
    acc: &mut [std::arch::x86_64::__m512; N],
) {
    use pulp::bytemuck;
    use std::arch::x86_64::{__m256i, __m512i};
    let zero = simd.avx512f._mm512_setzero_si512();
    let (d, dmin) = super_block_scales(simd, step);
    let mins: [__m512i; SUBS / 2] = std::array::from_fn(|p| {
        let at = MINS_AT + 2 * LANES * p;
        let pair: __m256i = bytemuck::pod_read_unaligned(&step[at..at + 2 * LANES]);
        simd.avx512bw._mm512_cvtepu8_epi16(pair)
    });
    for n in 0..N {
        let mut min_sum = zero;
        for (p, mins) in mins.iter().enumerate() {
            let sums = simd.avx512f._mm512_set1_epi32(ys[n].sum_pairs[p]);
            min_sum = simd
                .avx512f
                ._mm512_add_epi32(min_sum, simd.avx512bw._mm512_madd_epi16(*mins, sums));
        }
        acc[n] = finish_row(simd, (d, dmin), ys[n].scale, scaled[n], min_sum, acc[n]);
    }
}

/// A super-block's F16 scales and minimum scales of the group's sixteen
/// rows, as F32 lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn super_block_scales(
    simd: pulp::x86::V4,
    step: &[u8],
) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
    let halves = |at: usize| {
        let h: std::arch::x86_64::__m256i =
            pulp::bytemuck::pod_read_unaligned(&step[at..at + 2 * LANES]);
        simd.avx512f._mm512_cvtph_ps(h)
    };
    (halves(D_AT), halves(DMIN_AT))
}

/// One activation row's super-block added to its accumulator, from the
/// exact integer sums: shared by the AVX-512 and the AMX kernels, so that
/// the same integers give the same bits on both.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn finish_row(
    simd: pulp::x86::V4,
    (d, dmin): (std::arch::x86_64::__m512, std::arch::x86_64::__m512),
    y_scale: f32,
    scaled: std::arch::x86_64::__m512i,
    min_sum: std::arch::x86_64::__m512i,
    acc: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    let y_scale = simd.avx512f._mm512_set1_ps(y_scale);
    let acc = simd.avx512f._mm512_fmadd_ps(
        simd.avx512f._mm512_mul_ps(d, y_scale),
        simd.avx512f._mm512_cvtepi32_ps(scaled),
        acc,
    );
    simd.avx512f._mm512_fnmadd_ps(
        simd.avx512f._mm512_mul_ps(dmin, y_scale),
        simd.avx512f._mm512_cvtepi32_ps(min_sum),
        acc,
    )
}

/// `dot_group_wide` on AVX2: the group in two halves of eight rows, each
/// step's 32 bytes of that half; the same integers and the same F32
/// operations per lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dot_group<B: NarrowBytes, const N: usize>(
    bytes: B,
    weights: &[u8],
    rows: [&[ActivationBlock]; N],
) -> [[f32; LANES]; N] {
    const HALF: usize = LANES / 2;
    let simd = bytes.v3();
    bytes.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::{__m128i, __m256i};
            let zero = simd.avx._mm256_setzero_si256();
            let mut out = [[0f32; LANES]; N];
            for half in 0..2 {
                let mut acc = [simd.avx._mm256_setzero_ps(); N];
                for (b, step) in weights.chunks_exact(STEP_BYTES).enumerate() {
                    let ys: [&ActivationBlock; N] = std::array::from_fn(|n| &rows[n][b]);
                    let mut scaled = [zero; N];
                    for j in 0..SUBS {
                        let at = SCALES_AT + LANES * j + HALF * half;
                        let mut scales = [0u8; 16];
                        scales[..HALF].copy_from_slice(&step[at..at + HALF]);
                        let scales = simd
                            .avx2
                            ._mm256_cvtepu8_epi32(bytemuck::cast::<_, __m128i>(scales));
                        // Where step `s` of this half lies (its nibbles are
                        // unpacked by `nibbles_narrow`, inlined here).
                        let values =
                            |s: usize| VALUES_AT + (j * STEPS + s) * QUAD_BYTES + 32 * half;
                        if B::PAIRS_IN_16_BITS {
                            // A sub-block's pairs of products stay in 16
                            // bits (eight `maddubs` of nibbles and
                            // activations within ±127: at most 30,480),
                            // and one `madd` by the scale in both halves
                            // of each lane gives `scale·Σ q·y`: per step
                            // and row a `madd` and an add fewer, and no
                            // 32-bit multiply per sub-block.
                            let scales16 = simd
                                .avx2
                                ._mm256_or_si256(scales, simd.avx2._mm256_slli_epi32::<16>(scales));
                            let mut pairs = [zero; N];
                            for s in 0..STEPS {
                                let (low, high) = nibbles_narrow(simd, step, values(s));
                                let k = (j * STEPS + s) * 2;
                                for n in 0..N {
                                    let y_low = simd.avx._mm256_set1_epi32(ys[n].quads[k]);
                                    let y_high = simd.avx._mm256_set1_epi32(ys[n].quads[k + 1]);
                                    pairs[n] =
                                        bytes.add_pairs16(pairs[n], low, y_low, high, y_high);
                                }
                            }
                            for n in 0..N {
                                scaled[n] = simd.avx2._mm256_add_epi32(
                                    scaled[n],
                                    simd.avx2._mm256_madd_epi16(pairs[n], scales16),
                                );
                            }
                            continue;
                        }
                        let mut sums = [[zero; 2]; N];
                        for s in 0..STEPS {
                            let (low, high) = nibbles_narrow(simd, step, values(s));
                            let k = (j * STEPS + s) * 2;
                            let chain = if N >= 4 { 0 } else { s % 2 };
                            for n in 0..N {
                                let y_low = simd.avx._mm256_set1_epi32(ys[n].quads[k]);
                                let y_high = simd.avx._mm256_set1_epi32(ys[n].quads[k + 1]);
                                sums[n][chain] =
                                    bytes.add_quads2(sums[n][chain], low, y_low, high, y_high);
                            }
                        }
                        for n in 0..N {
                            let sum = simd.avx2._mm256_add_epi32(sums[n][0], sums[n][1]);
                            scaled[n] = simd.avx2._mm256_add_epi32(
                                scaled[n],
                                simd.avx2._mm256_mullo_epi32(sum, scales),
                            );
                        }
                    }
                    let halves = |at: usize| {
                        let at = at + 2 * HALF * half;
                        let values: [f32; HALF] = std::array::from_fn(|r| {
                            f16::from_le_bytes([step[at + 2 * r], step[at + 2 * r + 1]]).to_f32()
                        });
                        bytemuck::cast::<_, std::arch::x86_64::__m256>(values)
                    };
                    let (d, dmin) = (halves(D_AT), halves(DMIN_AT));
                    let mins: [__m256i; SUBS / 2] = std::array::from_fn(|p| {
                        let at = MINS_AT + 2 * LANES * p + 2 * HALF * half;
                        let pair: __m128i = bytemuck::pod_read_unaligned(&step[at..at + 2 * HALF]);
                        simd.avx2._mm256_cvtepu8_epi16(pair)
                    });
                    for n in 0..N {
                        let mut min_sum = zero;
                        for (p, mins) in mins.iter().enumerate() {
                            let sums = simd.avx._mm256_set1_epi32(ys[n].sum_pairs[p]);
                            min_sum = simd.avx2._mm256_add_epi32(
                                min_sum,
                                simd.avx2._mm256_madd_epi16(*mins, sums),
                            );
                        }
                        let y_scale = simd.avx._mm256_set1_ps(ys[n].scale);
                        acc[n] = simd.fma._mm256_fmadd_ps(
                            simd.avx._mm256_mul_ps(d, y_scale),
                            simd.avx._mm256_cvtepi32_ps(scaled[n]),
                            acc[n],
                        );
                        acc[n] = simd.fma._mm256_fnmadd_ps(
                            simd.avx._mm256_mul_ps(dmin, y_scale),
                            simd.avx._mm256_cvtepi32_ps(min_sum),
                            acc[n],
                        );
                    }
                }
                for n in 0..N {
                    let lanes: [f32; HALF] = bytemuck::cast(acc[n]);
                    out[n][HALF * half..HALF * (half + 1)].copy_from_slice(&lanes);
                }
            }
            out
        },
    )
}

/// What [`dot_runs_tiles`] multiplies a group by: the activations' whole
/// runs of 16 rows, as bytes for the tiles and as quantized blocks.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
struct Runs<'a> {
    t: &'a WideTiles,
    rows: &'a side_tiles::ActivationRows,
    activations: &'a [ActivationBlock],
    row_blocks: usize,
}

/// A group's products with every whole run of 16 activation rows on AMX
/// tiles; returns the rows done. Per super-block, the weights are laid out
/// once for all runs as two tile matrices: the low and the high byte of
/// each value times its sub-block's scale (`q·scale` ≤ 945). So
/// `Σ_j scale_j·Σ q·y` is the low sums plus 256 times the high ones, and
/// stays in tiles over the whole super-block: the exact integer the
/// AVX-512 kernel forms, finished by the same [`finish_block`]. (Scaling
/// each 32-value block's sums after the tiles cost as much as the tiles
/// saved: docs/benchmarks.md.) Runs go two at a time, so that each weight
/// tile loaded serves two products.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[inline(always)]
fn dot_runs_tiles<B: WideBytes>(
    bytes: B,
    runs: &Runs,
    weights: &[u8],
    store: &impl Fn(usize, &[f32; LANES]),
) -> usize {
    use pulp::bytemuck;
    use std::arch::x86_64::__m512;
    const ROWS: usize = side_tiles::ROWS;
    let simd = bytes.v4();
    let count = runs.rows.runs();
    bytes.vectorize(
        #[inline(always)]
        || {
            let mut acc: Vec<[__m512; ROWS]> =
                vec![[simd.avx512f._mm512_setzero_ps(); ROWS]; count];
            let mut tiles = Box::new(WideWeights {
                parts: [[[0; AMX_WIDE_WEIGHT_TILE]; AMX_WIDE_STEPS]; AMX_WIDE_PARTS],
            });
            let mut sums = Box::new(WideSums {
                runs: [[[[0; LANES]; ROWS]; AMX_WIDE_PARTS]; AMX_WIDE_RUNS],
            });
            for (b, step) in weights.chunks_exact(STEP_BYTES).enumerate() {
                lay_out_super_block(simd, step, &mut tiles);
                for first in (0..count).step_by(AMX_WIDE_RUNS) {
                    // An odd last run goes with itself.
                    let pair = [first, (first + 1).min(count - 1)];
                    let rows = pair.map(|r| runs.rows.run_chunk(b, r));
                    runs.t.super_block_sums(rows, BLOCK, 0, &tiles, &mut sums);
                    finish_pair(simd, &sums, (b, step), runs, pair, &mut acc);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (n, acc) in acc.iter().enumerate() {
                    store(r * ROWS + n, &bytemuck::cast(*acc));
                }
            }
            count * ROWS
        },
    )
}

/// Adds one call's sums (super-block `b`, held as `step`, of the pair of
/// runs `pair`: an odd last run is there twice, and added once) to the
/// runs' accumulators.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[inline(always)]
fn finish_pair(
    simd: pulp::x86::V4,
    sums: &WideSums,
    (b, step): (usize, &[u8]),
    runs: &Runs,
    pair: [usize; AMX_WIDE_RUNS],
    acc: &mut [[std::arch::x86_64::__m512; side_tiles::ROWS]],
) {
    use pulp::bytemuck;
    use std::arch::x86_64::__m512i;
    const ROWS: usize = side_tiles::ROWS;
    let distinct = if pair[0] == pair[1] { 1 } else { AMX_WIDE_RUNS };
    for (r, sums) in pair.into_iter().zip(&sums.runs).take(distinct) {
        let [low, high] = sums;
        let ys: [&ActivationBlock; ROWS] =
            std::array::from_fn(|n| &runs.activations[(r * ROWS + n) * runs.row_blocks + b]);
        // A loop, not `array::from_fn`: a closure there is compiled apart,
        // without the AVX-512 features, and its intrinsics become calls.
        let mut scaled = [simd.avx512f._mm512_setzero_si512(); ROWS];
        for (n, scaled) in scaled.iter_mut().enumerate() {
            let low: __m512i = bytemuck::cast(low[n]);
            let high: __m512i = bytemuck::cast(high[n]);
            *scaled = simd
                .avx512f
                ._mm512_add_epi32(low, simd.avx512f._mm512_slli_epi32::<8>(high));
        }
        finish_block(simd, step, ys, scaled, &mut acc[r]);
    }
}

/// Lays out one held super-block of the group as [`dot_runs_tiles`]' two
/// weight matrices, in the VNNI order: a step's low nibbles are one tile
/// row (four values of each of the 16 rows), its high nibbles the next.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[inline(always)]
fn lay_out_super_block(simd: pulp::x86::V4, step: &[u8], tiles: &mut WideWeights) {
    use pulp::bytemuck;
    use std::arch::x86_64::{__m128i, __m512i};
    /// Odd bytes: the high byte of each 16-bit lane.
    const ODD_BYTES: u64 = 0xAAAA_AAAA_AAAA_AAAA;
    const TILE_ROWS: usize = AMX_WIDE_WEIGHT_TILE / 64;
    let low_nibbles = simd.avx512f._mm512_set1_epi8(0x0F);
    let low_bytes = simd.avx512f._mm512_set1_epi16(0x00FF);
    let [low_tiles, high_tiles] = &mut tiles.parts;
    let put = |tiles: &mut [[u8; AMX_WIDE_WEIGHT_TILE]; AMX_WIDE_STEPS], row: usize, v: __m512i| {
        let (tile, row) = (row / TILE_ROWS, row % TILE_ROWS);
        tiles[tile][64 * row..64 * row + 64].copy_from_slice(&bytemuck::cast::<_, [u8; 64]>(v));
    };
    for j in 0..SUBS {
        let at = SCALES_AT + LANES * j;
        let scales: __m128i = bytemuck::pod_read_unaligned(&step[at..at + LANES]);
        let scales = simd.avx512f._mm512_cvtepu8_epi32(scales);
        // Each row's scale in both 16-bit halves of its lane.
        let scales = simd
            .avx512f
            ._mm512_or_si512(scales, simd.avx512f._mm512_slli_epi32::<16>(scales));
        for s in 0..STEPS {
            let at = VALUES_AT + (j * STEPS + s) * QUAD_BYTES;
            let q: __m512i = bytemuck::pod_read_unaligned(&step[at..at + QUAD_BYTES]);
            let halves = [
                simd.avx512f._mm512_and_si512(q, low_nibbles),
                simd.avx512f
                    ._mm512_and_si512(simd.avx512bw._mm512_srli_epi16::<4>(q), low_nibbles),
            ];
            for (h, values) in halves.into_iter().enumerate() {
                // Each byte times its row's scale, in 16 bits: even bytes
                // and odd bytes apart.
                let even = simd
                    .avx512bw
                    ._mm512_mullo_epi16(simd.avx512f._mm512_and_si512(values, low_bytes), scales);
                let odd = simd
                    .avx512bw
                    ._mm512_mullo_epi16(simd.avx512bw._mm512_srli_epi16::<8>(values), scales);
                let low = simd.avx512bw._mm512_mask_blend_epi8(
                    ODD_BYTES,
                    even,
                    simd.avx512bw._mm512_slli_epi16::<8>(odd),
                );
                let high = simd.avx512bw._mm512_mask_blend_epi8(
                    ODD_BYTES,
                    simd.avx512bw._mm512_srli_epi16::<8>(even),
                    odd,
                );
                let row = 2 * (j * STEPS + s) + h;
                put(low_tiles, row, low);
                put(high_tiles, row, high);
            }
        }
    }
}
