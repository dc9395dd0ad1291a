//! Q4_1 weights (blocks of 32 four-bit values with an F16 scale and an F16
//! minimum) times activations quantized to 8 bits per 32 values.
//!
//! candle 0.11 has no SIMD kernel for Q4_1; before this kernel the engine
//! converted Q4_1 to Q8_0 at load, which reads 34 bytes per block instead
//! of 20. Decoding reads every weight once per token, so the file's own
//! format is the smaller read.
//!
//! Sixteen weight rows are held side by side, as Q4_K's are (see
//! `q4_k.rs`): lane `r` of every vector is row `r` of the group, and each
//! 32-bit lane of a step holds four of its values in the low nibbles and
//! the next four in the high ones. A block's integer sums then take one
//! conversion and two fused multiply-adds for sixteen rows, with no sum
//! across lanes, and the layout is the one AMX tiles read (`side_tiles`).
//!
//! Q5_0 (`q5_0.rs`) is held the same way, its fifth bits beside the
//! nibbles: the kernels here are generic over the [`SideLayout`].

use candle_core::quantized::GgmlDType;
#[cfg(target_arch = "x86_64")]
use half::f16;

use super::q8_0::{ActivationRow, Activations};
use super::{
    check_blocks, check_layout, for_each_group, side_tiles, GroupKernel, Isa, KernelError,
    ReadError,
};
#[cfg(target_arch = "x86_64")]
use super::{NarrowBytes, WideBytes};

/// Values per Q4_1 block.
const BLOCK: usize = 32;
/// Weight rows held side by side.
pub(super) const LANES: usize = 16;
/// Where a held block's F16 scales lie (sixteen, one per row).
const D_AT: usize = 0;
/// Eight values per row and step: four in the low nibbles, four in the high.
const STEP_VALUES: usize = 8;
/// Steps per block.
const STEPS: usize = BLOCK / STEP_VALUES;
/// Blocks ahead that the wide kernel prefetches from four activation rows
/// up (the pointer wraps, never dereferenced past the weights: a prefetch
/// of any address is harmless).
const PREFETCH_STEPS: usize = 4;
/// Blocks ahead below four rows, where the CPU gains
/// (`Isa::prefetch_ahead`): the loads then wait on the memory itself, so
/// the prefetch must run further ahead. 16 blocks (5–9 KiB) gave SmolLM2
/// alone 10% on AMD Zen 5, where 8 gave less.
const STREAM_PREFETCH_STEPS: usize = 16;
/// Bytes per step: four bytes a row.
pub(super) const QUAD_BYTES: usize = 4 * LANES;

/// A format of 32-value blocks with an F16 scale each, held sixteen rows
/// side by side: where a held block's fields lie, and what its values and
/// minimums need beyond the scale.
///
/// A block's values come in four steps of eight per row: each step gives
/// two vectors of unsigned bytes, its "low" one (values `8s..8s+4` of every
/// row, four bytes a row) and its "high" one (values `8s+4..8s+8`). The
/// nibble formats hold a step as one 64-byte vector, low values in the low
/// nibbles; Q8_0 holds it as two.
pub trait SideLayout: std::fmt::Debug + Clone + Send + Sync + 'static {
    const FORMAT: GgmlDType;
    /// Bytes per block in GGUF, and per row in a held block.
    const BLOCK_BYTES: usize;
    /// Where the values start in a held block (after the scales, and
    /// whatever else the format keeps per block).
    const VALUES_AT: usize;
    /// Whether values take all eight bits (Q8_0's, offset by 128). Two
    /// products of such a byte by an activation do not fit 16 bits, so the
    /// paths without VNNI (`maddubs` adds pairs in 16 bits, saturating)
    /// take them otherwise: AVX-512 multiplies their two nibbles apart,
    /// AVX2 the signed byte's magnitude by the activation with its sign
    /// (fewer instructions; `NarrowBytes::add_byte_quads2`). With nibble
    /// values (0..=15, or 0..=31 with a fifth bit) they do fit.
    const FULL_BYTES: bool = false;

    /// The largest value a step holds as a byte (a nibble's 15 by
    /// default): how many steps of byte products the AVX2 kernel may add
    /// in 16 bits before widening them ([`steps_in_16_bits`]).
    const MAX_VALUE: i32 = 15;

    /// Whether forming a step's values as bytes costs enough that the
    /// AVX2 kernel does it once per group for many activation rows
    /// ([`UnpackedGroup`]): Q5_0's fifth bits. A nibble's three
    /// instructions cost less than storing and loading the bytes again.
    const UNPACK: bool = false;

    /// Writes one GGUF block of weight row `lane` into `step`, the held
    /// block of its group.
    fn pack_block(block: &[u8], lane: usize, step: &mut [u8]);

    /// The minimum as a multiple of the scale, where the format fixes it
    /// (Q5_0's `-16·d`, Q8_0's `-128·d`); Q4_1 holds its own minimums and
    /// overrides the `mins_*` methods instead.
    const MIN_PER_SCALE: f32 = 0.0;

    /// Each row's minimum (`m` of `d·Σ q·y + m·Σ y`), given its scale.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn mins_wide(
        simd: pulp::x86::V4,
        _step: &[u8],
        d: std::arch::x86_64::__m512,
    ) -> std::arch::x86_64::__m512 {
        simd.avx512f
            ._mm512_mul_ps(d, simd.avx512f._mm512_set1_ps(Self::MIN_PER_SCALE))
    }

    /// [`mins_wide`](Self::mins_wide) for half `half` of the rows.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn mins_narrow(
        simd: pulp::x86::V3,
        _step: &[u8],
        _half: usize,
        d: std::arch::x86_64::__m256,
    ) -> std::arch::x86_64::__m256 {
        simd.avx
            ._mm256_mul_ps(d, simd.avx._mm256_set1_ps(Self::MIN_PER_SCALE))
    }

    /// Step `s`'s low and high values: by default its nibbles.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn values_wide(
        simd: pulp::x86::V4,
        step: &[u8],
        s: usize,
    ) -> (std::arch::x86_64::__m512i, std::arch::x86_64::__m512i) {
        nibbles_wide(simd, step, Self::VALUES_AT + s * QUAD_BYTES)
    }

    /// [`values_wide`](Self::values_wide) for half `half` of the rows.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn values_narrow(
        simd: pulp::x86::V3,
        step: &[u8],
        s: usize,
        half: usize,
    ) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
        nibbles_narrow(simd, step, Self::VALUES_AT + s * QUAD_BYTES + 32 * half)
    }
}

