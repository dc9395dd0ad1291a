//! `e^x` on eight F32 lanes with AVX2/FMA, through `pulp`'s safe
//! intrinsics: for GELU and for the softmax sums of the confidence signals,
//! where the C library's `exp` per value was the cost.

/// `e^t` per lane (Cephes' `expf`): `t = k·ln 2 + r` with `|r| <= ln 2 / 2`,
/// a degree-6 polynomial for `e^r`, and `2^k` built in the exponent bits.
/// `t` is clamped to where `2^k` is a normal number, [-87, 88]: beyond it
/// GELU is `x` or 0 to the last bit anyway, and a probability below e^-87
/// adds nothing to a softmax's sums.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn exp(simd: pulp::x86::V3, t: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    let splat = |v: f32| simd.avx._mm256_set1_ps(v);
    let t = simd
        .avx
        ._mm256_min_ps(simd.avx._mm256_max_ps(t, splat(-87.0)), splat(88.0));
    let k = simd
        .avx
        ._mm256_round_ps::<0x08>(simd.avx._mm256_mul_ps(t, splat(std::f32::consts::LOG2_E)));
    // ln 2 in two parts, so that k·ln 2 is exact to float precision.
    let r = simd.fma._mm256_fnmadd_ps(k, splat(0.693_359_4), t);
    let r = simd.fma._mm256_fnmadd_ps(k, splat(-2.121_944_4e-4), r);
    let mut p = splat(1.987_569_1e-4);
    for coefficient in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = simd.fma._mm256_fmadd_ps(p, r, splat(coefficient));
    }
    let r2 = simd.avx._mm256_mul_ps(r, r);
    let p = simd
        .fma
        ._mm256_fmadd_ps(p, r2, simd.avx._mm256_add_ps(r, splat(1.0)));
    let exponent = simd
        .avx2
        ._mm256_slli_epi32::<23>(simd.avx2._mm256_add_epi32(
            simd.avx._mm256_cvtps_epi32(k),
            simd.avx._mm256_set1_epi32(127),
        ));
    simd.avx
        ._mm256_mul_ps(p, simd.avx._mm256_castsi256_ps(exponent))
}
