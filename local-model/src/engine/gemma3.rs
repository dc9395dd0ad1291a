//! Gemma 3 from a GGUF file (llama.cpp's `gemma3` layout).
//!
//! Built from the same parts as [`super::llama`], plus what Gemma 3 adds:
//! embeddings scaled by √width, RMS norms on each query and key head, norms
//! after attention and after the MLP, a GELU-gated MLP, and five local
//! layers (sliding window, their own rotary base) for every global one.
//!
//! Differences from candle 0.11's `quantized_gemma3`, on purpose: the MLP
//! gate is GELU (tanh approximation) as in Gemma, where candle uses SiLU
//! (candle issue #3745); the local layers' window applies while decoding
//! too, not only within a prefill, so sequences may run past it; the window
//! holds the last `sliding_window` positions, as in llama.cpp and
//! Transformers (candle's admits one more); the embedding table stays
//! quantized (candle expands it to F32: 671 MB for Gemma 3 270M).

use std::io::{Read, Seek};

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Result, Tensor, D};

use super::attention::{self, Rotary};
use super::gelu::gelu;
use super::kv_cache::{self, rope_one, LayerCache, SeqCache};
use super::linear::{dense_and_tuned_sizes, stack_rows, with_simd_kernel, Linear};
use super::llama::rope_tables;
use super::norm::RmsNorm;
use super::token_table::{output_projection, TokenTable};
use super::{
    check_step, check_steps, hidden_features, middle_layer, CausalLm, DecodeStep, Outputs, Pass,
    PrefillWeights,
};

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, Copy)]
struct Shape {
    width: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    rms_eps: f32,
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    qkv: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    attn_out: Linear,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate_up: Linear,
    down: Linear,
    post_ffn_norm: RmsNorm,
    /// `Some(window)` for local layers.
    window: Option<usize>,
    /// Index into the rotary tables: 0 global, 1 local.
    rope: usize,
}

/// A Gemma 3 model with the KV cache of its serial sequence (batched
/// sequences bring their own, see [`Gemma3::decode_rows`]).
#[derive(Debug, Clone)]
pub(crate) struct Gemma3 {
    cache: SeqCache,
    /// What the KV caches hold keys and values in ([`kv_cache::held_dtype`]).
    kv_held: DType,
    embeddings: TokenTable,
    blocks: Vec<Block>,
    norm: RmsNorm,
    output: Linear,
    /// Cosine and sine tables for the global and the local rotary base.
    rope: [(Tensor, Tensor); 2],
    shape: Shape,
    dense_bytes: usize,
}

