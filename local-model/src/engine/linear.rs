//! A linear layer over quantized weights, with an optional dense copy for
//! prefill.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, QuantizedType};
use candle_core::{DType, Device, Module, Result, Tensor, D};

use super::kernels::{self, GroupedWeights};
use super::Pass;

/// Brings weights into a format with a SIMD kernel, Cascade's own
/// (`kernels`: Q8_0, Q4_1, Q5_0, Q4_K on AVX2) or candle's.
///
/// candle 0.11 has hand-written AVX2 dot products for Q4_0, Q8_0 and the
/// K-quants, but runs Q4_1, Q5_0 and Q5_1 through a generic scalar loop.
/// Those become Q8_0, except Q4_1 and Q5_0, which Cascade's kernels run as they are.
/// Q8_0 holds every value of those formats to within half a step of an
/// 8-bit grid per 32 values, far finer than their own 4- or 5-bit grid, so
/// the conversion costs no measurable accuracy (the log-prob test in
/// `tests/engine.rs` holds it to 0.05 nats), but 34 bytes per 32 values
/// against Q5_0's 22 and Q4_1's 20.
///
/// Where Cascade's kernels run (AVX2 or AVX-512), Q6_K becomes Q8_0 too:
/// candle's Q6_K product was 10% of Gemma 3 270M's prefill samples for 4%
/// of its weight bytes (nine of its down projections) on both, and Q8_0
/// reads 34 bytes per 32 values against Q6_K's 26.25.
pub(crate) fn with_simd_kernel(weights: QTensor, device: &Device) -> Result<QTensor> {
    let row = weights.shape().dims().last().copied().unwrap_or(0);
    if !lacks_simd_kernel(weights.dtype(), row) {
        return Ok(weights);
    }
    let dense = weights.dequantize(device)?;
    QTensor::quantize(&dense, GgmlDType::Q8_0)
}

/// Whether weights of this format and row length get converted by
/// [`with_simd_kernel`].
pub(crate) fn lacks_simd_kernel(dtype: GgmlDType, row: usize) -> bool {
    let converts = match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => !grouped_kernels_cover(dtype),
        GgmlDType::Q6K => kernels::covers(GgmlDType::Q8_0),
        _ => false,
    };
    converts && row.is_multiple_of(GgmlDType::Q8_0.block_size())
}

/// The dense size of `weights` and the part of it whose products run on
/// Cascade's own kernels here (AVX2 or AVX-512).
pub(crate) fn dense_and_tuned_sizes<'a>(
    weights: impl Iterator<Item = &'a QTensor>,
) -> (usize, usize) {
    weights.fold((0, 0), |(dense, tuned), w| {
        let size = dense_size(w);
        let on_tuned = if grouped_kernels_cover(w.dtype()) {
            size
        } else {
            0
        };
        (dense + size, tuned + on_tuned)
    })
}

/// Whether Cascade's kernels run weights of `dtype` here.
pub(crate) fn grouped_kernels_cover(dtype: GgmlDType) -> bool {
    kernels::covers(dtype)
}

/// Stacks weight matrices with the same input width and format into one,
/// so that projections of the same input run as one matrix product.
pub(crate) fn stack_rows(parts: &[QTensor], device: &Device) -> Result<QTensor> {
    let Some(first) = parts.first() else {
        candle_core::bail!("stack_rows: no weights")
    };
    let dtype = first.dtype();
    let (_, cols) = first.shape().dims2()?;
    let mut rows = 0;
    let mut bytes = Vec::new();
    for part in parts {
        let (r, c) = part.shape().dims2()?;
        if c != cols || part.dtype() != dtype {
            candle_core::bail!(
                "stack_rows: {:?} {:?} does not match {:?} {:?}",
                part.dtype(),
                part.shape(),
                dtype,
                first.shape()
            )
        }
        rows += r;
        bytes.extend_from_slice(&part.data()?);
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), device, dtype)?;
    QTensor::new(storage, (rows, cols))
}

