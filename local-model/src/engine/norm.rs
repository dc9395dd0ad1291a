//! The row norms over the last dimension, eight values per instruction:
//! layer norm (the phi2 layout's) and RMS norm (the llama family's and
//! Gemma 3's).
//!
//! candle 0.11's CPU norms sum each row in one chain of scalar adds, each
//! waiting on the one before, and its layer norm hands the rows to rayon's
//! pool, a second pool beside the one the matrix products run on. In
//! Phi-1.5's decode steps on AMD Zen 4 its layer norm took 6 µs a layer at
//! one row and 58 µs at eight (1.4 ms of a step of eight sequences); at
//! eight SmolLM2 sequences its RMS norm was 0.8% of all samples, on the
//! model thread while the pool's thread waited. Here each row is summed in
//! eight lanes and normalised on AVX2/FMA (`pulp`'s safe intrinsics), on the
//! calling thread. Other CPUs, and tensors that are not contiguous F32 on
//! the CPU, keep candle's.
//!
//! Each row's result depends on that row alone, so a sequence's values are
//! the same whichever rows run beside it in a batch.

use candle_core::{DType, Result, Tensor, D};

/// A layer norm's scale and shift, with their values at hand for the
/// vector path.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    weight_values: Vec<f32>,
    bias_values: Vec<f32>,
}

/// A weight tensor's values as F32.
fn values_of(weight: &Tensor) -> Result<Vec<f32>> {
    weight.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

impl LayerNorm {
    /// `weight` and `bias`: one value per dimension of the rows it normalises.
    pub(crate) fn new(weight: Tensor, bias: Tensor) -> Result<Self> {
        let (weight_values, bias_values) = (values_of(&weight)?, values_of(&bias)?);
        if weight_values.len() != bias_values.len() {
            candle_core::bail!(
                "layer norm: {} weights and {} biases",
                weight_values.len(),
                bias_values.len()
            )
        }
        Ok(Self {
            weight,
            bias,
            weight_values,
            bias_values,
        })
    }

    /// The device its weights are on.
    pub(crate) fn device(&self) -> &candle_core::Device {
        self.weight.device()
    }

    /// `(x - mean) / √(variance + eps) · weight + bias` over each row of `x`'s
    /// last dimension.
    pub(crate) fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        let eps = eps as f32;
        #[cfg(target_arch = "x86_64")]
        if let Some(out) = each_row(x, self.weight_values.len(), |simd, row| {
            layer_norm_row(simd, row, &self.weight_values, &self.bias_values, eps)
        })? {
            return Ok(out);
        }
        candle_nn::ops::layer_norm(x, &self.weight, &self.bias, eps)
    }
}

/// An RMS norm's scale, with its values at hand for the vector path.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    weight_values: Vec<f32>,
}

impl RmsNorm {
    /// `weight`: one value per dimension of the rows it normalises.
    pub(crate) fn new(weight: Tensor) -> Result<Self> {
        let weight_values = values_of(&weight)?;
        Ok(Self {
            weight,
            weight_values,
        })
    }

    /// The device its weights are on.
    pub(crate) fn device(&self) -> &candle_core::Device {
        self.weight.device()
    }

    /// `x / √(mean(x²) + eps) · weight` over each row of `x`'s last dimension.
    pub(crate) fn forward(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        #[cfg(target_arch = "x86_64")]
        if let Some(out) = each_row(x, self.weight_values.len(), |simd, row| {
            rms_norm_row(simd, row, &self.weight_values, eps)
        })? {
            return Ok(out);
        }
        candle_nn::ops::rms_norm(x, &self.weight, eps)
    }

    /// The same norm of each `weight`-long piece of `values`, in place (a
    /// decode step's query or key heads): the same arithmetic per row as
    /// [`RmsNorm::forward`] gives them in prefill.
    pub(crate) fn normalize_each(&self, values: &mut [f32], eps: f32) {
        let width = self.weight_values.len().max(1);
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            for row in values.chunks_exact_mut(width) {
                rms_norm_row(simd, row, &self.weight_values, eps);
            }
            return;
        }
        for row in values.chunks_exact_mut(width) {
            let mean = row.iter().map(|a| a * a).sum::<f32>() / row.len() as f32;
            let inverse = 1.0 / (mean + eps).sqrt();
            for (a, w) in row.iter_mut().zip(&self.weight_values) {
                *a *= inverse * w;
            }
        }
    }
}

