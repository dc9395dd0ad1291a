//! The one place in the workspace with `unsafe`: x86 instructions that
//! `pulp` does not wrap, behind tokens that prove the CPU has them.
//!
//! VNNI's `vpdpbusd` multiplies unsigned by signed bytes and adds each four
//! products into a 32-bit lane in one instruction, where AVX2 and AVX-512
//! need three (`maddubs`, `madd` by ones, `add`). The integer sums are the
//! same (the pairs `maddubs` forms never saturate on the values the kernels
//! feed it: unsigned nibbles or |i8|, times i8), so the kernels' results do
//! not change with the path.
//!
//! F16C's `vcvtph2ps` converts eight F16 values to F32 in one instruction:
//! the decode step reads an F16 KV cache through it ([`F16cAvx`]).
//!
//! How the wrappers stay sound, the way `pulp`'s `V3`/`V4` do it:
//! - a token ([`Vnni512`], [`VnniAvx`], [`F16cAvx`]) has a private field and one
//!   constructor, which returns `None` unless the CPU reports every feature
//!   the token's functions use (`is_x86_feature_detected!`);
//! - each instruction is a safe `#[inline(always)]` method of the token:
//!   holding the token is the proof the `unsafe` call needs;
//! - `vectorize` runs a closure inside a function compiled with those
//!   features, so that the methods inline into it as single instructions
//!   (outside it they are still sound, only slower: calls).
//!
//! Every value passed is a register (`__m512i`, `__m256i`): no pointer
//! arithmetic happens here, so there are no bounds to check.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{__m128i, __m256, __m256i, __m512i};

/// Proof that the CPU runs AVX-512 (F, BW, CD, DQ, VL: `pulp`'s `V4`) and
/// AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub struct Vnni512 {
    v4: pulp::x86::V4,
}

#[cfg(target_arch = "x86_64")]
impl Vnni512 {
    /// `None` unless the CPU also has AVX-512 VNNI.
    pub fn try_new(v4: pulp::x86::V4) -> Option<Self> {
        std::arch::is_x86_feature_detected!("avx512vnni").then_some(Self { v4 })
    }

    /// The AVX-512 token this one extends.
    #[inline(always)]
    pub fn v4(self) -> pulp::x86::V4 {
        self.v4
    }

    /// Runs `f` compiled with AVX-512 and VNNI enabled, so that this
    /// token's and `V4`'s methods inline into it.
    #[inline(always)]
    pub fn vectorize<R>(self, f: impl FnOnce() -> R) -> R {
        #[target_feature(
            enable = "sse,sse2,sse3,ssse3,sse4.1,sse4.2,popcnt,fxsr,avx,avx2,fma,bmi1,bmi2,lzcnt,avx512f,avx512bw,avx512cd,avx512dq,avx512vl,avx512vnni"
        )]
        #[inline]
        fn with_features<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: `self` exists only where `V4::try_new` (F, BW, CD, DQ, VL
        // and everything V3 has) and `try_new` (VNNI) found every feature
        // enabled above on this CPU.
        unsafe { with_features(f) }
    }

    /// `acc` plus, in each 32-bit lane, the four products of `unsigned`'s
    /// bytes (as u8) with `signed`'s (as i8) in that lane (`vpdpbusd`).
    #[inline(always)]
    pub fn dot_u8_i8(self, acc: __m512i, unsigned: __m512i, signed: __m512i) -> __m512i {
        // SAFETY: `self` exists only where the CPU has AVX-512 F and VNNI
        // (`try_new`); the arguments are registers, nothing is read or written
        // through a pointer.
        unsafe { std::arch::x86_64::_mm512_dpbusd_epi32(acc, unsigned, signed) }
    }
}

/// Proof that the CPU runs AVX2/FMA (`pulp`'s `V3`) and AVX-VNNI (the VEX
/// form of `vpdpbusd` on 256-bit registers: Intel since Alder Lake and
/// Sapphire Rapids, AMD since Zen 5).
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub struct VnniAvx {
    v3: pulp::x86::V3,
}

