//! Cascade's own CPU forward passes for quantized GGUF models.
//!
//! candle's model code is correct but leaves speed on the table on small
//! CPUs: weight formats without a SIMD kernel (Q4_1, Q5_0, Q5_1) run a scalar
//! loop, every projection is its own matmul and thread-pool round, the KV
//! cache is re-concatenated on every token, and grouped-query attention
//! copies the keys and values once per query head. This engine fixes those
//! while reading the same files (see docs/benchmarks.md for the figures).

pub(crate) mod attention;
pub(crate) mod decode_attention;
pub(crate) mod gelu;
pub(crate) mod gemma3;
pub mod kernels;
pub(crate) mod kv_cache;
pub(crate) mod linear;
pub(crate) mod llama;
pub(crate) mod norm;
pub(crate) mod phi2;
pub(crate) mod simd_exp;
pub(crate) mod swiglu;
pub(crate) mod token_table;

/// `n` deterministic values in [0, 1) for the engine's tests, from a small
/// linear congruential generator: the tests must not depend on a seed that
/// a crate version bump could change.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as f32 / (1u64 << 31) as f32
        })
        .collect()
}

use candle_core::Tensor;

/// Which pass a forward call belongs to: prompt tokens (prefill) or one
/// generated token (decode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    Prefill,
    Decode,
}

/// What a forward call gives back: the next-token logits and, for the same rows, the hidden
/// features a confidence probe reads (see [`hidden_features`]).
pub(crate) struct Outputs {
    /// `[vocab]` for one sequence, `[rows, vocab]` for a batched decode step.
    pub(crate) logits: Tensor,
    /// `[rows, 2 * width]`, one row per row of logits (one for a prompt).
    pub(crate) hidden: Tensor,
}

/// How many blocks run before the probe reads the middle of the residual stream.
pub(crate) fn middle_layer(layers: usize) -> usize {
    layers / 2
}

/// The probe's features of `rows` positions: the final hidden state after the final norm (what
/// the output projection reads) and the residual stream after [`middle_layer`] blocks, side by
/// side, `[rows, 2 * width]`. Both are `[1, rows, width]`; they are by-products of the forward
/// pass, so a probe costs no extra pass.
pub(crate) fn hidden_features(normed: &Tensor, middle: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::cat(&[normed, middle], 2)?.squeeze(0)
}

/// One sequence's part of a batched decode step: its next token, placed
/// at `position` (the length of its own `cache`).
pub(crate) struct DecodeStep<'a> {
    pub(crate) cache: &'a mut kv_cache::SeqCache,
    pub(crate) token: u32,
    pub(crate) position: usize,
}

/// Checks every step of a batched decode step against its cache (a model
/// of `layers` layers, sequences of at most `max_positions`).
pub(crate) fn check_steps(
    steps: &[DecodeStep<'_>],
    layers: usize,
    max_positions: usize,
) -> candle_core::Result<()> {
    for step in steps {
        step.cache.check(layers)?;
        check_step(1, step.position, step.cache.len(), max_positions)?;
    }
    Ok(())
}

/// One architecture on the tuned engine: what differs between the llama family, Gemma 3 and
/// phi2 (its layers, its prompt pass, its batched decode step). What they share (serving one
/// sequence from a cache of their own, a single token through the batched step, truncating,
/// new caches, the cache's size) is written once here.
pub(crate) trait CausalLm: Send {
    /// The cache of the sequence the model serves one at a time.
    fn own_cache(&mut self) -> &mut kv_cache::SeqCache;
    /// Transformer blocks, each with a layer of the KV cache.
    fn layers(&self) -> usize;
    /// Key (or value) width of one layer's cache per position: KV heads × head dimension.
    fn kv_width(&self) -> usize;
    /// The type the KV caches hold keys and values in.
    fn kv_held(&self) -> candle_core::DType;
    /// Bytes of the dense prefill copy.
    fn dense_bytes(&self) -> usize;
    /// Runs a prompt of several tokens placed at `position` (the cached length) into
    /// `cache` and returns the next-token logits of the last one, `[vocab]`, with its hidden
    /// features.
    fn prompt_in(
        &self,
        cache: &mut kv_cache::SeqCache,
        tokens: &[u32],
        position: usize,
        pass: Pass,
    ) -> candle_core::Result<Outputs>;
    /// One decode step of several sequences (or a one-token prefill): each step's token at
    /// its position in its own cache; every matrix product runs once over all of them.
    /// Returns the next-token logits, `[steps, vocab]`, and the hidden features of each step.
    fn decode_rows(&self, steps: &mut [DecodeStep<'_>], pass: Pass)
        -> candle_core::Result<Outputs>;

    /// Runs `tokens` placed at `position` on the sequence whose keys and values `cache`
    /// holds and returns the next-token logits of the last one, `[vocab]`, with its hidden
    /// features.
    fn forward_in(
        &self,
        cache: &mut kv_cache::SeqCache,
        tokens: &[u32],
        position: usize,
        pass: Pass,
    ) -> candle_core::Result<Outputs> {
        if let [token] = tokens {
            // One token takes the same path alone as in a batch, so a request's log-probs
            // do not depend on what runs beside it.
            let mut step = [DecodeStep {
                cache,
                token: *token,
                position,
            }];
            let out = self.decode_rows(&mut step, pass)?;
            return Ok(Outputs {
                logits: out.logits.squeeze(0)?,
                hidden: out.hidden,
            });
        }
        self.prompt_in(cache, tokens, position, pass)
    }

    /// [`CausalLm::forward_in`] on the model's own cache.
    fn forward(
        &mut self,
        tokens: &[u32],
        position: usize,
        pass: Pass,
    ) -> candle_core::Result<Outputs> {
        let mut cache = std::mem::take(self.own_cache());
        let out = self.forward_in(&mut cache, tokens, position, pass);
        *self.own_cache() = cache;
        out
    }

    /// Keeps the first `len` cached positions of the own sequence and forgets the rest.
    fn truncate_cache(&mut self, len: usize) {
        self.own_cache().truncate(len);
    }

    /// An empty KV cache for one more sequence.
    fn new_cache(&self) -> kv_cache::SeqCache {
        kv_cache::SeqCache::new(self.layers(), self.kv_held())
    }

    /// Bytes of keys and values one position takes over all layers.
    fn kv_bytes_per_position(&self) -> usize {
        2 * self.layers() * self.kv_width() * self.kv_held().size_in_bytes()
    }
}

/// A model on the tuned engine, whichever its architecture.
pub(crate) type TunedModel = Box<dyn CausalLm>;

/// Which forward-pass code runs a quantized GGUF model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Cascade's engine: SIMD-friendly weight formats, fused projections,
    /// a dense prefill copy where it fits (see [`PrefillWeights`]).
    #[default]
    Tuned,
    /// candle's own model code on the file's weights as stored (also what
    /// runs architectures the tuned engine does not cover).
    Reference,
    /// The tuned engine's code with every product in F32 on the
    /// dequantised weights: the file's values with exact arithmetic, the
    /// yardstick that accuracy tests hold both other paths to. Slow and
    /// 4 bytes per weight; llama-family and phi2 GGUF only.
    Exact,
}

impl std::str::FromStr for Kernels {
    type Err = crate::error::LoadError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tuned" => Ok(Kernels::Tuned),
            "reference" => Ok(Kernels::Reference),
            "exact" => Ok(Kernels::Exact),
            other => Err(crate::error::LoadError::InvalidOption(format!(
                "unknown kernels `{other}` (choose tuned, reference or exact)"
            ))),
        }
    }
}

