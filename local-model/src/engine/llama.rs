//! The llama architecture (SmolLM2, Llama, Mistral…) from a GGUF file.
//!
//! Same mathematics as candle's `quantized_llama`, arranged for speed on a
//! small CPU: query/key/value and gate/up projections are stacked into one
//! matrix each (one thread-pool round instead of three or two), the KV
//! cache is written in place, grouped-query attention reads each key/value
//! head once for its whole group of query heads instead of copying it per
//! head, and prefill can run on a dense copy of the weights.

use std::io::{Read, Seek};

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Result, Tensor};

use super::attention::{self, Rotary};
use super::kv_cache::{self, rope_one, LayerCache, SeqCache};
use super::linear::{dense_and_tuned_sizes, stack_rows, with_simd_kernel, Linear};
use super::norm::RmsNorm;
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
    ffn: usize,
    rms_eps: f32,
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    /// Query, key and value projections stacked: `[q | k | v]` rows.
    qkv: Linear,
    attn_out: Linear,
    ffn_norm: RmsNorm,
    /// Gate and up projections stacked: `[gate | up]` rows.
    gate_up: Linear,
    down: Linear,
}

/// A llama-architecture model with the KV cache of its serial sequence
/// (batched sequences bring their own, see [`Llama::decode_rows`]).
#[derive(Debug, Clone)]
pub(crate) struct Llama {
    cache: SeqCache,
    /// What the KV caches hold keys and values in ([`kv_cache::held_dtype`]).
    kv_held: DType,
    embeddings: TokenTable,
    blocks: Vec<Block>,
    norm: RmsNorm,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    shape: Shape,
    /// Bytes of the dense prefill copy (0 when prefill is quantized).
    dense_bytes: usize,
}

/// Whether this engine can run the file: the plain llama architecture
/// without mixture-of-experts layers.
pub(crate) fn supports(content: &gguf_file::Content) -> bool {
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str);
    let experts = content
        .metadata
        .get("llama.expert_count")
        .and_then(|v| v.to_u32().ok())
        .unwrap_or(0);
    arch == Some("llama") && experts <= 1
}