#[cfg(target_arch = "x86_64")]
impl VnniAvx {
    /// `None` unless the CPU also has AVX-VNNI.
    pub fn try_new(v3: pulp::x86::V3) -> Option<Self> {
        std::arch::is_x86_feature_detected!("avxvnni").then_some(Self { v3 })
    }

    /// The AVX2 token this one extends.
    #[inline(always)]
    pub fn v3(self) -> pulp::x86::V3 {
        self.v3
    }

    /// Runs `f` compiled with AVX2, FMA and AVX-VNNI enabled.
    #[inline(always)]
    pub fn vectorize<R>(self, f: impl FnOnce() -> R) -> R {
        #[target_feature(
            enable = "sse,sse2,sse3,ssse3,sse4.1,sse4.2,popcnt,fxsr,avx,avx2,fma,bmi1,bmi2,lzcnt,avxvnni"
        )]
        #[inline]
        fn with_features<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: `self` exists only where `V3::try_new` (AVX2, FMA,
        // BMI1/2, LZCNT and the SSE levels) and `try_new` (AVX-VNNI) found
        // every feature enabled above on this CPU.
        unsafe { with_features(f) }
    }

    /// `acc` plus, in each 32-bit lane, the four products of `unsigned`'s
    /// bytes (as u8) with `signed`'s (as i8) in that lane (`vpdpbusd`, VEX).
    #[inline(always)]
    pub fn dot_u8_i8(self, acc: __m256i, unsigned: __m256i, signed: __m256i) -> __m256i {
        // SAFETY: `self` exists only where the CPU has AVX-VNNI (`try_new`);
        // the arguments are registers.
        unsafe { std::arch::x86_64::_mm256_dpbusd_avx_epi32(acc, unsigned, signed) }
    }
}

/// Values per AMX product (one block).
pub const AMX_BLOCK: usize = 32;

/// Products of 16 activation rows with 16 weight rows held side by side
/// (Q8_0, Q4_1, Q5_0, Q4_K): rows per tile, and bytes of one block of the weights in
/// the VNNI layout (8 rows of 64 bytes: row `k4` holds values `4·k4..4·k4+4`
/// of each of the 16 weight rows, as unsigned bytes).
pub const AMX_SIDE_ROWS: usize = 16;
pub const AMX_SIDE_WEIGHT_TILE: usize = 512;

/// Proof that the CPU runs AVX2/FMA (`pulp`'s `V3`) and F16C, the
/// conversion of eight F16 values to F32 in one instruction (every AVX2 CPU
/// has it; `pulp` does not wrap it). The decode step reads an F16 KV cache
/// through it, converting in registers instead of through a scratch copy.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub struct F16cAvx {
    v3: pulp::x86::V3,
}

#[cfg(target_arch = "x86_64")]
impl F16cAvx {
    /// `None` unless the CPU also has F16C.
    pub fn try_new(v3: pulp::x86::V3) -> Option<Self> {
        std::arch::is_x86_feature_detected!("f16c").then_some(Self { v3 })
    }

    /// The AVX2 token this one extends.
    #[inline(always)]
    pub fn v3(self) -> pulp::x86::V3 {
        self.v3
    }

    /// Runs `f` compiled with AVX2, FMA and F16C enabled.
    #[inline(always)]
    pub fn vectorize<R>(self, f: impl FnOnce() -> R) -> R {
        #[target_feature(
            enable = "sse,sse2,sse3,ssse3,sse4.1,sse4.2,popcnt,fxsr,avx,avx2,fma,bmi1,bmi2,lzcnt,f16c"
        )]
        #[inline]
        fn with_features<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: `self` exists only where `V3::try_new` (AVX2, FMA,
        // BMI1/2, LZCNT and the SSE levels) and `try_new` (F16C) found every
        // feature enabled above on this CPU.
        unsafe { with_features(f) }
    }

    /// The eight F16 values in `halves`' lanes as F32 (`vcvtph2ps`).
    #[inline(always)]
    pub fn f16_to_f32(self, halves: __m128i) -> __m256 {
        // SAFETY: `self` exists only where the CPU has F16C (`try_new`); the
        // argument is a register.
        unsafe { std::arch::x86_64::_mm256_cvtph_ps(halves) }
    }
}

