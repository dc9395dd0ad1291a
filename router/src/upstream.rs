//! The one client through which every paid call to a remote model passes:
//! first tries, retries and fallbacks, streamed or not.
//!
//! Keeping them in one place is what lets a budget gate (reserve before the
//! call, settle with the real usage after) be inserted once and cover every
//! path; see [`CallGate`].

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use rand::Rng;
use serde::Deserialize;

use crate::breaker::Breaker;
use crate::config::{RemoteAuth, RemoteConfig};
use crate::metrics::Metrics;
use crate::openai::{self, CompletionRequest};
use policies::NanoUsd;

/// Token counts a remote reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct RemoteUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// Who pays for a request's remote calls, and the most one call may cost: carried with every
/// call to the budget gate (no lookup on the side).
#[derive(Debug, Clone, Copy)]
pub struct Payer<'a> {
    pub request_id: &'a str,
    /// The caller's team; empty for a gateway without teams (global scopes only).
    pub team: &'a str,
    /// The caller's key id; empty without teams.
    pub key_id: &'a str,
    /// The policy's `max_cost_per_request_usd`: a call whose worst-case cost exceeds it is
    /// refused, whichever remote of the chain and whichever attempt it is.
    pub max_cost: Option<NanoUsd>,
}

/// A paid call about to be made.
#[derive(Debug)]
pub struct PaidCall<'a> {
    pub request_id: &'a str,
    /// The caller's team and key id (empty without teams), for its budget scopes.
    pub team: &'a str,
    pub key_id: &'a str,
    /// The configured remote's name.
    pub upstream: &'a str,
    /// The model name sent upstream.
    pub model: &'a str,
    /// The request as it goes upstream (for a conservative cost estimate).
    pub request: &'a CompletionRequest,
    /// Estimated input tokens: what is reserved for the prompt, and what is charged for it
    /// when the remote reports no usage.
    pub input_tokens: u64,
    /// 0 for the first try at this upstream.
    pub attempt: u32,
    /// The policy's `max_cost_per_request_usd`: a call whose worst-case cost exceeds it is
    /// refused, whichever remote of the chain and whichever attempt it is.
    pub max_cost: Option<NanoUsd>,
}

/// A granted call, to be settled exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reservation(pub u64);

/// Why the gate refused a call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GateRefusal {
    /// A budget scope cannot hold the call's estimated cost.
    #[error("budget exhausted: {0}")]
    BudgetExhausted(String),
    /// The call's worst-case cost exceeds the policy's `max_cost_per_request_usd`.
    #[error("worst-case cost {estimate} exceeds max_cost_per_request {cap}")]
    OverRequestCap { estimate: NanoUsd, cap: NanoUsd },
    /// The budget store could not be asked; the gate fails closed.
    #[error("budget store unavailable: {0}")]
    Unavailable(String),
}

/// What a granted call turned out to cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The remote produced nothing billable (the attempt failed before an answer).
    Failed,
    /// The tokens to charge: the remote's reported usage, or the gateway's count when it
    /// reported none.
    Used(RemoteUsage),
}