/// The low and high nibbles of the 64 bytes at `at`, as bytes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn nibbles_wide(
    simd: pulp::x86::V4,
    step: &[u8],
    at: usize,
) -> (std::arch::x86_64::__m512i, std::arch::x86_64::__m512i) {
    let low_nibbles = simd.avx512f._mm512_set1_epi8(0x0F);
    let q: std::arch::x86_64::__m512i = pulp::bytemuck::pod_read_unaligned(&step[at..at + 64]);
    (
        simd.avx512f._mm512_and_si512(q, low_nibbles),
        simd.avx512f
            ._mm512_and_si512(simd.avx512bw._mm512_srli_epi16::<4>(q), low_nibbles),
    )
}

/// The low and high nibbles of the 32 bytes at `at`, as bytes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn nibbles_narrow(
    simd: pulp::x86::V3,
    step: &[u8],
    at: usize,
) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
    let low_nibbles = simd.avx._mm256_set1_epi8(0x0F);
    let q: std::arch::x86_64::__m256i = pulp::bytemuck::pod_read_unaligned(&step[at..at + 32]);
    (
        simd.avx2._mm256_and_si256(q, low_nibbles),
        simd.avx2
            ._mm256_and_si256(simd.avx2._mm256_srli_epi16::<4>(q), low_nibbles),
    )
}

/// Steps whose byte products AVX2's `maddubs` may add in 16 bits: each
/// adds two pairs of products per lane, each product within `MAX_VALUE`
/// times ±127 (the activations' grid), and the total must stay within
/// ±32,767. Four for nibbles (30,480 at most), two for Q5_0's five-bit
/// values (31,496), one for anything larger.
const fn steps_in_16_bits<L: SideLayout>() -> usize {
    let steps = i16::MAX as i32 / (4 * L::MAX_VALUE * 127);
    if steps >= 4 {
        4
    } else if steps >= 2 {
        2
    } else {
        1
    }
}

/// Bytes of one block of a group's sixteen rows.
const fn step_bytes<L: SideLayout>() -> usize {
    LANES * L::BLOCK_BYTES
}

/// Writes 32 values (0..=15 in their low nibbles) of weight row `lane` as
/// the four steps of nibbles at `at` in a held block.
pub(super) fn pack_nibbles(values: &[u8; BLOCK], lane: usize, step: &mut [u8], at: usize) {
    for (k, eight) in values.chunks_exact(STEP_VALUES).enumerate() {
        let at = at + k * QUAD_BYTES + 4 * lane;
        for t in 0..4 {
            step[at + t] = (eight[t] & 0xF) | (eight[t + 4] << 4);
        }
    }
}

/// Q4_1: an F16 scale and an F16 minimum per block, held as the sixteen
/// scales, the sixteen minimums, then the nibbles.
#[derive(Debug, Clone)]
pub struct Q4_1Layout;

/// Where a held Q4_1 block's minimums lie.
const MINS_AT: usize = 2 * LANES;

impl SideLayout for Q4_1Layout {
    const FORMAT: GgmlDType = GgmlDType::Q4_1;
    const BLOCK_BYTES: usize = 20;
    const VALUES_AT: usize = 4 * LANES;

