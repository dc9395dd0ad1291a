//! The model architectures we run, behind one forward-pass interface.

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{phi, quantized_gemma3, quantized_llama, quantized_mixformer};

use crate::engine::kv_cache::SeqCache;
use crate::engine::{DecodeStep, Outputs, Pass, TunedModel};
use crate::error::GenerateError;
use crate::phi_mixed::MixedPhi;

/// What one sequence gets from a forward call: the logits of its next token and, on the tuned
/// engine, the hidden features of the same position (`[final, middle]`, see
/// [`crate::engine::hidden_features`]) that the confidence probe reads.
#[derive(Debug, Clone, Default)]
pub(crate) struct Next {
    pub(crate) logits: Vec<f32>,
    pub(crate) hidden: Option<Vec<f32>>,
}

impl Next {
    /// Logits alone: the backends that expose no hidden state.
    fn logits(logits: Vec<f32>) -> Self {
        Self {
            logits,
            hidden: None,
        }
    }
}

/// Which architecture a loaded model is, for logs and `/v1/models`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// Phi-1.5 in the Hugging Face safetensors layout.
    Phi,
    /// Phi-1.5 quantized GGUF in candle's mixformer layout (`model-q4k.gguf`).
    PhiGguf,
    /// Llama-family GGUF (SmolLM2, Llama, Mistral…).
    Llama,
    /// Gemma 3 GGUF.
    Gemma3,
    /// Phi-1.5 or Phi-2 GGUF in llama.cpp's `phi2` layout.
    Phi2,
}

impl Architecture {
    /// Short name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Phi => "phi",
            Architecture::PhiGguf => "phi-gguf",
            Architecture::Llama => "llama",
            Architecture::Gemma3 => "gemma3",
            Architecture::Phi2 => "phi2",
        }
    }
}

/// A loaded model with its key/value cache.
///
/// Quantized GGUF models keep a pristine copy without cache: their weights
/// are reference-counted, so a clone is cheap and gives every request a
/// fresh cache even where candle offers no way to clear it.
pub(crate) enum Backend {
    Phi(Box<phi::Model>),
    /// Phi-1.5 with BF16 weights (candle's `phi` cannot run them on CPU).
    PhiMixed(Box<MixedPhi>),
    PhiGguf(Box<quantized_mixformer::MixFormerSequentialForCausalLM>),
    Llama {
        pristine: Box<quantized_llama::ModelWeights>,
        live: Box<quantized_llama::ModelWeights>,
    },
    Gemma3 {
        pristine: Box<quantized_gemma3::ModelWeights>,
        live: Box<quantized_gemma3::ModelWeights>,
    },
    /// Llama-family or Gemma 3 GGUF on Cascade's tuned engine, with the
    /// tokens its cache holds so that a prompt sharing a prefix with the
    /// previous sequence (a repeated system prompt) skips that prefix.
    Tuned {
        model: TunedModel,
        /// The prompt tokens whose keys and values the cache holds, as
        /// computed by a prefill. Generated tokens are not reused: their
        /// keys and values came from the decode path, and a prompt that
        /// repeats them must get what a fresh prefill would give.
        prefilled: Vec<u32>,
        /// Whether a new prompt may reuse the cached prefix at all (see
        /// `LoadOptions::reuse_prompt_prefix`).
        reuse: bool,
        /// Prompt tokens per prefill part (`LoadOptions::prefill_chunk_tokens`).
        chunk: usize,
    },
}

impl Backend {
    /// A model on the tuned engine with an empty cache.
    pub(crate) fn tuned(model: TunedModel, reuse_prompt_prefix: bool, chunk: usize) -> Self {
        Backend::Tuned {
            model,
            prefilled: Vec::new(),
            reuse: reuse_prompt_prefix,
            chunk: chunk.max(1),
        }
    }

    /// Prompt tokens per prefill part; prompts run in one piece elsewhere.
    pub(crate) fn prefill_chunk(&self) -> usize {
        match self {
            Backend::Tuned { chunk, .. } => *chunk,
            _ => usize::MAX,
        }
    }

    /// Where the prefill part that starts at `position` ends, for a prompt
    /// of `len` tokens (see [`part_end`]).
    pub(crate) fn part_end(&self, position: usize, len: usize) -> usize {
        part_end(position, len, self.prefill_chunk())
    }

    /// Forgets the previous sequence so a new prompt starts at position 0.
    pub(crate) fn reset(&mut self) {
        match self {
            Backend::Phi(m) => m.clear_kv_cache(),
            Backend::PhiMixed(m) => m.clear_kv_cache(),
            Backend::PhiGguf(m) => m.clear_kv_cache(),
            Backend::Llama { pristine, live } => *live = pristine.clone(),
            Backend::Gemma3 { pristine, live } => *live = pristine.clone(),
            Backend::Tuned {
                model, prefilled, ..
            } => {
                model.truncate_cache(0);
                prefilled.clear();
            }
        }
    }

