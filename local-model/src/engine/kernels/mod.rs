//! Cascade's own products of F32 activations with block-quantized weights
//! (Q8_0, Q4_1, Q5_0 and Q4_K), on AVX2 through `pulp`'s safe intrinsics.
//!
//! candle 0.11's x86 kernels take one weight row at a time through a single
//! accumulator and re-read the activation block for every row. Here the
//! weights are held sixteen rows side by side (`q4_1.rs` for the 32-value
//! formats, `q4_k.rs`), in one sequential stream: lane `r` of every vector
//! is row `r`, the activations are broadcast, and each block's integer sums
//! are scaled for sixteen rows at once with no sums across lanes. In
//! prefill and batched decode several activation rows pass over a group
//! while it sits in L1, so the matrix is read once per product.
//!
//! No `unsafe` here: `pulp::x86::V3` is a token that exists only when the CPU
//! has AVX2 and FMA (checked at run time), its intrinsics are safe methods,
//! and `V3::vectorize` compiles the closure with those features. Without the
//! token (another CPU or architecture) the constructors return `None` and the
//! caller keeps candle's kernels (on ARM, candle's NEON kernels already take
//! four rows at a time).
//!
//! Where the CPU also has AVX-512 (F, BW, VL: `pulp::x86::V4`, checked at
//! run time), the products take 64 bytes per instruction and eight
//! activation rows per pass over a weight group. The AVX2 kernels stay for
//! other CPUs and read the same layout.

mod q4_1;
mod q4_k;
mod q5_0;
mod q8_0;
mod side_tiles;
#[cfg(target_arch = "x86_64")]
#[expect(
    unsafe_code,
    reason = "VNNI instructions pulp does not wrap: safe methods of CPU-proof tokens, the workspace's only unsafe (docs/benchmarks.md, STYLE.md)"
)]
mod unsafe_simd;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{__m256i, __m512i};
use std::sync::Mutex;

use candle_core::quantized::GgmlDType;

pub use q4_1::Q4_1Matrix;
pub use q4_k::Q4KMatrix;
pub use q5_0::Q5_0Matrix;
pub use q8_0::{Q8_0Matrix, ReadError};
#[cfg(target_arch = "x86_64")]
pub(crate) use unsafe_simd::F16cAvx;

/// Proof that the CPU runs the AVX2/FMA kernels.
#[cfg(target_arch = "x86_64")]
type Simd = pulp::x86::V3;
/// No kernels here: the type has no values, so no matrix is ever built.
#[cfg(not(target_arch = "x86_64"))]
type Simd = std::convert::Infallible;