    fn pack_block(block: &[u8], lane: usize, step: &mut [u8]) {
        step[D_AT + 2 * lane..D_AT + 2 * lane + 2].copy_from_slice(&block[..2]);
        step[MINS_AT + 2 * lane..MINS_AT + 2 * lane + 2].copy_from_slice(&block[2..4]);
        // GGUF: value `i` in the low nibble of byte `i`, `16 + i` in the high.
        let mut values = [0u8; BLOCK];
        for (i, &byte) in block[4..].iter().enumerate() {
            values[i] = byte & 0xF;
            values[BLOCK / 2 + i] = byte >> 4;
        }
        pack_nibbles(&values, lane, step, Self::VALUES_AT);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn mins_wide(
        simd: pulp::x86::V4,
        step: &[u8],
        _d: std::arch::x86_64::__m512,
    ) -> std::arch::x86_64::__m512 {
        let h: std::arch::x86_64::__m256i =
            pulp::bytemuck::pod_read_unaligned(&step[MINS_AT..MINS_AT + 2 * LANES]);
        simd.avx512f._mm512_cvtph_ps(h)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn mins_narrow(
        _simd: pulp::x86::V3,
        step: &[u8],
        half: usize,
        _d: std::arch::x86_64::__m256,
    ) -> std::arch::x86_64::__m256 {
        halves_narrow(step, MINS_AT, half)
    }
}

/// The F16 values at `at` of half `half` of the rows, as F32 lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn halves_narrow(step: &[u8], at: usize, half: usize) -> std::arch::x86_64::__m256 {
    let at = at + LANES * half;
    let values: [f32; LANES / 2] = std::array::from_fn(|r| {
        f16::from_le_bytes([step[at + 2 * r], step[at + 2 * r + 1]]).to_f32()
    });
    pulp::bytemuck::cast(values)
}

/// Weights of a [`SideLayout`] format, `rows x cols`, held sixteen rows
/// side by side.
#[derive(Debug, Clone)]
pub struct SideMatrix<L> {
    groups: Vec<u8>,
    rows: usize,
    cols: usize,
    pub(super) isa: Isa,
    layout: std::marker::PhantomData<L>,
}

/// Q4_1 weights, `rows x cols`, held sixteen rows side by side.
pub type Q4_1Matrix = SideMatrix<Q4_1Layout>;

impl<L: SideLayout> SideMatrix<L> {
    /// From GGUF's layout. `None` when this CPU lacks AVX2/FMA.
    pub fn new(bytes: &[u8], rows: usize, cols: usize) -> Result<Option<Self>, KernelError> {
        check_layout(L::FORMAT, bytes, rows, cols)?;
        let Some(isa) = Isa::detect() else {
            return Ok(None);
        };
        let mut source = bytes.chunks(LANES * cols / BLOCK * L::BLOCK_BYTES);
        let filled = Self::pack(isa, rows, cols, |group_rows| {
            if let Some(next) = source.next() {
                group_rows.copy_from_slice(next);
            }
            Ok::<_, std::convert::Infallible>(())
        });
        Ok(Some(match filled {
            Ok(matrix) => matrix,
            Err(never) => match never {},
        }))
    }

    /// Reads `rows x cols` weights in GGUF's layout from `reader`, sixteen
    /// rows at a time, straight into the held layout: a large table
    /// (Gemma 3's 178 MB embedding) is never held twice while loading.
    /// `None` when this CPU lacks AVX2/FMA (nothing is read then).
    pub fn read(
        reader: &mut impl std::io::Read,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self>, ReadError> {
        check_blocks(L::FORMAT, cols)?;
        let Some(isa) = Isa::detect() else {
            return Ok(None);
        };
        Ok(Some(Self::pack(isa, rows, cols, |group_rows| {
            reader.read_exact(group_rows)
        })?))
    }

    /// Packs the groups one by one, each from the GGUF rows `fill` writes
    /// (sixteen, fewer in the last group).
    fn pack<E>(
        isa: Isa,
        rows: usize,
        cols: usize,
        mut fill: impl FnMut(&mut [u8]) -> Result<(), E>,
    ) -> Result<Self, E> {
        let row_bytes = cols / BLOCK * L::BLOCK_BYTES;
        let group_bytes = cols / BLOCK * step_bytes::<L>();
        // The last group's missing rows stay zero (scales 0): their
        // products are computed and dropped.
        let mut groups = vec![0u8; rows.div_ceil(LANES) * group_bytes];
        let mut source = vec![0u8; LANES * row_bytes];
        for (g, group) in groups.chunks_exact_mut(group_bytes).enumerate() {
            let lanes = LANES.min(rows - g * LANES);
            let source = &mut source[..lanes * row_bytes];
            fill(source)?;
            for (lane, row) in source.chunks_exact(row_bytes).enumerate() {
                for (block, step) in row
                    .chunks_exact(L::BLOCK_BYTES)
                    .zip(group.chunks_exact_mut(step_bytes::<L>()))
                {
                    L::pack_block(block, lane, step);
                }
            }
        }
        Ok(Self {
            groups,
            rows,
            cols,
            isa,
            layout: std::marker::PhantomData,
        })
    }

    /// The held blocks of the group holding row `row`, and its lane there.
    pub(super) fn held_row(&self, row: usize) -> Option<(std::slice::ChunksExact<'_, u8>, usize)> {
        if row >= self.rows {
            return None;
        }
        let group_bytes = self.cols / BLOCK * step_bytes::<L>();
        let at = row / LANES * group_bytes;
        let group = self.groups.get(at..at + group_bytes)?;
        Some((group.chunks_exact(step_bytes::<L>()), row % LANES))
    }

    pub fn cols(&self) -> usize {
        self.cols
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
        let activations = Activations::quantize(self.isa.simd, x, self.cols)?;
        let m = x.len() / self.cols;
        let blocks_per_row = self.cols / BLOCK;
        let kernel = Kernel::<L> {
            isa: self.isa,
            activations: &activations,
            tiles: side_tiles::ActivationTiles::new(&self.isa, m, blocks_per_row, |i, k| {
                activations.row(i).values[k].map(|v| v.to_le_bytes()[0])
            }),
            layout: std::marker::PhantomData,
        };
        Ok(for_each_group(
            &self.groups,
            blocks_per_row * step_bytes::<L>(),
            self.rows,
            m,
            &kernel,
        ))
    }
}

/// The product over one set of quantized activations.
struct Kernel<'a, L> {
    isa: Isa,
    activations: &'a Activations,
    /// The activations of each whole run of 16 rows as AMX tiles, where
    /// the products run on tiles.
    tiles: Option<side_tiles::ActivationTiles>,
    layout: std::marker::PhantomData<L>,
}

/// Activation rows from which the AVX2 kernel unpacks a Q5_0 group's
/// values once for all of them, rather than once per pass of four rows:
/// at 8 rows it was slower (0.13 against 0.11 ms, `kernel_bench q5_0 2048
/// 640 8`, AMD Zen 3), at 16 even, from 32 faster.
const UNPACK_MIN_ROWS: usize = 32;

impl<L: SideLayout> Kernel<'_, L> {
    /// Whether this product unpacks each group first: on the AVX2 paths
    /// (AVX-512 forms Q5_0's values with two masked adds a step, too few
    /// to save), for the formats that ask for it ([`SideLayout::UNPACK`]),
    /// from [`UNPACK_MIN_ROWS`] activation rows.
    fn unpacks(&self) -> bool {
        L::UNPACK
            && self.isa.unpack
            && self.tiles.is_none()
            && self.isa.wide.is_none()
            && self.activations.rows() >= UNPACK_MIN_ROWS
    }
}

