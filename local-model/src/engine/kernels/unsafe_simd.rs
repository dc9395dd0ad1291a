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
//! How the wrappers stay sound, the way `pulp`'s `V3`/`V4` do it:
//! - a token ([`Vnni512`], [`VnniAvx`]) has a private field and one
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
use std::arch::x86_64::{__m256i, __m512i};

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
