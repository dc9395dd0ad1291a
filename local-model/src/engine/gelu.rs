//! GELU (the tanh approximation Phi-1.5 and Gemma 3 were trained with),
//! eight values per instruction.
//!
//! candle 0.11's CPU `gelu` calls the C library's `tanhf` (and through it
//! `expm1f`) once per value: 12% of Phi-1.5's prefill samples under perf,
//! more than any other operation outside the matrix products. Here
//! `0.5·x·(1 + tanh(u))` is written as the identical `x·sigmoid(2u)`, with
//! `exp` from `simd_exp` (Cephes' `expf`, within 2 ulp), on AVX2/FMA through `pulp`'s safe intrinsics.
//! Other CPUs and tensors that are not contiguous F32 keep candle's.

use candle_core::{Result, Tensor};

#[cfg(target_arch = "x86_64")]
use super::simd_exp::exp;

/// √(2/π), as in the tanh approximation.
const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
/// The cubic term's weight in the tanh approximation.
const CUBIC: f32 = 0.044_715;
/// Values per task on candle's thread pool (the one the products run on,
/// its thread spinning between them): 8,192 take about 6 µs on AMD Zen 4.
/// One Phi-1.5 decode row (8,192 values) stays on the calling thread; eight
/// rows, 1.2 ms per step on one thread, use both. (Scoped threads spawned
/// per call, as before, paid off only from 65,536 values per thread.)
const VALUES_PER_TASK: usize = 1 << 13;

/// GELU of every value of `x` (tanh approximation).
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    if let (Some(simd), candle_core::DType::F32, true) =
        (pulp::x86::V3::try_new(), x.dtype(), x.device().is_cpu())
    {
        let mut values = x.flatten_all()?.to_vec1::<f32>()?;
        if values.len() <= VALUES_PER_TASK {
            gelu_in_place(simd, &mut values);
        } else {
            // Each task takes its own chunk; the locks are never contended.
            let chunks: Vec<std::sync::Mutex<&mut [f32]>> = values
                .chunks_mut(VALUES_PER_TASK)
                .map(std::sync::Mutex::new)
                .collect();
            candle_core::utils::barrier_pool().execute_chunked(chunks.len(), |range| {
                for chunk in &chunks[range] {
                    let mut chunk = chunk
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    gelu_in_place(simd, &mut chunk);
                }
            });
        }
        return Tensor::from_vec(values, x.shape(), x.device());
    }
    x.gelu()
}

/// One value, for the tail of a slice (and the tests' reference).
#[cfg(any(target_arch = "x86_64", test))]
fn gelu_one(x: f32) -> f32 {
    let u = SQRT_TWO_OVER_PI * (x + CUBIC * x * x * x);
    x / (1.0 + (-2.0 * u).exp())
}

#[cfg(target_arch = "x86_64")]
fn gelu_in_place(simd: pulp::x86::V3, values: &mut [f32]) {
    simd.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::__m256;
            let (lanes, tail) = pulp::as_arrays_mut::<8, f32>(values);
            let splat = |v: f32| simd.avx._mm256_set1_ps(v);
            let (c, cubic, minus_two, one) = (
                splat(SQRT_TWO_OVER_PI),
                splat(CUBIC),
                splat(-2.0),
                splat(1.0),
            );
            for lane in lanes {
                let x: __m256 = bytemuck::cast(*lane);
                let x2 = simd.avx._mm256_mul_ps(x, x);
                // u = c·(x + 0.044715·x³) = c·x·(1 + 0.044715·x²)
                let u = simd.avx._mm256_mul_ps(
                    simd.avx._mm256_mul_ps(c, x),
                    simd.fma._mm256_fmadd_ps(cubic, x2, one),
                );
                let e = exp(simd, simd.avx._mm256_mul_ps(minus_two, u));
                let y = simd.avx._mm256_div_ps(x, simd.avx._mm256_add_ps(one, e));
                *lane = bytemuck::cast(y);
            }
            for v in tail {
                *v = gelu_one(*v);
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
    fn matches_candles_gelu_across_the_range() {
        // Dense near zero, where GELU bends, out to where it saturates;
        // 1003 values: whole lanes and a tail.
        let values: Vec<f32> = (0..1003)
            .map(|i| {
                let t = (i as f32 - 501.0) / 50.0;
                t * t.abs()
            })
            .collect();
        let x = Tensor::from_vec(values.clone(), (17, 59), &Device::Cpu).unwrap();
        let ours = gelu(&x).unwrap();
        assert_eq!(ours.dims(), &[17, 59]);
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let candle = x
            .gelu()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for ((v, a), b) in values.iter().zip(&ours).zip(&candle) {
            let tolerance = 1e-6 + 4e-7 * b.abs();
            assert!(
                (a - b).abs() <= tolerance,
                "gelu({v}): {a} against candle's {b}"
            );
            assert!((gelu_one(*v) - b).abs() <= tolerance, "scalar gelu({v})");
        }
        // Saturation: x for large x, (next to) 0 for large negative x, no
        // NaN.
        assert_eq!(ours[1002], values[1002]);
        assert!(ours[0].abs() < 1e-30, "gelu({}) = {}", values[0], ours[0]);
        assert!(ours.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn large_inputs_are_split_over_threads_and_keep_their_order() {
        let n = 3 * VALUES_PER_TASK + 5;
        let values: Vec<f32> = (0..n).map(|i| (i % 97) as f32 / 10.0 - 4.8).collect();
        let x = Tensor::from_vec(values.clone(), n, &Device::Cpu).unwrap();
        let ours = gelu(&x).unwrap().to_vec1::<f32>().unwrap();
        for (v, a) in values.iter().zip(&ours) {
            assert!(
                (a - gelu_one(*v)).abs() <= 1e-6 + 4e-7 * a.abs(),
                "gelu({v})"
            );
        }
    }

    #[test]
    fn other_dtypes_take_candles_path() {
        let x = Tensor::new(&[-1.0f64, 0.5, 3.0], &Device::Cpu).unwrap();
        let ours = gelu(&x).unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(ours, x.gelu().unwrap().to_vec1::<f64>().unwrap());
    }
}
