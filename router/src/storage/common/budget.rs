//! Budget reservations: reserve, settle, release, expire.
//!
//! Compiled once per backend (`#[path]` from `sqlite.rs` and `postgres.rs`): `Db`,
//! `begin_write` and `SELECT_RESERVATION_FOR_UPDATE` come from the parent module.
//!
//! Why this is race-free: every change to a scope's counters happens inside a write
//! transaction (SQLite: `BEGIN IMMEDIATE`, a single writer; PostgreSQL: row locks), the check
//! and the increment are one conditional statement, and scope rows are always locked in
//! `lock_order`, so concurrent transactions queue instead of deadlocking.

use sqlx::{Pool, Row, Transaction};

use super::{begin_write, Db, SELECT_RESERVATION_FOR_UPDATE};
use crate::storage::model::{
    from_db, lock_order, to_db, PlannedScope, Reservation, ReservationState, ScopeLimit, ScopeState,
};
use crate::storage::StorageError;

/// Finished reservations are kept this long (for idempotent settles), then forgotten.
const FINISHED_RETENTION_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// Creates the scope row with the amount reserved, or adds the amount to an existing row, but
/// only if it stays within the limit; returns no row when it would not. Check and increment
/// are one statement on a locked row, so no other transaction can slip in between.
const RESERVE_SCOPE: &str = "\
    INSERT INTO budget_scopes (scope, spent_nanos, reserved_nanos, created_unix_ms) \
    SELECT $1, 0, $2, $4 WHERE $2 <= $3 \
    ON CONFLICT (scope) DO UPDATE \
        SET reserved_nanos = budget_scopes.reserved_nanos + excluded.reserved_nanos \
        WHERE budget_scopes.spent_nanos + budget_scopes.reserved_nanos \
              + excluded.reserved_nanos <= $3 \
    RETURNING scope";

/// Moves a finished reservation's amount out of `reserved` and its real cost into `spent`.
const ADJUST_SCOPE: &str = "\
    UPDATE budget_scopes \
    SET reserved_nanos = reserved_nanos - $2, spent_nanos = spent_nanos + $3 \
    WHERE scope = $1";

/// Reserves `amount_nanos` against all scopes or none; see `Storage::reserve`.
pub(crate) async fn reserve(
    pool: &Pool<Db>,
    request_id: &str,
    scopes: &[ScopeLimit],
    amount_nanos: u64,
    now_unix_ms: i64,
    ttl_ms: i64,
) -> Result<Reservation, StorageError> {
    let amount = to_db(amount_nanos, "amount_nanos")?;
    let planned = lock_order(scopes)?;
    let full_scope = match try_reserve(pool, request_id, &planned, amount, now_unix_ms).await? {
        Ok(id) => return Ok(Reservation { id, amount_nanos }),
        Err(full_scope) => full_scope,
    };
    // The budget may only look full because crashed requests still hold reservations.
    if expire_stale(pool, now_unix_ms.saturating_sub(ttl_ms)).await? == 0 {
        return Err(StorageError::BudgetExhausted { scope: full_scope });
    }
    match try_reserve(pool, request_id, &planned, amount, now_unix_ms).await? {
        Ok(id) => Ok(Reservation { id, amount_nanos }),
        Err(scope) => Err(StorageError::BudgetExhausted { scope }),
    }
}

