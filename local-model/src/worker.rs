//! The model's own thread, a bounded queue in front of it, and an async
//! handle for callers.
//!
//! Inference is CPU-bound, so one thread owns the model. Where the model
//! can (GGUF models on the tuned engine), that thread runs every admitted
//! request in the same decode step (continuous batching): decode is bound
//! by reading the weights, and one pass over them serves the next token of
//! every running request for little more than the cost of one. Requests
//! join at step boundaries and each leaves as soon as it ends, freeing its
//! slot and its KV cache. A prompt that arrives while others are decoding
//! runs in parts (`LoadOptions::prefill_chunk_tokens`), one part between
//! two decode steps, so a long prompt delays the running streams by one
//! part's time per step instead of stalling them for its whole prefill.
//! [`BatchLimits`] bound the batch; requests beyond them wait in the queue.
//! Other models run one request at a time. A full queue answers "busy" at
//! once rather than letting latency grow without bound.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::engine::kv_cache::allocated_positions;
use crate::error::GenerateError;
use crate::generate::{Control, Generation, GenerationParams, Prompt, TokenEvent};
use crate::model::{EncodedPrompt, LocalModel, ModelInfo, PromptEncoder};
use crate::sequence::Sequence;

/// Per-token callback run on the model thread.
pub type TokenCallback = Box<dyn FnMut(&TokenEvent<'_>) -> Control + Send>;

/// One generation to run.
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// `prompt` already encoded by this model's [`PromptEncoder::encode_prompt`], when the
    /// caller has it (the worker then skips encoding; ids from another tokenizer are ignored).
    pub encoded: Option<EncodedPrompt>,
    pub params: GenerationParams,
    /// Called after every token; `Control::Stop` ends generation.
    pub on_token: Option<TokenCallback>,
    /// Stop generating once this much time has passed since the request
    /// started running (the queue wait does not count).
    pub time_budget: Option<Duration>,
}

impl GenerateRequest {
    /// A request with default parameters and no callback.
    pub fn new(prompt: Prompt, params: GenerationParams) -> Self {
        Self {
            prompt,
            encoded: None,
            params,
            on_token: None,
            time_budget: None,
        }
    }
}

/// Why the worker could not produce a generation.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the local model is busy: {queued} requests already waiting")]
    Busy { queued: usize },
    #[error("the local model worker has stopped")]
    Stopped,
    #[error(transparent)]
    Generate(#[from] GenerateError),
}

/// Outcome of a request that ran, with how it ended.
#[derive(Debug, Clone)]
pub struct WorkerOutput {
    pub generation: Generation,
    /// The time budget ran out before generation finished.
    pub timed_out: bool,
}

struct Job {
    request: GenerateRequest,
    enqueued: Instant,
    reply: oneshot::Sender<Result<WorkerOutput, WorkerError>>,
}

/// How many requests the worker runs together, and the memory they may
/// hold. Only models that decode several sequences in one step use them
/// (see [`ModelHandle::max_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Requests decoded in the same step at most; 1 runs one at a time.
    pub max_batch: usize,
    /// KV-cache memory that the running requests may take together, in
    /// MiB. Each request counts what its cache takes at its longest
    /// (prompt plus `max_tokens`, in the cache's allocation steps); one
    /// that would not fit waits until running requests end. A request
    /// larger than the whole budget still runs, alone, so that it is
    /// answered rather than starved.
    pub kv_cache_mib: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_batch: 8,
            kv_cache_mib: 256,
        }
    }
}

#[derive(Default)]
struct Shared {
    /// Requests accepted and not yet finished (waiting or running).
    in_flight: AtomicUsize,
    /// Requests running (admitted to the batch, not yet finished).
    active: AtomicUsize,
    /// Moving average of one request's run time, in microseconds.
    avg_run_us: AtomicU64,
    /// Decode steps run, and sequence rows over all of them: the mean
    /// batch size is their ratio.
    decode_steps: AtomicU64,
    decode_rows: AtomicU64,
}

