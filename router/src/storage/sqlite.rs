//! The SQLite backend: an embedded file in WAL mode, for a single process.
//!
//! The query code in `common/` is compiled here with `Db = Sqlite`; this file holds only what
//! differs: how to open the pool, how a writing transaction starts, and the schema.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

use super::schema::{self, Migration};
use super::{SqliteSync, StorageError};

#[path = "common/budget.rs"]
#[expect(clippy::duplicate_mod, reason = "compiled once per backend on purpose")]
pub(super) mod budget;
#[path = "common/ledger.rs"]
#[expect(clippy::duplicate_mod, reason = "compiled once per backend on purpose")]
pub(super) mod ledger;
#[path = "common/migrate.rs"]
#[expect(clippy::duplicate_mod, reason = "compiled once per backend on purpose")]
pub(super) mod migrate;

/// The database the shared query code is compiled for.
type Db = Sqlite;

/// This backend's schema history.
const MIGRATIONS: &[Migration] = schema::SQLITE;

/// No row locks in SQLite: `BEGIN IMMEDIATE` already made the transaction the only writer.
const SELECT_RESERVATION_FOR_UPDATE: &str =
    "SELECT state, amount_nanos, created_unix_ms FROM reservations WHERE id = $1";

/// How long a writer waits for another connection's write transaction before giving up with
/// `Unavailable`; write transactions here last microseconds to a few milliseconds.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens (creating if missing) the database file, or a private in-memory database.
pub(super) async fn open(
    url: &str,
    max_connections: u32,
    sync: SqliteSync,
) -> Result<SqlitePool, StorageError> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|e| StorageError::Config(format!("bad sqlite url: {e}")))?
        .create_if_missing(true)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT);
    if is_in_memory(url) {
        // Every connection to `:memory:` would otherwise be its own empty database, and the
        // database vanishes with its last connection: keep exactly one, forever.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        return Ok(pool);
    }
    // SQLite creates a missing file but not a missing directory (`sqlite://data/cascade.db`).
    // Blocking, but once at start-up and before anything else runs.
    if let Some(dir) = options.get_filename().parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            StorageError::Config(format!("cannot create directory {}: {e}", dir.display()))
        })?;
    }
    let options = options
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous_level(sync));
    Ok(SqlitePoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options)
        .await?)
}

/// In WAL mode a commit has written its frames to the WAL file before it returns whatever the
/// level, so the record is in the operating system's hands and survives the process. FULL adds
/// an fsync per commit so that it also survives the machine; NORMAL leaves that to checkpoints.
fn synchronous_level(sync: SqliteSync) -> SqliteSynchronous {
    match sync {
        SqliteSync::ProcessCrash => SqliteSynchronous::Normal,
        SqliteSync::PowerLoss => SqliteSynchronous::Full,
    }
}

/// Whether the URL names an in-memory database rather than a file.
fn is_in_memory(url: &str) -> bool {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    rest.starts_with(":memory:") || rest.contains("mode=memory")
}

/// Starts a transaction that holds SQLite's single write lock from its first statement.
///
/// A deferred `BEGIN` that reads before it writes can fail with `SQLITE_BUSY_SNAPSHOT` when
/// another connection commits in between, without the busy timeout applying; `IMMEDIATE` waits.
async fn begin_write(pool: &SqlitePool) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

/// Nothing to do: `BEGIN IMMEDIATE` already serialises migrations between processes.
async fn lock_for_migration(_tx: &mut Transaction<'static, Sqlite>) -> Result<(), sqlx::Error> {
    Ok(())
}

#[cfg(test)]
mod unit_tests {
    use super::is_in_memory;

    #[test]
    fn memory_urls_are_told_apart_from_file_urls() {
        assert!(is_in_memory("sqlite::memory:"));
        assert!(is_in_memory("sqlite://file:x?mode=memory&cache=shared"));
        assert!(!is_in_memory("sqlite://data/cascade.db"));
        assert!(!is_in_memory("sqlite:cascade.db"));
    }
}
