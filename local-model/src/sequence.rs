//! One request's decoding between forward steps: picking each token from
//! the logits, its signals, the text it adds, stop sequences, and how the
//! request ends.
//!
//! The same state drives a request run alone (`LocalModel::generate`) and
//! one run beside others in the worker's batched decode steps, so both
//! decide the same tokens from the same logits in the same way.

use std::time::Instant;

use tokenizers::Tokenizer;

use crate::backend::Next;
use crate::detok::IncrementalDecoder;
use crate::engine::kv_cache::SeqCache;
use crate::error::GenerateError;
use crate::generate::{
    Control, FinishReason, Generation, GenerationParams, Timings, TokenEvent, Usage,
};
use crate::probe::ProbeAccumulator;
use crate::sampling::Sampler;
use crate::signals::{signals_from_logits, TokenRecord};

/// A request between forward steps: the logits of its next token, or how
/// it ended.
pub(crate) struct Sequence<'t> {
    run: Run<'t>,
    sampler: Sampler,
    prompt_tokens: usize,
    /// Tokens it may still generate at most, from the start.
    max_new: usize,
    ignore_eos: bool,
    /// Tokens generated so far (end-of-sequence tokens excluded).
    emitted: usize,
    /// Where the next forward step places `next`.
    position: usize,
    logits: Vec<f32>,
    /// The hidden features of the position `logits` came from, where the backend has them.
    hidden: Option<Vec<f32>>,
    /// The hidden features of every position whose logits picked a token.
    probe: ProbeAccumulator,
    /// The token the next forward step runs.
    next: u32,
    finish: FinishReason,
    timings: Timings,
    /// When it was opened: its prefill counts from here, for a prompt run in
    /// parts the other sequences' steps between its parts included, since
    /// they delay its first token as much as its own parts do.
    opened: Instant,
    decode_started: Instant,
    /// Its own keys and values, when it runs in batched steps.
    pub(crate) cache: Option<SeqCache>,
}

impl<'t> Sequence<'t> {
    /// A request of `prompt_tokens` that may generate `max_new` tokens.
    pub(crate) fn new(
        tokenizer: &'t Tokenizer,
        prompt_tokens: usize,
        max_new: usize,
        params: &GenerationParams,
    ) -> Self {
        Self {
            run: Run::new(tokenizer, params.stop.clone()),
            sampler: Sampler::new(params.sampling, params.seed),
            prompt_tokens,
            max_new,
            ignore_eos: params.ignore_eos,
            emitted: 0,
            position: prompt_tokens,
            logits: Vec::new(),
            hidden: None,
            probe: ProbeAccumulator::default(),
            next: 0,
            finish: FinishReason::Length,
            timings: Timings::default(),
            opened: Instant::now(),
            decode_started: Instant::now(),
            cache: None,
        }
    }

    /// Takes the logits after the prompt (empty when nothing is to be
    /// generated) and how many prompt tokens came from a reused cache; the
    /// prefill took from the opening until now, and decoding starts now.
    pub(crate) fn start(&mut self, next: Next, cached_prompt_tokens: usize) {
        self.logits = next.logits;
        self.hidden = next.hidden;
        self.timings.cached_prompt_tokens = cached_prompt_tokens;
        self.timings.prefill_ms = Timings::ms(self.opened.elapsed());
        self.decode_started = Instant::now();
    }

    /// Tokens it may generate at most, from the start.
    pub(crate) fn max_new(&self) -> usize {
        self.max_new
    }

    /// Prompt positions its own cache holds so far.
    pub(crate) fn prefilled(&self) -> usize {
        self.cache.as_ref().map_or(0, SeqCache::len)
    }

    /// Picks the next token from the current logits, records it and calls
    /// `on_token`. `true` when the sequence goes on: run
    /// [`Sequence::pending`] through the model and pass the logits to
    /// [`Sequence::advance`]; `false` when it has ended.
    pub(crate) fn step(
        &mut self,
        eos_ids: &[u32],
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> Control,
    ) -> Result<bool, GenerateError> {
        if self.emitted >= self.max_new {
            self.finish = FinishReason::Length;
            return Ok(false);
        }
        let next = self.sampler.pick(&self.logits);
        if let Some(hidden) = self.hidden.take() {
            self.probe.push(&hidden);
        }
        let next_id = next as u32;
        if !self.ignore_eos && eos_ids.contains(&next_id) {
            self.finish = FinishReason::Stop;
            return Ok(false);
        }
        let signals = signals_from_logits(&self.logits, next);
        let outcome = self.run.push(next_id, signals)?;
        self.emitted += 1;
        let control = on_token(&TokenEvent {
            token: self.run.last_token(),
            text_delta: &outcome.delta,
            tokens_so_far: &self.run.tokens,
        });
        if outcome.hit_stop {
            self.finish = FinishReason::Stop;
            return Ok(false);
        }
        if control == Control::Stop {
            self.finish = FinishReason::Aborted;
            return Ok(false);
        }
        if self.emitted == self.max_new {
            self.finish = FinishReason::Length;
            return Ok(false);
        }
        self.next = next_id;
        Ok(true)
    }