/// Block-quantized weights multiplied through candle's plain CPU kernel
/// (`k_quants::matmul`: activations quantized once, four rows per dot
/// product, spread over candle's thread pool), called directly.
///
/// Through `QMatMul`, candle 0.11 sends Q4_K weights whose widths are
/// multiples of 256 on x86 to a repacked layout that it builds at first use
/// and keeps beside the original: twice the file's size in memory (1.8 GB
/// resident for a 0.8 GB Phi-1.5). On AVX2 that layout decodes slower
/// (Phi-1.5: 12–13 against 16–19 tok/s here) and prefills about twice as
/// fast; memory and decode win (docs/benchmarks.md). Other formats take the
/// plain kernel through `QMatMul` too; the direct call skips the tensor
/// machinery around each product.
#[derive(Clone)]
pub(crate) struct BlockWeights {
    blocks: Arc<Box<dyn QuantizedType>>,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for BlockWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockWeights")
            .field("dtype", &self.blocks.dtype())
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl BlockWeights {
    /// `None` for float formats (F32, F16, BF16), which `QMatMul` runs as
    /// dense products.
    fn new(weights: &QTensor, device: &Device) -> Result<Option<Self>> {
        if matches!(
            weights.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        ) || !device.is_cpu()
        {
            return Ok(None);
        }
        let (rows, cols) = weights.shape().dims2()?;
        match QStorage::from_data(weights.data()?, device, weights.dtype())? {
            QStorage::Cpu(blocks) => Ok(Some(Self {
                blocks: Arc::new(blocks),
                rows,
                cols,
            })),
            _ => Ok(None),
        }
    }

    /// `x`: `[.., cols]`; returns `[.., rows]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let width = x.dim(D::Minus1)?;
        if width != self.cols {
            candle_core::bail!(
                "input width {width} does not match weights of width {}",
                self.cols
            )
        }
        let lhs = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let m = lhs.len() / width.max(1);
        let mut out = vec![0f32; m * self.rows];
        self.blocks
            .matmul_t((m, self.cols, self.rows), &lhs, &mut out)?;
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.rows;
        }
        Tensor::from_vec(out, shape, x.device())
    }
}

/// Weights regrouped for Cascade's own kernels (`kernels`), when this CPU
/// runs them (AVX2/FMA); `None` for other formats and devices.
pub(crate) fn grouped(weights: &QTensor, device: &Device) -> Result<Option<GroupedWeights>> {
    if !device.is_cpu() || !grouped_kernels_cover(weights.dtype()) {
        return Ok(None);
    }
    let (rows, cols) = weights.shape().dims2()?;
    GroupedWeights::new(weights.dtype(), &weights.data()?, rows, cols)
        .map_err(candle_core::Error::wrap)
}

/// `x Wᵀ` through Cascade's kernels; `x`: `[.., cols]`, returns
/// `[.., rows]`.
fn grouped_forward(weights: &GroupedWeights, x: &Tensor) -> Result<Tensor> {
    let lhs = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let out = weights.matmul(&lhs).map_err(candle_core::Error::wrap)?;
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = weights.rows();
    }
    Tensor::from_vec(out, shape, x.device())
}

/// The product kernel for a layer's weights.
#[derive(Debug, Clone)]
enum Product {
    /// Cascade's kernels (Q8_0, Q4_K on CPUs with AVX2/FMA); Q8_0 may be
    /// shared with a tied embedding table.
    Grouped(Arc<GroupedWeights>),
    Blocks(BlockWeights),
    /// Float formats, and every format off the CPU.
    Candle(QMatMul),
}

/// `y = x Wᵀ` with `W` quantized, and optionally also held dense.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    quantized: Product,
    /// `[out, in]` in F32, used for every prefill product (and, in exact
    /// mode, every product).
    dense: Option<Tensor>,
    /// `[out]`, added to every product (Phi-2's linears carry biases).
    bias: Option<Tensor>,
    exact: bool,
}

impl Linear {
    pub(crate) fn new(weights: QTensor, keep_dense: bool, device: &Device) -> Result<Self> {
        let dense = if keep_dense {
            Some(weights.dequantize(device)?.to_dtype(DType::F32)?)
        } else {
            None
        };
        let quantized = if let Some(grouped) = grouped(&weights, device)? {
            Product::Grouped(Arc::new(grouped))
        } else if let Some(blocks) = BlockWeights::new(&weights, device)? {
            Product::Blocks(blocks)
        } else {
            Product::Candle(QMatMul::from_qtensor(weights)?)
        };
        Ok(Self {
            quantized,
            dense,
            bias: None,
            exact: false,
        })
    }