/// Proof that the CPU has AMX-TILE and AMX-INT8 and that the kernel granted
/// this process the tile state (Linux asks for it: `arch_prctl`).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[derive(Debug, Clone, Copy)]
pub struct Amx {
    _granted: (),
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
impl Amx {
    /// `None` without AMX-TILE and AMX-INT8, or when the kernel refuses the
    /// tile state (an older kernel, or a seccomp policy). Asked once.
    pub fn try_new() -> Option<Self> {
        static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        GRANTED
            .get_or_init(|| cpu_has_amx_int8() && request_tile_state())
            .then_some(Self { _granted: () })
    }

    /// Runs `f` with this thread's tiles configured for
    /// [`Tiles::side_block_pair`]'s shapes, and releases them after. A call
    /// inside `f` (on the same thread) finds them configured and leaves them
    /// to the outer call, so no `Tiles` ever outlives its configuration.
    pub fn with_tiles<R>(self, f: impl FnOnce(&Tiles) -> R) -> R {
        configured(TileShapes::Blocks, || {
            f(&Tiles {
                _not_send: std::marker::PhantomData,
            })
        })
    }

    /// Runs `f` with this thread's tiles configured for
    /// [`WideTiles::super_block_sums`]' shapes, as [`Amx::with_tiles`] does
    /// for its own. Inside a call configured for the other shapes, it
    /// configures its own and restores the outer call's after.
    pub fn with_wide_tiles<R>(self, f: impl FnOnce(&WideTiles) -> R) -> R {
        configured(TileShapes::Wide, || {
            f(&WideTiles {
                _not_send: std::marker::PhantomData,
            })
        })
    }
}

/// The two tile configurations the kernels use.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TileShapes {
    /// [`Tiles::side_block_pair`]: 32-value blocks.
    Blocks,
    /// [`WideTiles::super_block_sums`]: whole 64-byte tile rows.
    Wide,
}

/// Runs `f` with this thread's tiles configured as `shapes`. Only called
/// with an [`Amx`] in hand (the CPU has AMX and the tile state is granted).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn configured<R>(shapes: TileShapes, f: impl FnOnce() -> R) -> R {
    thread_local! {
        static CONFIGURED: std::cell::Cell<Option<TileShapes>> = const { std::cell::Cell::new(None) };
    }
    let outer = CONFIGURED.with(|c| c.replace(Some(shapes)));
    if outer == Some(shapes) {
        return f();
    }
    /// Restores the outer call's configuration (or releases the tiles)
    /// when this call ends, even by a panic.
    struct Restore(Option<TileShapes>);
    impl Drop for Restore {
        fn drop(&mut self) {
            match self.0 {
                Some(outer) => load_config(outer),
                // SAFETY: this thread's tiles were configured by the call
                // that made this guard; releasing returns them to their
                // initial state.
                None => unsafe {
                    std::arch::asm!("tilerelease", options(nostack, nomem));
                },
            }
            CONFIGURED.with(|c| c.set(self.0));
        }
    }
    load_config(shapes);
    let _restore = Restore(outer);
    f()
}

/// Loads `shapes`' tile configuration on this thread.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn load_config(shapes: TileShapes) {
    let config = match shapes {
        TileShapes::Blocks => TileConfig::for_blocks(),
        TileShapes::Wide => TileConfig::wide(),
    };
    // SAFETY: only reached through `configured`, which only an `Amx` (AMX-TILE
    // present, tile state granted) calls; `config` is a valid 64-byte
    // palette-1 configuration (64-byte aligned, read only by `ldtilecfg`).
    unsafe {
        std::arch::asm!("ldtilecfg [{cfg}]", cfg = in(reg) config.0.as_ptr(), options(nostack, readonly));
    }
}