    /// Runs a prompt from the start of a new sequence and returns the logits
    /// for its next token (with its hidden features where the backend has them)
    /// and how many prompt tokens came from the cache.
    /// Where the backend keeps its cache, the positions shared with the
    /// previous sequence are reused, not recomputed.
    pub(crate) fn prefill(
        &mut self,
        prompt: &[u32],
        device: &Device,
    ) -> Result<(Next, usize), GenerateError> {
        if let Backend::Tuned {
            model,
            prefilled,
            reuse,
            chunk,
        } = self
        {
            if !*reuse {
                prefilled.clear();
            }
            let shared = prefilled
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                // At least one token must run to produce logits.
                .min(prompt.len().saturating_sub(1));
            model.truncate_cache(shared);
            prefilled.truncate(shared);
            let mut from = shared;
            let mut next = Next::default();
            while from < prompt.len() {
                let to = part_end(from, prompt.len(), *chunk);
                next = run_tuned(model, &prompt[from..to], from, Pass::Prefill)
                    .inspect_err(|_| prefilled.clear())?;
                from = to;
            }
            prefilled.extend_from_slice(&prompt[shared..]);
            return Ok((next, shared));
        }
        self.reset();
        Ok((self.forward(prompt, 0, device)?, 0))
    }

    /// Bytes of keys and values per position of a sequence, where this
    /// backend decodes several sequences in one step.
    pub(crate) fn kv_bytes_per_position(&self) -> Option<usize> {
        match self {
            Backend::Tuned { model, .. } => Some(model.kv_bytes_per_position()),
            _ => None,
        }
    }

    /// An empty cache for a sequence of its own, where this backend decodes
    /// several sequences in one step.
    pub(crate) fn new_sequence_cache(&self) -> Option<SeqCache> {
        match self {
            Backend::Tuned { model, .. } => Some(model.new_cache()),
            _ => None,
        }
    }

    /// Runs `tokens`, the prompt's part that starts at `position`, into `cache` (which holds
    /// exactly the positions before it) and returns the logits for the token after them, with
    /// the hidden features of the part's last position.
    /// The parts must end where [`Backend::part_end`] says: attention over a part sums in an
    /// order that depends on its size, so other cuts give (slightly) other log-probs.
    pub(crate) fn prefill_part(
        &self,
        cache: &mut SeqCache,
        tokens: &[u32],
        position: usize,
    ) -> Result<Next, GenerateError> {
        let Backend::Tuned { model, .. } = self else {
            return Err(GenerateError::Model(
                "only the tuned engine runs sequences with their own caches".into(),
            ));
        };
        let out = model.forward_in(cache, tokens, position, Pass::Prefill)?;
        Ok(one_row(out)?)
    }

    /// One decode step of several sequences with their own caches; the
    /// next-token logits and hidden features of each, in order.
    pub(crate) fn decode_batch(
        &self,
        steps: &mut [DecodeStep<'_>],
    ) -> Result<Vec<Next>, GenerateError> {
        let Backend::Tuned { model, .. } = self else {
            return Err(GenerateError::Model(
                "only the tuned engine runs sequences with their own caches".into(),
            ));
        };
        let out = model.decode_rows(steps, Pass::Decode)?;
        let logits = out.logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let hidden = out.hidden.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(logits
            .into_iter()
            .zip(hidden)
            .map(|(logits, hidden)| Next {
                logits,
                hidden: Some(hidden),
            })
            .collect())
    }

    /// Runs `tokens` (placed at `position` in the sequence) and returns the
    /// logits for the next token, as f32, with its hidden features where the
    /// backend has them.
    pub(crate) fn forward(
        &mut self,
        tokens: &[u32],
        position: usize,
        device: &Device,
    ) -> Result<Next, GenerateError> {
        if let Backend::Tuned {
            model, prefilled, ..
        } = self
        {
            return run_tuned(model, tokens, position, Pass::Decode).inspect_err(|_| {
                prefilled.clear();
            });
        }
        let input = Tensor::new(tokens, device)?.unsqueeze(0)?;
        let logits = match self {
            Backend::Phi(m) => m.forward(&input)?,
            Backend::PhiMixed(m) => m.forward(&input)?,
            Backend::PhiGguf(m) => m.forward(&input)?,
            Backend::Llama { live, .. } => live.forward(&input, position)?,
            Backend::Gemma3 { live, .. } => live.forward(&input, position)?,
            // Handled above; kept exhaustive so a new backend is not missed.
            Backend::Tuned { .. } => {
                return Err(GenerateError::Model(
                    "tuned backend reached the generic forward path".into(),
                ))
            }
        };
        // Shapes differ by architecture ([1, vocab] or [vocab]); flatten.
        let logits = logits.flatten_all()?.to_dtype(DType::F32)?;
        Ok(Next::logits(logits.to_vec1::<f32>()?))
    }
}

/// The end of the prefill part that starts at `position` of a `len`-token
/// prompt: the next multiple of `chunk`, so a prompt is cut at the same
/// places however its parts are scheduled (alone, or between the decode
/// steps of a batch) and gets the same log-probs either way.
fn part_end(position: usize, len: usize, chunk: usize) -> usize {
    let chunk = chunk.max(1);
    (position / chunk + 1).saturating_mul(chunk).min(len)
}

/// One forward call on the tuned engine; on failure the cache may hold part
/// of the step, so it is emptied and the next prompt starts afresh.
fn run_tuned(
    model: &mut TunedModel,
    tokens: &[u32],
    position: usize,
    pass: Pass,
) -> Result<Next, GenerateError> {
    let next = model.forward(tokens, position, pass).and_then(one_row);
    if next.is_err() {
        model.truncate_cache(0);
    }
    Ok(next?)
}

/// One sequence's logits (`[vocab]`) and hidden features (`[1, features]`) as f32 vectors.
fn one_row(out: Outputs) -> candle_core::Result<Next> {
    Ok(Next {
        logits: out.logits.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        hidden: Some(
            out.hidden
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        ),
    })
}