/// `norm` applied to each `width`-long row of a copy of `x`, where the CPU
/// has AVX2/FMA and `x` is F32 on the CPU with rows of `width`; `None`
/// elsewhere.
#[cfg(target_arch = "x86_64")]
fn each_row(
    x: &Tensor,
    width: usize,
    norm: impl Fn(pulp::x86::V3, &mut [f32]),
) -> Result<Option<Tensor>> {
    let (Some(simd), DType::F32, true, true) = (
        pulp::x86::V3::try_new(),
        x.dtype(),
        x.device().is_cpu(),
        width > 0 && x.dim(D::Minus1)? == width,
    ) else {
        return Ok(None);
    };
    let mut values = x.flatten_all()?.to_vec1::<f32>()?;
    for row in values.chunks_exact_mut(width) {
        norm(simd, row);
    }
    Tensor::from_vec(values, x.shape(), x.device()).map(Some)
}

/// `(Σ v, Σ v²)` of `row`, in eight lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn sums(simd: pulp::x86::V3, row: &[f32]) -> (f32, f32) {
    use pulp::bytemuck;
    use std::arch::x86_64::__m256;
    let (lanes, tail) = pulp::as_arrays::<8, f32>(row);
    let (mut sum, mut squares) = (simd.avx._mm256_setzero_ps(), simd.avx._mm256_setzero_ps());
    for lane in lanes {
        let v: __m256 = bytemuck::cast(*lane);
        sum = simd.avx._mm256_add_ps(sum, v);
        squares = simd.fma._mm256_fmadd_ps(v, v, squares);
    }
    let sum: [f32; 8] = bytemuck::cast(sum);
    let squares: [f32; 8] = bytemuck::cast(squares);
    (
        sum.iter().sum::<f32>() + tail.iter().sum::<f32>(),
        squares.iter().sum::<f32>() + tail.iter().map(|v| v * v).sum::<f32>(),
    )
}

/// One row of an RMS norm, in place, on AVX2/FMA.
#[cfg(target_arch = "x86_64")]
fn rms_norm_row(simd: pulp::x86::V3, row: &mut [f32], weight: &[f32], eps: f32) {
    simd.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::__m256;
            let (_, squares) = sums(simd, row);
            let inverse = (squares / row.len() as f32 + eps).sqrt().recip();
            let inverse8 = simd.avx._mm256_set1_ps(inverse);
            let (lanes, tail) = pulp::as_arrays_mut::<8, f32>(row);
            let (weights, weight_tail) = pulp::as_arrays::<8, f32>(weight);
            for (lane, w) in lanes.iter_mut().zip(weights) {
                let v: __m256 = bytemuck::cast(*lane);
                let out = simd
                    .avx
                    ._mm256_mul_ps(simd.avx._mm256_mul_ps(v, inverse8), bytemuck::cast(*w));
                *lane = bytemuck::cast(out);
            }
            for (v, w) in tail.iter_mut().zip(weight_tail) {
                *v = *v * inverse * w;
            }
        },
    )
}