/// This thread's tiles, configured by [`Amx::with_tiles`]: neither `Send`
/// nor `Sync`, and only lent inside it, so the configuration is in place
/// whenever a method runs.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub struct Tiles {
    _not_send: std::marker::PhantomData<*const ()>,
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
impl Tiles {
    /// The 16 × 16 integer products of two 32-value blocks: row `n` of
    /// `out[i]` holds activation row `n` of `activations[i]` (signed
    /// bytes) against each of the 16 weight rows in `weights[i]` (the VNNI
    /// layout of [`AMX_SIDE_WEIGHT_TILE`], values as unsigned
    /// bytes). Two blocks per call on separate tiles, so that one block's
    /// loads and product overlap the other's: tile registers are not
    /// renamed, and one block at a time ran at the tiles' latency.
    #[inline(always)]
    pub fn side_block_pair(
        &self,
        activations: [&[[u8; AMX_BLOCK]; AMX_SIDE_ROWS]; 2],
        weights: [&[u8; AMX_SIDE_WEIGHT_TILE]; 2],
        out: &mut [[[i32; AMX_SIDE_ROWS]; AMX_SIDE_ROWS]; 2],
    ) {
        let [first, second] = out;
        // SAFETY: `self` exists only inside `with_tiles`, on this thread,
        // after `ldtilecfg` set tmm3 and tmm6 to 16 rows × 64 bytes, tmm4
        // and tmm7 to 16 × 32, and tmm2 and tmm5 to 8 × 64. tmm4 and tmm7
        // read 16 rows of 32 bytes at a 32-byte stride (512 bytes: each of
        // `activations`'); tmm2 and tmm5 read 8 rows of 64 at a 64-byte
        // stride (512: each of `weights`'); the stores write 16 rows of 64
        // bytes at a 64-byte stride (1024: each of `out`'s). The lengths are
        // in the types. `tdpbsud` multiplies signed (tmm4, tmm7) by unsigned
        // (tmm2, tmm5) bytes.
        unsafe {
            std::arch::asm!(
                "tilezero tmm3",
                "tilezero tmm6",
                "tileloadd tmm4, [{a0} + {as_} * 1]",
                "tileloadd tmm2, [{w0} + {ws} * 1]",
                "tileloadd tmm7, [{a1} + {as_} * 1]",
                "tileloadd tmm5, [{w1} + {ws} * 1]",
                "tdpbsud tmm3, tmm4, tmm2",
                "tdpbsud tmm6, tmm7, tmm5",
                "tilestored [{o0} + {os} * 1], tmm3",
                "tilestored [{o1} + {os} * 1], tmm6",
                a0 = in(reg) activations[0].as_ptr(),
                a1 = in(reg) activations[1].as_ptr(),
                as_ = in(reg) AMX_BLOCK,
                w0 = in(reg) weights[0].as_ptr(),
                w1 = in(reg) weights[1].as_ptr(),
                ws = in(reg) 4 * AMX_SIDE_ROWS,
                o0 = in(reg) first.as_mut_ptr(),
                o1 = in(reg) second.as_mut_ptr(),
                os = in(reg) 4 * AMX_SIDE_ROWS,
                options(nostack)
            );
        }
    }
}

/// Values per wide tile product: a whole 64-byte tile row of activations.
pub const AMX_WIDE_K: usize = 64;
/// Wide tile products per [`WideTiles::super_block_sums`] call and run:
/// 256 values.
pub const AMX_WIDE_STEPS: usize = 4;
/// Weight matrices multiplied by the same activations in one call.
pub const AMX_WIDE_PARTS: usize = 2;
/// Runs of 16 activation rows multiplied in one call.
pub const AMX_WIDE_RUNS: usize = 2;
/// Bytes of one wide weight tile: 16 rows of 64 (row `k4` holds values
/// `4·k4..4·k4+4` of each of the 16 weight rows, as unsigned bytes).
pub const AMX_WIDE_WEIGHT_TILE: usize = 1024;

/// Two weight matrices of 16 rows over 256 values, as wide tiles:
/// `parts[p][s]` is matrix `p`'s values `64·s..64·s + 64`.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[repr(C, align(64))]
pub struct WideWeights {
    pub parts: [[[u8; AMX_WIDE_WEIGHT_TILE]; AMX_WIDE_STEPS]; AMX_WIDE_PARTS],
}

