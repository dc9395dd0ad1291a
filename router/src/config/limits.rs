//! `[limits]`: hard limits on one request, as written and validated.

use super::*;

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

pub(super) fn invalid_limit(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("limits.{key}"),
        message: message.into(),
    }
}

/// The limits of a configuration that sets none.
impl Default for RequestLimits {
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

/// Checks `[limits]`: every limit must be positive (a limit of zero would refuse
/// every request).
pub(super) fn validate_limits(raw: &RawLimits) -> Result<RequestLimits, ConfigError> {
    for (key, value) in [
        ("max_messages", raw.max_messages),
        ("max_prompt_chars", raw.max_prompt_chars),
        ("max_output_tokens", raw.max_output_tokens),
        ("max_header_bytes", raw.max_header_bytes),
    ] {
        if value == 0 {
            return Err(invalid_limit(key, "must be positive"));
        }
    }
    if raw.max_header_bytes > HEADER_BYTES_CEILING {
        return Err(invalid_limit(
            "max_header_bytes",
            format!("must be at most {HEADER_BYTES_CEILING} (hyper's own limit is near)"),
        ));
    }
    if raw.request_timeout_ms == 0 {
        return Err(invalid_limit("request_timeout_ms", "must be positive"));
    }
    Ok(RequestLimits {
        max_messages: raw.max_messages,
        max_prompt_chars: raw.max_prompt_chars,
        max_output_tokens: raw.max_output_tokens,
        max_header_bytes: raw.max_header_bytes,
        request_timeout: Duration::from_millis(raw.request_timeout_ms),
    })
}
