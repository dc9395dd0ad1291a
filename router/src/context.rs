//! What is known about one request as it goes through the gateway: the
//! record a ledger will store, and the source of its metrics.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::error::ApiError;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::openai::Endpoint;
use crate::upstream::RemoteUsage;
use policies::decision::{Reason, Route};

/// One request's facts. Its ledger record is committed with [`RequestContext::commit`]
/// before the response completes (or, for a client that went away, when the context is
/// dropped); its metrics are recorded exactly once when it is dropped.
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
    /// Why a local answer was served instead of the remote one the policy wanted
    /// (`remote-unavailable`, `budget-exhausted`): the `x-cascade-degraded` header.
    pub degraded: Option<&'static str>,
    /// The remote that answered.
    pub upstream: Option<String>,
    /// The local model generated (so its compute is charged).
    pub local_ran: bool,
    pub local_prompt_tokens: usize,
    pub local_completion_tokens: usize,
    /// What the answering remote call was charged: its reported usage, or the gateway's
    /// count when it reported none.
    pub remote_billed: Option<RemoteUsage>,
    /// The worst-case cost reserved for the answering remote call: what it billed beyond
    /// this is recorded as an overrun.
    pub remote_reserved: Option<policies::NanoUsd>,
    /// The name of the aggregate behind `confidence`.
    pub aggregate_name: Option<String>,
    /// The error code of a failed request.
    pub error_code: Option<&'static str>,
    /// The prompt, kept only when the caller's policy sets `log_prompts`.
    pub prompt_text: Option<String>,
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
    ledger: Option<Arc<Ledger>>,
    committed: bool,
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
            degraded: None,
            upstream: None,
            local_ran: false,
            local_prompt_tokens: 0,
            local_completion_tokens: 0,
            remote_billed: None,
            remote_reserved: None,
            aggregate_name: None,
            error_code: None,
            prompt_text: None,
            local_time: Duration::ZERO,
            local_queue_wait: Duration::ZERO,
            upstream_time: Duration::ZERO,
            time_to_response: None,
            overhead: None,
            status: 499,
            stream_failed: false,
            metrics,
            ledger: None,
            committed: false,
        }
    }

    /// From now on this request gets a ledger record.
    pub fn keep_in(&mut self, ledger: Arc<Ledger>) {
        self.ledger = Some(ledger);
    }

    /// Commits the ledger record (once) and returns when it is durable (in the database, or
    /// in the spool while the database refuses it). A failed write is logged and counted;
    /// it fails the request only when the ledger fails closed (`storage.on_ledger_failure =
    /// "fail_closed"`): then the caller must not send the answer.
    pub async fn commit(&mut self) -> Result<(), ApiError> {
        if self.committed {
            return Ok(());
        }
        let Some(ledger) = self.ledger.clone() else {
            return Ok(());
        };
        self.committed = true;
        match ledger.commit(self).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!(request_id = %self.id, error = %e, "ledger record not written");
                if ledger.fails_closed() {
                    Err(ApiError::LedgerUnavailable)
                } else {
                    Ok(())
                }
            }
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
        // Not committed: the client went away before the response completed. The record
        // is still written (what was spent stays accounted for), just not awaited.
        if let Some(ledger) = self.ledger.take().filter(|_| !self.committed) {
            let record = ledger.record_of(self);
            ledger.write_detached(record);
        }
    }
}