/// The 16 × 16 integer sums of two runs of 16 activation rows against each
/// of [`WideWeights`]' two matrices: `runs[r][p][i][n]` is row `i` of run
/// `r` against weight row `n` of matrix `p`.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[repr(C, align(64))]
pub struct WideSums {
    pub runs: [[[[i32; AMX_SIDE_ROWS]; AMX_SIDE_ROWS]; AMX_WIDE_PARTS]; AMX_WIDE_RUNS],
}

/// This thread's tiles, configured by [`Amx::with_wide_tiles`]: as
/// [`Tiles`], lent only inside it.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub struct WideTiles {
    _not_send: std::marker::PhantomData<*const ()>,
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
impl WideTiles {
    /// The exact integer sums of two runs of 16 activation rows (signed
    /// bytes) against two weight matrices (unsigned bytes) over 256 values.
    /// The four sums stay in tiles across all four steps of 64 values (so
    /// a call stores its results once, not once per block), and each tile
    /// loaded serves two products. Row `i` of run `r` is
    /// `runs[r][at + i·stride..][..256]`.
    ///
    /// # Panics
    ///
    /// If a run is too short for that: `at + 15·stride + 256 > len`.
    #[inline(always)]
    pub fn super_block_sums(
        &self,
        runs: [&[u8]; AMX_WIDE_RUNS],
        stride: usize,
        at: usize,
        weights: &WideWeights,
        out: &mut WideSums,
    ) {
        let last = stride
            .checked_mul(AMX_SIDE_ROWS - 1)
            .and_then(|v| v.checked_add(at))
            .and_then(|v| v.checked_add(AMX_WIDE_K * AMX_WIDE_STEPS));
        for run in runs {
            assert!(
                last.is_some_and(|last| last <= run.len()),
                "16 activation rows of 256 bytes at {at}, stride {stride}, out of {} bytes",
                run.len()
            );
        }
        // SAFETY: `self` exists only inside `with_wide_tiles`, on this
        // thread, after `ldtilecfg` set every tile to 16 rows × 64 bytes.
        // tmm0 and tmm1 read 16 rows of 64 bytes at `stride` from
        // `runs[r][at + 64·s..]` for s < 4: the last byte read is
        // `at + 15·stride + 255`, in bounds by the checks above. tmm2 and
        // tmm3 read 16 rows of 64 at a 64-byte stride from `parts[p][s]`
        // (1,024 bytes each, at `1024·(4p + s)` in `weights`: the lengths
        // are in the type). The stores write 16 rows of 64 bytes at a
        // 64-byte stride into `out.runs[r][p]` (1,024 bytes each, at
        // `1024·(2r + p)`). `tdpbsud` multiplies signed (tmm0, tmm1) by
        // unsigned (tmm2, tmm3) bytes into 32-bit sums, which cannot
        // overflow: 256 products of at most 128 × 255.
        unsafe {
            std::arch::asm!(
                "tilezero tmm4",
                "tilezero tmm5",
                "tilezero tmm6",
                "tilezero tmm7",
                "tileloadd tmm0, [{a0} + {as_} * 1]",
                "tileloadd tmm2, [{w} + {ws} * 1]",
                "tdpbsud tmm4, tmm0, tmm2",
                "tileloadd tmm3, [{w} + {ws} * 1 + 4096]",
                "tdpbsud tmm5, tmm0, tmm3",
                "tileloadd tmm1, [{a1} + {as_} * 1]",
                "tdpbsud tmm6, tmm1, tmm2",
                "tdpbsud tmm7, tmm1, tmm3",
                "tileloadd tmm0, [{a0} + {as_} * 1 + 64]",
                "tileloadd tmm2, [{w} + {ws} * 1 + 1024]",
                "tdpbsud tmm4, tmm0, tmm2",
                "tileloadd tmm3, [{w} + {ws} * 1 + 5120]",
                "tdpbsud tmm5, tmm0, tmm3",
                "tileloadd tmm1, [{a1} + {as_} * 1 + 64]",
                "tdpbsud tmm6, tmm1, tmm2",
                "tdpbsud tmm7, tmm1, tmm3",
                "tileloadd tmm0, [{a0} + {as_} * 1 + 128]",
                "tileloadd tmm2, [{w} + {ws} * 1 + 2048]",
                "tdpbsud tmm4, tmm0, tmm2",
                "tileloadd tmm3, [{w} + {ws} * 1 + 6144]",
                "tdpbsud tmm5, tmm0, tmm3",
                "tileloadd tmm1, [{a1} + {as_} * 1 + 128]",
                "tdpbsud tmm6, tmm1, tmm2",
                "tdpbsud tmm7, tmm1, tmm3",
                "tileloadd tmm0, [{a0} + {as_} * 1 + 192]",
                "tileloadd tmm2, [{w} + {ws} * 1 + 3072]",
                "tdpbsud tmm4, tmm0, tmm2",
                "tileloadd tmm3, [{w} + {ws} * 1 + 7168]",
                "tdpbsud tmm5, tmm0, tmm3",
                "tileloadd tmm1, [{a1} + {as_} * 1 + 192]",
                "tdpbsud tmm6, tmm1, tmm2",
                "tdpbsud tmm7, tmm1, tmm3",
                "tilestored [{o} + {os} * 1], tmm4",
                "tilestored [{o} + {os} * 1 + 1024], tmm5",
                "tilestored [{o} + {os} * 1 + 2048], tmm6",
                "tilestored [{o} + {os} * 1 + 3072], tmm7",
                a0 = in(reg) runs[0].as_ptr().wrapping_add(at),
                a1 = in(reg) runs[1].as_ptr().wrapping_add(at),
                as_ = in(reg) stride,
                w = in(reg) weights.parts.as_ptr(),
                ws = in(reg) AMX_WIDE_K,
                o = in(reg) out.runs.as_mut_ptr(),
                os = in(reg) AMX_WIDE_K,
                options(nostack)
            );
        }
    }
}