    /// A layer over weights shared with another user (a tied embedding
    /// table), multiplied through candle's `QMatMul` without a copy.
    pub(crate) fn from_matmul(matmul: QMatMul) -> Self {
        Self {
            quantized: Product::Candle(matmul),
            dense: None,
            bias: None,
            exact: false,
        }
    }

    /// A layer over Q8_0 weights shared with a tied embedding table.
    pub(crate) fn from_grouped(weights: Arc<GroupedWeights>) -> Self {
        Self {
            quantized: Product::Grouped(weights),
            dense: None,
            bias: None,
            exact: false,
        }
    }

    /// The same layer with `bias` (`[out]`) added to every product.
    pub(crate) fn with_bias(mut self, bias: Tensor) -> Self {
        self.bias = Some(bias);
        self
    }

    /// Every product in F32 on the dequantised weights: exact arithmetic on
    /// the file's values, for accuracy tests (slow, 4 bytes per weight).
    pub(crate) fn exact(weights: QTensor, device: &Device) -> Result<Self> {
        let mut linear = Self::new(weights, true, device)?;
        linear.exact = true;
        Ok(linear)
    }

    /// Bytes held by the dense copy.
    pub(crate) fn dense_bytes(&self) -> usize {
        self.dense
            .as_ref()
            .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
    }

    /// `x`: `[.., in]`; returns `[.., out]`.
    ///
    /// The path depends on the pass, never on the number of rows: a prompt
    /// suffix run after a reused prefix then takes the same path as in a
    /// full prefill, and the same request always gets the same log-probs.
    pub(crate) fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let product = self.product(x, pass)?;
        match &self.bias {
            Some(bias) => product.broadcast_add(bias),
            None => Ok(product),
        }
    }

    fn product(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let width = x.dim(D::Minus1)?;
        let rows = x.elem_count() / width.max(1);
        match &self.dense {
            Some(w) if pass == Pass::Prefill || self.exact => {
                let mut out_shape = x.dims().to_vec();
                let (out, _) = w.dims2()?;
                if let Some(last) = out_shape.last_mut() {
                    *last = out;
                }
                x.reshape((rows, width))?
                    .matmul(&w.t()?)?
                    .reshape(out_shape)
            }
            _ => match &self.quantized {
                Product::Grouped(weights) => grouped_forward(weights, x),
                Product::Blocks(blocks) => blocks.forward(x),
                Product::Candle(matmul) => matmul.forward(x),
            },
        }
    }
}

