//! The local model as the gateway uses it: loading, parameters from an
//! OpenAI request, and generation with early exit and a time budget.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use local_model::{
    Control, EncodedPrompt, GenerateError, GenerateRequest, GenerationParams, LoadOptions,
    LocalModel, ModelHandle, Prompt, WorkerError, WorkerOutput,
};
use tokio::sync::mpsc;

use crate::cascade::signals::{self, Aggregate};
use crate::config::LocalConfig;
use crate::openai::CompletionRequest;
use policies::decision::LocalLoad;

/// Why the local model could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalStartError {
    #[error("cannot load the local model `{model}`: {source}")]
    Load {
        model: String,
        #[source]
        source: local_model::LoadError,
    },
    #[error("local model warm-up failed: {0}")]
    WarmUp(#[from] GenerateError),
    #[error("cannot start the local model thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The local model behind its queue, with the name clients use for it.
#[derive(Clone)]
pub struct LocalEngine {
    handle: ModelHandle,
    name: String,
    /// Cap on generated tokens per request, whatever the client asks.
    max_tokens: usize,
}

/// How a local run should behave.
#[derive(Default)]
pub struct RunOptions {
    /// Stop as soon as this aggregate is settled under this threshold.
    pub early_exit: Option<(Aggregate, f64)>,
    /// Stop once the model has run this long.
    pub time_budget: Option<Duration>,
    /// Receives text deltas as they are generated (live streaming).
    pub deltas: Option<mpsc::UnboundedSender<LiveEvent>>,
    /// The prompt as [`LocalEngine::encode_prompt`] encoded it, when the caller already did
    /// (the model's thread then does not encode it again).
    pub encoded: Option<EncodedPrompt>,
}

/// What a live local generation reports to its stream.
pub enum LiveEvent {
    Delta(String),
    Done(Result<LocalRun, WorkerError>),
}

/// A finished local run.
#[derive(Debug, Clone)]
pub struct LocalRun {
    pub output: WorkerOutput,
    /// Stopped because the confidence could no longer reach the threshold.
    pub early_exit: bool,
    /// Stopped by the gateway's token cap, below what the client allowed.
    pub hit_token_cap: bool,
    /// Queue wait plus run time.
    pub elapsed: Duration,
}

impl LocalEngine {
    /// Loads the model, warms it up and starts its thread. Blocking: call it
    /// off the async runtime.
    pub fn start(config: &LocalConfig) -> Result<Self, LocalStartError> {
        let options = LoadOptions {
            dtype: config.dtype,
            template: config.template,
            kernels: config.kernels,
            prefill_weights: config.prefill_weights,
            reuse_prompt_prefix: config.reuse_prompt_prefix,
            prefill_chunk_tokens: config.prefill_chunk_tokens,
        };
        let mut model =
            LocalModel::load(&config.model, &options).map_err(|source| LocalStartError::Load {
                model: config.model.clone(),
                source,
            })?;
        if config.warm_up {
            model.warm_up()?;
        }
        let handle = ModelHandle::spawn_with(model, config.queue_depth, config.batch)?;
        Ok(Self::new(handle, config.name.clone(), config.max_tokens))
    }

    /// Wraps a running model handle.
    pub fn new(handle: ModelHandle, name: String, max_tokens: usize) -> Self {
        Self {
            handle,
            name,
            max_tokens,
        }
    }

    /// The name clients use for the local model.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model's context window in tokens.
    pub fn context_window(&self) -> usize {
        self.handle.info().context_window
    }

    /// Requests decoding now, and the mean number of sequences per decode step so far.
    pub fn batch_stats(&self) -> (usize, f64) {
        (self.handle.active(), self.handle.mean_batch_size())
    }

    /// The queue as it stands.
    pub fn load(&self) -> LocalLoad {
        LocalLoad {
            in_flight: self.handle.in_flight(),
            batch_capacity: self.handle.max_batch(),
            queue_capacity: self.handle.queue_capacity(),
            expected_wait: self.handle.expected_wait(),
        }
    }

    /// Counts the prompt's tokens on a blocking thread (tokenising a long
    /// prompt is CPU work that must not stall the async runtime).
    pub async fn prompt_tokens(&self, prompt: &Prompt) -> Result<usize, GenerateError> {
        Ok(self.encode_prompt(prompt).await?.len())
    }

    /// Encodes the prompt off the async runtime, for its length and for [`RunOptions::encoded`].
    pub async fn encode_prompt(&self, prompt: &Prompt) -> Result<EncodedPrompt, GenerateError> {
        let encoder = self.handle.encoder().clone();
        let prompt = prompt.clone();
        tokio::task::spawn_blocking(move || encoder.encode_prompt(&prompt))
            .await
            .map_err(|e| GenerateError::Tokenizer(format!("tokenizer task failed: {e}")))?
    }

    /// Decoding parameters for a request, and whether the gateway's cap is
    /// below what the client allowed.
    fn params(&self, request: &CompletionRequest) -> (GenerationParams, bool) {
        let asked = request.max_tokens.unwrap_or(usize::MAX);
        let max_tokens = asked.min(self.max_tokens);
        let defaults = GenerationParams::default();
        let params = GenerationParams {
            max_tokens,
            sampling: request.sampling,
            seed: request.seed.unwrap_or(defaults.seed),
            stop: request.stop.clone(),
            ignore_eos: false,
        };
        (params, asked > self.max_tokens)
    }

    /// Generates an answer. Dropping the future (a client that went away)
    /// stops the generation at the next token.
    pub async fn run(
        &self,
        request: &CompletionRequest,
        prompt: Prompt,
        options: RunOptions,
    ) -> Result<LocalRun, WorkerError> {
        let (params, capped) = self.params(request);
        let cap = params.max_tokens;
        let settled = Arc::new(AtomicBool::new(false));
        let settled_flag = Arc::clone(&settled);
        let RunOptions {
            early_exit,
            time_budget,
            deltas,
            encoded,
        } = options;
        // The signals so far, grown by one per token rather than rebuilt.
        let mut signals: Vec<policies::TokenSignal> = Vec::new();
        let on_token = move |event: &local_model::TokenEvent<'_>| -> Control {
            if let Some(tx) = &deltas {
                // A closed channel means the client is gone.
                if !event.text_delta.is_empty()
                    && tx
                        .send(LiveEvent::Delta(event.text_delta.to_string()))
                        .is_err()
                {
                    return Control::Stop;
                }
            }
            if let Some((aggregate, threshold)) = &early_exit {
                if let Some(new) = event.tokens_so_far.get(signals.len()..) {
                    signals.extend(signals::signals(new));
                }
                let more = cap.saturating_sub(event.tokens_so_far.len());
                if aggregate.settled_below_within(&signals, *threshold, more) {
                    settled_flag.store(true, Ordering::Relaxed);
                    return Control::Stop;
                }
            }
            Control::Continue
        };
        let mut job = GenerateRequest::new(prompt, params);
        job.encoded = encoded;
        job.on_token = Some(Box::new(on_token));
        job.time_budget = time_budget;
        let started = Instant::now();
        let output = self.handle.generate(job).await?;
        let hit_token_cap = capped
            && output.generation.finish_reason == local_model::FinishReason::Length
            && output.generation.tokens.len() >= cap;
        Ok(LocalRun {
            early_exit: settled.load(Ordering::Relaxed),
            hit_token_cap,
            elapsed: started.elapsed(),
            output,
        })
    }
}