impl<L: SideLayout> GroupKernel<LANES> for Kernel<'_, L> {
    fn dot<const N: usize>(&self, weights: &[u8], first: usize) -> [[f32; LANES]; N] {
        let rows = std::array::from_fn(|n| self.activations.row(first + n));
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(out) = self.tiles.as_ref().and_then(|tiles| {
            tiles.with_run::<N, _>(first, |t, wide, run| match wide {
                side_tiles::Wide::Vnni(vnni) => {
                    dot_group_tiles::<L, _, N>(vnni, t, weights, run, rows)
                }
                side_tiles::Wide::Plain(v4) => {
                    dot_group_tiles::<L, _, N>(v4, t, weights, run, rows)
                }
            })
        }) {
            return out;
        }
        let ahead = self
            .isa
            .prefetch_ahead(N, PREFETCH_STEPS, STREAM_PREFETCH_STEPS);
        if let Some(vnni) = self.isa.wide_vnni {
            return dot_group_wide::<L, _, N>(vnni, weights, rows, ahead);
        }
        if let Some(wide) = self.isa.wide {
            return dot_group_wide::<L, _, N>(wide, weights, rows, ahead);
        }
        match self.isa.simd_vnni {
            Some(vnni) => dot_group::<L, _, N>(vnni, weights, rows),
            None => dot_group::<L, _, N>(self.isa.simd, weights, rows),
        }
    }

    fn isa(&self) -> Isa {
        self.isa
    }

    /// Sixteen on AMX tiles (a tile's rows); eight on AVX-512, as Q4_K;
    /// on AVX2 as many as the registers hold.
    fn rows_per_step(&self) -> usize {
        if self.tiles.is_some() {
            side_tiles::ROWS
        } else if self.isa.wide.is_some() {
            8
        } else if L::FULL_BYTES {
            // Q8_0's bytes prepared for the sign trick take two registers
            // a vector: four rows spill (1.38 against 1.14 ms, Q8_0
            // 2048 x 640, 64 rows, AMD Zen 3).
            2
        } else {
            // The nibbles (and Q5_0's fifth bits) unpacked once for four
            // rows: Q5_0 2048 x 640, 64 rows, 1.61 against 1.13 ms (eight
            // rows: 1.05 at 64, no gain at 8).
            4
        }
    }

    fn on_worker(&self, work: impl FnOnce()) {
        match &self.tiles {
            Some(tiles) => tiles.on_worker(work),
            None => work(),
        }
    }

    /// Every activation row over the group's values unpacked once, where
    /// [`Kernel::unpacks`] says so.
    fn dot_runs(&self, weights: &[u8], store: &impl Fn(usize, &[f32; LANES])) -> usize {
        #[cfg(target_arch = "x86_64")]
        if self.unpacks() {
            let group = UnpackedGroup::of::<L>(self.isa.simd, weights);
            return match self.isa.simd_vnni {
                Some(vnni) => dot_rows_unpacked::<L, _>(vnni, &group, self.activations, store),
                None => dot_rows_unpacked::<L, _>(self.isa.simd, &group, self.activations, store),
            };
        }
        let _ = (weights, store);
        0
    }
}

