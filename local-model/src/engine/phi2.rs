//! Phi-1.5 and Phi-2 from a GGUF file (llama.cpp's `phi2` layout).
//!
//! What sets the architecture apart from llama: layer norms with a bias,
//! a bias on every projection, attention and MLP reading the same
//! normalised input and added to the residual together ("parallel"
//! blocks), a plain GELU MLP (no gate), and rotary embeddings on only the
//! first `rope.dimension_count` dimensions of each head, in the
//! half-split ("NeoX") arrangement. Query, key and value may come fused
//! (`attn_qkv`, older converters) or apart (`attn_q`/`attn_k`/`attn_v`);
//! both are read into one stacked projection.

use std::io::{Read, Seek};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor, D};

use super::attention::{self, Rotary};
use super::gelu::gelu;
use super::kv_cache::{self, rope_one, LayerCache, SeqCache};
use super::linear::{dense_and_tuned_sizes, stack_rows, with_simd_kernel, Linear};
use super::llama::rope_tables;
use super::norm::LayerNorm;
use super::token_table::{output_projection, TokenTable};
use super::{
    check_step, check_steps, hidden_features, middle_layer, CausalLm, DecodeStep, Outputs, Pass,
    PrefillWeights,
};

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, Copy)]
struct Shape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Leading dimensions of each head that get rotary embeddings.
    rope_dim: usize,
    norm_eps: f64,
}

#[derive(Debug, Clone)]
struct Block {
    norm: LayerNorm,
    /// Query, key and value projections stacked: `[q | k | v]` rows.
    qkv: Linear,
    attn_out: Linear,
    up: Linear,
    down: Linear,
}

/// A `phi2`-architecture model with the KV cache of its serial sequence
/// (batched sequences bring their own, see [`Phi2::decode_rows`]).
#[derive(Debug, Clone)]
pub(crate) struct Phi2 {
    cache: SeqCache,
    /// What the KV caches hold keys and values in ([`kv_cache::held_dtype`]).
    kv_held: DType,
    embeddings: TokenTable,
    blocks: Vec<Block>,
    norm: LayerNorm,
    output: Linear,
    output_bias: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
    shape: Shape,
    dense_bytes: usize,
}

/// The weights of one block as read from the file, before assembly.
struct RawBlock {
    qkv: Vec<QTensor>,
    qkv_bias: Vec<Tensor>,
    attn_out: (QTensor, Tensor),
    up: (QTensor, Tensor),
    down: (QTensor, Tensor),
    norm: LayerNorm,
}