/// Hook around every paid call: the place for budget reservation and
/// settlement. `reserve` runs before each attempt; `settle` runs exactly once
/// per granted reservation with what the call used.
#[async_trait]
pub trait CallGate: Send + Sync {
    async fn reserve(&self, call: &PaidCall<'_>) -> Result<Reservation, GateRefusal>;
    async fn settle(&self, reservation: Reservation, settlement: Settlement);
}

/// A gate that allows every call and records nothing (a gateway without storage, tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct OpenGate;

#[async_trait]
impl CallGate for OpenGate {
    async fn reserve(&self, _call: &PaidCall<'_>) -> Result<Reservation, GateRefusal> {
        Ok(Reservation::default())
    }
    async fn settle(&self, _reservation: Reservation, _settlement: Settlement) {}
}

/// Why a remote call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("{upstream}: timed out")]
    Timeout { upstream: String },
    #[error("{upstream}: cannot connect: {detail}")]
    Connect { upstream: String, detail: String },
    #[error("{upstream}: connection failed: {detail}")]
    Network { upstream: String, detail: String },
    #[error("{upstream}: HTTP {status}: {detail}")]
    Status {
        upstream: String,
        status: u16,
        detail: String,
    },
    #[error("{upstream}: malformed response: {detail}")]
    Malformed { upstream: String, detail: String },
    #[error("{upstream}: the response is larger than the limit of {limit} bytes")]
    TooLarge { upstream: String, limit: usize },
    #[error("{upstream}: circuit open after repeated failures; not called")]
    CircuitOpen {
        upstream: String,
        /// Until the breaker lets a probe through.
        retry_in: Duration,
    },
    #[error("{upstream}: call refused: {refusal}")]
    Refused {
        upstream: String,
        refusal: GateRefusal,
    },
    #[error("no remote model is configured")]
    NoRemote,
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl UpstreamError {
    /// The remote timed out (504 rather than 502).
    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::Timeout { .. })
    }

    /// The budget gate refused the call because a budget is full.
    pub fn is_budget_exhausted(&self) -> bool {
        matches!(
            self,
            UpstreamError::Refused {
                refusal: GateRefusal::BudgetExhausted(_) | GateRefusal::OverRequestCap { .. },
                ..
            }
        )
    }

    /// Worth another try at the same upstream: transient by nature.
    fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Connect { .. } => true,
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// Says something about the upstream's health, for its circuit breaker: an answer that
    /// is a client error (400, 401, …) came from a working upstream, and a refused or
    /// skipped call never reached it.
    fn is_upstream_failure(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::Timeout { .. }
            | UpstreamError::Connect { .. }
            | UpstreamError::Network { .. }
            | UpstreamError::Malformed { .. }
            | UpstreamError::TooLarge { .. } => true,
            UpstreamError::Refused { .. }
            | UpstreamError::CircuitOpen { .. }
            | UpstreamError::NoRemote
            | UpstreamError::Client(_) => false,
        }
    }

    /// Metric label and, in stream error events, the error's code.
    fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Network { .. } => "network",
            UpstreamError::Status { status: 429, .. } => "status_429",
            UpstreamError::Status { status, .. } if *status >= 500 => "status_5xx",
            UpstreamError::Status { .. } => "status_4xx",
            UpstreamError::Malformed { .. } => "malformed",
            UpstreamError::TooLarge { .. } => "too_large",
            UpstreamError::CircuitOpen { .. } => "circuit_open",
            UpstreamError::Refused { .. } => "refused",
            UpstreamError::NoRemote | UpstreamError::Client(_) => "config",
        }
    }
}

/// A successful remote answer.
pub struct UpstreamReply {
    /// The configured remote that answered.
    pub upstream: String,
    /// Time spent on remote calls, retries and backoff included, until the
    /// full body (or, streamed, the first event) arrived.
    pub elapsed: Duration,
    pub body: UpstreamBody,
}

/// The answer's body.
pub enum UpstreamBody {
    /// A non-streamed response, passed to the client byte for byte.
    Complete {
        bytes: Bytes,
        /// What was charged: the reported usage, or the gateway's estimate without one.
        billed: RemoteUsage,
    },
    /// Server-sent events, forwarded one by one as they arrive.
    Stream(Box<UpstreamStream>),
}

/// The remotes and the shared HTTP client (one connection pool for all).
pub struct Upstreams {
    client: reqwest::Client,
    remotes: Vec<Arc<RemoteConfig>>,
    /// One per remote, same order.
    breakers: Vec<Breaker>,
    gate: Arc<dyn CallGate>,
    metrics: Option<Arc<Metrics>>,
}

/// Just enough of a response to validate it and read its usage; serde still
/// checks that the whole body is well-formed JSON.
#[derive(Deserialize)]
struct ResponseProbe {
    #[serde(default)]
    usage: Option<RemoteUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    choices: Vec<ChoiceProbe>,
}

