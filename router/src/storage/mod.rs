//! Durable storage: the per-request ledger and atomic budget reservations.
//!
//! One schema and one behaviour on two backends: an embedded SQLite file (WAL; see
//! [`SqliteSync`] for when it fsyncs) for a single process, and PostgreSQL for several replicas sharing budgets. The query
//! code is written once in `common/` and compiled once per backend (see `sqlite.rs` and
//! `postgres.rs`), so the two cannot drift apart. See `docs/storage.md`.

mod error;
mod model;
mod postgres;
pub(crate) mod schema;
mod signals;
mod sqlite;

#[cfg(test)]
mod tests;

pub use error::StorageError;
pub use model::{
    LedgerRecord, Reservation, ScopeLimit, ScopeState, SignalRecord, UsageSummary, VariantSample,
};
pub use signals::{EncodedSignals, RequestSignals, SignalDecodeError};

/// How to reach the database and how long a reservation may be held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// `sqlite://path/to/cascade.db`, `sqlite::memory:` or `postgres://user@host/db`.
    pub url: String,
    /// Upper bound on pooled connections (an in-memory SQLite database always uses one).
    pub max_connections: u32,
    /// After this long an unsettled reservation is presumed orphaned and its budget released.
    pub reservation_ttl_secs: u64,
    /// How a SQLite file commits; PostgreSQL ignores it (its own `synchronous_commit` applies).
    pub sqlite_sync: SqliteSync,
}

/// What a SQLite commit waits for before it returns (`storage.sqlite_sync`).
///
/// Both keep the promise a client relies on: a request whose response completed has its record
/// after the gateway process dies, even by `kill -9`, because in WAL mode a commit has reached
/// the operating system before it returns. They differ only when the whole machine stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SqliteSync {
    /// `synchronous=NORMAL`: no fsync per commit (the WAL is fsynced at checkpoints). A power
    /// cut or kernel crash can lose the last commits; a process crash loses nothing.
    #[default]
    ProcessCrash,
    /// `synchronous=FULL`: the WAL is fsynced on every commit, so records also survive a power
    /// cut, at the price of one fsync per group commit on the request path.
    PowerLoss,
}

/// Handle to the ledger and budget store; cheap to clone, all clones share one pool.
#[derive(Debug, Clone)]
pub struct Storage {
    backend: Backend,
    reservation_ttl_ms: i64,
}

/// The connection pool of whichever database the URL named.
#[derive(Debug, Clone)]
enum Backend {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// Runs the same function of the backend module that matches the pool.
macro_rules! on_backend {
    ($storage:expr, $module:ident :: $function:ident ( $($arg:expr),* $(,)? )) => {
        match &$storage.backend {
            Backend::Sqlite(pool) => sqlite::$module::$function(pool, $($arg),*).await,
            Backend::Postgres(pool) => postgres::$module::$function(pool, $($arg),*).await,
        }
    };
}

/// A private in-memory database, for unit tests of the modules that write to storage.
#[cfg(test)]
pub(crate) async fn in_memory() -> Storage {
    #[allow(clippy::expect_used)]
    connect(&StorageConfig {
        url: "sqlite::memory:".into(),
        max_connections: 1,
        reservation_ttl_secs: 60,
        sqlite_sync: SqliteSync::default(),
    })
    .await
    .expect("an in-memory SQLite database opens")
}

/// Opens the database named by `cfg.url` and brings its schema up to date.
///
/// A SQLite file is created if missing and opened in WAL mode with the `synchronous` level
/// `cfg.sqlite_sync` names, so a record whose write returned survives the process being killed
/// (and, with [`SqliteSync::PowerLoss`], a power cut).
pub async fn connect(cfg: &StorageConfig) -> Result<Storage, StorageError> {
    if cfg.max_connections == 0 {
        return Err(StorageError::Config(
            "max_connections must be at least 1".into(),
        ));
    }
    let reservation_ttl_ms = cfg
        .reservation_ttl_secs
        .checked_mul(1000)
        .and_then(|ms| i64::try_from(ms).ok())
        .filter(|ms| *ms > 0)
        .ok_or_else(|| {
            StorageError::Config(format!(
                "reservation_ttl_secs = {} must be positive and fit in milliseconds",
                cfg.reservation_ttl_secs
            ))
        })?;
    let url = cfg.url.trim();
    let backend = if url.starts_with("sqlite:") {
        Backend::Sqlite(sqlite::open(url, cfg.max_connections, cfg.sqlite_sync).await?)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Backend::Postgres(postgres::open(url, cfg.max_connections).await?)
    } else {
        return Err(StorageError::Config(
            "storage url must start with sqlite: or postgres://".into(),
        ));
    };
    let storage = Storage {
        backend,
        reservation_ttl_ms,
    };
    on_backend!(storage, migrate::run())?;
    Ok(storage)
}

impl Storage {
    /// Atomically reserves `amount_nanos` against every scope, or nothing at all.
    ///
    /// Succeeds only if `spent + reserved + amount <= limit` holds for every scope at once,
    /// even with concurrent callers in other processes sharing the database. Otherwise fails
    /// with [`StorageError::BudgetExhausted`] naming the first overflowing scope in the order
    /// given. Before giving up it releases reservations older than the TTL and tries once more,
    /// so a crashed request never blocks a budget for longer than the TTL. With no scopes it
    /// always succeeds. A scope listed twice counts once, with the smaller limit.
    pub async fn reserve(
        &self,
        request_id: &str,
        scopes: &[ScopeLimit],
        amount_nanos: u64,
        now_unix_ms: i64,
    ) -> Result<Reservation, StorageError> {
        let ttl = self.reservation_ttl_ms;
        on_backend!(
            self,
            budget::reserve(request_id, scopes, amount_nanos, now_unix_ms, ttl)
        )
    }