impl Llama {
    pub(crate) fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        max_positions: usize,
        prefill: PrefillWeights,
        exact: bool,
        device: &Device,
    ) -> Result<Self> {
        // Exact mode keeps the file's values and multiplies in F32.
        let convert = |t: QTensor| {
            if exact {
                Ok(t)
            } else {
                with_simd_kernel(t, device)
            }
        };
        let linear = |t: QTensor, keep_dense: bool| {
            if exact {
                Linear::exact(t, device)
            } else {
                Linear::new(t, keep_dense, device)
            }
        };
        let meta = |key: &str| match content.metadata.get(&format!("llama.{key}")) {
            Some(v) => Ok(v),
            None => candle_core::bail!("GGUF metadata has no llama.{key}"),
        };
        let heads = meta("attention.head_count")?.to_u32()? as usize;
        let kv_heads = meta("attention.head_count_kv")?.to_u32()? as usize;
        let blocks = meta("block_count")?.to_u32()? as usize;
        let width = meta("embedding_length")?.to_u32()? as usize;
        let rope_dim = meta("rope.dimension_count")?.to_u32()? as usize;
        let rms_eps = meta("attention.layer_norm_rms_epsilon")?.to_f32()?;
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
        if rope_dim != head_dim {
            candle_core::bail!("partial rotary embeddings ({rope_dim} of {head_dim}) are not supported by the tuned engine")
        }

        let kv_held = kv_cache::held_for_file(content, exact);
        let embeddings = TokenTable::load(content, reader, exact, device)?;
        let norm = RmsNorm::new(
            content
                .tensor(reader, "output_norm.weight", device)?
                .dequantize(device)?,
        )?;
        let output = output_projection(content, reader, &embeddings, exact, device)?;

        let mut raw = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let mut get = |part: &str| -> Result<QTensor> {
                convert(content.tensor(reader, &format!("blk.{i}.{part}.weight"), device)?)
            };
            raw.push([
                get("attn_q")?,
                get("attn_k")?,
                get("attn_v")?,
                get("attn_output")?,
                get("ffn_gate")?,
                get("ffn_up")?,
                get("ffn_down")?,
                get("attn_norm")?,
                get("ffn_norm")?,
            ]);
        }
        let (dense_total, tuned_total) =
            dense_and_tuned_sizes(raw.iter().flat_map(|b| b[..7].iter()));
        let keep_dense = prefill.keeps_copy(dense_total, tuned_total);

        let mut built = Vec::with_capacity(blocks);
        let mut dense_bytes = 0;
        let mut ffn = 0;
        for [q, k, v, o, gate, up, down, attn_norm, ffn_norm] in raw {
            ffn = gate.shape().dims2()?.0;
            let block = Block {
                attn_norm: RmsNorm::new(attn_norm.dequantize(device)?)?,
                qkv: linear(stack_rows(&[q, k, v], device)?, keep_dense)?,
                attn_out: linear(o, keep_dense)?,
                ffn_norm: RmsNorm::new(ffn_norm.dequantize(device)?)?,
                gate_up: linear(stack_rows(&[gate, up], device)?, keep_dense)?,
                down: linear(down, keep_dense)?,
            };
            dense_bytes += block.qkv.dense_bytes()
                + block.attn_out.dense_bytes()
                + block.gate_up.dense_bytes()
                + block.down.dense_bytes();
            built.push(block);
        }

        let (cos, sin) = rope_tables(head_dim, rope_base, max_positions, device)?;
        Ok(Self {
            cache: SeqCache::new(built.len(), kv_held),
            kv_held,
            embeddings,
            blocks: built,
            norm,
            output,
            cos,
            sin,
            shape: Shape {
                heads,
                kv_heads,
                head_dim,
                ffn,
                rms_eps,
            },
            dense_bytes,
        })
    }

    /// Longest sequence served.
    fn max_positions(&self) -> Result<usize> {
        self.cos.dim(0)
    }
}

impl CausalLm for Llama {
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
        check_step(n, position, cache.len(), self.max_positions()?)?;
        let device = self.norm.device().clone();
        let mut x = self.embeddings.lookup(tokens, &device)?.unsqueeze(0)?;
        let rotary = Rotary::at(&self.cos, &self.sin, position, n)?;
        let shape = self.shape;
        let middle = middle_layer(self.blocks.len());
        let mut at_middle = x.clone();
        for (l, (block, layer)) in self.blocks.iter().zip(&mut cache.layers).enumerate() {
            let h = block.attn_norm.forward(&x, shape.rms_eps)?;
            let attended = block.attention(layer, &h, &rotary, shape, pass)?;
            x = (x + attended)?;
            x = (&x + block.feed_forward(&x, shape, pass)?)?;
            if l + 1 == middle {
                at_middle = x.clone();
            }
        }
        let last = x.narrow(1, n - 1, 1)?;
        let last = self.norm.forward(&last, shape.rms_eps)?;
        Ok(Outputs {
            logits: self.output.forward(&last, Pass::Decode)?.flatten_all()?,
            hidden: hidden_features(&last, &at_middle.narrow(1, n - 1, 1)?)?,
        })
    }

    fn decode_rows(&self, steps: &mut [DecodeStep<'_>], pass: Pass) -> Result<Outputs> {
        check_steps(steps, self.blocks.len(), self.max_positions()?)?;
        let rotary = steps
            .iter()
            .map(|s| Rotary::row_at(&self.cos, &self.sin, s.position))
            .collect::<Result<Vec<_>>>()?;
        let device = self.norm.device().clone();
        let tokens: Vec<u32> = steps.iter().map(|s| s.token).collect();
        let mut x = self.embeddings.lookup(&tokens, &device)?.unsqueeze(0)?;
        let shape = self.shape;
        let head_dim = shape.head_dim;
        let middle = middle_layer(self.blocks.len());
        let mut at_middle = x.clone();
        for (l, block) in self.blocks.iter().enumerate() {
            let h = block.attn_norm.forward(&x, shape.rms_eps)?;
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
                    rope_one(q, head_dim, head_dim, cos, sin, true);
                    rope_one(k, head_dim, head_dim, cos, sin, true);
                },
            )?;
            x = (x + block.attn_out.forward(&mixed, pass)?)?;
            x = (&x + block.feed_forward(&x, shape, pass)?)?;
            if l + 1 == middle {
                at_middle = x.clone();
            }
        }
        let x = self.norm.forward(&x, shape.rms_eps)?;
        Ok(Outputs {
            logits: self.output.forward(&x, Pass::Decode)?.squeeze(0)?,
            hidden: hidden_features(&x, &at_middle)?,
        })
    }
}