/// Dot products of one sixteen-row group with `N` activation rows.
#[cfg(not(target_arch = "x86_64"))]
fn dot_group_wide<L, B: Into<std::convert::Infallible>, const N: usize>(
    bytes: B,
    _weights: &[u8],
    _rows: [ActivationRow<'_>; N],
    _ahead: usize,
) -> [[f32; LANES]; N] {
    // Every token type is uninhabited off x86-64: never called.
    match bytes.into() {}
}

/// Dot products of one sixteen-row group with `N` activation rows.
#[cfg(not(target_arch = "x86_64"))]
fn dot_group<L, B: Into<std::convert::Infallible>, const N: usize>(
    bytes: B,
    _weights: &[u8],
    _rows: [ActivationRow<'_>; N],
) -> [[f32; LANES]; N] {
    // Every token type is uninhabited off x86-64: never called.
    match bytes.into() {}
}

/// Activation values `4k..4k + 4` of a block: the word a step broadcasts
/// to every lane, read straight from the row (copying a block's words out
/// first kept them in spilled registers and on the stack: 20–33% of the
/// AVX-512 kernels' time at eight rows).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn quad(values: &[i8; BLOCK], k: usize) -> i32 {
    pulp::bytemuck::pod_read_unaligned(pulp::bytemuck::cast_slice(&values[4 * k..4 * k + 4]))
}

/// Dot products of one sixteen-row group with `N` activation rows; each
/// step of weights is loaded and unpacked once for all `N`.
///
/// Per row and block: `d·dy·Σ q·y + m·(dy·Σ y)`, the second factor of the
/// minimum's term coming with the activations. `Σ q·y` is an exact
/// integer on every path (VNNI or not only changes how the four-byte
/// products are added), and the F32 operations per lane are the same on
/// every path, so all paths give the same bits. Each block asks for the
/// weights `ahead` blocks on (none for 0).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dot_group_wide<L: SideLayout, B: WideBytes, const N: usize>(
    bytes: B,
    weights: &[u8],
    rows: [ActivationRow<'_>; N],
    ahead: usize,
) -> [[f32; LANES]; N] {
    let simd = bytes.v4();
    bytes.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            let zero = simd.avx512f._mm512_setzero_si512();
            let mut acc = [simd.avx512f._mm512_setzero_ps(); N];
            for (b, step) in weights.chunks_exact(step_bytes::<L>()).enumerate() {
                let ys: [&[i8; BLOCK]; N] = std::array::from_fn(|n| &rows[n].values[b]);
                // Two chains per row when the rows are few, so that the
                // adds of one step need not wait for the previous step's.
                let mut sums = [[zero; 2]; N];
                // As in Q4_K's kernel: with many products per byte (four
                // activation rows or more) the hardware's prefetcher leaves
                // the loads and the products in turn, so ask for the block
                // `PREFETCH_STEPS` ahead (20% faster on Gemma 3's output
                // projection at eight rows); with few, where the CPU gains
                // (`Isa::prefetch_ahead`), further ahead.
                let lines = if ahead > 0 {
                    step_bytes::<L>().div_ceil(64)
                } else {
                    0
                };
                for line in 0..lines {
                    let wanted = step
                        .as_ptr()
                        .wrapping_add(ahead * step_bytes::<L>() + line * 64);
                    simd.sse
                        ._mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(wanted.cast());
                }
                for s in 0..STEPS {
                    let (low, high) = L::values_wide(simd, step, s);
                    for n in 0..N {
                        let y_low = simd.avx512f._mm512_set1_epi32(quad(ys[n], 2 * s));
                        let y_high = simd.avx512f._mm512_set1_epi32(quad(ys[n], 2 * s + 1));
                        let chain = if N >= 4 { 0 } else { s % 2 };
                        sums[n][chain] = if L::FULL_BYTES {
                            bytes.add_byte_quads2(sums[n][chain], low, y_low, high, y_high)
                        } else {
                            // Values within 0..=31 and activations within
                            // ±127: a pair of products of each half stays
                            // within ±7874, their sum within 16 bits.
                            bytes.add_quads2(sums[n][chain], low, y_low, high, y_high)
                        };
                    }
                }
                let sums =
                    std::array::from_fn(|n| simd.avx512f._mm512_add_epi32(sums[n][0], sums[n][1]));
                finish_block::<L, N>(simd, step, b, &rows, sums, &mut acc);
            }
            acc.map(bytemuck::cast)
        },
    )
}

/// Adds one block to `acc`, given each row's `Σ q·y` (`sums`): lane by
/// lane `d·dy·Σ q·y`, then `m·(dy·Σ y)`. Shared by the AVX-512 and the AMX
/// kernels, so that the same integers give the same bits on both.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn finish_block<L: SideLayout, const N: usize>(
    simd: pulp::x86::V4,
    step: &[u8],
    b: usize,
    rows: &[ActivationRow<'_>; N],
    sums: [std::arch::x86_64::__m512i; N],
    acc: &mut [std::arch::x86_64::__m512; N],
) {
    use pulp::bytemuck;
    use std::arch::x86_64::__m256i;
    let halves = |at: usize| {
        let h: __m256i = bytemuck::pod_read_unaligned(&step[at..at + 2 * LANES]);
        simd.avx512f._mm512_cvtph_ps(h)
    };
    let d = halves(D_AT);
    let m = L::mins_wide(simd, step, d);
    for n in 0..N {
        let y_scale = simd.avx512f._mm512_set1_ps(rows[n].scales[b]);
        acc[n] = simd.avx512f._mm512_fmadd_ps(
            simd.avx512f._mm512_mul_ps(d, y_scale),
            simd.avx512f._mm512_cvtepi32_ps(sums[n]),
            acc[n],
        );
        acc[n] =
            simd.avx512f
                ._mm512_fmadd_ps(m, simd.avx512f._mm512_set1_ps(rows[n].sum(b)), acc[n]);
    }
}