/// A cheap, cloneable handle to the model thread.
#[derive(Clone)]
pub struct ModelHandle {
    sender: SyncSender<Job>,
    shared: Arc<Shared>,
    info: ModelInfo,
    encoder: PromptEncoder,
    queue_depth: usize,
    /// Requests that run together (1 where the model decodes one at a time).
    max_batch: usize,
}

impl ModelHandle {
    /// Starts the model thread with the default [`BatchLimits`].
    /// `queue_depth` requests may wait while the batch runs.
    pub fn spawn(model: LocalModel, queue_depth: usize) -> std::io::Result<Self> {
        Self::spawn_with(model, queue_depth, BatchLimits::default())
    }

    /// Starts the model thread; `queue_depth` requests may wait while the
    /// batch runs, within `limits`.
    pub fn spawn_with(
        mut model: LocalModel,
        queue_depth: usize,
        limits: BatchLimits,
    ) -> std::io::Result<Self> {
        let batching = model.batch_kv_bytes_per_position();
        let max_batch = match batching {
            Some(_) => limits.max_batch.max(1),
            None => 1,
        };
        // The limit is on requests in flight (`max_batch` running plus `queue_depth`
        // waiting), counted in `generate`, not on the channel: how many jobs sit in the
        // channel depends on when the worker thread last took them (it admits only at step
        // boundaries, and may not have run at all yet), so a channel-sized limit refused
        // requests that fit. The channel holds the whole limit, so it is never what refuses.
        let (sender, receiver) = sync_channel::<Job>(queue_depth + max_batch);
        let shared = Arc::new(Shared::default());
        let info = model.info().clone();
        let encoder = model.encoder().clone();
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("local-model".into())
            .spawn(move || match batching {
                Some(bytes_per_position) => {
                    let budget = Budget {
                        max_batch,
                        kv_bytes: limits.kv_cache_mib.saturating_mul(1024 * 1024),
                        bytes_per_position,
                    };
                    serve_batched(&mut model, &receiver, &thread_shared, budget);
                }
                None => {
                    while let Ok(job) = receiver.recv() {
                        run_job(&mut model, job, &thread_shared);
                    }
                }
            })?;
        Ok(Self {
            sender,
            shared,
            info,
            encoder,
            queue_depth,
            max_batch,
        })
    }

    /// Facts about the model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Tokenizer and template, for counting prompt tokens without the model.
    pub fn encoder(&self) -> &PromptEncoder {
        &self.encoder
    }

    /// Requests waiting or running.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Requests running now (in the batch).
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Requests that run together at most: the batch limit where the model
    /// decodes several sequences in one step, else 1.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Batched decode steps run so far, and the sequence rows over all of
    /// them (for metrics: batch size per step).
    pub fn decode_counts(&self) -> (u64, u64) {
        (
            self.shared.decode_steps.load(Ordering::Relaxed),
            self.shared.decode_rows.load(Ordering::Relaxed),
        )
    }

    /// Mean number of sequences per decode step so far (0 before the
    /// first batched step).
    pub fn mean_batch_size(&self) -> f64 {
        let (steps, rows) = self.decode_counts();
        if steps == 0 {
            0.0
        } else {
            rows as f64 / steps as f64
        }
    }

    /// Configured number of requests that may wait.
    pub fn queue_capacity(&self) -> usize {
        self.queue_depth
    }

    /// Rough time a new request would wait before it starts: it joins at
    /// once while the batch has a free slot; beyond that it waits for
    /// about one average run per full batch ahead of it. (The KV budget may
    /// hold the batch below `max_batch`, so this can be optimistic.)
    pub fn expected_wait(&self) -> Duration {
        let ahead = self.in_flight() as u64;
        let slots = self.max_batch.max(1) as u64;
        let batches = (ahead + 1).saturating_sub(slots).div_ceil(slots);
        Duration::from_micros(
            batches.saturating_mul(self.shared.avg_run_us.load(Ordering::Relaxed)),
        )
    }

