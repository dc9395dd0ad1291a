//! Models, health, readiness, metrics, and the answer for paths that do not exist.

use super::*;

/// `GET /v1/models`: with teams configured it needs a team key, as OpenAI's does, so the
/// remotes a gateway pays for are not listed to anyone who can reach it.
pub(super) async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
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

pub(super) async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

pub(super) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
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

pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
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

pub(super) async fn not_found(request: Request) -> Response {
    error_response(&ApiError::NotFound(request.uri().path().to_string()))
}