/// The generated text of one choice, streamed (`delta.content`) or not (`message.content`,
/// `text`), for counting tokens when a remote reports no usage.
#[derive(Deserialize, Default)]
struct ChoiceProbe {
    #[serde(default)]
    delta: Option<ContentProbe>,
    #[serde(default)]
    message: Option<ContentProbe>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize, Default)]
struct ContentProbe {
    #[serde(default)]
    content: Option<String>,
}

impl ChoiceProbe {
    fn text_len(&self) -> usize {
        let content = |c: &Option<ContentProbe>| {
            c.as_ref()
                .and_then(|c| c.content.as_ref())
                .map_or(0, String::len)
        };
        content(&self.delta) + content(&self.message) + self.text.as_ref().map_or(0, String::len)
    }
}

/// Output tokens of a generation the remote did not count: at least one per streamed event
/// that carried text (OpenAI sends one token per event), and at least one per four bytes of
/// text (some servers batch tokens), so budgets err on the side of charging too much.
fn counted_output_tokens(text_events: u64, text_bytes: u64) -> u64 {
    text_events.max(text_bytes.div_ceil(4))
}

impl Upstreams {
    /// Builds the client for the configured remotes.
    pub fn new(
        remotes: Vec<RemoteConfig>,
        gate: Arc<dyn CallGate>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, UpstreamError> {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| UpstreamError::Client(e.to_string()))?;
        let breakers = remotes
            .iter()
            .map(|r| Breaker::new(r.breaker_failures, r.breaker_cooldown))
            .collect();
        Ok(Self {
            client,
            breakers,
            remotes: remotes.into_iter().map(Arc::new).collect(),
            gate,
            metrics,
        })
    }

    /// The configured remotes, in file order.
    pub fn remotes(&self) -> &[Arc<RemoteConfig>] {
        &self.remotes
    }

    /// The name of the remote at index `i`.
    pub fn name(&self, i: usize) -> Option<&str> {
        self.remotes.get(i).map(|r| r.name.as_str())
    }

    /// Sets the circuit-state gauge of every remote.
    pub fn update_gauges(&self) {
        if let Some(m) = &self.metrics {
            for (remote, breaker) in self.remotes.iter().zip(&self.breakers) {
                m.upstream_circuit_state
                    .with_label_values(&[&remote.name])
                    .set(breaker.state().gauge());
            }
        }
    }

