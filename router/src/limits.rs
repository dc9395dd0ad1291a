//! Hard limits on what one request may ask for: each is checked before any work is done
//! or money spent, and breaking one is a 4xx in OpenAI's error format, never a hang or a
//! remote call paid for an absurd request.

use std::time::Duration;

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::ConfigError;
use crate::error::ApiError;
use crate::openai::{CompletionRequest, Endpoint};

/// `[limits]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Most entries in a chat request's `messages`.
    pub max_messages: usize,
    /// Most characters of prompt text (every string in `messages` or `prompt` but `role`
    /// and `type` fields; a token id counts as one).
    pub max_prompt_chars: usize,
    /// Largest `max_tokens` / `max_completion_tokens` a client may ask for.
    pub max_output_tokens: usize,
    /// Most bytes of request headers (names and values).
    pub max_header_bytes: usize,
    /// Longest time from a request's arrival to its response's headers.
    pub request_timeout_ms: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_messages: 1024,
            // About 250k tokens of English: more than any current model's context, so no
            // real prompt is refused, while a 4 MiB body of text is.
            max_prompt_chars: 1_000_000,
            max_output_tokens: 32_768,
            max_header_bytes: 32 * 1024,
            request_timeout_ms: 300_000,
        }
    }
}

/// The largest `max_header_bytes` accepted: hyper refuses headers beyond its own read
/// buffer (about 400 KiB) with a bare 431 before the gateway sees them, so a larger limit
/// would never apply.
pub const HEADER_BYTES_CEILING: usize = 256 * 1024;

/// Validated `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_messages: usize,
    pub max_prompt_chars: usize,
    pub max_output_tokens: usize,
    pub max_header_bytes: usize,
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        let raw = RawLimits::default();
        Self {
            max_messages: raw.max_messages,
            max_prompt_chars: raw.max_prompt_chars,
            max_output_tokens: raw.max_output_tokens,
            max_header_bytes: raw.max_header_bytes,
            request_timeout: Duration::from_millis(raw.request_timeout_ms),
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("limits.{key}"),
        message: message.into(),
    }
}

impl Limits {
    /// Checks `[limits]`: every limit must be positive (a limit of zero would refuse
    /// every request).
    pub fn validate(raw: &RawLimits) -> Result<Self, ConfigError> {
        for (key, value) in [
            ("max_messages", raw.max_messages),
            ("max_prompt_chars", raw.max_prompt_chars),
            ("max_output_tokens", raw.max_output_tokens),
            ("max_header_bytes", raw.max_header_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be positive"));
            }
        }
        if raw.max_header_bytes > HEADER_BYTES_CEILING {
            return Err(invalid(
                "max_header_bytes",
                format!("must be at most {HEADER_BYTES_CEILING} (hyper's own limit is near)"),
            ));
        }
        if raw.request_timeout_ms == 0 {
            return Err(invalid("request_timeout_ms", "must be positive"));
        }
        Ok(Self {
            max_messages: raw.max_messages,
            max_prompt_chars: raw.max_prompt_chars,
            max_output_tokens: raw.max_output_tokens,
            max_header_bytes: raw.max_header_bytes,
            request_timeout: Duration::from_millis(raw.request_timeout_ms),
        })
    }

    /// Checks a parsed generation request against the limits.
    pub fn check(&self, request: &CompletionRequest) -> Result<(), ApiError> {
        if let Some(Value::Array(messages)) = request.body.get("messages") {
            if messages.len() > self.max_messages {
                return Err(ApiError::InvalidRequest {
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
            return Err(ApiError::InvalidRequest {
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
                return Err(ApiError::PromptTooLong {
                    limit: self.max_prompt_chars,
                    param: param.into(),
                });
            }
        }
        Ok(())
    }

    /// Checks the total size of the request's headers.
    pub fn check_headers(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let bytes = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .fold(0usize, usize::saturating_add);
        if bytes > self.max_header_bytes {
            return Err(ApiError::HeadersTooLarge {
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
    use crate::openai::parse_request;

    fn small() -> Limits {
        Limits {
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

    fn param(result: Result<(), ApiError>) -> String {
        match result {
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
        let e = small().check(&r).unwrap_err();
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
        let e = small().check(&r).unwrap_err();
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
        assert_eq!(small().check_headers(&h).unwrap_err().status(), 431);
    }

    #[test]
    fn a_zero_limit_stops_start_up_naming_its_key() {
        let raw = RawLimits {
            max_messages: 0,
            ..RawLimits::default()
        };
        let e = Limits::validate(&raw).unwrap_err().to_string();
        assert!(e.starts_with("limits.max_messages"), "{e}");
        let raw = RawLimits {
            request_timeout_ms: 0,
            ..RawLimits::default()
        };
        assert!(Limits::validate(&raw)
            .unwrap_err()
            .to_string()
            .starts_with("limits.request_timeout_ms"));
        let raw = RawLimits {
            max_header_bytes: 1 << 20,
            ..RawLimits::default()
        };
        assert!(Limits::validate(&raw).is_err());
        assert_eq!(
            Limits::validate(&RawLimits::default()).unwrap(),
            Limits::default()
        );
    }
}
