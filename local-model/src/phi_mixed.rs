//! Phi-1.5 with weights in BF16 (or F32) and the precision-sensitive steps
//! in F32.
//!
//! candle 0.11's `models::phi` runs in one dtype throughout, and on the CPU
//! its rotary embedding accepts only matching dtypes while its sin/cos
//! tables are always F32: with BF16 weights the first forward pass fails
//! with "unsupported dtype for rope". This model reads the same
//! `config.json` and tensor names but keeps the residual stream, layer
//! norms, rotary embedding, attention scores, softmax, GELU and the KV
//! cache in F32; only the projections (embedding, q/k/v, dense, fc1, fc2,
//! lm_head) run on weights in the chosen dtype. With F32 weights it
//! computes exactly what `models::phi` does.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Activation, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

/// The fields of a Hugging Face Phi `config.json` this model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct PhiConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub rope_theta: f32,
    pub partial_rotary_factor: f64,
    #[serde(default)]
    pub qk_layernorm: bool,
}

impl PhiConfig {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
}

/// A linear layer whose weights may be BF16, applied to an F32 input.
#[derive(Debug, Clone)]
struct Projection {
    inner: Linear,
    dtype: DType,
}

impl Projection {
    fn load(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let dtype = vb.dtype();
        Ok(Self {
            inner: candle_nn::linear(in_dim, out_dim, vb)?,
            dtype,
        })
    }

    /// F32 in, F32 out; the matrix product runs in the weights' dtype.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.inner
            .forward(&xs.to_dtype(self.dtype)?)?
            .to_dtype(DType::F32)
    }
}

/// Rotary position embedding over the first `dim` channels of each head.
#[derive(Debug, Clone)]
struct Rotary {
    dim: usize,
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &PhiConfig, device: &Device) -> Result<Self> {
        let dim = (cfg.partial_rotary_factor * cfg.head_dim() as f64) as usize;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / cfg.rope_theta.powf(i as f32 / dim as f32))
            .collect();
        let angles: Vec<f32> = (0..cfg.max_position_embeddings)
            .flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (cfg.max_position_embeddings, dim / 2), device)?;
        Ok(Self {
            dim,
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// `xs`: (batch, heads, seq, head_dim) in F32, starting at `position`.
    fn apply(&self, xs: &Tensor, position: usize) -> Result<Tensor> {
        let (_, _, seq_len, head_dim) = xs.dims4()?;
        let cos = self.cos.narrow(0, position, seq_len)?;
        let sin = self.sin.narrow(0, position, seq_len)?;
        let rotated = candle_nn::rotary_emb::rope(
            &xs.narrow(D::Minus1, 0, self.dim)?.contiguous()?,
            &cos,
            &sin,
        )?;
        if self.dim == head_dim {
            return Ok(rotated);
        }
        let passed = xs.narrow(D::Minus1, self.dim, head_dim - self.dim)?;
        Tensor::cat(&[&rotated, &passed], D::Minus1)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    dense: Projection,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    /// Keys (after rotation) and values so far, F32.
    cache: Option<(Tensor, Tensor)>,
}

impl Attention {
    fn load(cfg: &PhiConfig, vb: VarBuilder) -> Result<Self> {
        let head_dim = cfg.head_dim();
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.kv_heads());
        Ok(Self {
            q_proj: Projection::load(cfg.hidden_size, heads * head_dim, vb.pp("q_proj"))?,
            k_proj: Projection::load(cfg.hidden_size, kv_heads * head_dim, vb.pp("k_proj"))?,
            v_proj: Projection::load(cfg.hidden_size, kv_heads * head_dim, vb.pp("v_proj"))?,
            dense: Projection::load(heads * head_dim, cfg.hidden_size, vb.pp("dense"))?,
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            cache: None,
        })
    }

    fn forward(
        &mut self,
        xs: &Tensor,
        position: usize,
        rotary: &Rotary,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (batch, seq_len, _) = xs.dims3()?;
        let split_heads = |t: Tensor, heads: usize| {
            t.reshape((batch, seq_len, heads, self.head_dim))?
                .transpose(1, 2)
        };
        let q = rotary.apply(
            &split_heads(self.q_proj.forward(xs)?, self.heads)?,
            position,
        )?;
        let k = rotary.apply(
            &split_heads(self.k_proj.forward(xs)?, self.kv_heads)?,
            position,
        )?;
        let v = split_heads(self.v_proj.forward(xs)?, self.kv_heads)?;
        let (k, v) = match &self.cache {
            Some((past_k, past_v)) => (
                Tensor::cat(&[past_k, &k], 2)?,
                Tensor::cat(&[past_v, &v], 2)?,
            ),
            None => (k, v),
        };
        self.cache = Some((k.clone(), v.clone()));
        let groups = self.heads / self.kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, groups)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, groups)?.contiguous()?;

        let scores = (q.contiguous()?.matmul(&k.t()?)? * self.scale)?;
        let scores = match mask {
            Some(mask) => {
                let blocked =
                    Tensor::new(f32::NEG_INFINITY, xs.device())?.broadcast_as(scores.shape())?;
                mask.broadcast_as(scores.shape())?
                    .where_cond(&blocked, &scores)?
            }
            None => scores,
        };
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq_len, ()))?;
        self.dense.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: LayerNorm,
    attention: Attention,
    fc1: Projection,
    fc2: Projection,
    activation: Activation,
}