/// Whether the tuned engine keeps a dequantised copy of the layer weights
/// for prefill, a dense matrix product on candle's F32 `gemm`. Where
/// Cascade's own kernels run most of the weights, they beat the copy on
/// every host measured: AVX-512 (Gemma 3 270M: 924 against 768 tok/s, in
/// 542 instead of 870 MiB) and, since the kernels hold sixteen rows side
/// by side, AVX2 too (an AMD Zen 3 host: SmolLM2 464 against 294 tok/s,
/// Gemma 3 381 against 271, docs/benchmarks.md "Session 14"). So `Auto`
/// keeps a copy only for weights candle's own quantized kernels would run
/// (a CPU without AVX2, or formats Cascade has no kernel for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillWeights {
    /// A copy when it takes at most this many MiB and most of the
    /// weights are not on Cascade's kernels, else none.
    Auto { max_mib: usize },
    /// Always keep the copy.
    Dense,
    /// Never: prefill runs on the quantized weights.
    Quantized,
}

impl Default for PrefillWeights {
    fn default() -> Self {
        PrefillWeights::Auto { max_mib: 512 }
    }
}

impl PrefillWeights {
    /// Whether to keep a dense copy that would take `bytes`, of which
    /// `tuned_bytes` are of weights on Cascade's kernels.
    pub(crate) fn keeps_copy(self, bytes: usize, tuned_bytes: usize) -> bool {
        match self {
            PrefillWeights::Dense => true,
            PrefillWeights::Quantized => false,
            PrefillWeights::Auto { max_mib } => {
                bytes <= max_mib * 1024 * 1024 && 2 * tuned_bytes < bytes
            }
        }
    }
}

/// Checks a forward call of `tokens` tokens at `position` against what the
/// cache holds (`cached`) and the longest sequence the model serves.
pub(crate) fn check_step(
    tokens: usize,
    position: usize,
    cached: usize,
    max_positions: usize,
) -> candle_core::Result<()> {
    if tokens == 0 {
        candle_core::bail!("forward: no tokens")
    }
    if position != cached {
        candle_core::bail!("forward at position {position} but the cache holds {cached}")
    }
    if position + tokens > max_positions {
        candle_core::bail!(
            "sequence of {} positions exceeds the model's {max_positions}",
            position + tokens
        )
    }
    Ok(())
}

impl std::str::FromStr for PrefillWeights {
    type Err = crate::error::LoadError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(PrefillWeights::default()),
            "dense" => Ok(PrefillWeights::Dense),
            "quantized" => Ok(PrefillWeights::Quantized),
            other => Err(crate::error::LoadError::InvalidOption(format!(
                "unknown prefill weights `{other}` (choose auto, dense or quantized)"
            ))),
        }
    }
}

#[cfg(test)]
mod prefill_weights_tests {
    use super::PrefillWeights;

    #[test]
    fn auto_keeps_a_copy_only_when_small_and_not_mostly_on_cascades_kernels() {
        let auto = PrefillWeights::default();
        let mib = 1024 * 1024;
        assert!(auto.keeps_copy(400 * mib, 0));
        assert!(auto.keeps_copy(400 * mib, 199 * mib));
        assert!(!auto.keeps_copy(400 * mib, 200 * mib));
        assert!(!auto.keeps_copy(600 * mib, 0));
        assert!(PrefillWeights::Dense.keeps_copy(600 * mib, 600 * mib));
        assert!(!PrefillWeights::Quantized.keeps_copy(mib, 0));
    }
}