    /// The token the next forward step runs and its position.
    pub(crate) fn pending(&self) -> (u32, usize) {
        (self.next, self.position)
    }

    /// Takes the logits (and hidden features) of the forward step that ran
    /// [`Sequence::pending`].
    pub(crate) fn advance(&mut self, next: Next) {
        self.logits = next.logits;
        self.hidden = next.hidden;
        self.position += 1;
    }

    /// The generation, once [`Sequence::step`] returned `false`.
    pub(crate) fn finish(mut self) -> Result<Generation, GenerateError> {
        self.timings.decode_ms = Timings::ms(self.decode_started.elapsed());
        let text = self.run.finish()?;
        Ok(Generation {
            text,
            usage: Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.run.tokens.len(),
            },
            tokens: self.run.tokens,
            finish_reason: self.finish,
            timings: self.timings,
            probe: self.probe.finish().map(Box::new),
        })
    }
}

/// Per-request decoding state: tokens, text, and stop-sequence hold-back.
struct Run<'a> {
    decoder: IncrementalDecoder<'a>,
    stop: Vec<String>,
    tokens: Vec<TokenRecord>,
    text: String,
    /// Bytes of `text` already handed to the callback.
    released: usize,
    stopped_at: Option<usize>,
}

struct PushOutcome {
    delta: String,
    hit_stop: bool,
}

impl<'a> Run<'a> {
    fn new(tokenizer: &'a Tokenizer, stop: Vec<String>) -> Self {
        Self {
            decoder: IncrementalDecoder::new(tokenizer),
            stop,
            tokens: Vec::new(),
            text: String::new(),
            released: 0,
            stopped_at: None,
        }
    }

    fn last_token(&self) -> &TokenRecord {
        // push() always adds a token before this is called.
        &self.tokens[self.tokens.len() - 1]
    }

    fn push(&mut self, id: u32, s: crate::signals::Signals) -> Result<PushOutcome, GenerateError> {
        let piece = self.decoder.push(id).map_err(GenerateError::Tokenizer)?;
        self.text.push_str(&piece);
        self.tokens.push(TokenRecord {
            id,
            text: piece,
            logprob: s.logprob,
            entropy: s.entropy,
            margin: s.margin,
        });
        if let Some(at) = self.find_stop() {
            self.stopped_at = Some(at);
            let delta = self.text[self.released.min(at)..at].to_string();
            self.released = at;
            return Ok(PushOutcome {
                delta,
                hit_stop: true,
            });
        }
        // Hold back any tail that could still grow into a stop sequence.
        let safe = self.text.len() - self.held_back();
        let delta = if safe > self.released {
            self.text[self.released..safe].to_string()
        } else {
            String::new()
        };
        self.released = self.released.max(safe);
        Ok(PushOutcome {
            delta,
            hit_stop: false,
        })
    }

    fn find_stop(&self) -> Option<usize> {
        // Only the recent tail can contain a new match.
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.released.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| i + from))
            .min()
    }

    fn held_back(&self) -> usize {
        let mut held = 0;
        for stop in self.stop.iter().filter(|s| !s.is_empty()) {
            for (len, _) in stop.char_indices().skip(1) {
                if len > held && self.text.ends_with(&stop[..len]) {
                    held = len;
                }
            }
        }
        held
    }

    fn finish(&mut self) -> Result<String, GenerateError> {
        if self.stopped_at.is_none() {
            let rest = self.decoder.finish().map_err(GenerateError::Tokenizer)?;
            if !rest.is_empty() {
                self.text.push_str(&rest);
                if let Some(last) = self.tokens.last_mut() {
                    last.text.push_str(&rest);
                }
            }
            if let Some(at) = self.find_stop() {
                self.stopped_at = Some(at);
            }
        }
        let mut text = std::mem::take(&mut self.text);
        if let Some(at) = self.stopped_at {
            text.truncate(at);
        }
        Ok(text)
    }
}
