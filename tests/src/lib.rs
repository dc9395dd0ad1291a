//! A mock OpenAI-compatible upstream, shared by the end-to-end tests and the
//! benchmarks: a real HTTP server on 127.0.0.1 that answers
//! `/v1/chat/completions` and `/v1/completions`, streamed or not, after a
//! fixed delay, and fails on demand.
//!
//! A fault is chosen per request, first match wins: the `x-mock-fault`
//! header, a model named `mock-fault-<fault>`, the queue filled with
//! [`MockUpstream::push_faults`], then the default set with
//! [`MockUpstream::set_fault`]. Faults: an HTTP status (`500`, `429`, …),
//! `retry-after-<s>` (429 with that `Retry-After`), `timeout` (never answers),
//! `stall` (headers, then nothing), `stall-midway` (part of the body, then
//! nothing), `cut` (the connection drops mid-body), `malformed` (invalid JSON
//! with status 200), `oversized` (a valid answer of [`OVERSIZED_BYTES`]).
//!
//! Faults below HTTP have their own servers: [`ResetServer`] resets every
//! connection, and [`TcpProxy`] forwards to a real server (a database) until
//! it is told to cut every connection and refuse new ones.

pub mod fixtures;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The start of every answer the mock gives.
pub const ANSWER_PREFIX: &str = "Mock answer from";

/// The size of the text of an `oversized` answer (and of its one streamed event).
pub const OVERSIZED_BYTES: usize = 1024 * 1024;

/// A failure the mock can be told to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and an OpenAI error body (no `Retry-After`).
    Status(u16),
    /// Answer 429 with `Retry-After: <seconds>`.
    RetryAfter(u64),
    /// Never answer.
    Timeout,
    /// Send the headers (200), then nothing: the first byte of the body never comes.
    Stall,
    /// Send part of the body (a few stream events), then nothing.
    StallMidway,
    /// A valid answer whose text is [`OVERSIZED_BYTES`] long (streamed: in one event).
    Oversized,
    /// Start the body, then drop the connection.
    Cut,
    /// Status 200 with a body (or stream event) that is not valid JSON.
    Malformed,
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "timeout" => Ok(Fault::Timeout),
            "stall" => Ok(Fault::Stall),
            "stall-midway" => Ok(Fault::StallMidway),
            "oversized" => Ok(Fault::Oversized),
            other if other.starts_with("retry-after-") => other["retry-after-".len()..]
                .parse()
                .map(Fault::RetryAfter)
                .map_err(|_| format!("unknown fault `{other}`")),
            "cut" => Ok(Fault::Cut),
            "malformed" => Ok(Fault::Malformed),
            other => other
                .parse::<u16>()
                .ok()
                .filter(|s| (100..600).contains(s))
                .map(Fault::Status)
                .ok_or_else(|| format!("unknown fault `{other}`")),
        }
    }
}

/// Timing of the mock's answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct MockOptions {
    /// Wait before answering (before the first byte when streaming).
    pub delay: Duration,
    /// Wait between stream events.
    pub chunk_delay: Duration,
    /// Report usage as the most output the request allows: `max_tokens` (or
    /// `max_completion_tokens`; [`UNLIMITED_OUTPUT_TOKENS`] when neither is set) for each of
    /// `max(n, best_of)` sequences of each prompt, as a provider billing the worst case
    /// would; the input as the request body's byte count.
    pub bill_max_output: bool,
}

/// Output tokens a `bill_max_output` mock bills per sequence when the request sets no limit:
/// a provider that is not told a limit may generate far more than the gateway assumed.
pub const UNLIMITED_OUTPUT_TOKENS: u64 = 100_000;

