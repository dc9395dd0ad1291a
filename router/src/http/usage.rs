//! Feedback, usage and the admin API's spend and experiment reports.

use super::*;

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
pub(super) async fn feedback(
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
pub(super) async fn usage(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
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
pub(super) struct SpendQuery {
    #[serde(default)]
    window: Option<String>,
}

/// `GET /admin/spend?window=day|month`: every team's spend and budget.
pub(super) async fn admin_spend(
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
pub(super) async fn admin_experiment(
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
