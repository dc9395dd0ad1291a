//! The cascade itself: pick a target for a request, run the local model,
//! judge its answer, escalate, and fall back as the policy says. HTTP-free:
//! handlers call [`Gateway::complete`] and turn its [`Reply`] into a response.

pub mod context;
pub mod local;
pub mod reply;
pub mod signals;

pub use reply::{BodyStream, Reply};

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use local_model::{GenerateError, Prompt, WorkerError};
use tokio::sync::mpsc;

use crate::budget::{estimate_cost, input_token_estimate};
use crate::cascade::context::RequestContext;
pub use crate::cascade::context::RequestPolicy;
use crate::cascade::local::{LiveEvent, LocalEngine, LocalRun, RunOptions};
use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::openai::{self, ChunkWriter, CompletionRequest, LocalAnswer};
use crate::reload::{self, SharedPolicies};
use crate::upstream::{CallGate, GateRefusal, Payer, UpstreamBody, UpstreamError, Upstreams};
use policies::decision::{
    self as verdict, Addressed, LocalOutcome, PreRoute, Reason, RemoteFailureDecision, Route,
};
use policies::decision::{BudgetDecision, BudgetView, RemoteCandidate};
use policies::{OverloadAction, Policy};
use signals::Aggregate;

/// The gateway's shared state.
pub struct Gateway {
    model_name: String,
    local_name: String,
    /// The gateway's `[policy]`: for every request when no teams are configured.
    plan: reload::Live<RequestPolicy>,
    local: OnceLock<LocalEngine>,
    upstreams: Upstreams,
    metrics: Arc<Metrics>,
    /// Price tables, for the cost estimates of budget decisions.
    policies: SharedPolicies,
}

