//! HTTP: routes, thin handlers, request ids, and starting the server.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::accounts;
use crate::auth;
use crate::budget::BudgetGate;
use crate::clock::now_unix_ms as now_ms;
use crate::config::{Config, OnLedgerFailure};
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::gateway::{Gateway, Reply};
use crate::ledger::Ledger;
use crate::limits::Limits;
use crate::live::{Live, SharedPolicies};
use crate::metrics::Metrics;
use crate::openai::{self, Endpoint};
use crate::spool::Spool;
use crate::storage::Storage;
use crate::upstream::{CallGate, OpenGate};
use policies::decision::Route;

/// Header names the gateway reads or writes.
pub mod headers {
    use axum::http::HeaderName;

    pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub const ROUTE: HeaderName = HeaderName::from_static("x-cascade-route");
    pub const CONFIDENCE: HeaderName = HeaderName::from_static("x-cascade-confidence");
    pub const REASON: HeaderName = HeaderName::from_static("x-cascade-reason");
    pub const DEGRADED: HeaderName = HeaderName::from_static("x-cascade-degraded");
    pub const VARIANT: HeaderName = HeaderName::from_static("x-cascade-variant");
}

/// State shared by every handler.
pub struct AppState {
    pub gateway: Gateway,
    /// Teams, keys, prices, budgets and experiments; replaced on reload.
    pub policies: SharedPolicies,
    /// The budget gate every paid call goes through, when the server keeps budgets.
    pub budget: Option<Arc<BudgetGate>>,
    /// The ledger and budget store, when the server keeps one.
    pub storage: Option<Storage>,
    /// Writes one record per request, when the server keeps a ledger.
    pub ledger: Option<Arc<Ledger>>,
    /// Hex SHA-256 of the admin key; the admin API is off without one.
    pub admin_key_hash: Option<String>,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: usize,
    /// The remotes the gateway runs with; a reload may not change them.
    remotes: Vec<crate::config::RemoteConfig>,
    /// Hard limits on one request.
    pub limits: Limits,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A remote's key is missing from the environment.
    #[error(transparent)]
    Secrets(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl AppState {
    /// Builds the state from a validated configuration; `policies` is the handle the call
    /// gate reads too, so that a reload reaches both.
    pub fn new(
        config: &Config,
        policies: SharedPolicies,
        gate: Arc<dyn CallGate>,
    ) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new()?);
        let gateway = Gateway::new(config, Arc::clone(&policies), gate, Arc::clone(&metrics))?;
        Ok(Self {
            gateway,
            policies,
            budget: None,
            storage: None,
            ledger: None,
            admin_key_hash: config.admin.api_key_hash.clone(),
            metrics,
            max_body_bytes: config.server.max_body_bytes,
            remotes: config.remotes.clone(),
            limits: config.limits.clone(),
        })
    }

    /// Applies the policy and price sections of a new, already validated configuration:
    /// `[policy]`, `timezone`, `[prices.*]`, `[local_price]`, `[global]`, `[[teams]]`,
    /// `[[experiments]]` (and the learned rules they name). Requests in flight finish under
    /// the policy they started with. Refused, with nothing changed, when `[[remotes]]`
    /// differ from the running ones (those need a restart); other sections are not
    /// reloaded.
    pub fn reload(&self, config: &Config) -> Result<(), ReloadError> {
        if config.remotes != self.remotes {
            return Err(ReloadError::RemotesChanged);
        }
        self.policies.store(config.policies.clone());
        self.gateway.reload(config);
        Ok(())
    }
}

/// How a graceful shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Every in-flight request finished within the grace period.
    pub finished_in_time: bool,
    /// Reservations still unsettled at the end (released later by their TTL).
    pub unsettled: usize,
    /// Ledger records not written at the end (lost).
    pub unwritten: usize,
}