impl Block {
    /// The feed-forward part of `x` (`[1, n, width]`, before its norm).
    fn feed_forward(&self, x: &Tensor, shape: Shape, pass: Pass) -> Result<Tensor> {
        let h = self.ffn_norm.forward(x, shape.rms_eps)?;
        let gate_up = self.gate_up.forward(&h, pass)?;
        let mixed = super::swiglu::silu_gate(&gate_up, shape.ffn)?;
        self.down.forward(&mixed, pass)
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
            ..
        } = shape;
        let qkv = self.qkv.forward(x, pass)?;
        let (cos, sin) = (&rotary.cos, &rotary.sin);
        let (q, k, v) = attention::split_heads(&qkv, heads, kv_heads, head_dim)?;
        // GGUF llama weights are permuted for interleaved rotary pairs.
        let q = candle_nn::rotary_emb::rope_i(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&k, cos, sin)?;
        let mixed = attention::prefill_rows(&q, &k, &v, cache, kv_heads, None)?;
        self.attn_out.forward(&mixed, pass)
    }
}

/// Additive mask `[n, position + n]`: query `i` (at `position + i`) sees
/// keys up to its own position, and with a `window`, only the last
/// `window` of them (its own included). The tensor path's mask, which the
/// tests hold `attention::prefill_rows` to.
#[cfg(test)]
pub(crate) fn causal_mask(
    n: usize,
    position: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let total = position + n;
    let values: Vec<f32> = (0..n)
        .flat_map(|i| {
            let at = position + i;
            (0..total).map(move |j| {
                let visible = j <= at && window.is_none_or(|w| at - j < w);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(values, (n, total), device)
}

/// Cosine and sine tables `[positions, head_dim / 2]`.
pub(crate) fn rope_tables(
    head_dim: usize,
    base: f32,
    positions: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let inverse: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
        .collect();
    let inverse = Tensor::new(inverse.as_slice(), device)?.reshape((1, head_dim / 2))?;
    let angles = Tensor::arange(0u32, positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((positions, 1))?
        .broadcast_mul(&inverse)?;
    Ok((angles.cos()?, angles.sin()?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn visible(mask: &Tensor) -> Vec<Vec<bool>> {
        mask.to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|row| row.into_iter().map(|v| v == 0.0).collect())
            .collect()
    }

    #[test]
    fn causal_mask_sees_the_cached_prefix_and_no_future() {
        let m = visible(&causal_mask(2, 3, None, &Device::Cpu).unwrap());
        assert_eq!(m[0], [true, true, true, true, false]);
        assert_eq!(m[1], [true, true, true, true, true]);
    }

    #[test]
    fn a_window_keeps_only_the_last_positions() {
        let m = visible(&causal_mask(3, 2, Some(2), &Device::Cpu).unwrap());
        // Query at position 2 sees 1 and 2; at 3 sees 2 and 3; at 4 sees 3 and 4.
        assert_eq!(m[0], [false, true, true, false, false]);
        assert_eq!(m[1], [false, false, true, true, false]);
        assert_eq!(m[2], [false, false, false, true, true]);
    }
}