impl Gateway {
    /// Builds the gateway; the local model is attached later with
    /// [`Gateway::attach_local`] once it has loaded.
    pub fn new(
        config: &Config,
        policies: SharedPolicies,
        gate: Arc<dyn CallGate>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, UpstreamError> {
        let upstreams = Upstreams::new(config.remotes.clone(), gate, Some(Arc::clone(&metrics)))?;
        let chain = config
            .policy_remotes
            .iter()
            .filter_map(|name| upstreams.find(name))
            .collect();
        Ok(Self {
            model_name: config.server.model_name.clone(),
            local_name: config.local.name.clone(),
            plan: reload::Live::new(RequestPolicy {
                policy: config.policy.clone(),
                max_queue_wait: config.max_queue_wait,
                chain,
            }),
            local: OnceLock::new(),
            upstreams,
            metrics,
            policies,
        })
    }

    /// Takes the `[policy]` of a reloaded configuration (its remotes must be the running
    /// ones: `AppState::reload` checks).
    pub fn reload(&self, config: &Config) {
        let chain = config
            .policy_remotes
            .iter()
            .filter_map(|name| self.upstreams.find(name))
            .collect();
        self.plan.store(RequestPolicy {
            policy: config.policy.clone(),
            max_queue_wait: config.max_queue_wait,
            chain,
        });
    }

    /// The policy of a request: its caller's, else the gateway's `[policy]`.
    fn plan(&self, ctx: &RequestContext) -> Arc<RequestPolicy> {
        ctx.policy.clone().unwrap_or_else(|| self.plan.load())
    }

    /// A team, key or variant policy in the terms the gateway routes by. Remotes it names that
    /// are not configured are skipped (start-up checks the team policies themselves).
    pub fn request_policy(&self, p: &Policy) -> RequestPolicy {
        // A local_only policy calls no remote, whatever `remotes` it lists (start-up warns).
        let chain = if p.local_only() {
            Vec::new()
        } else {
            p.remotes()
                .iter()
                .filter_map(|name| self.upstreams.find(name))
                .collect()
        };
        RequestPolicy {
            policy: p.clone(),
            // Not a team setting: the local queue is the gateway's.
            max_queue_wait: self.plan.load().max_queue_wait,
            chain,
        }
    }

    /// Makes the local model available; only the first call has an effect.
    pub fn attach_local(&self, engine: LocalEngine) {
        let _ = self.local.set(engine);
    }

    /// Whether the local model is loaded.
    pub fn ready(&self) -> bool {
        self.local.get().is_some()
    }

    /// The model names clients can use: the cascade, then (when the policy
    /// allows addressing them) the local model and each remote.
    pub fn model_names(&self) -> Vec<(String, &'static str)> {
        let mut names = vec![(self.model_name.clone(), "cascade")];
        if self.plan.load().policy.allow_direct_models() {
            names.push((self.local_name.clone(), "local"));
            names.extend(
                self.upstreams
                    .remotes()
                    .iter()
                    .map(|r| (r.name.clone(), "remote")),
            );
        }
        names
    }

    /// The policy's confidence aggregate.
    pub fn aggregate(&self) -> Aggregate {
        self.plan.load().policy.aggregate().clone()
    }

    /// The policy a request runs under: its caller's, else the gateway's `[policy]`.
    pub fn policy_of(&self, ctx: &RequestContext) -> Arc<RequestPolicy> {
        self.plan(ctx)
    }

    /// Refreshes gauges that are read rather than counted.
    pub fn update_gauges(&self) {
        self.upstreams.update_gauges();
        if let Some(local) = self.local.get() {
            let depth = i64::try_from(local.load().in_flight).unwrap_or(i64::MAX);
            self.metrics.local_queue_depth.set(depth);
            let (active, mean_batch) = local.batch_stats();
            self.metrics
                .local_active_sequences
                .set(i64::try_from(active).unwrap_or(i64::MAX));
            self.metrics.local_batch_size.set(mean_batch);
        }
    }

    /// Answers one generation request.
    pub async fn complete(
        &self,
        ctx: &mut RequestContext,
        request: CompletionRequest,
        route_header: Option<Route>,
    ) -> Result<Reply, ApiError> {
        ctx.model = request.model.clone();
        let plan_of_request = self.plan(ctx);
        let plan: &RequestPolicy = &plan_of_request;
        let (addressed, named_remote) = self.addressed(&request.model, plan)?;
        match verdict::pre_route(&plan.policy, addressed, route_header) {
            PreRoute::Cascade => self.cascade(ctx, plan, &request).await,
            PreRoute::Local(reason) => self.serve_local_directly(ctx, plan, &request, reason).await,
            PreRoute::Remote(reason) => {
                ctx.route = Some(Route::Remote);
                ctx.reason = Some(reason);
                let chain = match named_remote {
                    Some(i) => vec![i],
                    None => plan.chain.clone(),
                };
                self.remote(ctx, plan, &request, &chain, None).await
            }
            PreRoute::Refuse(refusal) => Err(ApiError::NotAllowed(refusal.message().into())),
        }
    }

    /// What a request's `model` names, and the remote's index when it names one; 404 for a
    /// name the gateway does not know.
    fn addressed(
        &self,
        model: &str,
        plan: &RequestPolicy,
    ) -> Result<(Addressed, Option<usize>), ApiError> {
        if model == self.model_name {
            Ok((Addressed::Cascade, None))
        } else if model == self.local_name {
            Ok((Addressed::LocalModel, None))
        } else if let Some(i) = self.upstreams.find(model) {
            let in_policy = plan.chain.contains(&i);
            Ok((Addressed::Remote { in_policy }, Some(i)))
        } else {
            Err(ApiError::UnknownModel(model.to_string()))
        }
    }

    async fn cascade(
        &self,
        ctx: &mut RequestContext,
        plan: &RequestPolicy,
        request: &CompletionRequest,
    ) -> Result<Reply, ApiError> {
        if let Some(reason) = verdict::local_unsuitable(&request.features) {
            return self.escalate(ctx, plan, request, reason, None).await;
        }
        let (Some(local), Some(prompt)) = (self.local.get(), request.prompt.as_ref()) else {
            return self
                .overloaded(ctx, plan, request, Reason::LocalLoading)
                .await;
        };
        if verdict::overloaded(&local.load(), plan.max_queue_wait) {
            return self
                .overloaded(ctx, plan, request, Reason::LocalOverloaded)
                .await;
        }
        let encoded = match local.encode_prompt(prompt).await {
            Ok(e) if e.len() >= local.context_window() => {
                return self
                    .escalate(ctx, plan, request, Reason::ContextTooLong, None)
                    .await;
            }
            Ok(e) => {
                ctx.local_prompt_tokens = e.len();
                e
            }
            Err(e) => {
                tracing::warn!(request_id = %ctx.id, error = %e, "cannot encode the prompt for the local model");
                return self
                    .escalate(ctx, plan, request, Reason::LocalError, None)
                    .await;
            }
        };
        let options = RunOptions {
            // Only a cascading policy reaches here, and validation gives it a threshold.
            early_exit: Some((
                plan.policy.aggregate().clone(),
                plan.policy.threshold().unwrap_or(f64::INFINITY),
            )),
            time_budget: plan.policy.max_local_ms().map(Duration::from_millis),
            deltas: None,
            encoded: Some(encoded),
        };
        let run = match local.run(request, prompt.clone(), options).await {
            Ok(run) => run,
            Err(WorkerError::Busy { .. }) => {
                return self
                    .overloaded(ctx, plan, request, Reason::LocalOverloaded)
                    .await
            }
            Err(WorkerError::Generate(GenerateError::PromptTooLong { .. })) => {
                return self
                    .escalate(ctx, plan, request, Reason::ContextTooLong, None)
                    .await;
            }
            Err(e) => {
                tracing::warn!(request_id = %ctx.id, error = %e, "local generation failed");
                return self
                    .escalate(ctx, plan, request, Reason::LocalError, None)
                    .await;
            }
        };
        self.note_local_run(ctx, plan, &run);
        let json_valid = request
            .json_object
            .then(|| is_json_object(&run.output.generation.text));
        let outcome = LocalOutcome {
            score: ctx.confidence,
            early_exit: run.early_exit,
            timed_out: run.output.timed_out,
            hit_token_cap: run.hit_token_cap,
            json_valid,
        };
        match verdict::post_local(&outcome, &plan.policy) {
            (Route::Local, reason) => {
                ctx.route = Some(Route::Local);
                ctx.reason = Some(reason);
                Ok(self.local_reply(request, &run))
            }
            (Route::Remote, reason) => {
                self.escalate(ctx, plan, request, reason, Some((run, outcome)))
                    .await
            }
        }
    }

    /// Local overloaded or not loaded: escalate or refuse, as the policy says.
    async fn overloaded(
        &self,
        ctx: &mut RequestContext,
        plan: &RequestPolicy,
        request: &CompletionRequest,
        reason: Reason,
    ) -> Result<Reply, ApiError> {
        match plan.policy.on_overload() {
            OverloadAction::Escalate => self.escalate(ctx, plan, request, reason, None).await,
            OverloadAction::Reject => {
                ctx.route = Some(Route::Local);
                ctx.reason = Some(reason);
                Err(self.busy_error(reason))
            }
        }
    }

    fn busy_error(&self, reason: Reason) -> ApiError {
        match self.local.get() {
            Some(local) if reason != Reason::LocalLoading => ApiError::Overloaded {
                retry_after: local.load().expected_wait.max(Duration::from_secs(1)),
            },
            _ => ApiError::NotReady {
                retry_after: Duration::from_secs(5),
            },
        }
    }

    async fn escalate(
        &self,
        ctx: &mut RequestContext,
        plan: &RequestPolicy,
        request: &CompletionRequest,
        reason: Reason,
        local: Option<(LocalRun, LocalOutcome)>,
    ) -> Result<Reply, ApiError> {
        ctx.route = Some(Route::Remote);
        ctx.reason = Some(reason);
        ctx.escalated = true;
        self.remote(ctx, plan, request, &plan.chain, local).await
    }

    /// Pays for a remote answer, as far as the budgets allow. Each round asks the budget
    /// decision which remote of the chain to call (the first that has not failed, or under
    /// `on_budget_exhausted = "fallback"` the cheapest one that fits), then calls that one
    /// remote; the budget gate enforces the per-request cap and the budgets before every
    /// attempt. A remote that fails is not tried again; one whose reservation is refused is
    /// marked as not fitting and the decision is made again. When no budget pays for any
    /// remote, `on_budget_exhausted` decides; when every remote failed, `on_remote_failure`.
    async fn remote(
        &self,
        ctx: &mut RequestContext,
        plan: &RequestPolicy,
        request: &CompletionRequest,
        chain: &[usize],
        local: Option<(LocalRun, LocalOutcome)>,
    ) -> Result<Reply, ApiError> {
        let counted = self.counted_prompt_tokens(ctx, plan, request).await;
        // Each remote's input bound once per request (it serialises the body that remote
        // would receive), not again in every decision round.
        let input_tokens_of: Vec<(usize, u64)> = chain
            .iter()
            .map(|&i| (i, self.call_input_tokens(request, counted, i)))
            .collect();
        let input_tokens_for = |i: usize| {
            input_tokens_of
                .iter()
                .find(|(j, _)| *j == i)
                .map_or(0, |(_, n)| *n)
        };
        let mut unaffordable: Vec<usize> = Vec::new();
        let mut failed: Vec<usize> = Vec::new();
        let mut last_failure = UpstreamError::NoRemote;
        loop {
            let remaining: Vec<usize> = chain
                .iter()
                .copied()
                .filter(|i| !failed.contains(i))
                .collect();
            if remaining.is_empty() {
                break;
            }
            let decision = self.budget_decision(
                plan,
                request,
                &remaining,
                &unaffordable,
                &input_tokens_for,
                local.is_some(),
            );
            let remote = match decision {
                BudgetDecision::Proceed { remote } => remote,
                BudgetDecision::Fallback { remote } => {
                    ctx.reason = Some(Reason::BudgetFallback);
                    remote
                }
                BudgetDecision::ServeLocal => {
                    return self
                        .serve_local_within_budget(ctx, plan, request, local)
                        .await
                }
                BudgetDecision::Reject => {
                    ctx.reason = Some(Reason::BudgetExhausted);
                    return Err(ApiError::BudgetExhausted);
                }
            };
            let Some(i) = self.upstreams.find(&remote) else {
                break;
            };
            let input_tokens = input_tokens_for(i);
            let started = Instant::now();
            let payer = Payer {
                request_id: &ctx.id,
                team: ctx.team.as_deref().unwrap_or_default(),
                key_id: ctx.key_id.as_deref().unwrap_or_default(),
                max_cost: plan.policy.max_cost_per_request(),
            };
            let result = self.upstreams.call(i, payer, request, input_tokens).await;
            ctx.upstream_time += started.elapsed();
            match result {
                Ok(reply) => {
                    ctx.remote_reserved = Some(estimate_cost(
                        &self.policies.load(),
                        &reply.upstream,
                        input_tokens,
                        request,
                    ));
                    ctx.upstream = Some(reply.upstream);
                    return Ok(match reply.body {
                        UpstreamBody::Complete { bytes, billed } => {
                            ctx.remote_billed = Some(billed);
                            Reply::Json(bytes)
                        }
                        UpstreamBody::Stream(stream) => Reply::Upstream(stream),
                    });
                }
                // Decide again with this remote known not to fit; each round marks one more
                // remote as failed or not fitting, so this ends.
                Err(UpstreamError::Refused {
                    refusal: GateRefusal::BudgetExhausted(_) | GateRefusal::OverRequestCap { .. },
                    ..
                }) => unaffordable.push(i),
                // The budget store cannot be asked: fail closed, whatever else could be served.
                Err(error @ UpstreamError::Refused { .. }) => {
                    return Err(ApiError::Upstream(error));
                }
                Err(error) => {
                    failed.push(i);
                    last_failure = error;
                }
            }
        }
        // Only a request the local model already worked on falls back to it: one it could
        // not or would not take (tools, overload, a client's choice, remote_only) gets the
        // error.
        let error = last_failure;
        let serve_local = verdict::on_remote_failure(&plan.policy, local.is_some())
            == RemoteFailureDecision::ServeLocal;
        if serve_local {
            tracing::warn!(request_id = %ctx.id, %error, "every remote failed; serving the local answer");
            ctx.route = Some(Route::Local);
            ctx.reason = Some(Reason::RemoteUnavailable);
            ctx.escalated = false;
            ctx.degraded = Some("remote-unavailable");
            return self
                .full_local_answer(ctx, plan, request, local)
                .await
                .map_err(|_| ApiError::Upstream(error));
        }
        Err(ApiError::Upstream(error))
    }

    /// Whether a tighter cost estimate can change anything for this request: a budget scope
    /// or a per-request cap applies to it. Without either, every remote call is made whatever
    /// it costs, and the bound from the body's bytes serves the record's overrun check, so the
    /// prompt is not tokenized just to count it (a blocking task and a template render on
    /// every remote-only request).
    fn estimate_matters(&self, ctx: &RequestContext, plan: &RequestPolicy) -> bool {
        plan.policy.max_cost_per_request().is_some()
            || !self
                .policies
                .load()
                .scopes_for(
                    ctx.team.as_deref().unwrap_or_default(),
                    ctx.key_id.as_deref().unwrap_or_default(),
                    crate::clock::now_unix_ms() / 1000,
                )
                .is_empty()
    }

    /// The local tokenizer's count of the request's prompt, when the local model can read it.
    async fn counted_prompt_tokens(
        &self,
        ctx: &RequestContext,
        plan: &RequestPolicy,
        request: &CompletionRequest,
    ) -> Option<usize> {
        let mut counted = (ctx.local_prompt_tokens > 0).then_some(ctx.local_prompt_tokens);
        if counted.is_none() && self.estimate_matters(ctx, plan) {
            if let (Some(local), Some(prompt)) = (self.local.get(), request.prompt.as_ref()) {
                counted = local.prompt_tokens(prompt).await.ok();
            }
        }
        counted
    }

    /// Input tokens to reserve for a call to remote `i` (see [`input_token_estimate`]). The
    /// byte bound is the body that remote receives, not the client's: its model name and
    /// the `max_tokens` the gateway adds can make it longer.
    fn call_input_tokens(
        &self,
        request: &CompletionRequest,
        counted: Option<usize>,
        i: usize,
    ) -> u64 {
        let upstream_bytes = self
            .upstreams
            .remotes()
            .get(i)
            .and_then(|r| openai::upstream_body(request, &r.model).ok())
            .map_or(request.body_bytes, |b| b.len().max(request.body_bytes));
        input_token_estimate(counted, request.schema_bytes, upstream_bytes)
    }

    /// The budget decision over the remotes of `chain`, with those whose reservation was
    /// refused marked as not fitting. A local answer is available only when the local model
    /// worked on this request: a request it could not or would not take (tools, overload, a
    /// client's explicit remote choice, remote_only) is refused rather than answered locally.
    fn budget_decision(
        &self,
        plan: &RequestPolicy,
        request: &CompletionRequest,
        chain: &[usize],
        unaffordable: &[usize],
        input_tokens_for: &dyn Fn(usize) -> u64,
        local_ran: bool,
    ) -> BudgetDecision {
        let policies = self.policies.load();
        let candidates = chain
            .iter()
            .filter_map(|&i| {
                let name = self.upstreams.name(i)?;
                Some(RemoteCandidate {
                    remote: name.to_string(),
                    estimated_cost: estimate_cost(&policies, name, input_tokens_for(i), request),
                    fits: !unaffordable.contains(&i),
                })
            })
            .collect();
        let view = BudgetView {
            candidates,
            local_available: local_ran,
        };
        verdict::on_budget(&plan.policy, &view)
    }

    /// Whether the local model could answer this request at all.
    fn can_serve_locally(&self, request: &CompletionRequest) -> bool {
        self.local.get().is_some()
            && request.prompt.is_some()
            && verdict::local_unsuitable(&request.features).is_none()
    }

    /// No budget pays for a remote: serve the local answer, marked degraded, or refuse with
    /// 429 when there can be none.
    async fn serve_local_within_budget(
        &self,
        ctx: &mut RequestContext,
        plan: &RequestPolicy,
        request: &CompletionRequest,
        local: Option<(LocalRun, LocalOutcome)>,
    ) -> Result<Reply, ApiError> {
        ctx.route = Some(Route::Local);
        ctx.reason = Some(Reason::BudgetExhausted);
        ctx.escalated = false;
        ctx.degraded = Some("budget-exhausted");
        self.full_local_answer(ctx, plan, request, local)
            .await
            .map_err(|_| ApiError::BudgetExhausted)
    }

    /// The local answer to serve instead of a remote one. A local run cut short to escalate
    /// (early exit, time budget) is a fragment, not an answer, so the local model answers
    /// again, in full (no early exit, no time budget); the error says why it could not. A run
    /// that reached `local.max_tokens` is served as it is (`finish_reason: "length"`): a
    /// rerun would stop at the same cap.
    async fn full_local_answer(
        &self,
        ctx: &mut RequestContext,
        plan: &RequestPolicy,
        request: &CompletionRequest,
        local: Option<(LocalRun, LocalOutcome)>,
    ) -> Result<Reply, ApiError> {
        let complete = local.filter(|(_, o)| !o.early_exit && !o.timed_out && o.score.is_some());
        if let Some((run, _)) = complete {
            return Ok(self.local_reply(request, &run));
        }
        if !self.can_serve_locally(request) {
            return Err(ApiError::NotAllowed(
                "The local model cannot answer this request.".into(),
            ));
        }
        let (Some(engine), Some(prompt)) = (self.local.get(), request.prompt.as_ref()) else {
            return Err(self.busy_error(Reason::LocalLoading));
        };
        self.answer_locally(ctx, plan, engine, request, prompt)
            .await
    }

    /// A whole local answer: no early exit, no time budget.
    async fn answer_locally(
        &self,
        ctx: &mut RequestContext,
        plan: &RequestPolicy,
        engine: &LocalEngine,
        request: &CompletionRequest,
        prompt: &Prompt,
    ) -> Result<Reply, ApiError> {
        let run = engine
            .run(request, prompt.clone(), RunOptions::default())
            .await
            .map_err(|e| self.local_error(e))?;
        self.note_local_run(ctx, plan, &run);
        Ok(self.local_reply(request, &run))
    }

    /// The local model and nothing else (named directly, `x-cascade-route: local`, or a
    /// `local_only` policy): no early exit, no time budget, no escalation. What it cannot
    /// take is a 400, a full queue 429 and a loading model 503, each recorded with its own
    /// reason; a remote is never called.
    async fn serve_local_directly(
        &self,
        ctx: &mut RequestContext,
        plan: &RequestPolicy,
        request: &CompletionRequest,
        reason: Reason,
    ) -> Result<Reply, ApiError> {
        ctx.route = Some(Route::Local);
        ctx.reason = Some(reason);
        if let Some(unsuitable) = verdict::local_unsuitable(&request.features) {
            ctx.reason = Some(unsuitable);
            return Err(ApiError::InvalidRequest {
                message: format!("The local model cannot serve this request ({unsuitable})."),
                param: None,
            });
        }
        let (Some(local), Some(prompt)) = (self.local.get(), request.prompt.as_ref()) else {
            ctx.reason = Some(Reason::LocalLoading);
            return Err(self.busy_error(Reason::LocalLoading));
        };
        if verdict::overloaded(&local.load(), plan.max_queue_wait) {
            ctx.reason = Some(Reason::LocalOverloaded);
            return Err(self.busy_error(Reason::LocalOverloaded));
        }
        if request.stream {
            return Ok(self.live_local(local, request, prompt.clone()));
        }
        let result = self.answer_locally(ctx, plan, local, request, prompt).await;
        if matches!(result, Err(ApiError::Overloaded { .. })) {
            ctx.reason = Some(Reason::LocalOverloaded);
        }
        result
    }

    fn local_error(&self, error: WorkerError) -> ApiError {
        match error {
            WorkerError::Busy { .. } => self.busy_error(Reason::LocalOverloaded),
            WorkerError::Generate(
                e @ (GenerateError::PromptTooLong { .. } | GenerateError::EmptyPrompt),
            ) => ApiError::InvalidRequest {
                message: e.to_string(),
                param: None,
            },
            other => ApiError::Local(other.to_string()),
        }
    }

    /// Starts a generation whose tokens go to the client as they come.
    fn live_local(
        &self,
        local: &LocalEngine,
        request: &CompletionRequest,
        prompt: Prompt,
    ) -> Reply {
        let (tx, rx) = mpsc::unbounded_channel();
        let engine = local.clone();
        let writer = self.chunk_writer(request);
        let request = request.clone();
        tokio::spawn(async move {
            let options = RunOptions {
                deltas: Some(tx.clone()),
                ..RunOptions::default()
            };
            // A client that leaves while the request still waits in the
            // queue drops the receiver: stop waiting then, too.
            tokio::select! {
                result = engine.run(&request, prompt, options) => {
                    let _ = tx.send(LiveEvent::Done(result));
                }
                () = tx.closed() => {}
            }
        });
        Reply::LiveLocal { writer, events: rx }
    }

    /// Notes a finished local run in the context and the metrics.
    fn note_local_run(&self, ctx: &mut RequestContext, plan: &RequestPolicy, run: &LocalRun) {
        ctx.note_local_run(plan.policy.aggregate(), run, &self.metrics);
    }

    fn chunk_writer(&self, request: &CompletionRequest) -> ChunkWriter {
        ChunkWriter {
            endpoint: request.endpoint,
            id: openai::completion_id(request.endpoint),
            created: openai::unix_seconds(),
            model: self.local_name.clone(),
            include_usage: request.include_usage,
        }
    }

    fn local_reply(&self, request: &CompletionRequest, run: &LocalRun) -> Reply {
        let generation = &run.output.generation;
        let answer = LocalAnswer {
            id: openai::completion_id(request.endpoint),
            created: openai::unix_seconds(),
            model: self.local_name.clone(),
            text: generation.text.clone(),
            finish_reason: openai::finish_reason(generation.finish_reason),
            prompt_tokens: generation.usage.prompt_tokens,
            completion_tokens: generation.usage.completion_tokens,
        };
        if request.stream {
            let writer = ChunkWriter {
                id: answer.id.clone(),
                ..self.chunk_writer(request)
            };
            return Reply::LocalStream { writer, answer };
        }
        let body = answer.to_response(request.endpoint);
        // Serialising a `Value` cannot fail.
        Reply::Json(Bytes::from(serde_json::to_vec(&body).unwrap_or_default()))
    }
}

fn is_json_object(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text.trim()).is_ok_and(|v| v.is_object())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_object_check_accepts_objects_only() {
        assert!(is_json_object(" {\"a\": 1}\n"));
        assert!(!is_json_object("[1]"));
        assert!(!is_json_object("Paris"));
    }
}