impl DrainReport {
    /// Nothing was cut or lost.
    pub fn clean(&self) -> bool {
        self.finished_in_time && self.unsettled == 0 && self.unwritten == 0
    }
}

/// Why a reload was refused; the running configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "[[remotes]] changed: restart the gateway to apply remote changes (nothing was reloaded)"
    )]
    RemotesChanged,
}

/// The HTTP routes; the admin API is among them unless it has its own listener.
pub fn router(state: Arc<AppState>, with_admin: bool) -> Router {
    let limit = state.max_body_bytes;
    let mut routes = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/feedback", post(feedback))
        .route("/v1/usage", get(usage))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi));
    if with_admin {
        routes = admin_routes(routes);
    }
    routes
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            enforce_limits,
        ))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// The admin API alone, for its own listener.
pub fn admin_router(state: Arc<AppState>) -> Router {
    admin_routes(Router::new())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            enforce_limits,
        ))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// The paths the HTTP API serves (the admin API's included), as in `openapi.json`.
pub const ROUTES: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/feedback",
    "/v1/usage",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/admin/spend",
    "/admin/experiments/{id}",
];

/// The OpenAPI 3 description of this API, compiled in so it always matches the binary.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Header size and total time limits, for every route. The time limit ends when the
/// response's headers are ready: a stream's body then runs under the remote's own timeout
/// and the local model's `max_tokens`, since cutting an answer half-streamed would leave
/// the client a broken response it cannot tell from a complete one.
async fn enforce_limits(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Err(error) = state.limits.check_headers(request.headers()) {
        return error_response(&error);
    }
    let limit = state.limits.request_timeout;
    let id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_default();
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::info!(request_id = %id, limit_ms = limit.as_millis(), "request timed out");
            error_response(&ApiError::RequestTimeout {
                limit_ms: limit.as_millis(),
            })
        }
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

fn admin_routes(routes: Router<Arc<AppState>>) -> Router<Arc<AppState>> {
    routes
        .route("/admin/spend", get(admin_spend))
        .route("/admin/experiments/{id}", get(admin_experiment))
}

/// The request id: the client's `x-request-id` when it is a sane token,
/// else a new UUID. Stored for handlers and echoed on every response.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(headers::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_string);
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(headers::REQUEST_ID, value);
    }
    response
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    axum::Extension(id): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(state, Endpoint::Chat, id, headers, body).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    axum::Extension(id): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(state, Endpoint::Completions, id, headers, body).await
}

async fn generate(
    state: Arc<AppState>,
    endpoint: Endpoint,
    id: RequestId,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = RequestContext::new(id.0, endpoint, Some(Arc::clone(&state.metrics)));
    let result = async {
        // Authentication comes first: an unknown caller learns nothing about its body.
        let policies = state.policies.load();
        let caller = auth::authenticate(&policies, &headers)?;
        // Recorded from here on; unknown keys are not, so they cannot fill the ledger.
        if let Some(ledger) = &state.ledger {
            ctx.keep_in(Arc::clone(ledger));
        }
        let body = body.map_err(|rejection| body_error(&rejection, state.max_body_bytes))?;
        let request = openai::parse_request(endpoint, &body)?;
        state.limits.check(&request)?;
        if let Some(mut caller) = caller {
            let user = request.body.get("user").and_then(serde_json::Value::as_str);
            auth::assign_variant(&policies, &mut caller, user, &headers);
            let variant = caller.experiment.as_ref().map(|(_, v)| v.as_str());
            if let Some(policy) = policies.policy(&caller.team, &caller.key_id, variant) {
                ctx.policy = Some(Arc::new(state.gateway.request_policy(policy)));
            }
            ctx.team = Some(caller.team);
            ctx.key_id = Some(caller.key_id);
            if let Some((experiment, variant)) = caller.experiment {
                ctx.experiment = Some(experiment);
                ctx.variant = Some(variant);
            }
        }
        if state.gateway.policy_of(&ctx).policy.log_prompts() {
            ctx.prompt_text = prompt_text(&request);
        }
        let route = route_header(&headers)?;
        state.gateway.complete(&mut ctx, request, route).await
    }
    .await;
    match result {
        Ok(reply) => {
            ctx.response_ready(200);
            if !reply.is_stream() {
                // Durable before the client sees the answer; streams commit before their
                // last event. A ledger that fails closed withholds an answer it cannot record.
                if let Err(error) = ctx.commit().await {
                    return ledger_failure_response(&error, &ctx);
                }
            }
            reply_response(reply, ctx, &state)
        }
        Err(error) => {
            if !matches!(
                error,
                ApiError::MalformedJson(_)
                    | ApiError::InvalidRequest { .. }
                    | ApiError::PromptTooLong { .. }
            ) {
                tracing::info!(request_id = %ctx.id, %error, "request failed");
            }
            let mut response = error_response(&error);
            ctx.error_code = Some(error.code());
            ctx.response_ready(response.status().as_u16());
            cascade_headers(response.headers_mut(), &ctx);
            if let Err(error) = ctx.commit().await {
                return ledger_failure_response(&error, &ctx);
            }
            response
        }
    }
}

