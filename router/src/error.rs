//! Every error a client can receive, mapped to its HTTP status and OpenAI's
//! error body in one place.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use serde_json::json;

use crate::upstream::UpstreamError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("We could not parse the JSON body of your request: {0}")]
    MalformedJson(String),
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    UnknownModel(String),
    #[error("The request body is larger than the limit of {limit} bytes.")]
    BodyTooLarge { limit: usize },
    #[error("The prompt is longer than the limit of {limit} characters.")]
    PromptTooLong { limit: usize, param: String },
    #[error("The request headers are larger than the limit of {limit} bytes.")]
    HeadersTooLarge { limit: usize },
    #[error("The request took longer than the limit of {limit_ms} ms.")]
    RequestTimeout { limit_ms: u128 },
    #[error("Missing or unknown API key: send `Authorization: Bearer <key>`.")]
    Unauthorized,
    #[error("{0}")]
    NotAllowed(String),
    #[error("No route for {0}")]
    NotFound(String),
    #[error("The local model is overloaded; retry later.")]
    Overloaded { retry_after: Duration },
    #[error("The local model is not ready yet; retry later.")]
    NotReady { retry_after: Duration },
    #[error("The local model failed: {0}")]
    Local(String),
    #[error("The remote model failed: {0}")]
    Upstream(#[from] UpstreamError),
    #[error(
        "The budget for this request is exhausted and the policy does not serve it otherwise."
    )]
    BudgetExhausted,
    #[error("Internal error: {0}")]
    Internal(String),
    /// The request's ledger record could not be written and `storage.on_ledger_failure` is
    /// `fail_closed`: no answer goes out without its record.
    #[error("The request ledger is unavailable; the answer is withheld because it could not be recorded. Retry later.")]
    LedgerUnavailable,
}

impl From<crate::limits::LimitError> for ApiError {
    fn from(e: crate::limits::LimitError) -> Self {
        use crate::limits::LimitError;
        match e {
            LimitError::InvalidRequest { message, param } => {
                ApiError::InvalidRequest { message, param }
            }
            LimitError::PromptTooLong { limit, param } => ApiError::PromptTooLong { limit, param },
            LimitError::HeadersTooLarge { limit } => ApiError::HeadersTooLarge { limit },
        }
    }
}