/// One row of a layer norm, in place, on AVX2/FMA.
#[cfg(target_arch = "x86_64")]
fn layer_norm_row(simd: pulp::x86::V3, row: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    simd.vectorize(
        #[inline(always)]
        || {
            use pulp::bytemuck;
            use std::arch::x86_64::__m256;
            let n = row.len() as f32;
            let (sum, squares) = sums(simd, row);
            // As candle computes them: E[x²] − E[x]².
            let mean = sum / n;
            let variance = squares / n - mean * mean;
            let inverse = (variance + eps).sqrt().recip();
            let (lanes, tail) = pulp::as_arrays_mut::<8, f32>(row);
            let (weights, weight_tail) = pulp::as_arrays::<8, f32>(weight);
            let (biases, bias_tail) = pulp::as_arrays::<8, f32>(bias);
            let (mean8, inverse8) = (
                simd.avx._mm256_set1_ps(mean),
                simd.avx._mm256_set1_ps(inverse),
            );
            for ((lane, w), b) in lanes.iter_mut().zip(weights).zip(biases) {
                let v: __m256 = bytemuck::cast(*lane);
                let centred = simd
                    .avx
                    ._mm256_mul_ps(simd.avx._mm256_sub_ps(v, mean8), inverse8);
                let out = simd
                    .fma
                    ._mm256_fmadd_ps(centred, bytemuck::cast(*w), bytemuck::cast(*b));
                *lane = bytemuck::cast(out);
            }
            for ((v, w), b) in tail.iter_mut().zip(weight_tail).zip(bias_tail) {
                *v = (*v - mean) * inverse * w + b;
            }
        },
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::Device;

    fn random(n: usize, seed: u64, offset: f32) -> Vec<f32> {
        crate::engine::test_values(n, seed)
            .into_iter()
            .map(|v| v * 4.0 - 2.0 + offset)
            .collect()
    }

    /// Against the same formula in F64, for widths with and without a tail
    /// of fewer than eight, rows centred away from zero too; and each row's
    /// values the same whether it is normalised alone or among others.
    #[test]
    fn matches_exact_layer_norm_and_rows_are_independent() {
        let eps = 1e-5f32;
        for width in [8usize, 2048, 13, 1] {
            let rows = 5;
            let x = random(rows * width, 1, 0.5);
            let weight = random(width, 2, 0.0);
            let bias = random(width, 3, 0.0);
            let norm = LayerNorm::new(
                Tensor::new(weight.as_slice(), &Device::Cpu).unwrap(),
                Tensor::new(bias.as_slice(), &Device::Cpu).unwrap(),
            )
            .unwrap();
            let input = Tensor::from_vec(x.clone(), (1, rows, width), &Device::Cpu).unwrap();
            let all: Vec<f32> = norm
                .forward(&input, f64::from(eps))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (r, row) in x.chunks_exact(width).enumerate() {
                let n = width as f64;
                let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                let variance = row
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / n;
                let inverse = 1.0 / (variance + f64::from(eps)).sqrt();
                let alone = Tensor::from_vec(row.to_vec(), (1, 1, width), &Device::Cpu).unwrap();
                let alone: Vec<f32> = norm
                    .forward(&alone, f64::from(eps))
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for d in 0..width {
                    let want = (f64::from(row[d]) - mean) * inverse * f64::from(weight[d])
                        + f64::from(bias[d]);
                    let got = all[r * width + d];
                    assert!(
                        (f64::from(got) - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "width {width}, row {r}, dim {d}: {got} vs {want}"
                    );
                    assert_eq!(got.to_bits(), alone[d].to_bits(), "width {width}, row {r}");
                }
            }
        }
    }

    /// RMS norm against F64, widths with and without a tail, each row the
    /// same alone as among others, and in place as through `forward`.
    #[test]
    fn rms_norm_matches_exact_and_rows_are_independent() {
        let eps = 1e-6f32;
        for width in [576usize, 640, 13, 1] {
            let rows = 4;
            let x = random(rows * width, 4, 0.25);
            let weight = random(width, 5, 1.0);
            let norm = RmsNorm::new(Tensor::new(weight.as_slice(), &Device::Cpu).unwrap()).unwrap();
            let run = |values: Vec<f32>, rows: usize| -> Vec<f32> {
                let input = Tensor::from_vec(values, (1, rows, width), &Device::Cpu).unwrap();
                norm.forward(&input, eps)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let all = run(x.clone(), rows);
            // The decode step's in-place form gives the same bits.
            let mut in_place = x.clone();
            norm.normalize_each(&mut in_place, eps);
            assert_eq!(
                in_place.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                all.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "width {width}: in place against forward"
            );
            for (r, row) in x.chunks_exact(width).enumerate() {
                let mean_square =
                    row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / width as f64;
                let inverse = 1.0 / (mean_square + f64::from(eps)).sqrt();
                let alone = run(row.to_vec(), 1);
                for d in 0..width {
                    let want = f64::from(row[d]) * inverse * f64::from(weight[d]);
                    let got = all[r * width + d];
                    assert!(
                        (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "width {width}, row {r}, dim {d}: {got} vs {want}"
                    );
                    assert_eq!(got.to_bits(), alone[d].to_bits(), "width {width}, row {r}");
                }
            }
        }
    }
}
