//! What is known about one request as it goes through the gateway: the
//! record a ledger will store, and the source of its metrics.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::metrics::Metrics;
use crate::openai::Endpoint;
use crate::routing::{Reason, Route};

/// One request's facts, recorded exactly once when it is dropped: after the
/// response (or the last streamed chunk) went out, or when the client went
/// away first.
pub struct RequestContext {
    pub id: String,
    pub received_at: SystemTime,
    pub started: Instant,
    pub endpoint: Endpoint,
    /// The model the client asked for.
    pub model: String,
    /// The team and key id of the caller; `None` when no teams are configured.
    pub team: Option<String>,
    pub key_id: Option<String>,
    /// The experiment the request is enrolled in, and its variant.
    pub experiment: Option<String>,
    pub variant: Option<String>,
    /// The caller's policy; `None` uses the gateway's `[policy]`.
    pub policy: Option<Arc<crate::gateway::RequestPolicy>>,
    pub route: Option<Route>,
    pub reason: Option<Reason>,
    /// The local generation's aggregate score, when one was computed.
    pub confidence: Option<f64>,
    /// The cascade escalated (not a client-chosen remote).
    pub escalated: bool,
    /// A local answer served because every remote failed.
    pub degraded: bool,
    /// The remote that answered.
    pub upstream: Option<String>,
    pub local_prompt_tokens: usize,
    pub local_completion_tokens: usize,
    pub remote_prompt_tokens: Option<u64>,
    pub remote_completion_tokens: Option<u64>,
    /// Time waiting for and running the local model.
    pub local_time: Duration,
    pub local_queue_wait: Duration,
    /// Time waiting for remotes, every attempt included.
    pub upstream_time: Duration,
    /// Time from arrival until the response (or its headers) was ready.
    pub time_to_response: Option<Duration>,
    /// Of that, the time not spent waiting for a model.
    pub overhead: Option<Duration>,
    /// HTTP status; 499 until a response is produced (client went away).
    pub status: u16,
    /// A streamed response that ended with an error event.
    pub stream_failed: bool,
    metrics: Option<Arc<Metrics>>,
}

impl RequestContext {
    /// A new context for a request that just arrived.
    pub fn new(id: String, endpoint: Endpoint, metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            id,
            received_at: SystemTime::now(),
            started: Instant::now(),
            endpoint,
            model: String::new(),
            team: None,
            key_id: None,
            experiment: None,
            variant: None,
            policy: None,
            route: None,
            reason: None,
            confidence: None,
            escalated: false,
            degraded: false,
            upstream: None,
            local_prompt_tokens: 0,
            local_completion_tokens: 0,
            remote_prompt_tokens: None,
            remote_completion_tokens: None,
            local_time: Duration::ZERO,
            local_queue_wait: Duration::ZERO,
            upstream_time: Duration::ZERO,
            time_to_response: None,
            overhead: None,
            status: 499,
            stream_failed: false,
            metrics,
        }
    }

    /// Marks the moment the response (or its headers, when streamed) is
    /// ready, and how much of the time so far was the gateway's own.
    pub fn response_ready(&mut self, status: u16) {
        self.status = status;
        let elapsed = self.started.elapsed();
        self.time_to_response = Some(elapsed);
        // Measured now: a live local stream's generation time comes later
        // and is no part of the time to its headers.
        self.overhead = Some(
            elapsed
                .saturating_sub(self.local_time)
                .saturating_sub(self.upstream_time),
        );
    }

    fn record(&self, metrics: &Metrics) {
        let route = self.route.map_or("none", Route::as_str);
        let reason = self.reason.map_or("none", Reason::as_str);
        let status = if self.stream_failed {
            "stream_error".to_string()
        } else {
            self.status.to_string()
        };
        metrics
            .requests
            .with_label_values(&[self.endpoint.as_str(), route, reason, &status])
            .inc();
        if self.escalated {
            metrics.escalations.with_label_values(&[reason]).inc();
        }
        if let Some(c) = self.confidence {
            metrics.confidence.observe(c);
        }
        if let Some(overhead) = self.overhead {
            metrics.gateway_overhead.observe(overhead.as_secs_f64());
        }
    }
}

impl Drop for RequestContext {
    fn drop(&mut self) {
        if let Some(metrics) = self.metrics.take() {
            self.record(&metrics);
        }
    }
}
