//! Applies the embedded migrations not yet recorded in `schema_migrations`.
//!
//! Compiled once per backend (`#[path]` from `sqlite.rs` and `postgres.rs`): `Db`, `MIGRATIONS`,
//! `begin_write` and `lock_for_migration` come from the parent module.

use sqlx::Pool;

use super::{begin_write, lock_for_migration, Db, MIGRATIONS};
use crate::storage::schema::CREATE_MIGRATIONS_TABLE;
use crate::storage::StorageError;

/// Brings the schema up to date in one transaction: all pending migrations or none.
///
/// Versions recorded by a newer binary are left alone, so an older replica keeps running
/// during a rolling upgrade (migrations only ever add).
pub(crate) async fn run(pool: &Pool<Db>) -> Result<(), StorageError> {
    let mut tx = begin_write(pool).await?;
    lock_for_migration(&mut tx).await?;
    sqlx::raw_sql(CREATE_MIGRATIONS_TABLE)
        .execute(&mut *tx)
        .await?;
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
        .fetch_all(&mut *tx)
        .await?;
    let now_unix_ms = crate::clock::now_unix_ms();
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let failed = |source| StorageError::Migration {
            version: migration.version,
            source,
        };
        sqlx::raw_sql(migration.sql)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        sqlx::query(
            "INSERT INTO schema_migrations (version, description, applied_unix_ms) \
             VALUES ($1, $2, $3)",
        )
        .bind(migration.version)
        .bind(migration.description)
        .bind(now_unix_ms)
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
        tracing::info!(version = migration.version, "applied storage migration");
    }
    tx.commit().await?;
    Ok(())
}