/// The 503 of a request whose record the ledger could not write (`fail_closed`).
fn ledger_failure_response(error: &ApiError, ctx: &RequestContext) -> Response {
    let mut response = error_response(error);
    cascade_headers(response.headers_mut(), ctx);
    response
}

/// The prompt as the ledger keeps it when a policy allows: the messages (or the prompt) as
/// JSON, exactly as sent.
fn prompt_text(request: &openai::CompletionRequest) -> Option<String> {
    let prompt = request
        .body
        .get("messages")
        .or_else(|| request.body.get("prompt"))?;
    serde_json::to_string(prompt).ok()
}

fn body_error(rejection: &BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge { limit }
    } else {
        ApiError::InvalidRequest {
            message: rejection.body_text(),
            param: None,
        }
    }
}

fn route_header(headers: &HeaderMap) -> Result<Option<Route>, ApiError> {
    let Some(value) = headers.get(headers::ROUTE) else {
        return Ok(None);
    };
    match value.to_str().map(str::trim) {
        Ok("local") => Ok(Some(Route::Local)),
        Ok("remote") => Ok(Some(Route::Remote)),
        _ => Err(ApiError::InvalidRequest {
            message: "x-cascade-route must be `local` or `remote`".into(),
            param: Some("x-cascade-route".into()),
        }),
    }
}

fn reply_response(reply: Reply, ctx: RequestContext, state: &AppState) -> Response {
    let content_type = if reply.is_stream() {
        "text/event-stream"
    } else {
        "application/json"
    };
    let mut response = Response::builder().status(StatusCode::OK);
    if let Some(h) = response.headers_mut() {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if reply.is_stream() {
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        }
        cascade_headers(h, &ctx);
    }
    let aggregate = ctx.policy.as_ref().map_or_else(
        || state.gateway.aggregate(),
        |p| p.policy.aggregate().clone(),
    );
    let body = match reply {
        // A complete body goes out with a Content-Length, in one write.
        Reply::Json(bytes) => Body::from(bytes),
        streamed => {
            Body::from_stream(streamed.into_body(ctx, Arc::clone(&state.metrics), aggregate))
        }
    };
    response
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn cascade_headers(h: &mut HeaderMap, ctx: &RequestContext) {
    let set = |h: &mut HeaderMap, name: HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    set(h, headers::ROUTE, ctx.route.map_or("none", Route::as_str));
    set(
        h,
        headers::REASON,
        ctx.reason.map_or("none", |r| r.as_str()),
    );
    let confidence = ctx
        .confidence
        .map_or_else(|| "none".to_string(), |c| format!("{c:.4}"));
    set(h, headers::CONFIDENCE, &confidence);
    if let Some(why) = ctx.degraded {
        set(h, headers::DEGRADED, why);
    }
    if let Some(variant) = &ctx.variant {
        set(h, headers::VARIANT, variant);
    }
}

/// The single place where errors become responses.
pub fn error_response(error: &ApiError) -> Response {
    let mut response = (error.status(), Json(error.body())).into_response();
    if let Some(retry_after) = error.retry_after() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, retry_after);
    }
    response
}