/// The usage a `bill_max_output` mock reports for `request` (of `body_bytes` bytes).
pub fn max_billed_usage(request: &Value, body_bytes: usize) -> (u64, u64) {
    let count = |key: &str| request.get(key).and_then(Value::as_u64);
    let per_sequence = count("max_tokens")
        .or_else(|| count("max_completion_tokens"))
        .unwrap_or(UNLIMITED_OUTPUT_TOKENS);
    let sequences = count("n").unwrap_or(1).max(count("best_of").unwrap_or(1));
    let prompts = match request.get("prompt") {
        Some(Value::Array(items)) => items.len().max(1) as u64,
        _ => 1,
    };
    (body_bytes as u64, per_sequence * sequences.max(1) * prompts)
}

/// A request the mock received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
    /// The body's size as received.
    pub bytes: usize,
    /// Whether the mock answered it (no fault): a provider bills these only.
    pub answered: bool,
}

/// Shared state of one mock server.
#[derive(Default)]
pub struct MockState {
    options: Mutex<MockOptions>,
    queued: Mutex<VecDeque<Fault>>,
    default_fault: Mutex<Option<Fault>>,
    requests: Mutex<Vec<RecordedRequest>>,
    count: AtomicUsize,
    /// Requests being answered right now.
    in_flight: AtomicUsize,
    /// Whether to keep a copy of each request (off in benchmarks).
    record: bool,
}

impl MockState {
    fn next_fault(&self, headers: &HeaderMap, model: &str) -> Option<Fault> {
        if let Some(f) = headers.get("x-mock-fault").and_then(|v| v.to_str().ok()) {
            return f.parse().ok();
        }
        if let Some(f) = model.strip_prefix("mock-fault-") {
            return f.parse().ok();
        }
        if let Some(f) = lock(&self.queued).pop_front() {
            return Some(f);
        }
        *lock(&self.default_fault)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A test that panicked while holding the lock must not hide the mock's state.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running mock upstream.
pub struct MockUpstream {
    pub addr: SocketAddr,
    state: Arc<MockState>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl MockUpstream {
    /// Starts a mock on 127.0.0.1 with a free port, recording requests.
    pub async fn start(options: MockOptions) -> std::io::Result<Self> {
        Self::start_on(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            options,
            true,
        )
        .await
    }

    /// Starts a mock on `addr`; `record` keeps a copy of every request.
    pub async fn start_on(
        addr: SocketAddr,
        options: MockOptions,
        record: bool,
    ) -> std::io::Result<Self> {
        let state = Arc::new(MockState {
            options: Mutex::new(options),
            record,
            ..MockState::default()
        });
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (shutdown, signal) = oneshot::channel::<()>();
        let app = router(Arc::clone(&state));
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = signal.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            state,
            shutdown: Some(shutdown),
        })
    }

    /// The OpenAI base URL, e.g. `http://127.0.0.1:1234/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The next requests fail with these faults, one each, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.state.queued).extend(faults);
    }

    /// Every request (after the queued faults) fails this way; `None` heals.
    pub fn set_fault(&self, fault: Option<Fault>) {
        *lock(&self.state.default_fault) = fault;
    }

    /// Changes the timing of later answers.
    pub fn set_options(&self, options: MockOptions) {
        *lock(&self.state.options) = options;
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// Number of requests received so far.
    pub fn request_count(&self) -> usize {
        self.state.count.load(Ordering::Relaxed)
    }

    /// Requests being answered right now (a caller that went away ends its own).
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::Relaxed)
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The mock's routes.
pub fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .with_state(state)
}

/// A mock state with these options, for binaries that build their own server.
pub fn state(options: MockOptions, record: bool) -> Arc<MockState> {
    Arc::new(MockState {
        options: Mutex::new(options),
        record,
        ..MockState::default()
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(state, Kind::Chat, headers, body).await
}

async fn completions(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(state, Kind::Completion, headers, body).await
}

async fn models() -> Response {
    Json(json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}]}))
        .into_response()
}

fn error_body(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        Json(json!({"error": {"message": message, "type": "mock_error", "param": null, "code": null}})),
    )
        .into_response()
}

