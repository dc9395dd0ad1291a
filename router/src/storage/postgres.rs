//! The PostgreSQL backend, for several replicas sharing budgets and the ledger.
//!
//! The query code in `common/` is compiled here with `Db = Postgres`; this file holds only what
//! differs: how to open the pool, how a writing transaction starts, and the schema. A schema
//! other than `public` can be chosen in the URL: `?options=-c%20search_path%3Dcascade`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use super::schema::{self, Migration};
use super::StorageError;

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
type Db = Postgres;

/// This backend's schema history.
const MIGRATIONS: &[Migration] = schema::POSTGRES;

/// Locks the reservation row so a concurrent settle, release or expiry of the same
/// reservation waits and then sees the new state.
const SELECT_RESERVATION_FOR_UPDATE: &str =
    "SELECT state, amount_nanos, created_unix_ms FROM reservations WHERE id = $1 FOR UPDATE";

/// Key of the transaction-scoped advisory lock that serialises replicas migrating at once.
const MIGRATION_LOCK_KEY: i64 = 0x0C45_CADE;

/// How long a request waits for a pooled connection before failing with `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects a pool to the server.
pub(super) async fn open(url: &str, max_connections: u32) -> Result<PgPool, StorageError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| StorageError::Config(format!("bad postgres url: {e}")))?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await?)
}

/// Starts a READ COMMITTED transaction; atomicity comes from row locks taken in a fixed order
/// and from conditional updates, which re-check their condition on the latest row version.
async fn begin_write(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    pool.begin().await
}

/// Makes replicas that start together apply migrations one after another.
async fn lock_for_migration(tx: &mut Transaction<'static, Postgres>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