    /// The index of the remote with this name.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.remotes.iter().position(|r| r.name == name)
    }

    /// Sends `request` to the remotes of `chain` in order, retrying each on
    /// transient failures, until one answers. Returns the last failure when
    /// none does. A remote whose circuit breaker is open is skipped without a call and
    /// without a reservation.
    pub async fn call(
        &self,
        chain: &[usize],
        payer: Payer<'_>,
        request: &CompletionRequest,
        input_tokens: u64,
    ) -> Result<UpstreamReply, UpstreamError> {
        let request_id = payer.request_id;
        let started = Instant::now();
        let mut last = UpstreamError::NoRemote;
        let remotes = chain
            .iter()
            .filter_map(|&i| Some((self.remotes.get(i)?, self.breakers.get(i)?)));
        for (remote, breaker) in remotes {
            let body = openai::upstream_body(request, &remote.model)
                .map_err(|e| UpstreamError::Client(e.to_string()))?;
            let mut attempt = 0u32;
            loop {
                let permit = match breaker.admit(Instant::now()) {
                    Ok(permit) => permit,
                    Err(retry_in) => {
                        let error = UpstreamError::CircuitOpen {
                            upstream: remote.name.clone(),
                            retry_in,
                        };
                        if let Some(m) = &self.metrics {
                            m.upstream_errors
                                .with_label_values(&[&remote.name, error.kind()])
                                .inc();
                        }
                        tracing::debug!(request_id, upstream = %remote.name, "circuit open; skipping the upstream");
                        // A breaker that opened during this request's own retries: its real
                        // failure says more than "circuit open".
                        if attempt == 0 {
                            last = error;
                        }
                        break;
                    }
                };
                let call = PaidCall {
                    request_id,
                    team: payer.team,
                    key_id: payer.key_id,
                    upstream: &remote.name,
                    model: &remote.model,
                    request,
                    input_tokens,
                    attempt,
                    max_cost: payer.max_cost,
                };
                let reservation = match self.gate.reserve(&call).await {
                    Ok(r) => r,
                    // What to do about money is the caller's policy, not the next remote.
                    Err(refusal) => {
                        return Err(UpstreamError::Refused {
                            upstream: remote.name.clone(),
                            refusal,
                        })
                    }
                };
                let attempt_started = Instant::now();
                let result = self
                    .attempt(remote, &body, request, input_tokens, reservation)
                    .await;
                let latency = attempt_started.elapsed().as_secs_f64();
                match result {
                    Ok(body) => {
                        permit.success();
                        self.observe(&remote.name, "ok", latency);
                        return Ok(UpstreamReply {
                            upstream: remote.name.clone(),
                            elapsed: started.elapsed(),
                            body,
                        });
                    }
                    Err((error, retry_after)) => {
                        if error.is_upstream_failure() {
                            permit.failure(Instant::now());
                        } else {
                            permit.success();
                        }
                        self.observe(&remote.name, error.kind(), latency);
                        if let Some(m) = &self.metrics {
                            m.upstream_errors
                                .with_label_values(&[&remote.name, error.kind()])
                                .inc();
                        }
                        tracing::warn!(request_id, upstream = %remote.name, attempt, %error, "upstream attempt failed");
                        let retry = error.is_retryable() && attempt < remote.max_retries;
                        last = error;
                        if !retry {
                            break;
                        }
                        tokio::time::sleep(backoff(remote, attempt, retry_after)).await;
                        attempt += 1;
                    }
                }
            }
        }
        Err(last)
    }

    fn observe(&self, upstream: &str, outcome: &str, seconds: f64) {
        if let Some(m) = &self.metrics {
            m.upstream_latency
                .with_label_values(&[upstream, outcome])
                .observe(seconds);
        }
    }

    /// One attempt at one remote. The reservation is settled here, or handed
    /// to the stream, which settles it when it ends.
    async fn attempt(
        &self,
        remote: &Arc<RemoteConfig>,
        body: &Bytes,
        request: &CompletionRequest,
        input_tokens: u64,
        reservation: Reservation,
    ) -> Result<UpstreamBody, (UpstreamError, Option<Duration>)> {
        let (endpoint, stream) = (request.endpoint, request.stream);
        let settle = Settle::new(Arc::clone(&self.gate), reservation);
        let url = format!("{}{}", remote.base_url, endpoint.upstream_path());
        let mut builder = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        if let Some(key) = &remote.api_key {
            builder = match remote.auth {
                RemoteAuth::Bearer => builder.bearer_auth(key),
                RemoteAuth::ApiKey => builder.header("api-key", key),
            };
        }
        let name = || remote.name.clone();
        let timed_out = || (UpstreamError::Timeout { upstream: name() }, None);
        let deadline = tokio::time::Instant::now() + remote.timeout;
        let response = tokio::time::timeout_at(deadline, builder.send())
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| (transport_error(&remote.name, &e), None))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // The error body is only for the log line; do not wait long for it, nor read much.
            let read = read_limited(response, &remote.name, ERROR_BODY_LIMIT);
            let detail = tokio::time::timeout(Duration::from_millis(500), read)
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned())
                .unwrap_or_default();
            let error = UpstreamError::Status {
                upstream: name(),
                status: status.as_u16(),
                detail,
            };
            return Err((error, retry_after));
        }
        if stream {
            let mut events = UpstreamStream::new(
                name(),
                response.bytes_stream().boxed(),
                remote.timeout,
                remote.max_response_bytes,
                settle,
                input_tokens,
                self.metrics.clone(),
            );
            // Wait for the first event before answering the client: a stream
            // that breaks at once can still fall back to another upstream.
            let first = tokio::time::timeout_at(deadline, events.next())
                .await
                .map_err(|_| timed_out())?;
            if let Some(error) = events.failure.take() {
                return Err((error, None));
            }
            if let Some(first) = first {
                events.ready.push_front(first);
            }
            return Ok(UpstreamBody::Stream(Box::new(events)));
        }
        let read = read_limited(response, &remote.name, remote.max_response_bytes);
        let bytes = tokio::time::timeout_at(deadline, read)
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| (e, None))?;
        let probe: ResponseProbe = serde_json::from_slice(&bytes).map_err(|e| {
            (
                UpstreamError::Malformed {
                    upstream: name(),
                    detail: e.to_string(),
                },
                None,
            )
        })?;
        if probe.error.is_some() {
            let detail = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
            return Err((
                UpstreamError::Malformed {
                    upstream: name(),
                    detail,
                },
                None,
            ));
        }
        let billed = probe.usage.unwrap_or_else(|| RemoteUsage {
            prompt_tokens: input_tokens,
            completion_tokens: counted_output_tokens(
                probe.choices.len() as u64,
                probe.choices.iter().map(|c| c.text_len() as u64).sum(),
            ),
        });
        settle.finish(Settlement::Used(billed));
        Ok(UpstreamBody::Complete { bytes, billed })
    }
}

