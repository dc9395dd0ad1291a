//! Hard limits on what one request may ask for: each is checked before any work is done
//! or money spent, and breaking one is a 4xx in OpenAI's error format, never a hang or a
//! remote call paid for an absurd request.

use std::time::Duration;

use axum::http::HeaderMap;

use serde_json::Value;

use crate::openai::{CompletionRequest, Endpoint};

/// Why a request breaks a limit; `LimitError` turns it into the API's error body (400, or
/// 431 for headers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("The prompt is longer than the limit of {limit} characters.")]
    PromptTooLong { limit: usize, param: String },
    #[error("The request headers are larger than the limit of {limit} bytes.")]
    HeadersTooLarge { limit: usize },
}

/// Validated `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_messages: usize,
    pub max_prompt_chars: usize,
    pub max_output_tokens: usize,
    pub max_header_bytes: usize,
    pub request_timeout: Duration,
}

impl RequestLimits {
    /// Checks a parsed generation request against the limits.
    pub fn check(&self, request: &CompletionRequest) -> Result<(), LimitError> {
        if let Some(Value::Array(messages)) = request.body.get("messages") {
            if messages.len() > self.max_messages {
                return Err(LimitError::InvalidRequest {
                    message: format!(
                        "`messages` has {} entries; the limit is {}",
                        messages.len(),
                        self.max_messages
                    ),
                    param: Some("messages".into()),
                });
            }
        }
        if let Some(max_tokens) = request.max_tokens.filter(|&m| m > self.max_output_tokens) {
            // Named as sent: `max_completion_tokens` wins over `max_tokens` in parsing too.
            let param = if request
                .body
                .get("max_completion_tokens")
                .is_some_and(|v| !v.is_null())
            {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            return Err(LimitError::InvalidRequest {
                message: format!(
                    "`{param}` is {max_tokens}; the limit is {}",
                    self.max_output_tokens
                ),
                param: Some(param.into()),
            });
        }
        let param = match request.endpoint {
            Endpoint::Chat => "messages",
            Endpoint::Completions => "prompt",
        };
        if let Some(prompt) = request.body.get(param) {
            let chars = prompt_chars(prompt, self.max_prompt_chars);
            if chars > self.max_prompt_chars {
                return Err(LimitError::PromptTooLong {
                    limit: self.max_prompt_chars,
                    param: param.into(),
                });
            }
        }
        Ok(())
    }

    /// Checks the total size of the request's headers.
    pub fn check_headers(&self, headers: &HeaderMap) -> Result<(), LimitError> {
        let bytes = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .fold(0usize, usize::saturating_add);
        if bytes > self.max_header_bytes {
            return Err(LimitError::HeadersTooLarge {
                limit: self.max_header_bytes,
            });
        }
        Ok(())
    }
}

/// Characters of prompt text in `value`: every string's characters (but those of `role` and
/// `type` fields), one per number (a token id); stops counting once past `stop_after`. Iterative, so nesting depth costs no
/// stack (serde_json bounds it at 128 anyway).
fn prompt_chars(value: &Value, stop_after: usize) -> usize {
    let mut total = 0usize;
    let mut pending = vec![value];
    while let Some(v) = pending.pop() {
        match v {
            Value::String(s) => total = total.saturating_add(s.chars().count()),
            Value::Number(_) => total = total.saturating_add(1),
            Value::Array(items) => pending.extend(items),
            // `role` and a content part's `type` are structure, not prompt text.
            Value::Object(fields) => pending.extend(
                fields
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "role" | "type"))
                    .map(|(_, v)| v),
            ),
            Value::Null | Value::Bool(_) => {}
        }
        if total > stop_after {
            break;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use axum::http::HeaderValue;
    use serde_json::json;

    use super::*;
    use crate::error::ApiError;
    use crate::openai::parse_request;

    fn small() -> RequestLimits {
        RequestLimits {
            max_messages: 2,
            max_prompt_chars: 10,
            max_output_tokens: 100,
            max_header_bytes: 64,
            request_timeout: Duration::from_secs(1),
        }
    }

    fn chat(body: Value) -> CompletionRequest {
        parse_request(Endpoint::Chat, body.to_string().as_bytes()).unwrap()
    }

    fn param(result: Result<(), LimitError>) -> String {
        match result.map_err(ApiError::from) {
            Err(e) => e.body()["error"]["param"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            Ok(()) => panic!("expected an error"),
        }
    }

    #[test]
    fn a_request_within_every_limit_passes() {
        let r = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}),
        );
        small().check(&r).unwrap();
    }

    #[test]
    fn too_many_messages_is_a_400_on_messages() {
        let m = json!({"role": "user", "content": "a"});
        let r = chat(json!({"model": "m", "messages": [m, m, m]}));
        let e = ApiError::from(small().check(&r).unwrap_err());
        assert_eq!(e.status(), 400);
        assert_eq!(e.body()["error"]["param"], "messages");
    }

    #[test]
    fn max_tokens_above_the_cap_names_the_parameter_sent() {
        let m = json!([{"role": "user", "content": "a"}]);
        let r = chat(json!({"model": "m", "messages": m, "max_tokens": 101}));
        assert_eq!(param(small().check(&r)), "max_tokens");
        let r = chat(json!({"model": "m", "messages": m, "max_completion_tokens": 101}));
        assert_eq!(param(small().check(&r)), "max_completion_tokens");
    }

    #[test]
    fn prompt_text_over_the_cap_is_context_length_exceeded() {
        let parts = json!([{"type": "text", "text": "123456"}, {"type": "text", "text": "78901"}]);
        let r = chat(json!({"model": "m", "messages": [{"role": "user", "content": parts}]}));
        let e = ApiError::from(small().check(&r).unwrap_err());
        assert_eq!(e.status(), 400);
        assert_eq!(e.body()["error"]["code"], "context_length_exceeded");
        // Characters, not bytes: ten two-byte characters fit.
        let r =
            chat(json!({"model": "m", "messages": [{"role": "user", "content": "éééééééééé"}]}));
        small().check(&r).unwrap();
        // Token ids count one each.
        let r = parse_request(
            Endpoint::Completions,
            json!({"model": "m", "prompt": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(param(small().check(&r)), "prompt");
    }

    #[test]
    fn headers_over_the_cap_are_a_431() {
        let mut h = HeaderMap::new();
        h.insert("x-small", HeaderValue::from_static("ok"));
        small().check_headers(&h).unwrap();
        h.insert("x-big", HeaderValue::from_str(&"a".repeat(64)).unwrap());
        assert_eq!(
            ApiError::from(small().check_headers(&h).unwrap_err()).status(),
            431
        );
    }
}
