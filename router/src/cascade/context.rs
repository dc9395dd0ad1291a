//! What is known about one request as it goes through the gateway: the
//! record a ledger will store, and the source of its metrics.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::cascade::local::LocalRun;
use crate::cascade::signals::{self, Aggregate};
use crate::error::ApiError;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::openai::Endpoint;
use crate::storage::{EncodedSignals, LedgerRecord};
use crate::upstream::RemoteUsage;
use policies::decision::{Reason, Route};
use policies::{NanoUsd, Policies, Policy, SignalLog};

/// The routing policy of one request and its fallback chain (indices into the upstreams).
#[derive(Debug, Clone)]
pub struct RequestPolicy {
    /// The caller's policy (team ⊕ key ⊕ variant), or the gateway's `[policy]`.
    pub policy: Policy,
    /// The gateway's bound on the local queue's expected wait (`[policy].max_queue_wait_ms`).
    pub max_queue_wait: Option<std::time::Duration>,
    pub chain: Vec<usize>,
}

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
    pub policy: Option<Arc<RequestPolicy>>,
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
    /// Which confidence signals of a local answer the caller's policy keeps (`log_signals`).
    pub log_signals: SignalLog,
    /// The local answer's signals as kept, once the local model has answered.
    pub signals: Option<EncodedSignals>,
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
            log_signals: SignalLog::None,
            signals: None,
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
        let record = self.ledger_record(&ledger.policies());
        match ledger.write(record).await {
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

    /// The request's ledger record as it stands now, costed at `policies`' prices (the
    /// one place a record is built: commit and the detached write of a departed client).
    pub fn ledger_record(&self, policies: &Policies) -> LedgerRecord {
        let ctx = self;
        let local_cost = if ctx.local_ran {
            policies.local_cost(
                ctx.local_prompt_tokens as u64,
                ctx.local_completion_tokens as u64,
            )
        } else {
            NanoUsd::ZERO
        };
        let remote_cost = match (&ctx.upstream, ctx.remote_billed) {
            (Some(upstream), Some(billed)) => {
                policies.remote_cost(upstream, billed.prompt_tokens, billed.completion_tokens)
            }
            _ => NanoUsd::ZERO,
        };
        let status = if ctx.stream_failed { 502 } else { ctx.status };
        let route = match ctx.route {
            _ if status >= 400 && !ctx.stream_failed => "rejected",
            Some(route) => route.as_str(),
            None => "rejected",
        };
        let local_tokens = if ctx.local_ran {
            (ctx.local_prompt_tokens + ctx.local_completion_tokens) as u64
        } else {
            0
        };
        LedgerRecord {
            id: ctx.id.clone(),
            created_unix_ms: crate::clock::unix_ms(ctx.received_at),
            team: ctx.team.clone(),
            key_id: ctx.key_id.clone(),
            experiment: ctx.experiment.clone(),
            variant: ctx.variant.clone(),
            route: route.to_string(),
            reason: ctx.reason.map_or_else(
                || ctx.error_code.unwrap_or("none").to_string(),
                |r| r.as_str().to_string(),
            ),
            confidence: ctx.confidence,
            confidence_aggregate: ctx.confidence.and(ctx.aggregate_name.clone()),
            local_tokens,
            remote_model: ctx.upstream.clone(),
            remote_input_tokens: ctx.remote_billed.map_or(0, |u| u.prompt_tokens),
            remote_output_tokens: ctx.remote_billed.map_or(0, |u| u.completion_tokens),
            cost_nanos: remote_cost.saturating_add(local_cost).0,
            latency_ms: u64::try_from(ctx.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            status,
            prompt_text: ctx.prompt_text.clone(),
            overrun_nanos: ctx
                .remote_reserved
                .map_or(0, |reserved| remote_cost.0.saturating_sub(reserved.0)),
            signals: ctx.signals.clone(),
        }
    }

    /// Notes a finished local run: what it cost, how long it waited and ran, its confidence
    /// under `aggregate`; and counts it in the metrics. The one place for a cascade run and a
    /// live local stream alike.
    pub fn note_local_run(&mut self, aggregate: &Aggregate, run: &LocalRun, metrics: &Metrics) {
        let generation = &run.output.generation;
        self.local_ran = true;
        self.aggregate_name = Some(aggregate.name());
        self.local_time += run.elapsed;
        self.local_queue_wait =
            Duration::from_secs_f64(generation.timings.queue_ms.max(0.0) / 1000.0);
        self.local_prompt_tokens = generation.usage.prompt_tokens;
        self.local_completion_tokens = generation.usage.completion_tokens;
        // Built once: scored here, and kept when the policy keeps signals.
        let token_signals = signals::signals(&generation.tokens);
        self.confidence = signals::score_generation(aggregate, &token_signals, generation);
        if self.log_signals.tokens() {
            let hidden = generation
                .probe
                .as_deref()
                .filter(|_| self.log_signals.hidden());
            self.signals = Some(EncodedSignals::encode(&token_signals, hidden));
        }
        observe_local(metrics, run);
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
            let record = self.ledger_record(&ledger.policies());
            ledger.write_detached(record);
        }
    }
}

fn observe_local(metrics: &Metrics, run: &LocalRun) {
    let generation = &run.output.generation;
    let tokens = generation.usage.completion_tokens as u64;
    metrics.local_tokens.inc_by(tokens);
    metrics
        .local_queue_wait
        .observe(generation.timings.queue_ms.max(0.0) / 1000.0);
    metrics.local_time_to_first_token.observe(
        (generation.timings.queue_ms.max(0.0) + generation.timings.prefill_ms.max(0.0)) / 1000.0,
    );
    let decode_s = (generation.timings.prefill_ms + generation.timings.decode_ms) / 1000.0;
    if tokens > 0 && decode_s > 0.0 {
        metrics
            .local_tokens_per_second
            .observe(tokens as f64 / decode_s);
    }
}
