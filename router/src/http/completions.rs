//! `POST /v1/chat/completions` and `/v1/completions`: authenticate, parse, check the limits,
//! hand the request to the cascade, and write its reply with the cascade's headers; the
//! ledger record is durable before a JSON answer goes out.

use super::*;

pub(super) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    axum::Extension(id): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(state, Endpoint::Chat, id, headers, body).await
}

pub(super) async fn completions(
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
        let policy = state.gateway.policy_of(&ctx);
        if policy.policy.log_prompts() {
            ctx.prompt_text = prompt_text(&request);
        }
        ctx.log_signals = policy.policy.log_signals();
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

pub(super) fn body_error(rejection: &BytesRejection, limit: usize) -> ApiError {
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