    /// Replaces a reservation by the real cost, which is recorded even above the limit.
    ///
    /// Idempotent: settling a settled reservation does nothing. Settling a reservation that
    /// expired or was released still records the spend, because the money was spent.
    pub async fn settle(
        &self,
        reservation_id: &str,
        actual_nanos: u64,
    ) -> Result<(), StorageError> {
        on_backend!(self, budget::settle(reservation_id, actual_nanos))
    }

    /// Gives a reservation back without spend (the paid call never happened); idempotent.
    pub async fn release(&self, reservation_id: &str) -> Result<(), StorageError> {
        on_backend!(self, budget::release(reservation_id))
    }

    /// Releases reservations older than the TTL and returns how many.
    ///
    /// Also forgets finished reservations older than a week, which bounds the table's size;
    /// settling one of those afterwards reports `NotFound`.
    pub async fn expire_reservations(&self, now_unix_ms: i64) -> Result<u64, StorageError> {
        on_backend!(
            self,
            budget::expire_reservations(now_unix_ms, self.reservation_ttl_ms)
        )
    }

    /// A scope's spend and outstanding reservations (zero for a scope never used).
    pub async fn scope_state(&self, scope: &str) -> Result<ScopeState, StorageError> {
        on_backend!(self, budget::scope_state(scope))
    }

    /// Stores one request's record; a second record with the same id is ignored.
    pub async fn record(&self, rec: &LedgerRecord) -> Result<(), StorageError> {
        on_backend!(self, ledger::record(rec))
    }

    /// Stores several records in one transaction (one commit for all); records whose id
    /// exists are ignored. All or none are stored.
    pub async fn record_batch(&self, records: &[LedgerRecord]) -> Result<(), StorageError> {
        on_backend!(self, ledger::record_batch(records))
    }

    /// Attaches a client's score in [0, 1] (and comment) to a request; the latest wins.
    pub async fn record_feedback(
        &self,
        request_id: &str,
        score: f64,
        comment: Option<&str>,
        now_unix_ms: i64,
    ) -> Result<(), StorageError> {
        on_backend!(
            self,
            ledger::record_feedback(request_id, score, comment, now_unix_ms)
        )
    }

    /// Deletes the kept signals (`log_signals`) of requests that arrived before
    /// `before_unix_ms` and returns how many; their ledger records stay.
    pub async fn forget_signals(&self, before_unix_ms: i64) -> Result<u64, StorageError> {
        on_backend!(self, ledger::forget_signals(before_unix_ms))
    }

    /// The record of one request, if there is one.
    pub async fn get_record(&self, id: &str) -> Result<Option<LedgerRecord>, StorageError> {
        on_backend!(self, ledger::get_record(id))
    }

    /// Totals for one team over `[since, until)` (milliseconds since the Unix epoch).
    pub async fn team_usage(
        &self,
        team: &str,
        since_unix_ms: i64,
        until_unix_ms: i64,
    ) -> Result<UsageSummary, StorageError> {
        on_backend!(self, ledger::team_usage(team, since_unix_ms, until_unix_ms))
    }

    /// Totals per team over `[since, until)`, sorted by team; records without a team are
    /// grouped under the empty string.
    pub async fn spend_by_team(
        &self,
        since_unix_ms: i64,
        until_unix_ms: i64,
    ) -> Result<Vec<(String, UsageSummary)>, StorageError> {
        on_backend!(self, ledger::spend_by_team(since_unix_ms, until_unix_ms))
    }

    /// Every request of an experiment that was assigned a variant, oldest first.
    pub async fn variant_samples(
        &self,
        experiment_id: &str,
    ) -> Result<Vec<VariantSample>, StorageError> {
        on_backend!(self, ledger::variant_samples(experiment_id))
    }

    /// Up to `limit` requests in `[since, until)` that carry a confidence value (of `team`
    /// only, when given), oldest first, with their kept signals: the tokens of each, the hidden
    /// states only of those served locally with feedback (the probe's labels).
    pub async fn records_with_signals(
        &self,
        team: Option<&str>,
        since_unix_ms: i64,
        until_unix_ms: i64,
        limit: u32,
    ) -> Result<Vec<SignalRecord>, StorageError> {
        on_backend!(
            self,
            ledger::records_with_signals(team, since_unix_ms, until_unix_ms, limit)
        )
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(pool) => pool.close().await,
            Backend::Postgres(pool) => pool.close().await,
        }
    }
}