#[cfg(target_arch = "x86_64")]
fn detect_simd() -> Option<Simd> {
    pulp::x86::V3::try_new()
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_simd() -> Option<Simd> {
    None
}

/// Proof that the CPU runs the AVX-512 kernels.
#[cfg(target_arch = "x86_64")]
type WideSimd = pulp::x86::V4;
#[cfg(not(target_arch = "x86_64"))]
type WideSimd = std::convert::Infallible;

/// Set (to anything) to keep to the AVX2 kernels on a CPU with AVX-512:
/// to compare the two, or where AVX-512 lowers the clock (some Intel
/// server parts before Ice Lake).
pub const NO_AVX512_VARIABLE: &str = "CASCADE_NO_AVX512";

#[cfg(target_arch = "x86_64")]
fn detect_wide_simd() -> Option<WideSimd> {
    if std::env::var_os(NO_AVX512_VARIABLE).is_some() {
        return None;
    }
    pulp::x86::V4::try_new()
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_wide_simd() -> Option<WideSimd> {
    None
}

/// Proof that the CPU runs the AVX-512 kernels with VNNI's byte products.
#[cfg(target_arch = "x86_64")]
type WideVnni = unsafe_simd::Vnni512;
#[cfg(not(target_arch = "x86_64"))]
type WideVnni = std::convert::Infallible;

/// Proof that the CPU runs the AVX2 kernels with AVX-VNNI's byte products.
#[cfg(target_arch = "x86_64")]
type SimdVnni = unsafe_simd::VnniAvx;
#[cfg(not(target_arch = "x86_64"))]
type SimdVnni = std::convert::Infallible;

/// Set (to anything) to keep to the byte products without VNNI on a CPU
/// that has it: to compare the two.
pub const NO_VNNI_VARIABLE: &str = "CASCADE_NO_VNNI";

#[cfg(target_arch = "x86_64")]
fn detect_vnni(simd: Simd, wide: Option<WideSimd>) -> (Option<SimdVnni>, Option<WideVnni>) {
    if std::env::var_os(NO_VNNI_VARIABLE).is_some() {
        return (None, None);
    }
    (
        unsafe_simd::VnniAvx::try_new(simd),
        wide.and_then(unsafe_simd::Vnni512::try_new),
    )
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_vnni(simd: Simd, _wide: Option<WideSimd>) -> (Option<SimdVnni>, Option<WideVnni>) {
    match simd {}
}

/// Proof that the CPU has AMX-INT8 and the kernel granted the tile state.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
type Amx = unsafe_simd::Amx;
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
type Amx = std::convert::Infallible;

/// Chooses the products that run on AMX tiles where the CPU and kernel
/// allow. Unset: Q4_K's products of 64 activation rows or more (prefill),
/// whose tiles keep each 256-value super-block's sums in the tiles
/// (`q4_k::dot_runs_tiles`): Phi-1.5's 256-token prefill went from 151–160
/// to 176 tok/s on an Intel Xeon host (docs/benchmarks.md, session 17). `1`: also the
/// other formats' products of 16 rows or more, whose every 32-value block
/// has its own F32 scale, so each tile product of 16 × 16 × 32 values is
/// stored and read back to be scaled; on the hosts measured they were no
/// faster than the AVX-512 VNNI kernels (Gemma 3's prefill 11% slower).
/// `0`: no tiles. The tiles give the AVX kernels' bits in every format.
pub const AMX_VARIABLE: &str = "CASCADE_AMX";

/// AMX tiles for every format, where `CASCADE_AMX=1` asks for them and the
/// CPU and kernel allow it.
fn detect_amx() -> Option<Amx> {
    (std::env::var(AMX_VARIABLE).as_deref() == Ok("1"))
        .then(available_amx)
        .flatten()
}

/// AMX tiles for the formats that gain (Q4_K), unless `CASCADE_AMX=0`.
fn detect_gaining_amx() -> Option<Amx> {
    (std::env::var(AMX_VARIABLE).as_deref() != Ok("0"))
        .then(available_amx)
        .flatten()
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn available_amx() -> Option<Amx> {
    unsafe_simd::Amx::try_new()
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn available_amx() -> Option<Amx> {
    None
}

/// Set to `1` (or `0`) to turn on (or off) the AVX-512 kernels' software
/// prefetch of weights in products of one to three activation rows: a
/// decode step of one to three sequences, which streams the weights from
/// memory once per token. By default it is on where it was measured to
/// help, AMD Zen 5 and later (CPU family 26 on): Phi-1.5 (random Q4_K)
/// alone decoded 70 against 47–58 tok/s, SmolLM2 Q4_1 about 10% faster,
/// Gemma 3 unchanged. Elsewhere it is off: on a Zen 4 host the Q4_K
/// kernel's prefetch made one-row products 15% slower (docs/benchmarks.md).
/// Products of four rows and more always prefetch.
pub const STREAM_PREFETCH_VARIABLE: &str = "CASCADE_STREAM_PREFETCH";

/// Whether products of few rows prefetch weights: `CASCADE_STREAM_PREFETCH`
/// where set to `1` or `0`, else whether this CPU is one measured to gain.
fn detect_stream_prefetch() -> bool {
    match std::env::var(STREAM_PREFETCH_VARIABLE).as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => prefetch_helps_streams(),
    }
}

/// AMD family 26 (Zen 5) or later.
#[cfg(target_arch = "x86_64")]
fn prefetch_helps_streams() -> bool {
    use std::arch::x86_64::__cpuid;
    let vendor = __cpuid(0);
    // "AuthenticAMD" in EBX, EDX, ECX.
    let amd = (vendor.ebx, vendor.edx, vendor.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163);
    let signature = __cpuid(1).eax;
    let base = (signature >> 8) & 0xF;
    let family = if base == 0xF {
        base + ((signature >> 20) & 0xFF)
    } else {
        base
    };
    amd && family >= 26
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch_helps_streams() -> bool {
    false
}

/// The instruction sets one matrix's products run on: AVX2/FMA always,
/// AVX-512 where the CPU has it and `CASCADE_NO_AVX512` is not set, and on
/// either VNNI's byte products where the CPU has them and `CASCADE_NO_VNNI`
/// is not set.
#[derive(Debug, Clone, Copy)]
struct Isa {
    simd: Simd,
    wide: Option<WideSimd>,
    simd_vnni: Option<SimdVnni>,
    wide_vnni: Option<WideVnni>,
    /// AMX tiles for every format, for products over 16 activation rows
    /// or more (opt-in: [`AMX_VARIABLE`]).
    amx: Option<Amx>,
    /// AMX tiles for the formats where they gain (Q4_K, from 64 rows).
    gaining_amx: Option<Amx>,
    /// Whether the AVX-512 kernels prefetch weights for fewer than four
    /// activation rows ([`STREAM_PREFETCH_VARIABLE`]).
    stream_prefetch: bool,
    /// Whether the AVX2 kernel unpacks a Q5_0 group's values once for
    /// many activation rows (`q4_1::UnpackedGroup`): on, but for tests and
    /// benchmarks that compare.
    unpack: bool,
}

impl Isa {
    /// `None` when the CPU lacks AVX2/FMA.
    fn detect() -> Option<Self> {
        let simd = detect_simd()?;
        let wide = detect_wide_simd();
        let (simd_vnni, wide_vnni) = detect_vnni(simd, wide);
        Some(Self {
            simd,
            wide,
            simd_vnni,
            wide_vnni,
            amx: detect_amx(),
            gaining_amx: detect_gaining_amx(),
            stream_prefetch: detect_stream_prefetch(),
            unpack: true,
        })
    }

    /// How many of a kernel's steps ahead its products over `rows`
    /// activation rows ask for weights: `many` from four rows (the products
    /// per byte then leave the loads waiting on the hardware's prefetcher),
    /// `few` below where [`STREAM_PREFETCH_VARIABLE`] holds, 0 for none.
    fn prefetch_ahead(&self, rows: usize, many: usize, few: usize) -> usize {
        if rows >= 4 {
            many
        } else if self.stream_prefetch {
            few
        } else {
            0
        }
    }

    /// The path the products take.
    fn path(&self) -> KernelPath {
        match (self.wide, self.wide_vnni, self.simd_vnni) {
            (Some(_), Some(_), _) => KernelPath::Avx512Vnni,
            (Some(_), None, _) => KernelPath::Avx512,
            (None, _, Some(_)) => KernelPath::AvxVnni,
            (None, _, None) => KernelPath::Avx2,
        }
    }
}

/// Which instructions the quantized products run on, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// AVX-512 with VNNI's `vpdpbusd` (Intel since Cascade Lake, AMD since Zen 4).
    Avx512Vnni,
    /// AVX-512 F/BW/CD/DQ/VL.
    Avx512,
    /// AVX2 with AVX-VNNI's `vpdpbusd` (Intel since Alder Lake, AMD since Zen 5).
    AvxVnni,
    /// AVX2 and FMA.
    Avx2,
}

impl KernelPath {
    fn is_avx512(self) -> bool {
        matches!(self, Self::Avx512Vnni | Self::Avx512)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512Vnni => "AVX-512 VNNI",
            Self::Avx512 => "AVX-512",
            Self::AvxVnni => "AVX-VNNI",
            Self::Avx2 => "AVX2",
        }
    }
}

/// The path this CPU's products take (under `CASCADE_NO_AVX512` and
/// `CASCADE_NO_VNNI`); `None` where Cascade's kernels do not run (no
/// AVX2/FMA, or another architecture: candle's kernels do the products).
pub fn detected_path() -> Option<KernelPath> {
    Isa::detect().map(|isa| isa.path())
}

/// What `cascade bench` prints of the tuned engine's quantized products on
/// this CPU, e.g. "AVX-512 VNNI (Q8_0, Q4_1, Q5_0, Q4_K); other formats on
/// candle's".
pub fn describe_paths() -> String {
    let Some(isa) = Isa::detect() else {
        return "candle's (this CPU lacks AVX2/FMA)".into();
    };
    let path = isa.path();
    let amx = match (isa.amx, isa.gaining_amx) {
        (Some(_), _) => "; AMX tiles for 16 rows or more (Q4_K: 64)",
        (None, Some(_)) => "; AMX tiles for Q4_K from 64 rows",
        (None, None) => "",
    };
    let prefetch = if path.is_avx512() && isa.stream_prefetch {
        "; weights prefetched for decode steps"
    } else {
        ""
    };
    format!(
        "{} (Q8_0, Q4_1, Q5_0, Q4_K){amx}{prefetch}; other formats on candle's",
        path.name()
    )
}

/// The byte products of the AVX-512 kernels: each 32-bit lane of the
/// result sums the four products of unsigned by signed bytes in it.
/// Implemented by `V4` (`maddubs`, then `madd` by ones) and by the VNNI
/// token (`vpdpbusd`): the same integers either way.
#[cfg(target_arch = "x86_64")]
trait WideBytes: Copy {
    fn v4(self) -> WideSimd;
    fn vectorize<R>(self, f: impl FnOnce() -> R) -> R;
    /// `Σ a·b + Σ c·d` per four bytes; each pair of products of `a·b` plus
    /// that of `c·d` must fit 16 bits (the AVX-512 path adds them there).
    fn quads2(self, a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> __m512i;
    /// `acc` plus [`quads2`](Self::quads2)`(a, b, c, d)`, under the same
    /// condition: on VNNI two `vpdpbusd` into `acc` itself.
    fn add_quads2(self, acc: __m512i, a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> __m512i;
    /// [`add_quads2`](Self::add_quads2) for any unsigned bytes `a` and `c`
    /// (Q8_0's values): VNNI adds the products in 32 bits, the same as
    /// `add_quads2`; without it each nibble of `a` and `c` is multiplied
    /// apart, in 16 bits, and the high nibbles' sums shifted by four.
    fn add_byte_quads2(
        self,
        acc: __m512i,
        a: __m512i,
        b: __m512i,
        c: __m512i,
        d: __m512i,
    ) -> __m512i;
}

#[cfg(target_arch = "x86_64")]
impl WideBytes for WideSimd {
    #[inline(always)]
    fn v4(self) -> WideSimd {
        self
    }
    #[inline(always)]
    fn vectorize<R>(self, f: impl FnOnce() -> R) -> R {
        pulp::x86::V4::vectorize(self, f)
    }
    #[inline(always)]
    fn quads2(self, a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> __m512i {
        let pairs = self.avx512bw._mm512_add_epi16(
            self.avx512bw._mm512_maddubs_epi16(a, b),
            self.avx512bw._mm512_maddubs_epi16(c, d),
        );
        self.avx512bw
            ._mm512_madd_epi16(pairs, self.avx512f._mm512_set1_epi16(1))
    }
    #[inline(always)]
    fn add_quads2(self, acc: __m512i, a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> __m512i {
        self.avx512f._mm512_add_epi32(acc, self.quads2(a, b, c, d))
    }
    #[inline(always)]
    fn add_byte_quads2(
        self,
        acc: __m512i,
        a: __m512i,
        b: __m512i,
        c: __m512i,
        d: __m512i,
    ) -> __m512i {
        let nibbles = self.avx512f._mm512_set1_epi8(0x0F);
        let low = |v| self.avx512f._mm512_and_si512(v, nibbles);
        let high = |v| low(self.avx512bw._mm512_srli_epi16::<4>(v));
        let low_sums = self.quads2(low(a), b, low(c), d);
        let high_sums = self.quads2(high(a), b, high(c), d);
        self.avx512f._mm512_add_epi32(
            acc,
            self.avx512f
                ._mm512_add_epi32(low_sums, self.avx512f._mm512_slli_epi32::<4>(high_sums)),
        )
    }
}

#[cfg(target_arch = "x86_64")]
impl WideBytes for WideVnni {
    #[inline(always)]
    fn v4(self) -> WideSimd {
        unsafe_simd::Vnni512::v4(self)
    }
    #[inline(always)]
    fn vectorize<R>(self, f: impl FnOnce() -> R) -> R {
        unsafe_simd::Vnni512::vectorize(self, f)
    }
    #[inline(always)]
    fn quads2(self, a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> __m512i {
        let zero = self.v4().avx512f._mm512_setzero_si512();
        self.dot_u8_i8(self.dot_u8_i8(zero, a, b), c, d)
    }
    #[inline(always)]
    fn add_quads2(self, acc: __m512i, a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> __m512i {
        self.dot_u8_i8(self.dot_u8_i8(acc, a, b), c, d)
    }
    #[inline(always)]
    fn add_byte_quads2(
        self,
        acc: __m512i,
        a: __m512i,
        b: __m512i,
        c: __m512i,
        d: __m512i,
    ) -> __m512i {
        self.add_quads2(acc, a, b, c, d)
    }
}

/// A step's full bytes as [`NarrowBytes::full_bytes`] prepares them: the
/// unsigned operand of the byte products, and whose sign the activations
/// take (the same bytes where the path multiplies them as they are).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct FullBytes {
    unsigned: __m256i,
    sign: __m256i,
}

/// [`WideBytes`] for the AVX2 kernels: `V3`, or the AVX-VNNI token.
#[cfg(target_arch = "x86_64")]
trait NarrowBytes: Copy {
    fn v3(self) -> Simd;
    fn vectorize<R>(self, f: impl FnOnce() -> R) -> R;
    /// `acc` plus `Σ a·b + Σ c·d` per four bytes; each pair of products of
    /// `a·b` plus that of `c·d` must fit 16 bits (as [`WideBytes::quads2`]).
    fn add_quads2(self, acc: __m256i, a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m256i;
    /// Whether this path forms byte products in pairs added in 16 bits
    /// (`maddubs`), which [`add_pairs16`](Self::add_pairs16) may then add
    /// over several steps before [`widen_pairs`](Self::widen_pairs); VNNI
    /// adds its products in 32 bits at once, so it has nothing to save.
    const PAIRS_IN_16_BITS: bool;
    /// `acc` plus `a·b + c·d` per pair of bytes, in 16 bits: the caller
    /// bounds the total (`maddubs` saturates, it does not wrap).
    #[inline(always)]
    fn add_pairs16(self, acc: __m256i, a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m256i {
        let simd = self.v3();
        let pairs = simd.avx2._mm256_add_epi16(
            simd.avx2._mm256_maddubs_epi16(a, b),
            simd.avx2._mm256_maddubs_epi16(c, d),
        );
        simd.avx2._mm256_add_epi16(acc, pairs)
    }
    /// `acc` plus the 16-bit pairs of `pairs` added in fours, in 32 bits.
    #[inline(always)]
    fn widen_pairs(self, acc: __m256i, pairs: __m256i) -> __m256i {
        let simd = self.v3();
        simd.avx2._mm256_add_epi32(
            acc,
            simd.avx2
                ._mm256_madd_epi16(pairs, simd.avx._mm256_set1_epi16(1)),
        )
    }
    /// Full unsigned bytes (Q8_0's weights held as `w + 128`) as this
    /// path multiplies them, once per step for every activation row.
    fn full_bytes(self, held: __m256i) -> FullBytes;
    /// `acc` plus a sum over full bytes `a` and `c` times signed `b` and
    /// `d`, four bytes a lane: `Σ a·b + Σ c·d` itself, or that less
    /// `128·(Σ b + Σ d)`, as the path finds cheaper;
    /// [`NarrowBytes::full_byte_sums`] turns a block's total into `Σ a·b`
    /// given the block's activation sum.
    fn add_byte_quads2(
        self,
        acc: __m256i,
        a: FullBytes,
        b: __m256i,
        c: FullBytes,
        d: __m256i,
    ) -> __m256i;
    /// A block's total of [`NarrowBytes::add_byte_quads2`] as `Σ a·b`,
    /// given `y_sum`, the sum of the block's activation bytes.
    fn full_byte_sums(self, total: __m256i, y_sum: i32) -> __m256i;
}

#[cfg(target_arch = "x86_64")]
impl NarrowBytes for Simd {
    const PAIRS_IN_16_BITS: bool = true;
    #[inline(always)]
    fn v3(self) -> Simd {
        self
    }
    #[inline(always)]
    fn vectorize<R>(self, f: impl FnOnce() -> R) -> R {
        pulp::x86::V3::vectorize(self, f)
    }
    #[inline(always)]
    fn add_quads2(self, acc: __m256i, a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m256i {
        let pairs = self.avx2._mm256_add_epi16(
            self.avx2._mm256_maddubs_epi16(a, b),
            self.avx2._mm256_maddubs_epi16(c, d),
        );
        self.avx2._mm256_add_epi32(
            acc,
            self.avx2
                ._mm256_madd_epi16(pairs, self.avx._mm256_set1_epi16(1)),
        )
    }
    /// `maddubs` would saturate on `(w + 128)·y` (two products of up to
    /// 255 × 127 in 16 bits), so this path takes `Σ w·y` by llama.cpp's
    /// sign trick: `|w|` times `y` with `w`'s sign, at most 128 × 127
    /// twice. `full_byte_sums` adds the `128·Σ y` back once per block, so
    /// the integers are the same as on the other paths.
    #[inline(always)]
    fn full_bytes(self, held: __m256i) -> FullBytes {
        let w = self
            .avx2
            ._mm256_xor_si256(held, self.avx._mm256_set1_epi8(i8::MIN));
        FullBytes {
            unsigned: self.avx2._mm256_abs_epi8(w),
            sign: w,
        }
    }
    #[inline(always)]
    fn add_byte_quads2(
        self,
        acc: __m256i,
        a: FullBytes,
        b: __m256i,
        c: FullBytes,
        d: __m256i,
    ) -> __m256i {
        let signed_quads = |w: FullBytes, y: __m256i| {
            let pairs = self
                .avx2
                ._mm256_maddubs_epi16(w.unsigned, self.avx2._mm256_sign_epi8(y, w.sign));
            self.avx2
                ._mm256_madd_epi16(pairs, self.avx._mm256_set1_epi16(1))
        };
        self.avx2._mm256_add_epi32(
            acc,
            self.avx2
                ._mm256_add_epi32(signed_quads(a, b), signed_quads(c, d)),
        )
    }
    #[inline(always)]
    fn full_byte_sums(self, total: __m256i, y_sum: i32) -> __m256i {
        self.avx2
            ._mm256_add_epi32(total, self.avx._mm256_set1_epi32(128 * y_sum))
    }
}

#[cfg(target_arch = "x86_64")]
impl NarrowBytes for SimdVnni {
    const PAIRS_IN_16_BITS: bool = false;
    #[inline(always)]
    fn v3(self) -> Simd {
        unsafe_simd::VnniAvx::v3(self)
    }
    #[inline(always)]
    fn vectorize<R>(self, f: impl FnOnce() -> R) -> R {
        unsafe_simd::VnniAvx::vectorize(self, f)
    }
    #[inline(always)]
    fn add_quads2(self, acc: __m256i, a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m256i {
        self.dot_u8_i8(self.dot_u8_i8(acc, a, b), c, d)
    }
    #[inline(always)]
    fn full_bytes(self, held: __m256i) -> FullBytes {
        FullBytes {
            unsigned: held,
            sign: held,
        }
    }
    #[inline(always)]
    fn add_byte_quads2(
        self,
        acc: __m256i,
        a: FullBytes,
        b: __m256i,
        c: FullBytes,
        d: __m256i,
    ) -> __m256i {
        self.add_quads2(acc, a.unsigned, b, c.unsigned, d)
    }
    #[inline(always)]
    fn full_byte_sums(self, total: __m256i, _y_sum: i32) -> __m256i {
        total
    }
}

/// Why a buffer cannot be used as quantized weights or activations.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error("{format:?} rows of {cols} values are not whole blocks of {block}")]
    PartialBlock {
        format: GgmlDType,
        cols: usize,
        block: usize,
    },
    #[error("{rows} x {cols} {format:?} weights take {expected} bytes, got {actual}")]
    Size {
        format: GgmlDType,
        rows: usize,
        cols: usize,
        expected: usize,
        actual: usize,
    },
    #[error("activations of {actual} values are not rows of {cols}")]
    Activations { cols: usize, actual: usize },
}

/// Checks that `bytes` hold `rows x cols` weights of `format` in GGUF's
/// layout: whole blocks per row, and nothing more or less.
fn check_layout(
    format: GgmlDType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<(), KernelError> {
    check_blocks(format, cols)?;
    let expected = rows * cols / format.block_size() * format.type_size();
    if bytes.len() != expected {
        return Err(KernelError::Size {
            format,
            rows,
            cols,
            expected,
            actual: bytes.len(),
        });
    }
    Ok(())
}

/// Checks that rows of `cols` values are whole blocks of `format`.
fn check_blocks(format: GgmlDType, cols: usize) -> Result<(), KernelError> {
    let block = format.block_size();
    if !cols.is_multiple_of(block) {
        return Err(KernelError::PartialBlock {
            format,
            cols,
            block,
        });
    }
    Ok(())
}

/// A format's dot products of one weight group (`LANES` rows: sixteen in
/// every format here) with activation rows.
trait GroupKernel<const LANES: usize>: Sync {
    /// With the `N` activation rows from `first` on.
    fn dot<const N: usize>(&self, weights: &[u8], first: usize) -> [[f32; LANES]; N];

    /// The instruction sets it runs on.
    fn isa(&self) -> Isa;

    /// Activation rows that share one pass over a weight group in
    /// prefill, so that each weight block is loaded and unpacked once for
    /// all of them: as many as the registers hold with the accumulators
    /// (2 with AVX2's 16 registers, 4 with AVX-512's 32).
    fn rows_per_step(&self) -> usize {
        if self.isa().wide.is_some() {
            4
        } else {
            2
        }
    }

    /// Runs one worker's share of the groups: inside the thread's AMX
    /// tile configuration where the kernel uses tiles, so that it is
    /// loaded once per share rather than once per group.
    fn on_worker(&self, work: impl FnOnce()) {
        work()
    }

    /// Products with the first activation rows all at once, where the
    /// kernel has a path that lays a group's weights out once for many
    /// rows (AMX tiles); returns how many rows it did (0: none).
    fn dot_runs(&self, _weights: &[u8], _store: &impl Fn(usize, &[f32; LANES])) -> usize {
        0
    }
}

/// Runs `kernel` on `N` activation rows from `first` on and stores the
/// products in `store`.
#[inline(always)]
fn dot_rows<const LANES: usize, const N: usize>(
    kernel: &impl GroupKernel<LANES>,
    weights: &[u8],
    first: usize,
    store: &impl Fn(usize, &[f32; LANES]),
) {
    for (offset, sums) in kernel.dot::<N>(weights, first).iter().enumerate() {
        store(first + offset, sums);
    }
}

/// Runs `kernel` over every `LANES`-row group of a `rows`-row matrix
/// (`group_bytes` each in `groups`) and each of `m` activation rows;
/// returns `m x rows` values, row-major. Groups are split over candle's
/// thread pool in strips of a few groups.
fn for_each_group<const LANES: usize>(
    groups: &[u8],
    group_bytes: usize,
    rows: usize,
    m: usize,
    kernel: &impl GroupKernel<LANES>,
) -> Vec<f32> {
    let mut out = vec![0f32; m * rows];
    if out.is_empty() {
        return out;
    }
    // Each strip's piece of every output row, for the one task that takes
    // the strip: the workers write disjoint slices without `unsafe`, a
    // group's row at a time (one 64-byte copy). Per-value atomic stores,
    // as before, cost a quarter of a 256-row prefill product: sixteen
    // stores per cache line, each line missed, left the store buffer full.
    // Strips of several groups when rows are many keep the pieces few.
    let groups_per_strip = if m >= 16 { STRIP_GROUPS } else { 1 };
    let strip_cols = groups_per_strip * LANES;
    let strip_count = rows.div_ceil(strip_cols);
    let mut pieces: Vec<Option<&mut [f32]>> = (0..strip_count * m).map(|_| None).collect();
    for (i, row) in out.chunks_mut(rows).enumerate() {
        for (strip, piece) in row.chunks_mut(strip_cols).enumerate() {
            pieces[strip * m + i] = Some(piece);
        }
    }
    let strips: Vec<Mutex<&mut [Option<&mut [f32]>]>> =
        pieces.chunks_mut(m).map(Mutex::new).collect();
    let group_count = rows.div_ceil(LANES);
    candle_core::utils::barrier_pool().execute_chunked(strip_count, |range| {
        kernel.on_worker(|| {
            for strip in range {
                // Only this task takes this strip: the lock is never
                // contended, nor poisoned but by a panic in this task.
                let mut pieces = strips[strip]
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let first = strip * groups_per_strip;
                let strip_groups = first..group_count.min(first + groups_per_strip);
                for_groups(
                    strip_groups,
                    groups,
                    group_bytes,
                    rows,
                    m,
                    kernel,
                    &mut pieces,
                );
            }
        });
    });
    drop(strips);
    out
}

/// Groups per strip of the output (see [`for_each_group`]) when activation
/// rows are many.
const STRIP_GROUPS: usize = 4;

/// One task's share of [`for_each_group`]: the groups in `range`, one
/// strip, whose piece of output row `i` is `pieces[i]`.
fn for_groups<const LANES: usize>(
    range: std::ops::Range<usize>,
    groups: &[u8],
    group_bytes: usize,
    rows: usize,
    m: usize,
    kernel: &impl GroupKernel<LANES>,
    pieces: &mut [Option<&mut [f32]>],
) {
    let strip_first = range.start * LANES;
    let pieces = std::cell::RefCell::new(pieces);
    for group in range {
        let weights = &groups[group * group_bytes..(group + 1) * group_bytes];
        let first = group * LANES;
        let lanes = LANES.min(rows - first);
        let at = first - strip_first;
        let store = |i: usize, sums: &[f32; LANES]| {
            if let Some(Some(piece)) = pieces.borrow_mut().get_mut(i) {
                if let Some(out) = piece.get_mut(at..at + lanes) {
                    out.copy_from_slice(&sums[..lanes]);
                }
            }
        };
        let mut i = kernel.dot_runs(weights, &store);
        if kernel.rows_per_step() >= 16 {
            while i + 16 <= m {
                dot_rows::<LANES, 16>(kernel, weights, i, &store);
                i += 16;
            }
        }
        if kernel.rows_per_step() >= 8 {
            while i + 8 <= m {
                dot_rows::<LANES, 8>(kernel, weights, i, &store);
                i += 8;
            }
        }
        if kernel.rows_per_step() >= 4 {
            while i + 4 <= m {
                dot_rows::<LANES, 4>(kernel, weights, i, &store);
                i += 4;
            }
        }
        while i + 2 <= m {
            dot_rows::<LANES, 2>(kernel, weights, i, &store);
            i += 2;
        }
        if i < m {
            dot_rows::<LANES, 1>(kernel, weights, i, &store);
        }
    }
}

/// The largest F32 below one half: `trunc(x + 0.49999997·sign(x))` is `x`
/// rounded half away from zero for every `|x| < 2²³` (at `x = k + ½` the
/// sum rounds up to `k + 1`; just below, it stays below).
#[cfg(target_arch = "x86_64")]
const BELOW_HALF: f32 = 0.499_999_97;

/// Rounds `chunk` (whole blocks of 32 values) to signed bytes on a
/// symmetric grid: scale = max |v| / 127, half away from zero, as
/// llama.cpp; returns the scale, and writes each 32 values' sum of rounded
/// values to `sums` (one per block: the minimums' terms need them).
///
/// Eight values per instruction: the activations of every product are
/// quantized on the model's thread before the product is spread over the
/// pool, and the scalar loop (a call to `roundf` per value) was a tenth of
/// that thread's time in batched decode (SmolLM2, eight rows).
#[cfg(target_arch = "x86_64")]
fn quantize_block(simd: Simd, chunk: &[f32], out: &mut [i8], sums: &mut [i32]) -> f32 {
    simd.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::{__m256, __m256i};
            let load = |eight: &[f32]| -> __m256 {
                bytemuck::pod_read_unaligned(bytemuck::cast_slice(eight))
            };
            let magnitude = simd.avx._mm256_set1_ps(f32::from_bits(0x7FFF_FFFF));
            let mut amax = simd.avx._mm256_setzero_ps();
            for eight in chunk.chunks_exact(8) {
                amax = simd
                    .avx
                    ._mm256_max_ps(amax, simd.avx._mm256_and_ps(load(eight), magnitude));
            }
            let lanes: [f32; 8] = bytemuck::cast(amax);
            let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
            let scale = amax / 127.0;
            let inverse = simd
                .avx
                ._mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let sign = simd.avx._mm256_set1_ps(-0.0);
            let below_half = simd.avx._mm256_set1_ps(BELOW_HALF);
            // The two `packs` work within 128-bit halves, so the packed
            // bytes hold the 32 values' groups of four in the order
            // 0, 2, 4, 6, 1, 3, 5, 7; this permutation of 32-bit lanes puts
            // them back in order.
            let order: __m256i = bytemuck::cast([0i32, 4, 1, 5, 2, 6, 3, 7]);
            for ((block, out), sum) in chunk
                .chunks_exact(32)
                .zip(out.chunks_exact_mut(32))
                .zip(sums.iter_mut())
            {
                let words: [__m256i; 4] = std::array::from_fn(|k| {
                    let x = simd
                        .avx
                        ._mm256_mul_ps(load(&block[8 * k..8 * k + 8]), inverse);
                    let half = simd
                        .avx
                        ._mm256_or_ps(simd.avx._mm256_and_ps(x, sign), below_half);
                    simd.avx
                        ._mm256_cvttps_epi32(simd.avx._mm256_add_ps(x, half))
                });
                let total = simd.avx2._mm256_add_epi32(
                    simd.avx2._mm256_add_epi32(words[0], words[1]),
                    simd.avx2._mm256_add_epi32(words[2], words[3]),
                );
                *sum = bytemuck::cast::<_, [i32; 8]>(total).iter().sum();
                let bytes = simd.avx2._mm256_packs_epi16(
                    simd.avx2._mm256_packs_epi32(words[0], words[1]),
                    simd.avx2._mm256_packs_epi32(words[2], words[3]),
                );
                let bytes: [i8; 32] =
                    bytemuck::cast(simd.avx2._mm256_permutevar8x32_epi32(bytes, order));
                out.copy_from_slice(&bytes);
            }
            scale
        },
    )
}

/// No kernels off x86-64: never called.
#[cfg(not(target_arch = "x86_64"))]
fn quantize_block(simd: Simd, _chunk: &[f32], _out: &mut [i8], _sums: &mut [i32]) -> f32 {
    match simd {}
}

/// Checks activations `x` against rows of `cols` values; the row count.
fn activation_rows(x: &[f32], cols: usize) -> Result<usize, KernelError> {
    if cols == 0 || !x.len().is_multiple_of(cols) {
        return Err(KernelError::Activations {
            cols,
            actual: x.len(),
        });
    }
    Ok(x.len() / cols)
}

/// Weights in one of the formats these kernels cover.
#[derive(Debug, Clone)]
pub enum GroupedWeights {
    Q8_0(Q8_0Matrix),
    Q4_1(Q4_1Matrix),
    Q5_0(Q5_0Matrix),
    Q4K(Q4KMatrix),
}

/// The formats with kernels here (AVX2 and AVX-512 alike).
fn has_kernel(format: GgmlDType) -> bool {
    matches!(
        format,
        GgmlDType::Q8_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q4K
    )
}

/// Whether weights of `format` get Cascade's kernel on this CPU.
pub fn covers(format: GgmlDType) -> bool {
    has_kernel(format) && detect_simd().is_some()
}

impl GroupedWeights {
    /// `bytes`: `rows x cols` weights of `format` in GGUF's layout. `None`
    /// for other formats, or when this CPU lacks AVX2/FMA.
    pub fn new(
        format: GgmlDType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self>, KernelError> {
        Ok(match format {
            GgmlDType::Q8_0 => Q8_0Matrix::new(bytes, rows, cols)?.map(Self::Q8_0),
            GgmlDType::Q4_1 => Q4_1Matrix::new(bytes, rows, cols)?.map(Self::Q4_1),
            GgmlDType::Q5_0 => Q5_0Matrix::new(bytes, rows, cols)?.map(Self::Q5_0),
            GgmlDType::Q4K => Q4KMatrix::new(bytes, rows, cols)?.map(Self::Q4K),
            _ => None,
        })
    }

    pub fn rows(&self) -> usize {
        match self {
            Self::Q8_0(m) => m.rows(),
            Self::Q4_1(m) => m.rows(),
            Self::Q5_0(m) => m.rows(),
            Self::Q4K(m) => m.rows(),
        }
    }

    /// `x Wᵀ` for `x` of `m` rows of `cols` values: `m x rows` values.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>, KernelError> {
        match self {
            Self::Q8_0(m) => m.matmul(x),
            Self::Q4_1(m) => m.matmul(x),
            Self::Q5_0(m) => m.matmul(x),
            Self::Q4K(m) => m.matmul(x),
        }
    }

    fn isa_mut(&mut self) -> &mut Isa {
        match self {
            Self::Q8_0(m) => &mut m.isa,
            Self::Q4_1(m) => &mut m.isa,
            Self::Q5_0(m) => &mut m.isa,
            Self::Q4K(m) => &mut m.isa,
        }
    }

    /// The same weights on the AVX2 kernels only, even where the CPU has
    /// AVX-512: for tests and benchmarks that compare the two.
    pub fn without_avx512(mut self) -> Self {
        let isa = self.isa_mut();
        isa.wide = None;
        isa.wide_vnni = None;
        self
    }

    /// The same weights with the AVX2 kernels reading each group's held
    /// values on every pass, never unpacked once for many activation rows:
    /// for tests and benchmarks that compare.
    pub fn without_unpacking(mut self) -> Self {
        self.isa_mut().unpack = false;
        self
    }

    /// The same weights without AMX: for tests and benchmarks that compare.
    pub fn without_amx(mut self) -> Self {
        let isa = self.isa_mut();
        isa.amx = None;
        isa.gaining_amx = None;
        self
    }

    /// The same weights on AMX where the CPU and kernel allow it, whether
    /// or not `CASCADE_AMX` is set: for tests and benchmarks.
    pub fn with_available_amx(mut self) -> Self {
        let isa = self.isa_mut();
        isa.amx = available_amx();
        isa.gaining_amx = isa.amx;
        self
    }

    /// Whether products over 16 activation rows or more run on AMX tiles.
    pub fn uses_amx(&self) -> bool {
        match self {
            Self::Q8_0(m) => m.isa.amx.is_some() && m.isa.wide.is_some(),
            Self::Q4_1(m) => m.isa.amx.is_some() && m.isa.wide.is_some(),
            Self::Q5_0(m) => m.isa.amx.is_some() && m.isa.wide.is_some(),
            Self::Q4K(m) => m.isa.gaining_amx.is_some() && m.isa.wide.is_some(),
        }
    }

    /// The same weights without VNNI's byte products, even where the CPU
    /// has them: for tests and benchmarks that compare the two.
    pub fn without_vnni(mut self) -> Self {
        let isa = self.isa_mut();
        isa.simd_vnni = None;
        isa.wide_vnni = None;
        self
    }

    fn isa(&self) -> &Isa {
        match self {
            Self::Q8_0(m) => &m.isa,
            Self::Q4_1(m) => &m.isa,
            Self::Q5_0(m) => &m.isa,
            Self::Q4K(m) => &m.isa,
        }
    }

    /// Whether products run on the AVX-512 kernels.
    pub fn uses_avx512(&self) -> bool {
        self.isa().wide.is_some()
    }

    /// The instructions the products run on.
    pub fn path(&self) -> KernelPath {
        self.isa().path()
    }
}

#[cfg(test)]
mod tests;
