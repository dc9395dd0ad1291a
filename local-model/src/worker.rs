//! The model's own thread, a bounded queue in front of it, and an async
//! handle for callers.
//!
//! Inference is CPU-bound and the model holds a KV cache, so one thread owns
//! it and requests wait their turn. A full queue answers "busy" at once
//! rather than letting latency grow without bound.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::GenerateError;
use crate::generate::{Control, Generation, GenerationParams, Prompt, TokenEvent};
use crate::model::{LocalModel, ModelInfo, PromptEncoder};

/// Per-token callback run on the model thread.
pub type TokenCallback = Box<dyn FnMut(&TokenEvent<'_>) -> Control + Send>;

/// One generation to run.
pub struct GenerateRequest {
    pub prompt: Prompt,
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

#[derive(Default)]
struct Shared {
    /// Requests accepted and not yet finished (waiting or running).
    in_flight: AtomicUsize,
    /// Moving average of one request's run time, in microseconds.
    avg_run_us: AtomicU64,
}

/// A cheap, cloneable handle to the model thread.
#[derive(Clone)]
pub struct ModelHandle {
    sender: SyncSender<Job>,
    shared: Arc<Shared>,
    info: ModelInfo,
    encoder: PromptEncoder,
    queue_depth: usize,
}

impl ModelHandle {
    /// Starts the model thread. `queue_depth` requests may wait while one runs.
    pub fn spawn(mut model: LocalModel, queue_depth: usize) -> std::io::Result<Self> {
        let (sender, receiver) = sync_channel::<Job>(queue_depth);
        let shared = Arc::new(Shared::default());
        let info = model.info().clone();
        let encoder = model.encoder().clone();
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("local-model".into())
            .spawn(move || {
                while let Ok(job) = receiver.recv() {
                    run_job(&mut model, job, &thread_shared);
                }
            })?;
        Ok(Self {
            sender,
            shared,
            info,
            encoder,
            queue_depth,
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

    /// Configured number of requests that may wait.
    pub fn queue_capacity(&self) -> usize {
        self.queue_depth
    }

    /// Rough time a new request would wait before it starts: the requests
    /// ahead of it times the average run time.
    pub fn expected_wait(&self) -> Duration {
        let ahead = self.in_flight() as u64;
        Duration::from_micros(ahead.saturating_mul(self.shared.avg_run_us.load(Ordering::Relaxed)))
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
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
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
    let mut user_callback = request.on_token.take();
    let reply_ref = &reply;
    let mut callback = |event: &TokenEvent<'_>| -> Control {
        if reply_ref.is_closed() {
            return Control::Stop;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            return Control::Stop;
        }
        match user_callback.as_mut() {
            Some(cb) => cb(event),
            None => Control::Continue,
        }
    };
    let result = model.generate(&request.prompt, &request.params, &mut callback);
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