/// Most bytes of an error response read (for the log line).
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// A response body, refused as soon as it is known to exceed `limit` (by its Content-Length,
/// or while it arrives), so a hostile or broken remote cannot fill the gateway's memory.
async fn read_limited(
    response: reqwest::Response,
    upstream: &str,
    limit: usize,
) -> Result<Bytes, UpstreamError> {
    let too_large = || UpstreamError::TooLarge {
        upstream: upstream.to_string(),
        limit,
    };
    if response
        .content_length()
        .is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX))
    {
        return Err(too_large());
    }
    let mut body = BytesMut::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| transport_error(upstream, &e))?;
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn transport_error(upstream: &str, e: &reqwest::Error) -> UpstreamError {
    // reqwest's Display omits the cause (connection refused, reset, …).
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_connect() {
        UpstreamError::Connect {
            upstream: upstream.to_string(),
            detail,
        }
    } else if e.is_timeout() {
        UpstreamError::Timeout {
            upstream: upstream.to_string(),
        }
    } else {
        UpstreamError::Network {
            upstream: upstream.to_string(),
            detail,
        }
    }
}

/// Exponential backoff with jitter: a random delay in [d/2, d] where
/// d = base·2^attempt, capped; never shorter than the upstream's Retry-After
/// (itself capped, so a hostile value cannot stall the request).
fn backoff(remote: &RemoteConfig, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let exp = remote
        .backoff_base
        .saturating_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
        .min(remote.backoff_max);
    let half = exp / 2;
    let jittered = half + half.mul_f64(rand::rng().random::<f64>());
    retry_after.map_or(jittered, |r| jittered.max(r.min(remote.backoff_max)))
}

/// Settles a reservation exactly once: explicitly with what was used, or on drop as
/// failed (an attempt that produced no answer).
struct Settle {
    gate: Arc<dyn CallGate>,
    reservation: Option<Reservation>,
    settlement: Settlement,
}

impl Settle {
    fn new(gate: Arc<dyn CallGate>, reservation: Reservation) -> Self {
        Self {
            gate,
            reservation: Some(reservation),
            settlement: Settlement::Failed,
        }
    }

    fn finish(mut self, settlement: Settlement) {
        self.settlement = settlement;
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        let gate = Arc::clone(&self.gate);
        let settlement = self.settlement;
        // Settling may do I/O; it must not be lost when a client goes away,
        // so it runs as its own task.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { gate.settle(reservation, settlement).await });
        }
    }
}