/// A body that never sends another byte.
fn never() -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures::stream::pending()
}

/// Counts a request as in flight until dropped, so a caller that goes away
/// (which drops the handler) is seen.
struct InFlight(Arc<MockState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn answer(state: Arc<MockState>, kind: Kind, headers: HeaderMap, body: Bytes) -> Response {
    state.count.fetch_add(1, Ordering::Relaxed);
    state.in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(Arc::clone(&state));
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error_body(400, &format!("invalid JSON: {e}")),
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_string();
    let fault = state.next_fault(&headers, &model);
    if state.record {
        lock(&state.requests).push(RecordedRequest {
            path: match kind {
                Kind::Chat => "/v1/chat/completions".into(),
                Kind::Completion => "/v1/completions".into(),
            },
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: request.clone(),
            bytes: body.len(),
            answered: fault.is_none(),
        });
    }
    let options = *lock(&state.options);
    if fault == Some(Fault::Timeout) {
        // Never answer; the client's timeout (or disconnect) ends this.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if !options.delay.is_zero() {
        tokio::time::sleep(options.delay).await;
    }
    if let Some(Fault::Status(status)) = fault {
        return error_body(status, &format!("mock failure {status}"));
    }
    if let Some(Fault::RetryAfter(seconds)) = fault {
        let mut response = error_body(429, "mock rate limit");
        response
            .headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from(seconds));
        return response;
    }
    let prompt_text = prompt_text(kind, &request);
    let mut text = format!(
        "{ANSWER_PREFIX} {model} to: {}",
        prompt_text.chars().take(60).collect::<String>()
    );
    if fault == Some(Fault::Oversized) {
        text.push(' ');
        text.push_str(&"x".repeat(OVERSIZED_BYTES));
    }
    let (prompt_tokens, completion_tokens) = if options.bill_max_output {
        max_billed_usage(&request, body.len())
    } else {
        (
            prompt_text.split_whitespace().count() as u64,
            text.split_whitespace().count() as u64,
        )
    };
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if stream {
        return stream_answer(
            kind,
            &model,
            &text,
            usage,
            include_usage,
            fault,
            options.chunk_delay,
        );
    }
    let body = match kind {
        Kind::Chat => json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage,
        }),
        Kind::Completion => json!({
            "id": "cmpl-mock",
            "object": "text_completion",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage,
        }),
    };
    let bytes = Bytes::from(body.to_string());
    match fault {
        Some(Fault::Stall) => {
            let mut response = Response::new(Body::from_stream(never()));
            set_json(&mut response);
            response
        }
        Some(Fault::StallMidway) => {
            let half = bytes.slice(..bytes.len() / 2);
            let body = futures::stream::once(async move { Ok(half) }).chain(never());
            let mut response = Response::new(Body::from_stream(body));
            set_json(&mut response);
            response
        }
        Some(Fault::Malformed) => json_response(Bytes::from_static(
            b"{\"id\": \"chatcmpl-mock\", \"choices\": [",
        )),
        Some(Fault::Cut) => {
            let half = bytes.slice(..bytes.len() / 2);
            let parts: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(half),
                Err(std::io::Error::other("mock cut the connection")),
            ];
            let mut response = Response::new(Body::from_stream(futures::stream::iter(parts)));
            set_json(&mut response);
            response
        }
        _ => json_response(bytes),
    }
}

fn json_response(bytes: Bytes) -> Response {
    let mut response = Response::new(Body::from(bytes));
    set_json(&mut response);
    response
}

fn set_json(response: &mut Response) {
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
}