impl From<crate::openai::RequestError> for ApiError {
    fn from(e: crate::openai::RequestError) -> Self {
        match e {
            crate::openai::RequestError::MalformedJson(detail) => ApiError::MalformedJson(detail),
            crate::openai::RequestError::InvalidRequest { message, param } => {
                ApiError::InvalidRequest { message, param }
            }
        }
    }
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_)
            | ApiError::InvalidRequest { .. }
            | ApiError::PromptTooLong { .. } => StatusCode::BAD_REQUEST,
            ApiError::UnknownModel(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            // The gateway (not the client) ran out of time: a gateway timeout, as for a
            // remote that does not answer in time.
            ApiError::RequestTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotAllowed(_) => StatusCode::FORBIDDEN,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Upstream(e) if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            ApiError::BudgetExhausted => StatusCode::TOO_MANY_REQUESTS,
            // The gate refuses calls for a full budget (handled as `BudgetExhausted` by the
            // gateway), or fails closed when it cannot reach the budget store.
            ApiError::Upstream(e) if e.is_budget_exhausted() => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Upstream(
                UpstreamError::Refused { .. } | UpstreamError::CircuitOpen { .. },
            ) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::LedgerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Local(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` and `code` fields.
    fn kind(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ApiError::MalformedJson(_) => ("invalid_request_error", Some("invalid_json")),
            ApiError::InvalidRequest { .. } => ("invalid_request_error", None),
            ApiError::UnknownModel(_) => ("invalid_request_error", Some("model_not_found")),
            ApiError::NotFound(_) => ("invalid_request_error", Some("not_found")),
            ApiError::BodyTooLarge { .. } => ("invalid_request_error", Some("request_too_large")),
            // OpenAI's own code for a prompt beyond the model's context.
            ApiError::PromptTooLong { .. } => {
                ("invalid_request_error", Some("context_length_exceeded"))
            }
            ApiError::HeadersTooLarge { .. } => (
                "invalid_request_error",
                Some("request_header_fields_too_large"),
            ),
            ApiError::RequestTimeout { .. } => ("timeout_error", Some("request_timeout")),
            ApiError::Unauthorized => ("invalid_request_error", Some("invalid_api_key")),
            ApiError::NotAllowed(_) => ("permission_error", Some("not_allowed_by_policy")),
            ApiError::Overloaded { .. } => ("rate_limit_error", Some("local_queue_full")),
            ApiError::NotReady { .. } => ("server_error", Some("local_model_loading")),
            ApiError::Upstream(e) if e.is_timeout() => ("upstream_error", Some("upstream_timeout")),
            ApiError::BudgetExhausted => ("insufficient_quota", Some("budget_exhausted")),
            ApiError::Upstream(e) if e.is_budget_exhausted() => {
                ("insufficient_quota", Some("budget_exhausted"))
            }
            ApiError::Upstream(UpstreamError::Refused { .. }) => {
                ("server_error", Some("budget_store_unavailable"))
            }
            ApiError::Upstream(UpstreamError::CircuitOpen { .. }) => {
                ("upstream_error", Some("circuit_open"))
            }
            ApiError::Upstream(UpstreamError::TooLarge { .. }) => {
                ("upstream_error", Some("upstream_response_too_large"))
            }
            ApiError::Upstream(_) => ("upstream_error", Some("upstream_unavailable")),
            ApiError::LedgerUnavailable => ("server_error", Some("ledger_unavailable")),
            ApiError::Local(_) => ("server_error", Some("local_model_error")),
            ApiError::Internal(_) => ("server_error", None),
        }
    }

    /// The `Retry-After` header value, for errors worth retrying later.
    pub fn retry_after(&self) -> Option<HeaderValue> {
        match self {
            ApiError::Overloaded { retry_after } | ApiError::NotReady { retry_after } => {
                // Whole seconds, at least one: what the header allows.
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                Some(HeaderValue::from(secs.max(1)))
            }
            // The breaker lets a probe through when its cooldown ends.
            ApiError::Upstream(UpstreamError::CircuitOpen { retry_in, .. }) => {
                let secs = retry_in.as_secs() + u64::from(retry_in.subsec_nanos() > 0);
                Some(HeaderValue::from(secs.max(1)))
            }
            ApiError::LedgerUnavailable => Some(HeaderValue::from(1u64)),
            _ => None,
        }
    }

    /// The error's `code`, for the ledger.
    pub fn code(&self) -> &'static str {
        self.kind().1.unwrap_or(self.kind().0)
    }

    /// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = self.kind();
        let param = match self {
            ApiError::InvalidRequest { param, .. } => param.clone(),
            ApiError::PromptTooLong { param, .. } => Some(param.clone()),
            ApiError::UnknownModel(_) => Some("model".into()),
            _ => None,
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_api_contract() {
        assert_eq!(
            ApiError::MalformedJson("x".into()).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ApiError::UnknownModel("x".into()).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            ApiError::BodyTooLarge { limit: 1 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let overloaded = ApiError::Overloaded {
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(overloaded.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(overloaded.retry_after(), Some(HeaderValue::from(2u64)));
        let timeout = ApiError::Upstream(UpstreamError::Timeout {
            upstream: "u".into(),
        });
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        let down = ApiError::Upstream(UpstreamError::Status {
            upstream: "u".into(),
            status: 500,
            detail: String::new(),
        });
        assert_eq!(down.status(), StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn body_has_openai_shape() {
        let b = ApiError::UnknownModel("gpt-9".into()).body();
        assert_eq!(b["error"]["code"], "model_not_found");
        assert_eq!(b["error"]["param"], "model");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert!(b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("gpt-9")));
    }
}