/// Bytes a dense F32 copy of these weights would take.
pub(crate) fn dense_size(weights: &QTensor) -> usize {
    weights.shape().elem_count() * DType::F32.size_in_bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        let values: Vec<f32> = crate::engine::test_values(rows * cols, seed)
            .into_iter()
            .map(|v| v - 0.5)
            .collect();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn slow_formats_become_q8_0_without_losing_their_values() {
        let dense = random(16, 64, 1);
        let q5_1 = QTensor::quantize(&dense, GgmlDType::Q5_1).unwrap();
        let before = q5_1.dequantize(&Device::Cpu).unwrap();
        let converted = with_simd_kernel(q5_1, &Device::Cpu).unwrap();
        assert_eq!(converted.dtype(), GgmlDType::Q8_0);
        let after = converted.dequantize(&Device::Cpu).unwrap();
        // Half a step of an 8-bit grid over values within ±0.5.
        assert!(max_abs_diff(&before, &after) < 0.5 / 127.0 + 1e-6);
        // Formats with a kernel are left alone: Q8_0 everywhere, Q4_1 and
        // Q5_0 where Cascade's kernels run.
        let q8 = QTensor::quantize(&dense, GgmlDType::Q8_0).unwrap();
        assert_eq!(
            with_simd_kernel(q8, &Device::Cpu).unwrap().dtype(),
            GgmlDType::Q8_0
        );
        let q4_1 = QTensor::quantize(&dense, GgmlDType::Q4_1).unwrap();
        let kept = if grouped_kernels_cover(GgmlDType::Q4_1) {
            GgmlDType::Q4_1
        } else {
            GgmlDType::Q8_0
        };
        assert_eq!(with_simd_kernel(q4_1, &Device::Cpu).unwrap().dtype(), kept);
        let q5_0 = QTensor::quantize(&dense, GgmlDType::Q5_0).unwrap();
        let kept = if grouped_kernels_cover(GgmlDType::Q5_0) {
            GgmlDType::Q5_0
        } else {
            GgmlDType::Q8_0
        };
        assert_eq!(with_simd_kernel(q5_0, &Device::Cpu).unwrap().dtype(), kept);
        // Q6_K: to Q8_0 where Cascade's kernels run, within half a step of
        // the 8-bit grid.
        let dense = random(4, 256, 2);
        let q6_k = QTensor::quantize(&dense, GgmlDType::Q6K).unwrap();
        let before = q6_k.dequantize(&Device::Cpu).unwrap();
        let converted = with_simd_kernel(q6_k, &Device::Cpu).unwrap();
        if kernels::covers(GgmlDType::Q8_0) {
            assert_eq!(converted.dtype(), GgmlDType::Q8_0);
        } else {
            assert_eq!(converted.dtype(), GgmlDType::Q6K);
        }
        let after = converted.dequantize(&Device::Cpu).unwrap();
        assert!(max_abs_diff(&before, &after) < 0.5 / 127.0 + 1e-6);
    }

    #[test]
    fn stacked_weights_give_the_separate_products_side_by_side() {
        let q8 = |rows, seed| QTensor::quantize(&random(rows, 64, seed), GgmlDType::Q8_0).unwrap();
        let (a, b) = (q8(8, 2), q8(4, 3));
        let x = random(3, 64, 4);
        let separate = |w| {
            Linear::new(w, false, &Device::Cpu)
                .unwrap()
                .forward(&x, Pass::Decode)
                .unwrap()
        };
        let (separate_a, separate_b) = (separate(q8(8, 2)), separate(q8(4, 3)));
        let stacked = Linear::new(
            stack_rows(&[a, b], &Device::Cpu).unwrap(),
            false,
            &Device::Cpu,
        )
        .unwrap()
        .forward(&x, Pass::Decode)
        .unwrap();
        assert_eq!(stacked.dims(), [3, 12]);
        assert!(max_abs_diff(&stacked.narrow(1, 0, 8).unwrap(), &separate_a) < 1e-5);
        assert!(max_abs_diff(&stacked.narrow(1, 8, 4).unwrap(), &separate_b) < 1e-5);
        // Mismatched widths are an error, not garbage.
        let c = QTensor::quantize(&random(4, 32, 5), GgmlDType::Q8_0).unwrap();
        let d = QTensor::quantize(&random(4, 64, 6), GgmlDType::Q8_0).unwrap();
        assert!(stack_rows(&[c, d], &Device::Cpu).is_err());
    }

    #[test]
    fn dense_and_quantized_paths_agree() {
        let w = || QTensor::quantize(&random(32, 64, 7), GgmlDType::Q8_0).unwrap();
        let with_copy = Linear::new(w(), true, &Device::Cpu).unwrap();
        let without = Linear::new(w(), false, &Device::Cpu).unwrap();
        assert_eq!(with_copy.dense_bytes(), 32 * 64 * 4);
        let x = random(16, 64, 8).unsqueeze(0).unwrap();
        let dense = with_copy.forward(&x, Pass::Prefill).unwrap();
        let quantized = without.forward(&x, Pass::Prefill).unwrap();
        assert_eq!(dense.dims(), [1, 16, 32]);
        // Decoding uses the quantized weights even where a copy exists.
        let decoded = with_copy.forward(&x, Pass::Decode).unwrap();
        assert_eq!(max_abs_diff(&decoded, &quantized), 0.0);
        // The quantized path rounds activations to 8 bits; the dense one does not.
        assert!(max_abs_diff(&dense, &quantized) < 0.05);
    }
}