    /// Queues a generation and waits for it. Dropping the returned future
    /// (a client that went away) stops the generation at the next token.
    pub async fn generate(&self, request: GenerateRequest) -> Result<WorkerOutput, WorkerError> {
        let (reply, receiver) = oneshot::channel();
        let job = Job {
            request,
            enqueued: Instant::now(),
            reply,
        };
        let limit = self.queue_depth + self.max_batch;
        let admitted =
            self.shared
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < limit).then_some(n + 1)
                });
        if admitted.is_err() {
            return Err(WorkerError::Busy {
                queued: self.queue_depth,
            });
        }
        match self.sender.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                return Err(WorkerError::Busy {
                    queued: self.queue_depth,
                });
            }
            Err(TrySendError::Disconnected(_)) => {
                self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                return Err(WorkerError::Stopped);
            }
        }
        receiver.await.map_err(|_| WorkerError::Stopped)?
    }
}

/// The worker's per-token control of a request: stop once its client is
/// gone (nobody reads the answer) or its time budget is spent, else ask
/// the request's own callback.
fn watch(
    reply: &oneshot::Sender<Result<WorkerOutput, WorkerError>>,
    deadline: Option<Instant>,
    timed_out: &mut bool,
    on_token: &mut Option<TokenCallback>,
    event: &TokenEvent<'_>,
) -> Control {
    if reply.is_closed() {
        return Control::Stop;
    }
    if deadline.is_some_and(|d| Instant::now() >= d) {
        *timed_out = true;
        return Control::Stop;
    }
    match on_token.as_mut() {
        Some(cb) => cb(event),
        None => Control::Continue,
    }
}

/// Books a finished request (run time average, in-flight count) and sends
/// its answer.
fn complete(
    shared: &Shared,
    started: Instant,
    queue_wait: Duration,
    timed_out: bool,
    result: Result<Generation, GenerateError>,
    reply: oneshot::Sender<Result<WorkerOutput, WorkerError>>,
) {
    let elapsed = started.elapsed();
    // Exponential moving average with weight 1/4 for the newest sample.
    let sample = elapsed.as_micros().min(u64::MAX as u128) as u64;
    let old = shared.avg_run_us.load(Ordering::Relaxed);
    let new = if old == 0 {
        sample
    } else {
        (old * 3 + sample) / 4
    };
    shared.avg_run_us.store(new, Ordering::Relaxed);
    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
    let output = result
        .map(|mut generation| {
            generation.timings.queue_ms = queue_wait.as_secs_f64() * 1000.0;
            WorkerOutput {
                generation,
                timed_out,
            }
        })
        .map_err(WorkerError::from);
    // The receiver may be gone; nothing to do then.
    let _ = reply.send(output);
}

/// Runs one request alone, on a model that decodes one sequence at a time.
fn run_job(model: &mut LocalModel, job: Job, shared: &Shared) {
    let Job {
        mut request,
        enqueued,
        reply,
    } = job;
    let started = Instant::now();
    let queue_wait = started.duration_since(enqueued);
    if reply.is_closed() {
        // The caller is gone; do not spend CPU on an answer nobody reads.
        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let mut timed_out = false;
    let deadline = request.time_budget.map(|b| started + b);
    let mut on_token = request.on_token.take();
    let mut callback =
        |event: &TokenEvent<'_>| watch(&reply, deadline, &mut timed_out, &mut on_token, event);
    let result = model.generate(&request.prompt, &request.params, &mut callback);
    complete(shared, started, queue_wait, timed_out, result, reply);
}

/// The batch's bounds, in the model's units.
#[derive(Debug, Clone, Copy)]
struct Budget {
    max_batch: usize,
    kv_bytes: usize,
    bytes_per_position: usize,
}

/// A request taken from the queue, checked and encoded, not yet running.
struct Admission {
    job: Job,
    prompt_ids: Vec<u32>,
    max_new: usize,
    /// KV-cache bytes it takes at its longest.
    kv_bytes: usize,
}

/// A request in the batch.
struct Running<'t> {
    sequence: Sequence<'t>,
    reply: oneshot::Sender<Result<WorkerOutput, WorkerError>>,
    on_token: Option<TokenCallback>,
    deadline: Option<Instant>,
    started: Instant,
    queue_wait: Duration,
    timed_out: bool,
    kv_bytes: usize,
    /// The prompt while parts of it are still to run; `None` once the
    /// sequence decodes.
    prefilling: Option<Vec<u32>>,
}