impl Phi2 {
    pub(crate) fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        max_positions: usize,
        prefill: PrefillWeights,
        exact: bool,
        device: &Device,
    ) -> Result<Self> {
        let meta = |key: &str| match content.metadata.get(&format!("phi2.{key}")) {
            Some(v) => Ok(v),
            None => candle_core::bail!("GGUF metadata has no phi2.{key}"),
        };
        let heads = meta("attention.head_count")?.to_u32()? as usize;
        let kv_heads = meta("attention.head_count_kv")
            .and_then(|v| v.to_u32())
            .map_or(heads, |v| v as usize);
        let blocks = meta("block_count")?.to_u32()? as usize;
        let width = meta("embedding_length")?.to_u32()? as usize;
        let rope_dim = meta("rope.dimension_count")?.to_u32()? as usize;
        let norm_eps = f64::from(meta("attention.layer_norm_epsilon")?.to_f32()?);
        let rope_base = meta("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10_000.0);
        if heads == 0
            || kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
            || !width.is_multiple_of(heads)
        {
            candle_core::bail!(
                "inconsistent head counts: {heads} heads, {kv_heads} kv heads, width {width}"
            )
        }
        let head_dim = width / heads;
        if rope_dim == 0 || rope_dim > head_dim || !rope_dim.is_multiple_of(2) {
            candle_core::bail!("rotary dimension {rope_dim} does not fit heads of {head_dim}")
        }

        let convert = |t: QTensor| {
            if exact {
                Ok(t)
            } else {
                with_simd_kernel(t, device)
            }
        };
        let dense = |t: QTensor| t.dequantize(device);
        let kv_held = kv_cache::held_for_file(content, exact);
        let embeddings = TokenTable::load(content, reader, exact, device)?;
        let mut tensor = |name: &str| content.tensor(reader, name, device);
        let norm = LayerNorm::new(
            dense(tensor("output_norm.weight")?)?,
            dense(tensor("output_norm.bias")?)?,
        )?;
        let output_bias = match tensor("output.bias") {
            Ok(t) => Some(dense(t)?),
            Err(_) => None,
        };

        let mut raw = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let mut get = |part: &str| tensor(&format!("blk.{i}.{part}"));
            let fused = get("attn_qkv.weight");
            let (qkv, qkv_bias) = match fused {
                Ok(w) => (vec![convert(w)?], vec![dense(get("attn_qkv.bias")?)?]),
                Err(_) => {
                    let mut weights = Vec::with_capacity(3);
                    let mut biases = Vec::with_capacity(3);
                    for part in ["attn_q", "attn_k", "attn_v"] {
                        weights.push(convert(get(&format!("{part}.weight"))?)?);
                        biases.push(dense(get(&format!("{part}.bias"))?)?);
                    }
                    (weights, biases)
                }
            };
            let mut pair = |part: &str| -> Result<(QTensor, Tensor)> {
                Ok((
                    convert(get(&format!("{part}.weight"))?)?,
                    dense(get(&format!("{part}.bias"))?)?,
                ))
            };
            let attn_out = pair("attn_output")?;
            let up = pair("ffn_up")?;
            let down = pair("ffn_down")?;
            raw.push(RawBlock {
                qkv,
                qkv_bias,
                attn_out,
                up,
                down,
                norm: LayerNorm::new(
                    dense(get("attn_norm.weight")?)?,
                    dense(get("attn_norm.bias")?)?,
                )?,
            });
        }
        let output = output_projection(content, reader, &embeddings, exact, device)?;

        let (dense_total, tuned_total) = dense_and_tuned_sizes(
            raw.iter()
                .flat_map(|b| b.qkv.iter().chain([&b.attn_out.0, &b.up.0, &b.down.0])),
        );
        let keep_dense = prefill.keeps_copy(dense_total, tuned_total);
        let linear = |t: QTensor, bias: Tensor| -> Result<Linear> {
            let layer = if exact {
                Linear::exact(t, device)?
            } else {
                Linear::new(t, keep_dense, device)?
            };
            Ok(layer.with_bias(bias))
        };

        let mut built = Vec::with_capacity(blocks);
        let mut dense_bytes = 0;
        for b in raw {
            let qkv_weights = stack_projections(b.qkv, device)?;
            let qkv_bias = Tensor::cat(&b.qkv_bias, 0)?;
            let (q_rows, _) = qkv_weights.shape().dims2()?;
            if q_rows != (heads + 2 * kv_heads) * head_dim || qkv_bias.dim(0)? != q_rows {
                candle_core::bail!(
                    "query/key/value projection has {q_rows} rows, expected {}",
                    (heads + 2 * kv_heads) * head_dim
                )
            }
            let block = Block {
                norm: b.norm,
                qkv: linear(qkv_weights, qkv_bias)?,
                attn_out: linear(b.attn_out.0, b.attn_out.1)?,
                up: linear(b.up.0, b.up.1)?,
                down: linear(b.down.0, b.down.1)?,
            };
            dense_bytes += block.qkv.dense_bytes()
                + block.attn_out.dense_bytes()
                + block.up.dense_bytes()
                + block.down.dense_bytes();
            built.push(block);
        }

        let (cos, sin) = rope_tables(rope_dim, rope_base, max_positions, device)?;
        Ok(Self {
            cache: SeqCache::new(built.len(), kv_held),
            kv_held,
            embeddings,
            blocks: built,
            norm,
            output,
            output_bias,
            cos,
            sin,
            shape: Shape {
                heads,
                kv_heads,
                head_dim,
                rope_dim,
                norm_eps,
            },
            dense_bytes: if exact { 0 } else { dense_bytes },
        })
    }
}

