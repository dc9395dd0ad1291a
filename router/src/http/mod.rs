//! HTTP: the routes and middleware, over thin handlers by concern (completions, accounts,
//! operations); errors become responses in one place ([`error_response`]).

mod completions;
mod ops;
mod state;
mod usage;

pub use state::{AppState, ReloadError, StateError};

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::accounts;
use crate::auth;
use crate::cascade::context::RequestContext;
use crate::cascade::Reply;
use crate::clock::now_unix_ms as now_ms;
use crate::error::ApiError;
use crate::openai::{self, Endpoint};
use crate::storage::Storage;
use policies::decision::Route;

use completions::{body_error, chat_completions, completions};
use ops::{healthz, metrics, models, not_found, readyz};
use usage::{admin_experiment, admin_spend, feedback, usage};

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
        return error_response(&ApiError::from(error));
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