impl Running<'_> {
    /// Runs the next part of the prompt; `true` while it goes on, `false`
    /// when it should leave the batch now (its client is gone, or its time
    /// budget ran out before its first token).
    fn prefill_next(&mut self, model: &LocalModel) -> Result<bool, GenerateError> {
        if self.reply.is_closed() {
            return Ok(false);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.timed_out = true;
            return Ok(false);
        }
        let Some(prompt_ids) = self.prefilling.as_deref() else {
            return Ok(true);
        };
        if model.prefill_next_part(&mut self.sequence, prompt_ids)? {
            self.prefilling = None;
        }
        Ok(true)
    }

    /// Picks this request's next token; `true` while it goes on.
    fn step(&mut self, eos_ids: &[u32]) -> Result<bool, GenerateError> {
        let Self {
            sequence,
            reply,
            on_token,
            deadline,
            timed_out,
            ..
        } = self;
        let mut callback =
            |event: &TokenEvent<'_>| watch(reply, *deadline, timed_out, on_token, event);
        sequence.step(eos_ids, &mut callback)
    }

    /// Leaves the batch with `error`, or with its generation when `None`.
    fn end(self, shared: &Shared, error: Option<GenerateError>) {
        shared.active.fetch_sub(1, Ordering::Relaxed);
        let result = match error {
            Some(error) => Err(error),
            None => self.sequence.finish(),
        };
        complete(
            shared,
            self.started,
            self.queue_wait,
            self.timed_out,
            result,
            self.reply,
        );
    }
}

/// Checks and encodes a request from the queue; `None` when it has already
/// been answered (its client is gone, or it is invalid).
fn admit(model: &LocalModel, mut job: Job, shared: &Shared, budget: Budget) -> Option<Admission> {
    if job.reply.is_closed() {
        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    let encoded = job.request.encoded.take();
    match model.prepare(&job.request.prompt, encoded, &job.request.params) {
        Ok((prompt_ids, max_new)) => {
            let positions = allocated_positions(prompt_ids.len() + max_new);
            Some(Admission {
                kv_bytes: positions.saturating_mul(budget.bytes_per_position),
                job,
                prompt_ids,
                max_new,
            })
        }
        Err(error) => {
            let started = Instant::now();
            let queue_wait = started.duration_since(job.enqueued);
            complete(shared, started, queue_wait, false, Err(error), job.reply);
            None
        }
    }
}

/// Starts an admitted request in a cache of its own: prefilled at once
/// when `in_parts` is false, else left for [`Running::prefill_next`] to run
/// between decode steps. `None` when it has already been answered (client
/// gone, or the prefill failed).
fn start<'t>(
    model: &mut LocalModel,
    tokenizer: &'t tokenizers::Tokenizer,
    admission: Admission,
    shared: &Shared,
    in_parts: bool,
) -> Option<Running<'t>> {
    let Admission {
        job,
        prompt_ids,
        max_new,
        kv_bytes,
    } = admission;
    let Job {
        mut request,
        enqueued,
        reply,
    } = job;
    if reply.is_closed() {
        // It left while waiting for room in the batch.
        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    let started = Instant::now();
    let queue_wait = started.duration_since(enqueued);
    let opened = if in_parts {
        model.open(tokenizer, prompt_ids.len(), max_new, &request.params)
    } else {
        model.begin(tokenizer, &prompt_ids, max_new, &request.params)
    };
    match opened {
        Ok(sequence) => {
            shared.active.fetch_add(1, Ordering::Relaxed);
            Some(Running {
                sequence,
                reply,
                on_token: request.on_token.take(),
                deadline: request.time_budget.map(|b| started + b),
                started,
                queue_wait,
                timed_out: false,
                kv_bytes,
                prefilling: in_parts.then_some(prompt_ids),
            })
        }
        Err(error) => {
            complete(shared, started, queue_wait, false, Err(error), reply);
            None
        }
    }
}