/// `dot_group_wide` on AVX2: the group in two halves of eight rows, each
/// step's 32 bytes of that half; the same integers and the same F32
/// operations per lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dot_group<L: SideLayout, B: NarrowBytes, const N: usize>(
    bytes: B,
    weights: &[u8],
    rows: [ActivationRow<'_>; N],
) -> [[f32; LANES]; N] {
    const HALF: usize = LANES / 2;
    let simd = bytes.v3();
    bytes.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            let zero = simd.avx._mm256_setzero_si256();
            let mut out = [[0f32; LANES]; N];
            for half in 0..2 {
                let mut acc = [simd.avx._mm256_setzero_ps(); N];
                for (b, step) in weights.chunks_exact(step_bytes::<L>()).enumerate() {
                    let ys: [&[i8; BLOCK]; N] = std::array::from_fn(|n| &rows[n].values[b]);
                    let mut sums = [[zero; 2]; N];
                    for s in 0..STEPS {
                        let (low, high) = L::values_narrow(simd, step, s, half);
                        let full =
                            L::FULL_BYTES.then(|| (bytes.full_bytes(low), bytes.full_bytes(high)));
                        let chain = if N >= 4 { 0 } else { s % 2 };
                        for n in 0..N {
                            let y_low = simd.avx._mm256_set1_epi32(quad(ys[n], 2 * s));
                            let y_high = simd.avx._mm256_set1_epi32(quad(ys[n], 2 * s + 1));
                            let sum = sums[n][chain];
                            sums[n][chain] = match full {
                                Some((full_low, full_high)) => {
                                    bytes.add_byte_quads2(sum, full_low, y_low, full_high, y_high)
                                }
                                None => bytes.add_quads2(sum, low, y_low, high, y_high),
                            };
                        }
                    }
                    let d = halves_narrow(step, D_AT, half);
                    let m = L::mins_narrow(simd, step, half, d);
                    for n in 0..N {
                        let mut sum = simd.avx2._mm256_add_epi32(sums[n][0], sums[n][1]);
                        if L::FULL_BYTES {
                            sum = bytes.full_byte_sums(sum, rows[n].value_sums[b]);
                        }
                        let y_scale = simd.avx._mm256_set1_ps(rows[n].scales[b]);
                        acc[n] = simd.fma._mm256_fmadd_ps(
                            simd.avx._mm256_mul_ps(d, y_scale),
                            simd.avx._mm256_cvtepi32_ps(sum),
                            acc[n],
                        );
                        acc[n] = simd.fma._mm256_fmadd_ps(
                            m,
                            simd.avx._mm256_set1_ps(rows[n].sum(b)),
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

/// [`dot_group`] over a group's blocks unpacked once for many rows
/// ([`UnpackedGroup`], nibble formats only): the same integers and the
/// same F32 operations per lane, so the same bits.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dot_unpacked<L: SideLayout, B: NarrowBytes, const N: usize>(
    bytes: B,
    blocks: &UnpackedGroup,
    rows: [ActivationRow<'_>; N],
) -> [[f32; LANES]; N] {
    const HALF: usize = LANES / 2;
    let simd = bytes.v3();
    bytes.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            let zero = simd.avx._mm256_setzero_si256();
            let mut out = [[0f32; LANES]; N];
            for half in 0..2 {
                let mut acc = [simd.avx._mm256_setzero_ps(); N];
                for (b, block) in blocks
                    .values
                    .chunks_exact(UnpackedGroup::STRIDE)
                    .enumerate()
                {
                    let ys: [&[i8; BLOCK]; N] = std::array::from_fn(|n| &rows[n].values[b]);
                    let mut sums = [[zero; 2]; N];
                    if B::PAIRS_IN_16_BITS {
                        // The pairs of products added in 16 bits over as
                        // many steps as fit, then widened once: per step
                        // and row two `maddubs` and two adds, where
                        // widening every step took a `madd` and an add
                        // more. Over held values the extra accumulators
                        // spill beside the unpacking's registers: Q5_0's
                        // products were slower, and SmolLM2's Q4_1 prefill
                        // 5% slower (AMD Zen 3), so not there.
                        let chunk = steps_in_16_bits::<L>();
                        for c in 0..STEPS / chunk {
                            let mut pairs = [zero; N];
                            for s in c * chunk..(c + 1) * chunk {
                                let (low, high) = UnpackedGroup::step(block, half, s);
                                for n in 0..N {
                                    let (y_low, y_high) = step_quads(simd, ys[n], s);
                                    pairs[n] =
                                        bytes.add_pairs16(pairs[n], low, y_low, high, y_high);
                                }
                            }
                            for n in 0..N {
                                sums[n][0] = bytes.widen_pairs(sums[n][0], pairs[n]);
                            }
                        }
                    } else {
                        // VNNI adds its products in 32 bits at once.
                        for s in 0..STEPS {
                            let (low, high) = UnpackedGroup::step(block, half, s);
                            for n in 0..N {
                                let (y_low, y_high) = step_quads(simd, ys[n], s);
                                sums[n][0] = bytes.add_quads2(sums[n][0], low, y_low, high, y_high);
                            }
                        }
                    }
                    let (d, m) = blocks.scales(b, half);
                    finish_block_narrow::<L, B, N>(bytes, d, m, b, &rows, sums, &mut acc);
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

/// Adds one block to `acc` on AVX2, given its eight rows' scales `d` and
/// minimums `m` and each activation row's `Σ q·y` in two chains (`sums`):
/// lane by lane `d·dy·Σ q·y`, then `m·(dy·Σ y)`, as [`finish_block`] does
/// on AVX-512, and as `dot_group` does inline (kept inline there: its
/// held path is the one every decode step takes, and was measured as is).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn finish_block_narrow<L: SideLayout, B: NarrowBytes, const N: usize>(
    bytes: B,
    d: std::arch::x86_64::__m256,
    m: std::arch::x86_64::__m256,
    b: usize,
    rows: &[ActivationRow<'_>; N],
    sums: [[std::arch::x86_64::__m256i; 2]; N],
    acc: &mut [std::arch::x86_64::__m256; N],
) {
    let simd = bytes.v3();
    for n in 0..N {
        let mut sum = simd.avx2._mm256_add_epi32(sums[n][0], sums[n][1]);
        if L::FULL_BYTES {
            sum = bytes.full_byte_sums(sum, rows[n].value_sums[b]);
        }
        let y_scale = simd.avx._mm256_set1_ps(rows[n].scales[b]);
        acc[n] = simd.fma._mm256_fmadd_ps(
            simd.avx._mm256_mul_ps(d, y_scale),
            simd.avx._mm256_cvtepi32_ps(sum),
            acc[n],
        );
        acc[n] = simd
            .fma
            ._mm256_fmadd_ps(m, simd.avx._mm256_set1_ps(rows[n].sum(b)), acc[n]);
    }
}

/// Bytes of one unpacked step of eight rows: its low values, then its high
/// ones, a byte each.
#[cfg(target_arch = "x86_64")]
const UNPACKED_STEP: usize = 64;

/// A group's values as the AVX2 kernel multiplies them, unpacked once for
/// every activation row of a product: per block, half of the rows and
/// step, the low and the high values as bytes (0..=31), and per block and
/// half the rows' scales and minimums as F32.
///
/// Held, Q5_0's fifth bits take five instructions per 32 values to become
/// bytes (AVX2 has no masked add) beside the nibbles' three, and each pass
/// of four activation rows repeated them. A group's unpacked values
/// (32 KiB for 2,048 columns) stay in the core's caches while the rows go
/// over them, and over bytes loaded as they are the pairs of products
/// are added in 16 bits two steps at a time. AMD Zen 3, `kernel_bench
/// q5_0 2048 640 M`, medians of three alternating runs: 256 rows 3.68 ->
/// 2.87 ms, 64 rows 0.91 -> 0.79; at 8 and 16 rows unpacking cost more
/// than it saved ([`UNPACK_MIN_ROWS`]).
#[cfg(target_arch = "x86_64")]
struct UnpackedGroup {
    values: Vec<u8>,
    /// Per block and half: the scales, then the minimums.
    scales: Vec<[[f32; LANES / 2]; 2]>,
}

#[cfg(target_arch = "x86_64")]
impl UnpackedGroup {
    fn of<L: SideLayout>(simd: super::Simd, weights: &[u8]) -> Self {
        use pulp::bytemuck;
        let blocks = weights.len() / step_bytes::<L>();
        let mut values = vec![0u8; blocks * 2 * STEPS * UNPACKED_STEP];
        let mut scales = Vec::with_capacity(2 * blocks);
        simd.vectorize(
            #[inline(always)]
            || {
                let mut out = values.chunks_exact_mut(UNPACKED_STEP);
                for step in weights.chunks_exact(step_bytes::<L>()) {
                    for half in 0..2 {
                        for s in 0..STEPS {
                            let (low, high) = L::values_narrow(simd, step, s, half);
                            if let Some(out) = out.next() {
                                let (low_out, high_out) = out.split_at_mut(32);
                                low_out.copy_from_slice(&bytemuck::cast::<_, [u8; 32]>(low));
                                high_out.copy_from_slice(&bytemuck::cast::<_, [u8; 32]>(high));
                            }
                        }
                        let d = halves_narrow(step, D_AT, half);
                        let m = L::mins_narrow(simd, step, half, d);
                        scales.push([bytemuck::cast(d), bytemuck::cast(m)]);
                    }
                }
            },
        );
        Self { values, scales }
    }
}

/// Every activation row's products with an unpacked group, four rows a
/// pass (the rest two and one); returns the rows done.
#[cfg(target_arch = "x86_64")]
fn dot_rows_unpacked<L: SideLayout, B: NarrowBytes>(
    bytes: B,
    group: &UnpackedGroup,
    activations: &Activations,
    store: &impl Fn(usize, &[f32; LANES]),
) -> usize {
    let m = activations.rows();
    let mut i = 0;
    while i + 4 <= m {
        let rows = std::array::from_fn(|n| activations.row(i + n));
        for (n, sums) in dot_unpacked::<L, B, 4>(bytes, group, rows)
            .iter()
            .enumerate()
        {
            store(i + n, sums);
        }
        i += 4;
    }
    while i + 2 <= m {
        let rows = std::array::from_fn(|n| activations.row(i + n));
        for (n, sums) in dot_unpacked::<L, B, 2>(bytes, group, rows)
            .iter()
            .enumerate()
        {
            store(i + n, sums);
        }
        i += 2;
    }
    if i < m {
        store(
            i,
            &dot_unpacked::<L, B, 1>(bytes, group, [activations.row(i)])[0],
        );
        i += 1;
    }
    i
}

/// The activation words step `s` multiplies its low and its high values
/// by, broadcast to every lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn step_quads(
    simd: super::Simd,
    ys: &[i8; BLOCK],
    s: usize,
) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
    (
        simd.avx._mm256_set1_epi32(quad(ys, 2 * s)),
        simd.avx._mm256_set1_epi32(quad(ys, 2 * s + 1)),
    )
}

#[cfg(target_arch = "x86_64")]
impl UnpackedGroup {
    /// Bytes per block in `values`.
    const STRIDE: usize = 2 * STEPS * UNPACKED_STEP;

    /// Step `s`'s low and high values of half `half` of `block`.
    #[inline(always)]
    fn step(
        block: &[u8],
        half: usize,
        s: usize,
    ) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
        let at = (half * STEPS + s) * UNPACKED_STEP;
        (
            pulp::bytemuck::pod_read_unaligned(&block[at..at + 32]),
            pulp::bytemuck::pod_read_unaligned(&block[at + 32..at + 64]),
        )
    }

    /// The scales and minimums of half `half` of block `b`.
    #[inline(always)]
    fn scales(
        &self,
        b: usize,
        half: usize,
    ) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
        let [d, m] = self.scales[2 * b + half];
        (pulp::bytemuck::cast(d), pulp::bytemuck::cast(m))
    }
}

/// Blocks whose tile products are formed together before they are
/// finished.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const TILE_RUN: usize = 8;

/// `dot_group_wide` with the byte products on AMX tiles (see
/// `side_tiles`): each block's nibbles are split into a weight tile, one
/// tile product gives the 16 rows' integer sums, and [`finish_block`]
/// scales and adds them as on AVX-512.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[inline(always)]
fn dot_group_tiles<L: SideLayout, B: WideBytes, const N: usize>(
    bytes: B,
    t: &side_tiles::ConfiguredTiles,
    weights: &[u8],
    tiles: &[side_tiles::ActivationTile],
    rows: [ActivationRow<'_>; N],
) -> [[f32; LANES]; N] {
    let simd = bytes.v4();
    bytes.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            let mut acc = [simd.avx512f._mm512_setzero_ps(); N];
            let mut split = [[0u8; STEPS * 2 * QUAD_BYTES]; TILE_RUN];
            let mut products = [[[0i32; LANES]; side_tiles::ROWS]; TILE_RUN];
            for (c, (steps, tiles)) in weights
                .chunks(TILE_RUN * step_bytes::<L>())
                .zip(tiles.chunks(TILE_RUN))
                .enumerate()
            {
                for (step, split) in steps.chunks_exact(step_bytes::<L>()).zip(&mut split) {
                    split_values::<L>(simd, step, split);
                }
                // The blocks' products first, two at a time, so that the
                // tiles' latency overlaps the F32 work below; an odd last
                // block is paired with itself.
                for (pair, products) in products.chunks_exact_mut(2).enumerate() {
                    let (first, second) = (2 * pair, (2 * pair + 1).min(tiles.len() - 1));
                    if first >= tiles.len() {
                        break;
                    }
                    if let Ok(products) = products.try_into() {
                        t.side_block_pair(
                            [&tiles[first], &tiles[second]],
                            [&split[first], &split[second]],
                            products,
                        );
                    }
                }
                for (k, (step, products)) in steps
                    .chunks_exact(step_bytes::<L>())
                    .zip(&products)
                    .enumerate()
                {
                    let sums = std::array::from_fn(|n| bytemuck::cast(products[n]));
                    finish_block::<L, N>(simd, step, c * TILE_RUN + k, &rows, sums, &mut acc);
                }
            }
            acc.map(bytemuck::cast)
        },
    )
}

/// A held block's values as a weight tile: each step's low values, then
/// its high ones, as the AVX kernels see them.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[inline(always)]
fn split_values<L: SideLayout>(
    simd: pulp::x86::V4,
    step: &[u8],
    tile: &mut side_tiles::WeightTile,
) {
    use pulp::bytemuck;
    for (s, rows) in tile.chunks_exact_mut(2 * QUAD_BYTES).enumerate() {
        let (low, high) = L::values_wide(simd, step, s);
        let (low_row, high_row) = rows.split_at_mut(QUAD_BYTES);
        low_row.copy_from_slice(&bytemuck::cast::<_, [u8; 64]>(low));
        high_row.copy_from_slice(&bytemuck::cast::<_, [u8; 64]>(high));
    }
}