fn prompt_text(kind: Kind, request: &Value) -> String {
    match kind {
        Kind::Chat => request
            .get("messages")
            .and_then(Value::as_array)
            .and_then(|m| {
                m.iter()
                    .rev()
                    .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            })
            .and_then(|m| m.get("content"))
            .map(|c| match c {
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => String::new(),
            })
            .unwrap_or_default(),
        Kind::Completion => match request.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        },
    }
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn stream_answer(
    kind: Kind,
    model: &str,
    text: &str,
    usage: Value,
    include_usage: bool,
    fault: Option<Fault>,
    chunk_delay: Duration,
) -> Response {
    let chunk = |delta: Option<&str>, finish: Option<&str>| -> Value {
        let choice = match kind {
            Kind::Chat => {
                let delta = match delta {
                    Some(d) => json!({"content": d}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        let object = if kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({"id": "chatcmpl-mock", "object": object, "created": 1, "model": model, "choices": [choice]})
    };
    let mut events: Vec<Result<Bytes, std::io::Error>> = Vec::new();
    if kind == Kind::Chat {
        let mut first = chunk(Some(""), None);
        first["choices"][0]["delta"]["role"] = json!("assistant");
        events.push(Ok(sse(&first)));
    }
    let words: Vec<&str> = if fault == Some(Fault::Oversized) {
        // The whole text in one event, so that one event is over any limit.
        vec![text]
    } else if fault == Some(Fault::Stall) {
        events.clear();
        Vec::new()
    } else {
        text.split_inclusive(' ').collect()
    };
    for (i, word) in words.iter().enumerate() {
        if fault == Some(Fault::StallMidway) && i == 2 {
            break;
        }
        if fault == Some(Fault::Cut) && i == 2 {
            events.push(Err(std::io::Error::other("mock cut the stream")));
            break;
        }
        if fault == Some(Fault::Malformed) && i == 2 {
            events.push(Ok(Bytes::from_static(b"data: {\"id\": oops\n\n")));
            break;
        }
        events.push(Ok(sse(&chunk(Some(word), None))));
    }
    let completes = matches!(fault, None | Some(Fault::Oversized));
    if completes {
        events.push(Ok(sse(&chunk(None, Some("stop")))));
        if include_usage {
            let object = if kind == Kind::Chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            events.push(Ok(sse(&json!({
                "id": "chatcmpl-mock", "object": object, "created": 1, "model": model, "choices": [], "usage": usage,
            }))));
        }
        events.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    }
    let stalls = matches!(fault, Some(Fault::Stall | Fault::StallMidway));
    let body = futures::stream::iter(events)
        .then(move |event| async move {
            if !chunk_delay.is_zero() {
                tokio::time::sleep(chunk_delay).await;
            }
            event
        })
        .chain(futures::stream::iter(stalls.then(never)).flatten());
    let mut response = Response::new(Body::from_stream(body));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// A server that accepts each connection, reads the request, and resets the connection (RST,
/// not a clean close): a remote that crashes while answering.
pub struct ResetServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ResetServer {
    /// Starts on 127.0.0.1 with a free port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        tokio::io::AsyncReadExt::read(&mut socket, &mut buf),
                    )
                    .await;
                    // Linger 0: closing sends RST instead of FIN.
                    #[allow(deprecated)]
                    let _ = socket.set_linger(Some(Duration::ZERO));
                    drop(socket);
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// The OpenAI base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for ResetServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy to a real server (a database) that can be cut: while down, every connection
/// through it is closed and new ones are closed as soon as they are accepted, as if the
/// server had become unreachable; up again, it forwards as before.
pub struct TcpProxy {
    pub addr: SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy on 127.0.0.1 with a free port, forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (accept_up, accept_connections) = (Arc::clone(&up), Arc::clone(&connections));
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accept_up.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let forward = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                lock(&accept_connections).push(forward);
            }
        });
        Ok(Self {
            addr,
            up,
            connections,
            task,
        })
    }

    /// Cuts every connection and refuses new ones (`false`), or forwards again (`true`).
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for connection in lock(&self.connections).drain(..) {
                connection.abort();
            }
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.set_up(false);
        self.task.abort();
    }
}