impl Gemma3 {
    pub(crate) fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        max_positions: usize,
        prefill: PrefillWeights,
        device: &Device,
    ) -> Result<Self> {
        let meta = |key: &str| match content.metadata.get(&format!("gemma3.{key}")) {
            Some(v) => Ok(v),
            None => candle_core::bail!("GGUF metadata has no gemma3.{key}"),
        };
        let heads = meta("attention.head_count")?.to_u32()? as usize;
        let kv_heads = meta("attention.head_count_kv")?.to_u32()? as usize;
        let blocks = meta("block_count")?.to_u32()? as usize;
        let width = meta("embedding_length")?.to_u32()? as usize;
        let head_dim = meta("attention.key_length")?.to_u32()? as usize;
        let rms_eps = meta("attention.layer_norm_rms_epsilon")?.to_f32()?;
        let window = meta("attention.sliding_window")?.to_u32()? as usize;
        // Every `pattern`-th layer is global, the others local (Gemma 3: 6).
        let pattern = meta("attention.sliding_window_type")
            .and_then(|v| v.to_u32())
            .map_or(6, |v| v as usize)
            .max(1);
        let global_base = meta("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(1_000_000.0);
        let local_base = meta("rope.local_freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10_000.0);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || head_dim == 0 {
            candle_core::bail!("inconsistent head counts: {heads} heads, {kv_heads} kv heads")
        }

        let kv_held = kv_cache::held_for_file(content, false);
        let embeddings = TokenTable::load(content, reader, false, device)?;
        let norm = RmsNorm::new(
            content
                .tensor(reader, "output_norm.weight", device)?
                .dequantize(device)?,
        )?;
        let output = output_projection(content, reader, &embeddings, false, device)?;

        let mut raw = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let mut get = |part: &str| -> Result<QTensor> {
                let t = content.tensor(reader, &format!("blk.{i}.{part}.weight"), device)?;
                with_simd_kernel(t, device)
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
                get("attn_q_norm")?,
                get("attn_k_norm")?,
                get("post_attention_norm")?,
                get("ffn_norm")?,
                get("post_ffw_norm")?,
            ]);
        }
        let (dense_total, tuned_total) =
            dense_and_tuned_sizes(raw.iter().flat_map(|b| b[..7].iter()));
        let keep_dense = prefill.keeps_copy(dense_total, tuned_total);

        let mut built = Vec::with_capacity(blocks);
        let mut dense_bytes = 0;
        let mut ffn = 0;
        for (i, parts) in raw.into_iter().enumerate() {
            let [q, k, v, o, gate, up, down, attn_norm, q_norm, k_norm, post_attn_norm, ffn_norm, post_ffn_norm] =
                parts;
            ffn = gate.shape().dims2()?.0;
            let local = (i + 1) % pattern != 0;
            // Stacking needs one format; where the file mixes them, keep
            // the projections apart.
            let qkv = if q.dtype() == k.dtype() && k.dtype() == v.dtype() {
                Linear::new(stack_rows(&[q, k, v], device)?, keep_dense, device)?
            } else {
                let dense = [q, k, v]
                    .iter()
                    .map(|t| t.dequantize(device))
                    .collect::<Result<Vec<_>>>()?;
                let stacked = Tensor::cat(&dense, 0)?;
                Linear::new(
                    QTensor::quantize(&stacked, candle_core::quantized::GgmlDType::Q8_0)?,
                    keep_dense,
                    device,
                )?
            };
            let gate_up = if gate.dtype() == up.dtype() {
                Linear::new(stack_rows(&[gate, up], device)?, keep_dense, device)?
            } else {
                let dense = Tensor::cat(&[gate.dequantize(device)?, up.dequantize(device)?], 0)?;
                Linear::new(
                    QTensor::quantize(&dense, candle_core::quantized::GgmlDType::Q8_0)?,
                    keep_dense,
                    device,
                )?
            };
            let block = Block {
                attn_norm: RmsNorm::new(attn_norm.dequantize(device)?)?,
                qkv,
                q_norm: RmsNorm::new(q_norm.dequantize(device)?)?,
                k_norm: RmsNorm::new(k_norm.dequantize(device)?)?,
                attn_out: Linear::new(o, keep_dense, device)?,
                post_attn_norm: RmsNorm::new(post_attn_norm.dequantize(device)?)?,
                ffn_norm: RmsNorm::new(ffn_norm.dequantize(device)?)?,
                gate_up,
                down: Linear::new(down, keep_dense, device)?,
                post_ffn_norm: RmsNorm::new(post_ffn_norm.dequantize(device)?)?,
                window: local.then_some(window),
                rope: usize::from(local),
            };
            dense_bytes += block.qkv.dense_bytes()
                + block.attn_out.dense_bytes()
                + block.gate_up.dense_bytes()
                + block.down.dense_bytes();
            built.push(block);
        }

        Ok(Self {
            cache: SeqCache::new(built.len(), kv_held),
            kv_held,
            embeddings,
            blocks: built,
            norm,
            output,
            rope: [
                rope_tables(head_dim, global_base, max_positions, device)?,
                rope_tables(head_dim, local_base, max_positions, device)?,
            ],
            shape: Shape {
                width,
                heads,
                kv_heads,
                head_dim,
                ffn,
                rms_eps,
            },
            dense_bytes,
        })
    }
}