/// Runs prompt parts of the requests still prefilling, oldest first,
/// before the next decode step: one part, and more while they fit in one
/// part's worth of tokens together (the short last parts of several
/// prompts). Each whose last part is in decodes from that step on.
fn prefill_parts(model: &LocalModel, running: &mut Vec<Running<'_>>, shared: &Shared) {
    let mut left = model.prefill_chunk_tokens();
    let mut ran_one = false;
    let mut i = 0;
    while i < running.len() {
        let Some(prompt) = running[i].prefilling.as_deref() else {
            i += 1;
            continue;
        };
        let part = model.next_part_tokens(&running[i].sequence, prompt);
        if ran_one && part > left {
            break;
        }
        match running[i].prefill_next(model) {
            Ok(true) => {
                ran_one = true;
                left = left.saturating_sub(part);
                i += 1;
            }
            Ok(false) => running.remove(i).end(shared, None),
            Err(error) => running.remove(i).end(shared, Some(error)),
        }
    }
}

/// The batching worker's loop: admit what fits at each step boundary, pick
/// every running request's next token, end those that are done, and run
/// one decode step for the rest together. Returns once the queue is closed
/// and every request has been answered.
fn serve_batched(
    model: &mut LocalModel,
    receiver: &Receiver<Job>,
    shared: &Shared,
    budget: Budget,
) {
    // The tokenizer outlives the running requests, which borrow it.
    let encoder = model.encoder().clone();
    let tokenizer = encoder.tokenizer();
    let eos_ids = model.stop_token_ids().to_vec();
    let mut running: Vec<Running<'_>> = Vec::new();
    // The oldest request that did not fit yet: it goes first, so later
    // (smaller) requests cannot starve it.
    let mut held: Option<Admission> = None;
    let mut open = true;
    loop {
        loop {
            let admission = match held.take() {
                Some(admission) => admission,
                None if !open => break,
                None => {
                    let job = if running.is_empty() {
                        receiver.recv().map_err(|_| TryRecvError::Disconnected)
                    } else {
                        receiver.try_recv()
                    };
                    match job {
                        Ok(job) => match admit(model, job, shared, budget) {
                            Some(admission) => admission,
                            None => continue,
                        },
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
            };
            let reserved: usize = running.iter().map(|r| r.kv_bytes).sum();
            let full = running.len() >= budget.max_batch
                || reserved.saturating_add(admission.kv_bytes) > budget.kv_bytes;
            if full && !running.is_empty() {
                held = Some(admission);
                break;
            }
            // Alone, a prompt runs all its parts at once: nobody waits on
            // it, and a single request keeps its speed.
            let in_parts = running.iter().any(|r| r.prefilling.is_none());
            if let Some(started) = start(model, tokenizer, admission, shared, in_parts) {
                running.push(started);
            }
        }
        if running.is_empty() {
            if !open && held.is_none() {
                return;
            }
            continue;
        }
        prefill_parts(model, &mut running, shared);
        let mut i = 0;
        while i < running.len() {
            if running[i].prefilling.is_some() {
                i += 1;
                continue;
            }
            match running[i].step(&eos_ids) {
                Ok(true) => i += 1,
                Ok(false) => running.remove(i).end(shared, None),
                Err(error) => running.remove(i).end(shared, Some(error)),
            }
        }
        let mut batch: Vec<&mut Sequence<'_>> = running
            .iter_mut()
            .filter(|r| r.prefilling.is_none())
            .map(|r| &mut r.sequence)
            .collect();
        if batch.is_empty() {
            continue;
        }
        shared.decode_steps.fetch_add(1, Ordering::Relaxed);
        shared
            .decode_rows
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let Err(error) = model.decode_together(&mut batch) {
            // The step may have written part of the caches: no sequence in
            // it can go on. Prompts still running in were not part of it.
            let message = error.to_string();
            let (failed, prefilling): (Vec<_>, Vec<_>) =
                running.drain(..).partition(|r| r.prefilling.is_none());
            running = prefilling;
            for r in failed {
                r.end(shared, Some(GenerateError::Model(message.clone())));
            }
        }
    }
}