impl CausalLm for Phi2 {
    fn own_cache(&mut self) -> &mut SeqCache {
        &mut self.cache
    }

    fn layers(&self) -> usize {
        self.blocks.len()
    }

    fn kv_width(&self) -> usize {
        self.shape.kv_heads * self.shape.head_dim
    }

    fn kv_held(&self) -> DType {
        self.kv_held
    }

    fn dense_bytes(&self) -> usize {
        self.dense_bytes
    }

    fn prompt_in(
        &self,
        cache: &mut SeqCache,
        tokens: &[u32],
        position: usize,
        pass: Pass,
    ) -> Result<Outputs> {
        let n = tokens.len();
        cache.check(self.blocks.len())?;
        check_step(n, position, cache.len(), self.cos.dim(0)?)?;
        let device = self.norm.device().clone();
        let mut x = self.embeddings.lookup(tokens, &device)?.unsqueeze(0)?;
        let rotary = Rotary::at(&self.cos, &self.sin, position, n)?;
        let shape = self.shape;
        let middle = middle_layer(self.blocks.len());
        let mut at_middle = x.clone();
        for (l, (block, layer)) in self.blocks.iter().zip(&mut cache.layers).enumerate() {
            let h = block.norm.forward(&x, shape.norm_eps)?;
            let attended = block.attention(layer, &h, &rotary, shape, pass)?;
            let mlp = block.mlp(&h, pass)?;
            x = ((x + attended)? + mlp)?;
            if l + 1 == middle {
                at_middle = x.clone();
            }
        }
        let last = x.narrow(1, n - 1, 1)?;
        let last = self.norm.forward(&last, shape.norm_eps)?;
        let logits = self.output.forward(&last, Pass::Decode)?.flatten_all()?;
        let logits = match &self.output_bias {
            Some(bias) => (logits + bias)?,
            None => logits,
        };
        Ok(Outputs {
            logits,
            hidden: hidden_features(&last, &at_middle.narrow(1, n - 1, 1)?)?,
        })
    }

    fn decode_rows(&self, steps: &mut [DecodeStep<'_>], pass: Pass) -> Result<Outputs> {
        check_steps(steps, self.blocks.len(), self.cos.dim(0)?)?;
        let rotary = steps
            .iter()
            .map(|s| Rotary::row_at(&self.cos, &self.sin, s.position))
            .collect::<Result<Vec<_>>>()?;
        let device = self.norm.device().clone();
        let tokens: Vec<u32> = steps.iter().map(|s| s.token).collect();
        let mut x = self.embeddings.lookup(&tokens, &device)?.unsqueeze(0)?;
        let shape = self.shape;
        let (head_dim, rope_dim) = (shape.head_dim, shape.rope_dim);
        let middle = middle_layer(self.blocks.len());
        let mut at_middle = x.clone();
        for (l, block) in self.blocks.iter().enumerate() {
            let h = block.norm.forward(&x, shape.norm_eps)?;
            let qkv = block.qkv.forward(&h, pass)?;
            let caches = steps.iter_mut().map(|s| &mut s.cache.layers[l]);
            let mixed = attention::decode_rows(
                &qkv,
                caches,
                shape.heads,
                shape.kv_heads,
                None,
                |i, q, k| {
                    let (cos, sin) = &rotary[i];
                    rope_one(q, head_dim, rope_dim, cos, sin, false);
                    rope_one(k, head_dim, rope_dim, cos, sin, false);
                },
            )?;
            let attended = block.attn_out.forward(&mixed, pass)?;
            let mlp = block.mlp(&h, pass)?;
            x = ((x + attended)? + mlp)?;
            if l + 1 == middle {
                at_middle = x.clone();
            }
        }
        let x = self.norm.forward(&x, shape.norm_eps)?;
        let logits = self.output.forward(&x, Pass::Decode)?.squeeze(0)?;
        let logits = match &self.output_bias {
            Some(bias) => logits.broadcast_add(bias)?,
            None => logits,
        };
        Ok(Outputs {
            logits,
            hidden: hidden_features(&x, &at_middle)?,
        })
    }
}

impl Block {
    /// The MLP of `h` (`[1, n, width]`, normalised).
    fn mlp(&self, h: &Tensor, pass: Pass) -> Result<Tensor> {
        self.down.forward(&gelu(&self.up.forward(h, pass)?)?, pass)
    }