impl CausalLm for Gemma3 {
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
        check_step(n, position, cache.len(), self.rope[0].0.dim(0)?)?;
        let device = self.norm.device().clone();
        let shape = self.shape;
        let mut x =
            (self.embeddings.lookup(tokens, &device)?.unsqueeze(0)? * (shape.width as f64).sqrt())?;
        let rotary = [
            Rotary::at(&self.rope[0].0, &self.rope[0].1, position, n)?,
            Rotary::at(&self.rope[1].0, &self.rope[1].1, position, n)?,
        ];
        let middle = middle_layer(self.blocks.len());
        let mut at_middle = x.clone();
        for (l, (block, layer)) in self.blocks.iter().zip(&mut cache.layers).enumerate() {
            let h = block.attn_norm.forward(&x, shape.rms_eps)?;
            let attended = block.attention(layer, &h, &rotary[block.rope], shape, pass)?;
            let attended = block.post_attn_norm.forward(&attended, shape.rms_eps)?;
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
        check_steps(steps, self.blocks.len(), self.rope[0].0.dim(0)?)?;
        // Per step, the rotary row of the global and of the local base.
        let rotary = steps
            .iter()
            .map(|s| {
                let [(gc, gs), (lc, ls)] = &self.rope;
                Ok([
                    Rotary::row_at(gc, gs, s.position)?,
                    Rotary::row_at(lc, ls, s.position)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let device = self.norm.device().clone();
        let shape = self.shape;
        let head_dim = shape.head_dim;
        let tokens: Vec<u32> = steps.iter().map(|s| s.token).collect();
        let mut x = (self.embeddings.lookup(&tokens, &device)?.unsqueeze(0)?
            * (shape.width as f64).sqrt())?;
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
                block.window,
                |i, q, k| {
                    let (cos, sin) = &rotary[i][block.rope];
                    block.q_norm.normalize_each(q, shape.rms_eps);
                    block.k_norm.normalize_each(k, shape.rms_eps);
                    rope_one(q, head_dim, head_dim, cos, sin, false);
                    rope_one(k, head_dim, head_dim, cos, sin, false);
                },
            )?;
            let attended = block.attn_out.forward(&mixed, pass)?;
            let attended = block.post_attn_norm.forward(&attended, shape.rms_eps)?;
            x = (x + attended)?;
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
    /// The feed-forward part of `x` (`[1, n, width]`, before its norm),
    /// after its own closing norm.
    fn feed_forward(&self, x: &Tensor, shape: Shape, pass: Pass) -> Result<Tensor> {
        let h = self.ffn_norm.forward(x, shape.rms_eps)?;
        let gate_up = self.gate_up.forward(&h, pass)?;
        let gate = gate_up.narrow(D::Minus1, 0, shape.ffn)?;
        let up = gate_up.narrow(D::Minus1, shape.ffn, shape.ffn)?;
        let mixed = (gelu(&gate)? * up)?;
        let out = self.down.forward(&mixed, pass)?;
        self.post_ffn_norm.forward(&out, shape.rms_eps)
    }

    /// Self-attention of `x` (`[1, n, width]`, normalised, `n > 1`) over
    /// the cache and itself, causal, within the layer's window if any.
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
            rms_eps,
            ..
        } = shape;
        let qkv = self.qkv.forward(x, pass)?;
        let (cos, sin) = (&rotary.cos, &rotary.sin);
        let (q, k, v) = attention::split_heads(&qkv, heads, kv_heads, head_dim)?;
        let q = self.q_norm.forward(&q, rms_eps)?;
        let k = self.k_norm.forward(&k, rms_eps)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let mixed = attention::prefill_rows(&q, &k, &v, cache, kv_heads, self.window)?;
        self.attn_out.forward(&mixed, pass)
    }
}
