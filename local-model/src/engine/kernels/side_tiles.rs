//! AMX tile products for the formats held sixteen weight rows side by side
//! (Q8_0, Q4_1, Q5_0, opt-in, see `AMX_VARIABLE`; Q4_K's own tiles use
//! [`ActivationRows`]): the activations of each run of 16 rows laid out as tiles
//! once per product, the weights' nibbles split into tile rows, and each
//! worker thread's tile configuration held for its whole share.
//!
//! In those layouts a step holds four values of each of the 16 rows and
//! the next four (in the low and high nibbles of 64 bytes, or Q8_0's two
//! vectors of offset bytes): as bytes, the two are two rows of a weight
//! tile in the VNNI order `tdpbsud` reads. One
//! tile product then gives, for a 32-value block, the exact integer sums
//! of 16 activation rows against 16 weight rows: the sums the AVX kernels
//! form with `vpdpbusd`, row by row. The formats scale and add them with
//! the same F32 operations as their AVX-512 kernels, so tiles change no bit
//! of any result, whatever rows run beside a request.

use super::Isa;

/// Activation rows per tile product.
pub(super) const ROWS: usize = 16;
/// Values per tile product.
pub(super) const BLOCK: usize = 32;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(super) use with_amx::*;
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub(super) use without_amx::*;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod with_amx {
    use super::super::unsafe_simd::{
        Amx, Tiles, WideTiles, AMX_BLOCK, AMX_SIDE_ROWS, AMX_SIDE_WEIGHT_TILE,
    };
    use super::{Isa, BLOCK, ROWS};

    const _: () = assert!(AMX_SIDE_ROWS == ROWS && AMX_BLOCK == BLOCK);

    /// One block of 16 activation rows: 32 signed bytes each.
    pub(in super::super) type ActivationTile = [[u8; BLOCK]; ROWS];
    /// One block of 16 weight rows, in the VNNI layout.
    pub(in super::super) type WeightTile = [u8; AMX_SIDE_WEIGHT_TILE];
    /// This thread's configured tiles.
    pub(in super::super) type ConfiguredTiles = Tiles;

    /// The activations of each whole run of 16 rows, block by block.
    pub(in super::super) struct ActivationTiles {
        amx: Amx,
        wide: Wide,
        tiles: Vec<ActivationTile>,
        blocks_per_row: usize,
    }

    impl ActivationTiles {
        /// From `m` rows of `blocks_per_row` blocks; `block(i, k)` gives
        /// block `k` of row `i`. `None` without AMX or AVX-512 (which
        /// finishes the tiles' sums), or with fewer than 16 rows.
        pub(in super::super) fn new(
            isa: &Isa,
            m: usize,
            blocks_per_row: usize,
            block: impl Fn(usize, usize) -> [u8; BLOCK],
        ) -> Option<Self> {
            let amx = isa.amx?;
            let wide = Wide::of(isa)?;
            let runs = m / ROWS;
            if runs == 0 {
                return None;
            }
            let mut tiles = vec![[[0u8; BLOCK]; ROWS]; runs * blocks_per_row];
            for (run, run_tiles) in tiles.chunks_exact_mut(blocks_per_row).enumerate() {
                for (k, tile) in run_tiles.iter_mut().enumerate() {
                    for (n, row) in tile.iter_mut().enumerate() {
                        *row = block(run * ROWS + n, k);
                    }
                }
            }
            Some(Self {
                amx,
                wide,
                tiles,
                blocks_per_row,
            })
        }

        /// Runs one worker's share inside the thread's tile configuration.
        pub(in super::super) fn on_worker(&self, work: impl FnOnce()) {
            self.amx.with_tiles(|_| work())
        }

        /// `f` with the configured tiles, the AVX-512 token to finish
        /// their sums with and the blocks of the run of 16 rows from
        /// `first` on; `None` unless `N` is 16 and `first` starts a run.
        pub(in super::super) fn with_run<const N: usize, R>(
            &self,
            first: usize,
            f: impl FnOnce(&Tiles, Wide, &[ActivationTile]) -> R,
        ) -> Option<R> {
            if N != ROWS || !first.is_multiple_of(ROWS) {
                return None;
            }
            let run = first / ROWS;
            let tiles = self
                .tiles
                .get(run * self.blocks_per_row..(run + 1) * self.blocks_per_row)?;
            Some(self.amx.with_tiles(|t| f(t, self.wide, tiles)))
        }
    }

    /// The activations of each whole run of 16 rows as bytes for
    /// [`WideTiles`], in chunks of `chunk` values: all rows' first chunk,
    /// then all rows' second, and so on. A tile load reads 16 rows of 64
    /// values at the chunk's stride, so a run's chunk is one contiguous
    /// span (`16 · chunk` bytes) and a kernel that goes chunk by chunk over
    /// every run reads them in order.
    pub(in super::super) struct ActivationRows {
        amx: Amx,
        wide: Wide,
        bytes: Vec<u8>,
        chunk: usize,
        /// Rows held: the whole runs of 16.
        rows: usize,
    }

    impl ActivationRows {
        /// From `m` rows of `chunks` chunks of `chunk` values; `fill(i, c,
        /// out)` writes chunk `c` of row `i`. `None` without AMX (for the
        /// formats that gain: `Isa::gaining_amx`) or AVX-512 (which
        /// finishes the tiles' sums), or with fewer than 16 rows.
        pub(in super::super) fn new(
            isa: &Isa,
            m: usize,
            chunks: usize,
            chunk: usize,
            fill: impl Fn(usize, usize, &mut [u8]),
        ) -> Option<Self> {
            let amx = isa.gaining_amx?;
            let wide = Wide::of(isa)?;
            let rows = m / ROWS * ROWS;
            if rows == 0 || chunk == 0 {
                return None;
            }
            let mut bytes = vec![0u8; rows * chunks * chunk];
            for (at, out) in bytes.chunks_exact_mut(chunk).enumerate() {
                fill(at % rows, at / rows, out);
            }
            Some(Self {
                amx,
                wide,
                bytes,
                chunk,
                rows,
            })
        }

        /// Whole runs of 16 rows.
        pub(in super::super) fn runs(&self) -> usize {
            self.rows / ROWS
        }

        /// Run `run`'s chunk `c`: 16 rows of `chunk` bytes, contiguous.
        pub(in super::super) fn run_chunk(&self, c: usize, run: usize) -> &[u8] {
            let len = ROWS * self.chunk;
            let at = (c * self.runs() + run) * len;
            &self.bytes[at..at + len]
        }

        /// Runs one worker's share inside the thread's tile configuration.
        pub(in super::super) fn on_worker(&self, work: impl FnOnce()) {
            self.amx.with_wide_tiles(|_| work())
        }

        /// `f` with the configured tiles and the AVX-512 token to finish
        /// their sums with.
        pub(in super::super) fn with_tiles<R>(&self, f: impl FnOnce(&WideTiles, Wide) -> R) -> R {
            self.amx.with_wide_tiles(|t| f(t, self.wide))
        }
    }

    /// The AVX-512 token the formats finish the tiles' sums under: with
    /// VNNI where the CPU has it, since its `vectorize` compiles the
    /// kernel with every feature it inlines (under `pulp`'s own `V4` the
    /// tile kernels' intrinsics were left as calls: 13 times slower).
    #[derive(Clone, Copy)]
    pub(in super::super) enum Wide {
        Vnni(super::super::WideVnni),
        Plain(pulp::x86::V4),
    }

    impl Wide {
        /// With VNNI where the CPU has it; `None` without AVX-512.
        fn of(isa: &Isa) -> Option<Self> {
            match (isa.wide_vnni, isa.wide) {
                (Some(vnni), _) => Some(Wide::Vnni(vnni)),
                (None, Some(v4)) => Some(Wide::Plain(v4)),
                (None, None) => None,
            }
        }
    }
}

/// Where there are no AMX tiles: no values, so never used.
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod without_amx {
    use super::{Isa, BLOCK};

    pub(in super::super) enum ActivationTiles {}

    pub(in super::super) enum ActivationRows {}

    impl ActivationRows {
        pub(in super::super) fn new(
            _isa: &Isa,
            _m: usize,
            _chunks: usize,
            _chunk: usize,
            _fill: impl Fn(usize, usize, &mut [u8]),
        ) -> Option<Self> {
            None
        }

        pub(in super::super) fn on_worker(&self, _work: impl FnOnce()) {
            match *self {}
        }
    }

    impl ActivationTiles {
        pub(in super::super) fn new(
            _isa: &Isa,
            _m: usize,
            _blocks_per_row: usize,
            _block: impl Fn(usize, usize) -> [u8; BLOCK],
        ) -> Option<Self> {
            None
        }

        pub(in super::super) fn on_worker(&self, _work: impl FnOnce()) {
            match *self {}
        }
    }
}