/// A remote's server-sent events, forwarded event by event as they arrive.
///
/// Each event's JSON is checked and its usage noted. A stream that breaks,
/// stalls past the timeout, or sends malformed data ends with an OpenAI-style
/// error event and no `[DONE]`, so clients see the failure instead of a
/// silently truncated answer.
pub struct UpstreamStream {
    upstream: String,
    inner: BoxStream<'static, reqwest::Result<Bytes>>,
    buf: BytesMut,
    ready: VecDeque<Bytes>,
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    /// The largest event accepted; a longer one (or a buffer that grows past it without an
    /// event ending) fails the stream.
    max_event_bytes: usize,
    finished: bool,
    usage: Option<RemoteUsage>,
    /// Input tokens charged when the remote reports no usage.
    input_tokens: u64,
    /// Events that carried generated text, and its bytes, for counting without usage.
    text_events: u64,
    text_bytes: u64,
    failure: Option<UpstreamError>,
    failed: bool,
    settle: Option<Settle>,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Deserialize)]
struct ChunkProbe {
    #[serde(default)]
    usage: Option<RemoteUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    choices: Vec<ChoiceProbe>,
}

impl UpstreamStream {
    fn new(
        upstream: String,
        inner: BoxStream<'static, reqwest::Result<Bytes>>,
        idle_timeout: Duration,
        max_event_bytes: usize,
        settle: Settle,
        input_tokens: u64,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self {
            upstream,
            inner,
            buf: BytesMut::new(),
            ready: VecDeque::new(),
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            max_event_bytes,
            finished: false,
            usage: None,
            input_tokens,
            text_events: 0,
            text_bytes: 0,
            failure: None,
            failed: false,
            settle: Some(settle),
            metrics,
        }
    }

    /// The usage the remote reported in the stream, if it did.
    pub fn usage(&self) -> Option<RemoteUsage> {
        self.usage
    }

    /// What the stream is charged so far: the reported usage, else the estimated input
    /// and the output tokens counted from the text that arrived (a stream that breaks
    /// or that the client leaves was still generated, and billed, up to there). Nothing,
    /// when nothing billable arrived: the ledger and the budget settlement agree.
    pub fn billed(&self) -> RemoteUsage {
        match self.settlement() {
            Settlement::Used(usage) => usage,
            Settlement::Failed => RemoteUsage::default(),
        }
    }

    /// Nothing billable arrived (no text, no usage) is a failed attempt; anything else
    /// is charged as [`UpstreamStream::billed`].
    fn settlement(&self) -> Settlement {
        if self.usage.is_none() && self.text_events == 0 {
            Settlement::Failed
        } else {
            Settlement::Used(self.usage.unwrap_or(RemoteUsage {
                prompt_tokens: self.input_tokens,
                completion_tokens: counted_output_tokens(self.text_events, self.text_bytes),
            }))
        }
    }

    /// Whether the last event has been handed out.
    pub fn is_done(&self) -> bool {
        self.finished && self.ready.is_empty()
    }

    /// The stream ended with an error event.
    pub fn failed(&self) -> bool {
        self.failed
    }

    fn fail(&mut self, error: UpstreamError) {
        if let Some(m) = &self.metrics {
            m.upstream_errors
                .with_label_values(&[&self.upstream, error.kind()])
                .inc();
        }
        tracing::warn!(upstream = %self.upstream, %error, "upstream stream failed");
        self.ready
            .push_back(openai::sse_error(&error.to_string(), error.kind()));
        self.failure = Some(error);
        self.failed = true;
        self.end();
    }

    fn end(&mut self) {
        self.finished = true;
        if let Some(settle) = self.settle.take() {
            settle.finish(self.settlement());
        }
    }

    /// Checks one complete event and queues it for the client.
    fn inspect(&mut self, event: Bytes) {
        let mut data = Vec::new();
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(rest) = line.strip_prefix(b"data:") {
                if !data.is_empty() {
                    data.push(b'\n');
                }
                data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
            }
        }
        if data.is_empty() {
            // Comments and keep-alives carry no data; pass them on.
            self.ready.push_back(event);
            return;
        }
        if data.trim_ascii() == b"[DONE]" {
            self.ready.push_back(event);
            self.end();
            return;
        }
        match serde_json::from_slice::<ChunkProbe>(&data) {
            Ok(probe) => {
                if probe.usage.is_some() {
                    self.usage = probe.usage;
                }
                let text: usize = probe.choices.iter().map(ChoiceProbe::text_len).sum();
                if text > 0 {
                    self.text_events += 1;
                    self.text_bytes += text as u64;
                }
                let is_error = probe.error.is_some();
                self.ready.push_back(event);
                if is_error {
                    self.failed = true;
                    self.end();
                }
            }
            Err(e) => self.fail(UpstreamError::Malformed {
                upstream: self.upstream.clone(),
                detail: format!("bad stream event: {e}"),
            }),
        }
    }
}