/// A palette-1 tile configuration: 64 bytes, 64-byte aligned.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
impl TileConfig {
    /// Two blocks at a time: tmm3 and tmm6, the 16 × 16 i32 products;
    /// tmm4 and tmm7, 16 activation rows of 32 bytes; tmm2 and tmm5, the
    /// weights, 8 rows of 64 bytes. tmm0 and tmm1 stay unconfigured.
    fn for_blocks() -> Self {
        let mut bytes = [0u8; 64];
        bytes[0] = 1; // palette 1
        for (tile, rows, row_bytes) in [
            (2, AMX_BLOCK / 4, 4 * AMX_SIDE_ROWS),
            (3, AMX_SIDE_ROWS, 4 * AMX_SIDE_ROWS),
            (4, AMX_SIDE_ROWS, AMX_BLOCK),
            (5, AMX_BLOCK / 4, 4 * AMX_SIDE_ROWS),
            (6, AMX_SIDE_ROWS, 4 * AMX_SIDE_ROWS),
            (7, AMX_SIDE_ROWS, AMX_BLOCK),
        ] {
            bytes[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&(row_bytes as u16).to_le_bytes());
            bytes[48 + tile] = rows as u8;
        }
        Self(bytes)
    }

    /// Every tile (tmm0 to tmm7) 16 rows of 64 bytes: activations, weights
    /// in the VNNI layout and 32-bit sums alike.
    fn wide() -> Self {
        let mut bytes = [0u8; 64];
        bytes[0] = 1; // palette 1
        for tile in 0..8 {
            bytes[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&(AMX_WIDE_K as u16).to_le_bytes());
            bytes[48 + tile] = AMX_SIDE_ROWS as u8;
        }
        Self(bytes)
    }
}

/// CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn cpu_has_amx_int8() -> bool {
    // Leaf 7 is valid only where the maximum leaf (leaf 0's EAX) reaches it.
    if std::arch::x86_64::__cpuid(0).eax < 7 {
        return false;
    }
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    leaf7.edx & (1 << 24) != 0 && leaf7.edx & (1 << 25) != 0
}

/// Asks Linux for the AMX tile data state (`ARCH_REQ_XCOMP_PERM`,
/// `XFEATURE_XTILEDATA`); without it the first tile instruction faults.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this code only changes the process's permitted
    // XSAVE features; it reads and writes no memory of ours.
    let result = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    result == 0
}