/// One attempt at a reservation: `Ok(Ok(id))` when made, `Ok(Err(scope))` when a scope is full.
async fn try_reserve(
    pool: &Pool<Db>,
    request_id: &str,
    planned: &[PlannedScope],
    amount: i64,
    now_unix_ms: i64,
) -> Result<Result<String, String>, StorageError> {
    let mut tx = begin_write(pool).await?;
    // Every scope is tried, not just up to the first full one, so that the error can name the
    // first full scope in the caller's order (key before team before global) rather than in
    // lock order; the whole transaction is rolled back anyway.
    let mut first_full: Option<&PlannedScope> = None;
    for scope in planned {
        let reserved = sqlx::query(RESERVE_SCOPE)
            .bind(&scope.scope)
            .bind(amount)
            .bind(scope.limit)
            .bind(now_unix_ms)
            .fetch_optional(&mut *tx)
            .await?;
        if reserved.is_none() && first_full.is_none_or(|f| scope.caller_index < f.caller_index) {
            first_full = Some(scope);
        }
    }
    if let Some(full) = first_full {
        tx.rollback().await?;
        return Ok(Err(full.scope.clone()));
    }
    // Version 7 UUIDs are time-ordered, which keeps the primary-key index append-mostly.
    let id = uuid::Uuid::now_v7().to_string();
    sqlx::query(
        "INSERT INTO reservations (id, request_id, amount_nanos, created_unix_ms, state) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&id)
    .bind(request_id)
    .bind(amount)
    .bind(now_unix_ms)
    .bind(ReservationState::Held.as_str())
    .execute(&mut *tx)
    .await?;
    for scope in planned {
        sqlx::query("INSERT INTO reservation_scopes (reservation_id, scope) VALUES ($1, $2)")
            .bind(&id)
            .bind(&scope.scope)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Ok(id))
}

/// Replaces a reservation by its real cost; see `Storage::settle`.
pub(crate) async fn settle(
    pool: &Pool<Db>,
    reservation_id: &str,
    actual_nanos: u64,
) -> Result<(), StorageError> {
    let actual = to_db(actual_nanos, "actual_nanos")?;
    let mut tx = begin_write(pool).await?;
    let Some(locked) = lock_reservation(&mut tx, reservation_id).await? else {
        tx.rollback().await?;
        return Err(not_found(reservation_id));
    };
    let still_reserved = match locked.state {
        ReservationState::Settled => {
            tx.rollback().await?;
            return Ok(());
        }
        ReservationState::Held => locked.amount,
        // Its hold was already given back, but the money was spent all the same.
        ReservationState::Released | ReservationState::Expired => 0,
    };
    finish(
        &mut tx,
        reservation_id,
        ReservationState::Settled,
        Some(actual),
        still_reserved,
        actual,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Gives a held reservation back without spend; see `Storage::release`.
pub(crate) async fn release(pool: &Pool<Db>, reservation_id: &str) -> Result<(), StorageError> {
    let mut tx = begin_write(pool).await?;
    let Some(locked) = lock_reservation(&mut tx, reservation_id).await? else {
        tx.rollback().await?;
        return Err(not_found(reservation_id));
    };
    if locked.state != ReservationState::Held {
        tx.rollback().await?;
        return Ok(());
    }
    finish(
        &mut tx,
        reservation_id,
        ReservationState::Released,
        None,
        locked.amount,
        0,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Expires reservations older than the TTL and forgets long-finished ones; see
/// `Storage::expire_reservations`.
pub(crate) async fn expire_reservations(
    pool: &Pool<Db>,
    now_unix_ms: i64,
    ttl_ms: i64,
) -> Result<u64, StorageError> {
    let expired = expire_stale(pool, now_unix_ms.saturating_sub(ttl_ms)).await?;
    sqlx::query("DELETE FROM reservations WHERE state <> $1 AND created_unix_ms < $2")
        .bind(ReservationState::Held.as_str())
        .bind(now_unix_ms.saturating_sub(FINISHED_RETENTION_MS))
        .execute(pool)
        .await?;
    Ok(expired)
}

/// Expires every held reservation created before `cutoff_unix_ms`; returns how many.
///
/// Each one is expired in its own short transaction, because one transaction touching the
/// scopes of many reservations could not lock them all in `lock_order`. Orphaned reservations
/// are rare (a crash), so the per-reservation cost does not matter.
async fn expire_stale(pool: &Pool<Db>, cutoff_unix_ms: i64) -> Result<u64, StorageError> {
    let candidates: Vec<String> =
        sqlx::query_scalar("SELECT id FROM reservations WHERE state = $1 AND created_unix_ms < $2")
            .bind(ReservationState::Held.as_str())
            .bind(cutoff_unix_ms)
            .fetch_all(pool)
            .await?;
    let mut expired = 0;
    for id in candidates {
        let mut tx = begin_write(pool).await?;
        // Re-checked under the lock: it may have been settled since it was listed.
        match lock_reservation(&mut tx, &id).await? {
            Some(r) if r.state == ReservationState::Held && r.created_unix_ms < cutoff_unix_ms => {
                finish(&mut tx, &id, ReservationState::Expired, None, r.amount, 0).await?;
                tx.commit().await?;
                expired += 1;
            }
            _ => tx.rollback().await?,
        }
    }
    Ok(expired)
}

/// A scope's counters; zero for a scope never used.
pub(crate) async fn scope_state(pool: &Pool<Db>, scope: &str) -> Result<ScopeState, StorageError> {
    let row = sqlx::query("SELECT spent_nanos, reserved_nanos FROM budget_scopes WHERE scope = $1")
        .bind(scope)
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else {
        return Ok(ScopeState::default());
    };
    Ok(ScopeState {
        spent_nanos: from_db(row.try_get("spent_nanos")?, "spent_nanos")?,
        reserved_nanos: from_db(row.try_get("reserved_nanos")?, "reserved_nanos")?,
    })
}

/// A reservation row as read under its lock.
struct LockedReservation {
    state: ReservationState,
    amount: i64,
    created_unix_ms: i64,
}

/// Reads a reservation, locking its row on backends that lock rows.
async fn lock_reservation(
    tx: &mut Transaction<'static, Db>,
    reservation_id: &str,
) -> Result<Option<LockedReservation>, StorageError> {
    let row = sqlx::query(SELECT_RESERVATION_FOR_UPDATE)
        .bind(reservation_id)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(LockedReservation {
        state: ReservationState::parse(row.try_get("state")?)?,
        amount: row.try_get("amount_nanos")?,
        created_unix_ms: row.try_get("created_unix_ms")?,
    }))
}

/// Moves a locked reservation to `state` and applies `-unreserve` to `reserved_nanos` and
/// `+spend` to `spent_nanos` of each of its scopes, in lock order.
async fn finish(
    tx: &mut Transaction<'static, Db>,
    reservation_id: &str,
    state: ReservationState,
    actual: Option<i64>,
    unreserve: i64,
    spend: i64,
) -> Result<(), StorageError> {
    sqlx::query("UPDATE reservations SET state = $2, actual_nanos = $3 WHERE id = $1")
        .bind(reservation_id)
        .bind(state.as_str())
        .bind(actual)
        .execute(&mut **tx)
        .await?;
    let mut scopes: Vec<String> =
        sqlx::query_scalar("SELECT scope FROM reservation_scopes WHERE reservation_id = $1")
            .bind(reservation_id)
            .fetch_all(&mut **tx)
            .await?;
    // Sorted here rather than by ORDER BY, whose order depends on the database's collation.
    scopes.sort();
    for scope in scopes {
        sqlx::query(ADJUST_SCOPE)
            .bind(&scope)
            .bind(unreserve)
            .bind(spend)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// The error for an unknown reservation id.
fn not_found(reservation_id: &str) -> StorageError {
    StorageError::NotFound {
        what: "reservation",
        id: reservation_id.to_owned(),
    }
}