impl Drop for UpstreamStream {
    fn drop(&mut self) {
        // A stream the client abandoned was generated, and billed, up to here.
        if let Some(settle) = self.settle.take() {
            settle.finish(self.settlement());
        }
    }
}

/// The end of the first complete event in `buf` (after its blank line).
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(pos) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + pos;
        let rest = &buf[nl + 1..];
        if rest.first() == Some(&b'\n') {
            return Some(nl + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        i = nl + 1;
    }
    None
}

impl Stream for UpstreamStream {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.ready.pop_front() {
                return Poll::Ready(Some(event));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            let end = event_end(&this.buf);
            if end.map_or(this.buf.len(), |e| e) > this.max_event_bytes {
                this.fail(UpstreamError::TooLarge {
                    upstream: this.upstream.clone(),
                    limit: this.max_event_bytes,
                });
                continue;
            }
            if let Some(end) = end {
                let event = this.buf.split_to(end).freeze();
                this.inspect(event);
                continue;
            }
            match this.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.buf.extend_from_slice(&chunk);
                    let deadline = tokio::time::Instant::now() + this.idle_timeout;
                    this.idle.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Err(e))) => {
                    let error = transport_error(&this.upstream, &e);
                    this.fail(error);
                }
                Poll::Ready(None) => this.fail(UpstreamError::Network {
                    upstream: this.upstream.clone(),
                    detail: "the stream ended before [DONE]".into(),
                }),
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        this.fail(UpstreamError::Timeout {
                            upstream: this.upstream.clone(),
                        });
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_end_at_a_blank_line_with_either_line_ending() {
        assert_eq!(event_end(b"data: {}\n\ndata: x"), Some(10));
        assert_eq!(event_end(b"data: {}\r\n\r\n"), Some(12));
        assert_eq!(event_end(b"data: {}\n"), None);
    }

    #[test]
    fn retries_only_transient_failures() {
        let status = |s| UpstreamError::Status {
            upstream: "u".into(),
            status: s,
            detail: String::new(),
        };
        assert!(status(500).is_retryable());
        assert!(status(429).is_retryable());
        assert!(!status(400).is_retryable());
        assert!(UpstreamError::Connect {
            upstream: "u".into(),
            detail: String::new()
        }
        .is_retryable());
        assert!(!UpstreamError::Timeout {
            upstream: "u".into()
        }
        .is_retryable());
        assert!(!UpstreamError::Malformed {
            upstream: "u".into(),
            detail: String::new()
        }
        .is_retryable());
    }

    #[test]
    fn backoff_grows_exponentially_within_jitter_and_cap() {
        let remote = RemoteConfig {
            name: "u".into(),
            model: "m".into(),
            base_url: "http://x".into(),
            api_key: None,
            api_key_env: None,
            auth: RemoteAuth::Bearer,
            timeout: Duration::from_secs(1),
            max_retries: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
            max_response_bytes: 1 << 20,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(10),
        };
        for _ in 0..50 {
            let d0 = backoff(&remote, 0, None);
            assert!(
                d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100),
                "{d0:?}"
            );
            let d2 = backoff(&remote, 2, None);
            assert!(
                d2 >= Duration::from_millis(200) && d2 <= Duration::from_millis(400),
                "{d2:?}"
            );
            let d9 = backoff(&remote, 9, None);
            assert!(d9 <= Duration::from_millis(1000), "{d9:?}");
            let honoured = backoff(&remote, 0, Some(Duration::from_secs(1)));
            assert_eq!(honoured, Duration::from_millis(1000));
        }
    }
}
