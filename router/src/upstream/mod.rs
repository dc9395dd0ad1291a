//! The one client through which every paid call to a remote model passes: first tries and
//! retries, streamed or not. The cascade calls it once per remote of its chain, asking the
//! budget before each (so a fallback is a new call here, through the same gate).
//!
//! Keeping them in one place is what lets a budget gate (reserve before the
//! call, settle with the real usage after) be inserted once and cover every
//! path; see [`CallGate`].

pub mod breaker;
pub mod error;
pub mod gate;
pub mod stream;

pub use error::UpstreamError;
pub use gate::{
    CallGate, GateRefusal, OpenGate, PaidCall, Payer, RemoteUsage, Reservation, Settlement,
};
use stream::Settle;
pub use stream::UpstreamStream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rand::Rng;
use serde::Deserialize;

use crate::config::{RemoteAuth, RemoteConfig};
use crate::metrics::Metrics;
use crate::openai::{self, CompletionRequest};
use crate::upstream::breaker::Breaker;

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
pub(crate) struct ChoiceProbe {
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
    pub(crate) fn text_len(&self) -> usize {
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
pub(crate) fn counted_output_tokens(text_events: u64, text_bytes: u64) -> u64 {
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

    /// Sends `request` to the remote at index `remote`, retrying on transient failures;
    /// returns its answer or its last failure. A remote whose circuit breaker is open is
    /// not called and nothing is reserved. Falling back to another remote is the caller's
    /// decision (the cascade asks the budget before each one).
    pub async fn call(
        &self,
        remote: usize,
        payer: Payer<'_>,
        request: &CompletionRequest,
        input_tokens: u64,
    ) -> Result<UpstreamReply, UpstreamError> {
        let request_id = payer.request_id;
        let started = Instant::now();
        let (Some(remote), Some(breaker)) = (self.remotes.get(remote), self.breakers.get(remote))
        else {
            return Err(UpstreamError::NoRemote);
        };
        let mut last = UpstreamError::NoRemote;
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

pub(crate) fn transport_error(upstream: &str, e: &reqwest::Error) -> UpstreamError {
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

#[cfg(test)]
mod tests {
    use super::stream::event_end;
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
