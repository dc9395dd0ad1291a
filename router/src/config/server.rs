//! `[server]`: where the gateway listens and how it runs.

use super::*;

/// `[server]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    /// The model name that routes through the cascade.
    pub model_name: String,
    pub max_body_bytes: u64,
    /// Async worker threads; 0 picks min(4, CPUs).
    pub worker_threads: usize,
    /// On SIGTERM, how long in-flight requests may take to finish (and, after that, how
    /// long settling reservations and writing the ledger may take).
    pub shutdown_grace_ms: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            model_name: "cascade".into(),
            max_body_bytes: 4 * 1024 * 1024,
            worker_threads: 0,
            shutdown_grace_ms: 30_000,
        }
    }
}

/// Validated `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub model_name: String,
    pub max_body_bytes: usize,
    pub worker_threads: usize,
    pub shutdown_grace: Duration,
}

pub(super) fn validate_server(raw: &RawServer) -> Result<ServerConfig, ConfigError> {
    let listen = raw.listen.parse().map_err(|e| {
        invalid(
            "server.listen",
            format!("`{}` is not an address:port ({e})", raw.listen),
        )
    })?;
    if raw.model_name.trim().is_empty() {
        return Err(invalid("server.model_name", "must not be empty"));
    }
    if raw.max_body_bytes == 0 {
        return Err(invalid("server.max_body_bytes", "must be positive"));
    }
    // The gateway's own work per request is tens of microseconds; more
    // threads than that needs only add cross-thread wake-ups (p99 jitter)
    // and compete with the local model's compute threads for cores.
    let worker_threads = match raw.worker_threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
        n => n,
    };
    Ok(ServerConfig {
        listen,
        model_name: raw.model_name.clone(),
        max_body_bytes: usize::try_from(raw.max_body_bytes).unwrap_or(usize::MAX),
        worker_threads,
        shutdown_grace: Duration::from_millis(raw.shutdown_grace_ms),
    })
}
