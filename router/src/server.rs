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

use crate::auth;
use crate::budget::BudgetGate;
use crate::config::Config;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::gateway::{Gateway, Reply};
use crate::metrics::Metrics;
use crate::openai::{self, Endpoint};
use crate::routing::Route;
use crate::upstream::{CallGate, OpenGate};

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
    /// Teams, keys, prices, budgets and experiments.
    pub policies: policies::Policies,
    /// The budget gate every paid call goes through, when the server keeps budgets.
    pub budget: Option<Arc<BudgetGate>>,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: usize,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
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
    /// Builds the state from a validated configuration.
    pub fn new(config: &Config, gate: Arc<dyn CallGate>) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new()?);
        let gateway = Gateway::new(config, gate, Arc::clone(&metrics))?;
        Ok(Self {
            gateway,
            policies: config.policies.clone(),
            budget: None,
            metrics,
            max_body_bytes: config.server.max_body_bytes,
        })
    }
}

/// The HTTP routes.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
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
        let caller = auth::authenticate(&state.policies, &headers)?;
        let body = body.map_err(|rejection| body_error(&rejection, state.max_body_bytes))?;
        let request = openai::parse_request(endpoint, &body)?;
        if let Some(mut caller) = caller {
            let user = request.body.get("user").and_then(serde_json::Value::as_str);
            auth::assign_variant(&state.policies, &mut caller, user, &headers);
            let variant = caller.experiment.as_ref().map(|(_, v)| v.as_str());
            if let Some(policy) = state.policies.policy(&caller.team, &caller.key_id, variant) {
                ctx.policy = Some(Arc::new(state.gateway.request_policy(policy)));
            }
            if let Some(budget) = &state.budget {
                budget.open(&ctx.id, &caller.team, &caller.key_id);
            }
            ctx.team = Some(caller.team);
            ctx.key_id = Some(caller.key_id);
            if let Some((experiment, variant)) = caller.experiment {
                ctx.experiment = Some(experiment);
                ctx.variant = Some(variant);
            }
        }
        let route = route_header(&headers)?;
        let reply = state.gateway.complete(&mut ctx, request, route).await;
        // Every paid call of the request has reserved by now (a stream's only call
        // happened before its headers).
        if let Some(budget) = &state.budget {
            budget.close(&ctx.id);
        }
        reply
    }
    .await;
    match result {
        Ok(reply) => reply_response(reply, ctx, &state),
        Err(error) => {
            if !matches!(
                error,
                ApiError::MalformedJson(_) | ApiError::InvalidRequest { .. }
            ) {
                tracing::info!(request_id = %ctx.id, %error, "request failed");
            }
            let mut response = error_response(&error);
            ctx.response_ready(response.status().as_u16());
            cascade_headers(response.headers_mut(), &ctx);
            response
        }
    }
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

fn reply_response(reply: Reply, mut ctx: RequestContext, state: &AppState) -> Response {
    let content_type = if reply.is_stream() {
        "text/event-stream"
    } else {
        "application/json"
    };
    ctx.response_ready(200);
    let mut response = Response::builder().status(StatusCode::OK);
    if let Some(h) = response.headers_mut() {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if reply.is_stream() {
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        }
        cascade_headers(h, &ctx);
    }
    let aggregate = ctx
        .policy
        .as_ref()
        .map_or_else(|| state.gateway.aggregate(), |p| p.policy.aggregate);
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
    if ctx.degraded {
        set(h, headers::DEGRADED, "remote-unavailable");
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

async fn models(State(state): State<Arc<AppState>>) -> Response {
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
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found(request: Request) -> Response {
    error_response(&ApiError::NotFound(request.uri().path().to_string()))
}

/// A server running on the current tokio runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Opens the storage, binds `config.server.listen` and starts serving with every paid
    /// call reserved against the budgets in storage.
    pub async fn start(config: &Config) -> Result<Self, StartError> {
        let storage = crate::storage::connect(&config.storage).await?;
        let budget = Arc::new(BudgetGate::new(storage.clone(), config.policies.clone()));
        let gate: Arc<dyn CallGate> = Arc::clone(&budget) as Arc<dyn CallGate>;
        let server = Self::start_inner(config, gate, Some(budget)).await?;
        // Reservations of requests that died (a crash elsewhere, a lost settle) are released
        // after the TTL; `reserve` does so too, but only when a budget looks full.
        let period =
            std::time::Duration::from_secs(config.storage.reservation_ttl_secs.clamp(1, 60));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                if let Err(e) = storage.expire_reservations(now).await {
                    tracing::warn!(error = %e, "cannot expire reservations");
                }
            }
        });
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
        Self::start_inner(config, gate, None).await
    }

    async fn start_inner(
        config: &Config,
        gate: Arc<dyn CallGate>,
        budget: Option<Arc<BudgetGate>>,
    ) -> Result<Self, StartError> {
        let mut state = AppState::new(config, gate)?;
        state.budget = budget;
        let state = Arc::new(state);
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let (shutdown, signal) = oneshot::channel::<()>();
        let app = router(Arc::clone(&state));
        // Headers and body may go out in separate writes; without NODELAY,
        // Nagle's algorithm holds the second one back for a delayed ACK.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = signal.await;
                })
                .await
        });
        Ok(Self {
            addr,
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

    /// Asks the server to stop without waiting.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
