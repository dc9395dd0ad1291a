//! `[storage]`: the ledger and budget database, and what a record it refuses does.

use super::*;

/// `[storage]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStorage {
    /// `sqlite://file` (relative to the config file's folder), `sqlite::memory:`
    /// or `postgres://user@host/db`.
    pub url: String,
    pub max_connections: u32,
    /// After this long an unsettled reservation is presumed orphaned.
    pub reservation_ttl_secs: u64,
    /// What a ledger record that cannot be written does: `spool` (to `spool_path`, replayed
    /// later; the answer goes out) or `fail_closed` (the client gets 503).
    pub on_ledger_failure: String,
    /// The JSONL file of records waiting for the database; relative to the config's folder.
    pub spool_path: String,
    /// What a SQLite commit waits for: `process_crash` (no fsync per commit; records survive
    /// the process being killed) or `power_loss` (fsync per commit; they also survive the
    /// machine losing power).
    pub sqlite_sync: String,
    /// Days the kept confidence signals of a request (a policy's `log_signals`) stay in the
    /// database; 0 keeps them for ever. The ledger records themselves are never deleted.
    pub signals_retention_days: u32,
}

impl Default for RawStorage {
    fn default() -> Self {
        Self {
            url: "sqlite://cascade.db".into(),
            max_connections: 8,
            reservation_ttl_secs: 300,
            on_ledger_failure: "spool".into(),
            spool_path: "cascade-ledger-spool.jsonl".into(),
            sqlite_sync: "process_crash".into(),
            signals_retention_days: 90,
        }
    }
}

/// What a ledger record that cannot be written does (`storage.on_ledger_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLedgerFailure {
    /// Append it to the spool file (fsynced) and answer; replay it when the database heals.
    Spool,
    /// Answer 503 `ledger_unavailable` instead of an answer without a record.
    FailClosed,
}

/// Validated ledger-failure settings from `[storage]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    pub on_failure: OnLedgerFailure,
    /// The spool file (resolved against the config's folder).
    pub spool_path: PathBuf,
    /// How long kept signals stay (`storage.signals_retention_days`); `None`: for ever.
    pub signals_retention: Option<std::time::Duration>,
}

pub(super) fn validate_storage(
    raw: &RawStorage,
    base_dir: Option<&Path>,
) -> Result<StorageConfig, ConfigError> {
    let url = raw.url.trim();
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        return Err(invalid(
            "storage.url",
            format!("`{url}` must start with sqlite:, postgres:// or postgresql://"),
        ));
    }
    if raw.max_connections == 0 {
        return Err(invalid("storage.max_connections", "must be positive"));
    }
    if raw.reservation_ttl_secs == 0 {
        return Err(invalid("storage.reservation_ttl_secs", "must be positive"));
    }
    let sqlite_sync = match raw.sqlite_sync.as_str() {
        "process_crash" => SqliteSync::ProcessCrash,
        "power_loss" => SqliteSync::PowerLoss,
        other => {
            return Err(invalid(
                "storage.sqlite_sync",
                format!("unknown level `{other}` (choose process_crash or power_loss)"),
            ))
        }
    };
    Ok(StorageConfig {
        url: resolve_sqlite_path(url, base_dir),
        max_connections: raw.max_connections,
        reservation_ttl_secs: raw.reservation_ttl_secs,
        sqlite_sync,
    })
}

pub(super) fn validate_ledger(
    raw: &RawStorage,
    base_dir: Option<&Path>,
) -> Result<LedgerConfig, ConfigError> {
    let on_failure = match raw.on_ledger_failure.as_str() {
        "spool" => OnLedgerFailure::Spool,
        "fail_closed" => OnLedgerFailure::FailClosed,
        other => {
            return Err(invalid(
                "storage.on_ledger_failure",
                format!("unknown behaviour `{other}` (choose spool or fail_closed)"),
            ))
        }
    };
    let spool = raw.spool_path.trim();
    if spool.is_empty() {
        return Err(invalid("storage.spool_path", "must not be empty"));
    }
    let spool_path = match base_dir {
        Some(dir) if Path::new(spool).is_relative() => dir.join(spool),
        _ => PathBuf::from(spool),
    };
    Ok(LedgerConfig {
        on_failure,
        spool_path,
        signals_retention: (raw.signals_retention_days > 0).then(|| {
            std::time::Duration::from_secs(u64::from(raw.signals_retention_days) * 86_400)
        }),
    })
}

/// A relative SQLite file is taken relative to the config file's folder, so the
/// ledger does not move with the directory the server happens to start in.
pub(super) fn resolve_sqlite_path(url: &str, base_dir: Option<&Path>) -> String {
    let (Some(rest), Some(dir)) = (url.strip_prefix("sqlite://"), base_dir) else {
        return url.to_string();
    };
    let (file, query) = match rest.split_once('?') {
        Some((f, q)) => (f, Some(q)),
        None => (rest, None),
    };
    if file.is_empty() || file == ":memory:" || Path::new(file).is_absolute() {
        return url.to_string();
    }
    let joined = dir.join(file).to_string_lossy().into_owned();
    match query {
        Some(q) => format!("sqlite://{joined}?{q}"),
        None => format!("sqlite://{joined}"),
    }
}