/// The ledger store, or the error of a gateway that keeps none.
fn storage_of(state: &AppState) -> Result<&Storage, ApiError> {
    state.storage.as_ref().ok_or_else(|| {
        ApiError::NotAllowed("This gateway keeps no ledger (it runs without storage).".into())
    })
}

fn storage_error(e: crate::storage::StorageError) -> ApiError {
    ApiError::Internal(format!("storage: {e}"))
}

/// `POST /v1/feedback`: a score for one of the caller's own requests.
async fn feedback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let caller = auth::authenticate(&state.policies.load(), &headers)?;
        let storage = storage_of(&state)?;
        let body = body.map_err(|rejection| body_error(&rejection, state.max_body_bytes))?;
        let feedback = accounts::parse_feedback(&body)?;
        let team = caller.as_ref().map(|c| c.team.as_str());
        accounts::record_feedback(storage, team, &feedback, now_ms()).await?;
        Ok::<_, ApiError>(Json(json!({
            "object": "feedback",
            "request_id": feedback.request_id,
            "score": feedback.score,
        })))
    }
    .await;
    result.map_or_else(|e| error_response(&e), IntoResponse::into_response)
}

/// `GET /v1/usage`: the caller's own team's spend, budget left and escalation rate.
async fn usage(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let result = async {
        let caller = auth::authenticate(&state.policies.load(), &headers)?;
        let storage = storage_of(&state)?;
        let team = caller.as_ref().map(|c| c.team.as_str());
        accounts::team_usage(storage, &state.policies.load(), team, now_ms())
            .await
            .map_err(storage_error)
    }
    .await;
    result.map_or_else(|e| error_response(&e), |u| Json(u).into_response())
}

#[derive(Debug, serde::Deserialize)]
struct SpendQuery {
    #[serde(default)]
    window: Option<String>,
}

/// `GET /admin/spend?window=day|month`: every team's spend and budget.
async fn admin_spend(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<SpendQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        auth::authenticate_admin(
            state.admin_key_hash.as_deref(),
            &state.policies.load(),
            &headers,
            "/admin/spend",
        )?;
        let storage = storage_of(&state)?;
        let query = query.map_err(|e| ApiError::InvalidRequest {
            message: e.body_text(),
            param: None,
        })?;
        let window = match query.window.as_deref() {
            None | Some("day") => policies::Window::Day,
            Some("month") => policies::Window::Month,
            Some(_) => {
                return Err(ApiError::InvalidRequest {
                    message: "`window` must be `day` or `month`".into(),
                    param: Some("window".into()),
                })
            }
        };
        accounts::spend(storage, &state.policies.load(), window, now_ms())
            .await
            .map_err(storage_error)
    }
    .await;
    result.map_or_else(|e| error_response(&e), |r| Json(r).into_response())
}

/// `GET /admin/experiments/{id}`: per-variant results with 95% confidence intervals.
async fn admin_experiment(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let path = format!("/admin/experiments/{id}");
    let result = async {
        auth::authenticate_admin(
            state.admin_key_hash.as_deref(),
            &state.policies.load(),
            &headers,
            &path,
        )?;
        let storage = storage_of(&state)?;
        accounts::experiment(storage, &state.policies.load(), &id)
            .await
            .map_err(storage_error)?
            .ok_or_else(|| ApiError::NotFound(format!("experiment `{id}`")))
    }
    .await;
    result.map_or_else(|e| error_response(&e), |r| Json(r).into_response())
}