    /// Self-attention of `x` (`[1, n, width]`, normalised, `n > 1`) over
    /// the cache and itself, causal.
    fn attention(
        &self,
        cache: &mut LayerCache,
        x: &Tensor,
        rotary: &Rotary,
        shape: Shape,
        pass: Pass,
    ) -> Result<Tensor> {
        let Shape {
            heads,
            kv_heads,
            head_dim,
            rope_dim,
            ..
        } = shape;
        let qkv = self.qkv.forward(x, pass)?;
        let (cos, sin) = (&rotary.cos, &rotary.sin);
        let (q, k, v) = attention::split_heads(&qkv, heads, kv_heads, head_dim)?;
        let q = partial_rope(&q, cos, sin, rope_dim)?;
        let k = partial_rope(&k, cos, sin, rope_dim)?;
        let mixed = attention::prefill_rows(&q, &k, &v, cache, kv_heads, None)?;
        self.attn_out.forward(&mixed, pass)
    }
}

/// Half-split rotary embeddings on the first `rope_dim` dimensions of each
/// head of `x` (`[1, heads, n, head_dim]`); the rest pass through.
fn partial_rope(x: &Tensor, cos: &Tensor, sin: &Tensor, rope_dim: usize) -> Result<Tensor> {
    let head_dim = x.dim(D::Minus1)?;
    let rotated =
        candle_nn::rotary_emb::rope(&x.narrow(D::Minus1, 0, rope_dim)?.contiguous()?, cos, sin)?;
    if rope_dim == head_dim {
        return Ok(rotated);
    }
    let rest = x.narrow(D::Minus1, rope_dim, head_dim - rope_dim)?;
    Tensor::cat(&[rotated, rest], D::Minus1)?.contiguous()
}

/// One projection from the query, key and value weights: as they are when
/// fused or stacked in one format, else re-quantized to Q8_0 together.
fn stack_projections(parts: Vec<QTensor>, device: &Device) -> Result<QTensor> {
    let same_format = parts.windows(2).all(|w| w[0].dtype() == w[1].dtype());
    match parts.len() {
        1 => parts
            .into_iter()
            .next()
            .ok_or_else(|| candle_core::Error::Msg("no projection weights".into())),
        _ if same_format => stack_rows(&parts, device),
        _ => {
            let dense = parts
                .iter()
                .map(|t| t.dequantize(device))
                .collect::<Result<Vec<_>>>()?;
            QTensor::quantize(&Tensor::cat(&dense, 0)?, GgmlDType::Q8_0)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn partial_rope_rotates_only_the_leading_dimensions() {
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 1, 8))
            .unwrap();
        let (cos, sin) = rope_tables(4, 10_000.0, 4, &Device::Cpu).unwrap();
        // Position 0 is the identity; position 3 rotates the first four only.
        let at0 = partial_rope(
            &x,
            &cos.narrow(0, 0, 1).unwrap(),
            &sin.narrow(0, 0, 1).unwrap(),
            4,
        )
        .unwrap();
        assert_eq!(
            at0.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let at3 = partial_rope(
            &x,
            &cos.narrow(0, 3, 1).unwrap(),
            &sin.narrow(0, 3, 1).unwrap(),
            4,
        )
        .unwrap();
        let got: Vec<f32> = at3.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&got[4..8], &want[4..8]);
        assert_eq!(&got[12..16], &want[12..16]);
        assert_ne!(&got[0..4], &want[0..4]);
        // Half-split pairs: dimension 0 with 2 at angle 3·θ₀ = 3 radians.
        let (c, s) = (3f32.cos(), 3f32.sin());
        assert!((got[0] - (want[0] * c - want[2] * s)).abs() < 1e-5);
        assert!((got[2] - (want[2] * c + want[0] * s)).abs() < 1e-5);
    }
}