impl Block {
    fn load(cfg: &PhiConfig, vb: VarBuilder) -> Result<Self> {
        let mlp = vb.pp("mlp");
        Ok(Self {
            input_layernorm: layer_norm(cfg, vb.pp("input_layernorm"))?,
            attention: Attention::load(cfg, vb.pp("self_attn"))?,
            fc1: Projection::load(cfg.hidden_size, cfg.intermediate_size, mlp.pp("fc1"))?,
            fc2: Projection::load(cfg.intermediate_size, cfg.hidden_size, mlp.pp("fc2"))?,
            activation: cfg.hidden_act,
        })
    }

    /// Phi's parallel block: attention and MLP both read the same normed
    /// input and are added to the residual.
    fn forward(
        &mut self,
        xs: &Tensor,
        position: usize,
        rotary: &Rotary,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let normed = self.input_layernorm.forward(xs)?;
        let attention = self.attention.forward(&normed, position, rotary, mask)?;
        let mlp = self
            .fc2
            .forward(&self.fc1.forward(&normed)?.apply(&self.activation)?)?;
        (attention + mlp)? + xs
    }
}

/// Phi-1.5 whose projections run in the weights' dtype and everything else
/// in F32; see the module documentation.
#[derive(Debug, Clone)]
pub struct MixedPhi {
    embed_tokens: Embedding,
    blocks: Vec<Block>,
    final_layernorm: LayerNorm,
    lm_head: Projection,
    rotary: Rotary,
    /// Tokens already in the KV cache.
    cached: usize,
}

impl MixedPhi {
    /// Builds the model from Hugging Face Phi tensors; `vb`'s dtype is the
    /// weights' dtype (layer norms are read as F32 regardless).
    pub fn new(cfg: &PhiConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.qk_layernorm {
            candle_core::bail!("qk_layernorm is not supported (Phi-1.5 and Phi-2 do not use it)");
        }
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.kv_heads());
        if kv_heads == 0 || heads == 0 || heads / kv_heads * kv_heads != heads {
            candle_core::bail!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            );
        }
        let model = vb.pp("model");
        let layers = model.pp("layers");
        Ok(Self {
            embed_tokens: candle_nn::embedding(
                cfg.vocab_size,
                cfg.hidden_size,
                model.pp("embed_tokens"),
            )?,
            blocks: (0..cfg.num_hidden_layers)
                .map(|i| Block::load(cfg, layers.pp(i)))
                .collect::<Result<_>>()?,
            final_layernorm: layer_norm(cfg, model.pp("final_layernorm"))?,
            lm_head: Projection::load(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?,
            rotary: Rotary::new(cfg, vb.device())?,
            cached: 0,
        })
    }

    /// Runs `input` (batch, seq) after the tokens already cached and
    /// returns the F32 logits of the next token, (batch, vocab).
    pub fn forward(&mut self, input: &Tensor) -> Result<Tensor> {
        let (_, seq_len) = input.dims2()?;
        let position = self.cached;
        let mut xs = self.embed_tokens.forward(input)?.to_dtype(DType::F32)?;
        let mask = if seq_len > 1 {
            Some(causal_mask(seq_len, position, input.device())?)
        } else {
            None
        };
        for block in &mut self.blocks {
            xs = block.forward(&xs, position, &self.rotary, mask.as_ref())?;
        }
        self.cached += seq_len;
        let last = self
            .final_layernorm
            .forward(&xs)?
            .narrow(1, seq_len - 1, 1)?;
        self.lm_head.forward(&last)?.squeeze(1)
    }

    /// Forgets the cached sequence.
    pub fn clear_kv_cache(&mut self) {
        self.cached = 0;
        for block in &mut self.blocks {
            block.attention.cache = None;
        }
    }
}

/// Layer norm parameters are tiny and precision-sensitive: always F32.
fn layer_norm(cfg: &PhiConfig, vb: VarBuilder) -> Result<LayerNorm> {
    candle_nn::layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.to_dtype(DType::F32))
}

/// 1 where query `i` (at `position + i`) must not see key `j`.
fn causal_mask(seq_len: usize, position: usize, device: &Device) -> Result<Tensor> {
    let keys = position + seq_len;
    let mask: Vec<u8> = (0..seq_len)
        .flat_map(|i| (0..keys).map(move |j| u8::from(j > position + i)))
        .collect();
    Tensor::from_slice(&mask, (seq_len, keys), device)
}