/// `GET /v1/models`: with teams configured it needs a team key, as OpenAI's does, so the
/// remotes a gateway pays for are not listed to anyone who can reach it.
async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = auth::authenticate(&state.policies.load(), &headers) {
        return error_response(&e);
    }
    let data: Vec<_> = state
        .gateway
        .model_names()
        .into_iter()
        .map(|(id, kind)| json!({"id": id, "object": "model", "created": 0, "owned_by": format!("cascade-{kind}")}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.gateway.ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.gateway.update_gauges();
    update_budget_gauges(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Sets the budget-remaining gauge of every team with a budget (one read per team and
/// window, at scrape time rather than on the request path).
async fn update_budget_gauges(state: &AppState) {
    let Some(storage) = &state.storage else {
        return;
    };
    let now = now_ms().div_euclid(1000);
    let policies = state.policies.load();
    for team in policies.teams().keys() {
        for (scope, limit) in policies.scopes_for(team, "", now) {
            if scope.kind != policies::ScopeKind::Team {
                continue;
            }
            if let Ok(s) = storage.scope_state(&scope.storage_key()).await {
                let used = s.spent_nanos.saturating_add(s.reserved_nanos);
                state
                    .metrics
                    .team_budget_remaining
                    .with_label_values(&[team.as_str(), scope.window.as_str()])
                    .set(policies::NanoUsd(limit.0.saturating_sub(used)).usd());
            }
        }
    }
}

async fn not_found(request: Request) -> Response {
    error_response(&ApiError::NotFound(request.uri().path().to_string()))
}

/// A server running on the current tokio runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// The admin API's own address, when it has one.
    pub admin_addr: Option<SocketAddr>,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    /// The task that releases expired reservations; stopped with the server.
    expiry: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// Opens the storage, binds `config.server.listen` and starts serving with every paid
    /// call reserved against the budgets in storage.
    pub async fn start(config: &Config) -> Result<Self, StartError> {
        let storage = crate::storage::connect(&config.storage).await?;
        // Records spooled by an earlier run (the database was down when it stopped) go in
        // first, whatever this run's behaviour; a spool that cannot be replayed now stays for
        // the replay task (spool mode) or the next start.
        let spool = Arc::new(Spool::new(config.ledger.spool_path.clone()));
        if spool.has_pending() {
            match spool.replay(&storage).await {
                Ok(n) => {
                    tracing::info!(records = n, path = %spool.path().display(), "replayed the ledger spool left by an earlier run")
                }
                Err(e) => tracing::warn!(error = %e, "cannot replay the ledger spool yet"),
            }
        }
        let spool = (config.ledger.on_failure == OnLedgerFailure::Spool).then_some(spool);
        let policies: SharedPolicies = Arc::new(Live::new(config.policies.clone()));
        let budget = Arc::new(BudgetGate::new(storage.clone(), Arc::clone(&policies)));
        let gate: Arc<dyn CallGate> = Arc::clone(&budget) as Arc<dyn CallGate>;
        let mut server = Self::start_inner(
            config,
            policies,
            gate,
            Some((budget, storage.clone(), spool)),
        )
        .await?;
        // Reservations of requests that died (a crash elsewhere, a lost settle) are released
        // after the TTL; `reserve` does so too, but only when a budget looks full.
        let period =
            std::time::Duration::from_secs(config.storage.reservation_ttl_secs.clamp(1, 60));
        server.expiry = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                if let Err(e) = storage.expire_reservations(now_ms()).await {
                    tracing::warn!(error = %e, "cannot expire reservations");
                }
            }
        }));
        Ok(server)
    }

    /// Starts serving with the open gate: nothing is reserved or recorded.
    pub async fn start_open(config: &Config) -> Result<Self, StartError> {
        Self::start_with_gate(config, Arc::new(OpenGate)).await
    }

    /// Binds and starts serving with the given call gate.
    pub async fn start_with_gate(
        config: &Config,
        gate: Arc<dyn CallGate>,
    ) -> Result<Self, StartError> {
        let policies: SharedPolicies = Arc::new(Live::new(config.policies.clone()));
        Self::start_inner(config, policies, gate, None).await
    }

    async fn start_inner(
        config: &Config,
        policies: SharedPolicies,
        gate: Arc<dyn CallGate>,
        store: Option<(Arc<BudgetGate>, Storage, Option<Arc<Spool>>)>,
    ) -> Result<Self, StartError> {
        // Remotes are called from here on: their keys must be at hand.
        config.check_secrets()?;
        let mut state = AppState::new(config, Arc::clone(&policies), gate)?;
        if let Some((budget, storage, spool)) = store {
            state.ledger = Some(Arc::new(Ledger::start(
                storage.clone(),
                policies,
                Arc::clone(&state.metrics),
                spool,
            )));
            state.budget = Some(budget);
            state.storage = Some(storage);
        }
        let state = Arc::new(state);
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let (shutdown, signal) = oneshot::channel::<()>();
        let signal = futures::FutureExt::shared(async move {
            let _ = signal.await;
        });
        let admin_addr = match config.admin.listen {
            Some(admin) => {
                let listener =
                    TcpListener::bind(admin)
                        .await
                        .map_err(|source| StartError::Bind {
                            addr: admin,
                            source,
                        })?;
                let bound = listener.local_addr().map_err(|source| StartError::Bind {
                    addr: admin,
                    source,
                })?;
                let app = admin_router(Arc::clone(&state));
                let stop = signal.clone();
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app)
                        .with_graceful_shutdown(stop)
                        .await
                    {
                        tracing::error!(error = %e, "admin listener failed");
                    }
                });
                Some(bound)
            }
            None => None,
        };
        let app = router(Arc::clone(&state), admin_addr.is_none());
        // Headers and body may go out in separate writes; without NODELAY,
        // Nagle's algorithm holds the second one back for a delayed ACK.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
        });
        Ok(Self {
            addr,
            admin_addr,
            expiry: None,
            state,
            shutdown: Some(shutdown),
            task,
        })
    }

    /// Stops accepting connections and waits for in-flight requests.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// Waits until the server stops (on its own, or after `shutdown`).
    pub async fn wait(mut self) -> std::io::Result<()> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// Graceful shutdown: stops accepting, lets in-flight requests finish for up to `grace`
    /// (then cuts those left, whose records are still written as abandoned), waits for
    /// reservations to settle and the ledger to be written (up to `grace` more), and closes
    /// the database.
    pub async fn drain(mut self, grace: std::time::Duration) -> DrainReport {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let finished_in_time = tokio::time::timeout(grace, &mut self.task).await.is_ok();
        if !finished_in_time {
            tracing::warn!(
                ?grace,
                "in-flight requests did not finish in time; cutting them"
            );
            self.task.abort();
            let _ = (&mut self.task).await;
        }
        if let Some(expiry) = self.expiry.take() {
            expiry.abort();
        }
        let state = &self.state;
        let outstanding = || {
            let held = state.budget.as_ref().map_or(0, |b| b.outstanding());
            let pending = state.ledger.as_ref().map_or(0, |l| l.pending());
            (held, pending)
        };
        let deadline = tokio::time::Instant::now() + grace;
        while outstanding() != (0, 0) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let (unsettled, unwritten) = outstanding();
        if let Some(storage) = &state.storage {
            storage.close().await;
        }
        DrainReport {
            finished_in_time,
            unsettled,
            unwritten,
        }
    }

    /// Asks the server to stop without waiting.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn the_openapi_document_parses_and_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
        let mut routes = ROUTES.to_vec();
        documented.sort_unstable();
        routes.sort_unstable();
        assert_eq!(documented, routes);
        // Every `$ref` points at a schema the document defines.
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for reference in OPENAPI.split("\"$ref\": \"#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "undefined schema {name}");
        }
    }
}
