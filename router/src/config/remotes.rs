//! `[[remotes]]`: the paid models, how to reach them and how patiently.

use super::*;

/// One `[[remotes]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRemote {
    /// The name clients and the policy use.
    pub name: String,
    /// Model name sent upstream; defaults to `name`.
    pub model: Option<String>,
    /// e.g. `https://api.openai.com/v1`.
    pub base_url: Option<String>,
    /// Environment variable holding the base URL; wins over `base_url` when set.
    pub base_url_env: Option<String>,
    /// Environment variable holding the API key (never the key itself).
    pub api_key_env: Option<String>,
    /// How the key is sent: `bearer` (Authorization header) or `api-key`
    /// (Azure OpenAI's header).
    pub auth: String,
    pub timeout_ms: u64,
    pub max_retries: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// The largest response body (or, streamed, the largest event) read from this remote.
    pub max_response_bytes: u64,
    /// Consecutive failed attempts that open this remote's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before letting one probe through.
    pub breaker_cooldown_ms: u64,
}

impl Default for RawRemote {
    fn default() -> Self {
        Self {
            name: String::new(),
            model: None,
            base_url: None,
            base_url_env: None,
            api_key_env: None,
            auth: "bearer".into(),
            timeout_ms: 60_000,
            max_retries: 2,
            backoff_base_ms: 100,
            backoff_max_ms: 2_000,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
        }
    }
}

/// 16 MiB: far above any chat completion, far below what would hurt the process.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

/// Validated `[[remotes]]` entry. Its `Debug` leaves the API key out, so no debug print or
/// log of a configuration can leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    pub name: String,
    pub model: String,
    /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The key read from `api_key_env`; `None` without one, or while that variable is unset
    /// (see [`Config::check_secrets`]).
    pub api_key: Option<String>,
    /// The variable the key is read from, for the error that names it.
    pub api_key_env: Option<String>,
    pub auth: RemoteAuth,
    pub timeout: Duration,
    pub max_retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// The largest body, or streamed event, read from this remote.
    pub max_response_bytes: usize,
    /// Consecutive failed attempts that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before a probe.
    pub breaker_cooldown: Duration,
}

impl std::fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("name", &self.name)
            .field("model", &self.model)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("api_key_env", &self.api_key_env)
            .field("auth", &self.auth)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

/// How a remote expects its API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteAuth {
    /// `Authorization: Bearer <key>` (OpenAI, vLLM, llama.cpp, Cascade).
    Bearer,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKey,
}

pub(super) fn validate_remote(
    i: usize,
    raw: &RawRemote,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RemoteConfig, ConfigError> {
    let key = |field: &str| format!("remotes[{i}].{field}");
    if raw.name.trim().is_empty() {
        return Err(invalid(key("name"), "is required"));
    }
    let from_env = raw
        .base_url_env
        .as_ref()
        .and_then(|var| env(var))
        .filter(|v| !v.is_empty());
    let base_url = match (from_env, &raw.base_url) {
        (Some(url), _) => url,
        (None, Some(url)) => url.clone(),
        (None, None) => {
            let hint = match &raw.base_url_env {
                Some(var) => format!("set the environment variable {var} or base_url"),
                None => "set base_url or base_url_env".into(),
            };
            return Err(invalid(key("base_url"), format!("no base URL: {hint}")));
        }
    };
    let parsed = reqwest::Url::parse(&base_url)
        .map_err(|e| invalid(key("base_url"), format!("`{base_url}` is not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(
            key("base_url"),
            format!("`{base_url}` is not an http(s) URL"),
        ));
    }
    // A missing key is not an error here: commands that only read the ledger (`report`)
    // need no secret. `Config::check_secrets` refuses it where remotes are called.
    let api_key = raw
        .api_key_env
        .as_ref()
        .and_then(|var| env(var))
        .filter(|v| !v.is_empty());
    let auth = match raw.auth.as_str() {
        "bearer" => RemoteAuth::Bearer,
        "api-key" => RemoteAuth::ApiKey,
        other => {
            return Err(invalid(
                key("auth"),
                format!("unknown scheme `{other}` (choose bearer or api-key)"),
            ))
        }
    };
    if raw.timeout_ms == 0 {
        return Err(invalid(key("timeout_ms"), "must be positive"));
    }
    if raw.backoff_max_ms < raw.backoff_base_ms {
        return Err(invalid(
            key("backoff_max_ms"),
            "must be at least backoff_base_ms",
        ));
    }
    // A limit below a kilobyte would refuse ordinary error bodies and stream events.
    if raw.max_response_bytes < 1024 {
        return Err(invalid(key("max_response_bytes"), "must be at least 1024"));
    }
    if raw.breaker_failures == 0 {
        return Err(invalid(key("breaker_failures"), "must be at least 1"));
    }
    if raw.breaker_cooldown_ms == 0 {
        return Err(invalid(key("breaker_cooldown_ms"), "must be positive"));
    }
    Ok(RemoteConfig {
        name: raw.name.clone(),
        model: raw.model.clone().unwrap_or_else(|| raw.name.clone()),
        base_url: base_url.trim_end_matches('/').to_string(),
        api_key,
        api_key_env: raw.api_key_env.clone(),
        auth,
        timeout: Duration::from_millis(raw.timeout_ms),
        max_retries: raw.max_retries,
        backoff_base: Duration::from_millis(raw.backoff_base_ms),
        backoff_max: Duration::from_millis(raw.backoff_max_ms),
        max_response_bytes: usize::try_from(raw.max_response_bytes).unwrap_or(usize::MAX),
        breaker_failures: raw.breaker_failures,
        breaker_cooldown: Duration::from_millis(raw.breaker_cooldown_ms),
    })
}
