//! The gate of a SwiGLU feed-forward (llama family): `silu(gate) · up`
//! from the stacked `[gate | up]` projection, eight values per instruction.
//!
//! Through candle it took a `narrow` per half, a `silu` calling the C
//! library's `expf` per value and a multiply, each a pass and a tensor of
//! its own, on the model thread between two parallel products: 3% of
//! SmolLM2's batched decode. Here one pass reads both halves and writes the
//! result, with `exp` from `simd_exp` (Cephes' `expf`, within 2 ulp), on
//! AVX2/FMA through `pulp`'s safe intrinsics. Other CPUs and tensors that
//! are not F32 on the CPU keep candle's.

use candle_core::{Result, Tensor, D};

#[cfg(target_arch = "x86_64")]
use super::simd_exp::exp;

/// `silu(gate) · up` for `gate_up` (`[.., 2 · ffn]`, the gate's `ffn`
/// values then the up projection's); returns `[.., ffn]`.
pub(crate) fn silu_gate(gate_up: &Tensor, ffn: usize) -> Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    if let (Some(simd), candle_core::DType::F32, true) = (
        pulp::x86::V3::try_new(),
        gate_up.dtype(),
        gate_up.device().is_cpu(),
    ) {
        let values = gate_up.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; values.len() / 2];
        for (row, out) in values.chunks_exact(2 * ffn).zip(out.chunks_exact_mut(ffn)) {
            let (gate, up) = row.split_at(ffn);
            silu_gate_row(simd, gate, up, out);
        }
        let mut shape = gate_up.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = ffn;
        }
        return Tensor::from_vec(out, shape, gate_up.device());
    }
    let gate = gate_up.narrow(D::Minus1, 0, ffn)?;
    let up = gate_up.narrow(D::Minus1, ffn, ffn)?;
    candle_nn::ops::silu(&gate)? * up
}

/// One value, for the tail of a row (and the tests' reference).
#[cfg(any(target_arch = "x86_64", test))]
fn silu_gate_one(gate: f32, up: f32) -> f32 {
    gate / (1.0 + (-gate).exp()) * up
}

#[cfg(target_arch = "x86_64")]
fn silu_gate_row(simd: pulp::x86::V3, gate: &[f32], up: &[f32], out: &mut [f32]) {
    simd.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::__m256;
            let (gates, gate_tail) = pulp::as_arrays::<8, f32>(gate);
            let (ups, up_tail) = pulp::as_arrays::<8, f32>(up);
            let (outs, out_tail) = pulp::as_arrays_mut::<8, f32>(out);
            let one = simd.avx._mm256_set1_ps(1.0);
            let sign = simd.avx._mm256_set1_ps(-0.0);
            for ((g, u), o) in gates.iter().zip(ups).zip(outs) {
                let g: __m256 = bytemuck::cast(*g);
                let e = exp(simd, simd.avx._mm256_xor_ps(g, sign));
                let silu = simd.avx._mm256_div_ps(g, simd.avx._mm256_add_ps(one, e));
                *o = bytemuck::cast(simd.avx._mm256_mul_ps(silu, bytemuck::cast(*u)));
            }
            for ((g, u), o) in gate_tail.iter().zip(up_tail).zip(out_tail) {
                *o = silu_gate_one(*g, *u);
            }
        },
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_silu_times_up_across_the_range() {
        // Two rows of a 1003-wide feed-forward (whole lanes and a tail):
        // gates from -100 to 100, dense near zero; ups of both signs.
        let ffn = 1003;
        let mut values = Vec::new();
        for row in 0..2 {
            values.extend((0..ffn).map(|i| {
                let t = (i as f32 - 501.0) / 50.0 + row as f32 * 0.01;
                t * t.abs()
            }));
            values.extend((0..ffn).map(|i| (i % 13) as f32 / 4.0 - 1.5));
        }
        let x = Tensor::from_vec(values, (1, 2, 2 * ffn), &Device::Cpu).unwrap();
        let ours = silu_gate(&x, ffn).unwrap();
        assert_eq!(ours.dims(), &[1, 2, ffn]);
        let gate = x.narrow(D::Minus1, 0, ffn).unwrap();
        let up = x.narrow(D::Minus1, ffn, ffn).unwrap();
        let candle = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let candle = candle.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (a, b)) in ours.iter().zip(&candle).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 + 4e-7 * b.abs(),
                "value {i}: {a} against candle's {b}"
            );
        }
        assert!(ours.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn other_dtypes_take_candles_path() {
        let x = Tensor::new(&[[-1.0f64, 0.5, 3.0, 2.0]], &Device::Cpu).unwrap();
        let ours = silu_gate(&x, 2).unwrap().to_vec2::<f64>().unwrap();
        let gate = x.narrow(D::Minus1, 0, 2).unwrap();
        let up = x.narrow(D::Minus1, 2, 2).unwrap();
        let candle = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
        assert_eq!(ours, candle.to_vec2::<f64>().unwrap());
    }
}
