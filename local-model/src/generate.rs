//! Generation requests and results.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::probe::ProbeFeatures;
use crate::sampling::Sampling;
use crate::signals::TokenRecord;
use crate::template::ChatMessage;

/// What to generate from: chat messages (rendered with the model's
/// template) or raw prompt text (for `/v1/completions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Chat(Vec<ChatMessage>),
    Text(String),
}

/// Decoding parameters.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    /// Upper bound on generated tokens (also capped by the context window).
    pub max_tokens: usize,
    /// Greedy or sampled decoding.
    pub sampling: Sampling,
    /// Seed for sampled decoding.
    pub seed: u64,
    /// Generation stops before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks only).
    pub ignore_eos: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: Sampling::Greedy,
            seed: 299_792_458,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The per-token callback asked to stop (client gone, early exit).
    Aborted,
}

impl FinishReason {
    /// The OpenAI-style name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Aborted => "aborted",
        }
    }
}

/// Token counts, as in OpenAI's `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Where the time of one request went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Waiting in the worker's queue.
    pub queue_ms: f64,
    /// Processing the prompt: from leaving the queue until the first
    /// token's logits. A prompt run in parts between other requests' decode
    /// steps counts those steps too: queue plus prefill is its time to first
    /// token.
    pub prefill_ms: f64,
    /// Generating tokens after the first.
    pub decode_ms: f64,
    /// Prompt tokens whose keys and values were reused from the previous
    /// sequence instead of being computed (a shared prefix).
    pub cached_prompt_tokens: usize,
}

impl Timings {
    pub(crate) fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The answer text (stop sequence excluded).
    pub text: String,
    /// Every generated token with its confidence signals (end-of-sequence
    /// tokens excluded).
    pub tokens: Vec<TokenRecord>,
    pub usage: Usage,
    pub finish_reason: FinishReason,
    pub timings: Timings,
    /// Hidden-state features for a confidence probe (tuned engine only; see
    /// [`crate::probe`]). Boxed: most of a generation's life is spent in channels and
    /// enums, where four vectors inline would make every variant large.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Box<ProbeFeatures>>,
}

/// Whether generation should go on after a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

/// What the per-token callback sees.
#[derive(Debug)]
pub struct TokenEvent<'a> {
    /// The token just generated, with its signals.
    pub token: &'a TokenRecord,
    /// Text that is now safe to show: never part of a stop sequence. The
    /// deltas of all events are a prefix of the final `Generation::text`.
    pub text_delta: &'a str,
    /// Every token generated so far, this one included.
    pub tokens_so_far: &'a [TokenRecord],
}
