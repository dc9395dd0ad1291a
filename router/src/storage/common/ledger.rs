//! The request ledger: one row per request, feedback, and the aggregates reports read.
//!
//! Compiled once per backend (`#[path]` from `sqlite.rs` and `postgres.rs`): `Db` comes from
//! the parent module. Every write is durable when it returns: single statements autocommit,
//! and `record_batch` commits its records together.

use sqlx::{Database, Pool, Row};

use super::Db;
use crate::storage::model::{finite, from_db, status_from_db, to_db};
use crate::storage::{
    EncodedSignals, LedgerRecord, SignalRecord, StorageError, UsageSummary, VariantSample,
};

/// Columns of `LedgerRecord`, in the order `record` binds them.
macro_rules! record_columns {
    () => {
        "id, created_unix_ms, team, key_id, experiment, variant, route, reason, confidence, \
         confidence_aggregate, local_tokens, remote_model, remote_input_tokens, \
         remote_output_tokens, cost_nanos, latency_ms, status, prompt_text, overrun_nanos"
    };
}

/// The `UsageSummary` aggregates; `SUM` is cast back to BIGINT because PostgreSQL widens it
/// to NUMERIC, and `COALESCE`d because it is NULL over no rows.
macro_rules! usage_columns {
    () => {
        "COUNT(*) AS requests, \
         CAST(COALESCE(SUM(CASE WHEN route = 'remote' THEN 1 ELSE 0 END), 0) AS BIGINT) AS escalated, \
         CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT) AS cost_nanos, \
         CAST(COALESCE(SUM(local_tokens), 0) AS BIGINT) AS local_tokens, \
         CAST(COALESCE(SUM(remote_input_tokens), 0) AS BIGINT) AS remote_input_tokens, \
         CAST(COALESCE(SUM(remote_output_tokens), 0) AS BIGINT) AS remote_output_tokens"
    };
}

/// The kept signals' columns, read beside a record's (`LEFT JOIN request_signals`).
macro_rules! signal_columns {
    () => {
        "request_signals.tokens AS signal_tokens, request_signals.hidden AS signal_hidden"
    };
}

/// The kept signals as `records_with_signals` reads them: the tokens of every request, the
/// hidden states only of the requests that can be labels (served locally, with feedback),
/// the only ones a probe is fitted on; the others' would be kilobytes a row read for nothing.
macro_rules! signal_columns_for_labels {
    () => {
        "request_signals.tokens AS signal_tokens, \
         CASE WHEN route = 'local' AND feedback_score IS NOT NULL \
              THEN request_signals.hidden END AS signal_hidden"
    };
}

/// The join that brings a record's kept signals, if any.
macro_rules! with_signals {
    () => {
        " FROM ledger LEFT JOIN request_signals ON request_signals.request_id = ledger.id"
    };
}

/// Stores a record unless one with the same id exists (the first write wins, so a retried
/// write cannot double-count a request). A record with signals is written with them in one
/// transaction.
pub(crate) async fn record(pool: &Pool<Db>, rec: &LedgerRecord) -> Result<(), StorageError> {
    if rec.signals.is_some() {
        return record_batch(pool, std::slice::from_ref(rec)).await;
    }
    insert(pool, rec).await
}

/// Stores several records in one transaction: one commit (one fsync) for all of them.
pub(crate) async fn record_batch(
    pool: &Pool<Db>,
    records: &[LedgerRecord],
) -> Result<(), StorageError> {
    let mut tx = pool.begin().await?;
    for rec in records {
        insert(&mut *tx, rec).await?;
        if let Some(signals) = &rec.signals {
            sqlx::query(
                "INSERT INTO request_signals (request_id, request_created_unix_ms, tokens, hidden) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (request_id) DO NOTHING",
            )
            .bind(&rec.id)
            .bind(rec.created_unix_ms)
            .bind(&signals.tokens)
            .bind(&signals.hidden)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn insert<'e, E>(executor: E, rec: &LedgerRecord) -> Result<(), StorageError>
where
    E: sqlx::Executor<'e, Database = Db>,
{
    sqlx::query(concat!(
        "INSERT INTO ledger (",
        record_columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) \
         ON CONFLICT (id) DO NOTHING"
    ))
        .bind(&rec.id)
        .bind(rec.created_unix_ms)
        .bind(&rec.team)
        .bind(&rec.key_id)
        .bind(&rec.experiment)
        .bind(&rec.variant)
        .bind(&rec.route)
        .bind(&rec.reason)
        .bind(finite(rec.confidence))
        .bind(&rec.confidence_aggregate)
        .bind(to_db(rec.local_tokens, "local_tokens")?)
        .bind(&rec.remote_model)
        .bind(to_db(rec.remote_input_tokens, "remote_input_tokens")?)
        .bind(to_db(rec.remote_output_tokens, "remote_output_tokens")?)
        .bind(to_db(rec.cost_nanos, "cost_nanos")?)
        .bind(to_db(rec.latency_ms, "latency_ms")?)
        .bind(i32::from(rec.status))
        .bind(&rec.prompt_text)
        .bind(to_db(rec.overrun_nanos, "overrun_nanos")?)
        .execute(executor)
        .await?;
    Ok(())
}

/// Deletes the kept signals of requests that arrived before `before_unix_ms`; how many.
pub(crate) async fn forget_signals(
    pool: &Pool<Db>,
    before_unix_ms: i64,
) -> Result<u64, StorageError> {
    let done = sqlx::query("DELETE FROM request_signals WHERE request_created_unix_ms < $1")
        .bind(before_unix_ms)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// Attaches feedback to a request; see `Storage::record_feedback`.
pub(crate) async fn record_feedback(
    pool: &Pool<Db>,
    request_id: &str,
    score: f64,
    comment: Option<&str>,
    now_unix_ms: i64,
) -> Result<(), StorageError> {
    if !(0.0..=1.0).contains(&score) {
        return Err(StorageError::InvalidInput(format!(
            "feedback score {score} is not in [0, 1]"
        )));
    }
    let updated = sqlx::query(
        "UPDATE ledger SET feedback_score = $2, feedback_comment = $3, feedback_unix_ms = $4 \
         WHERE id = $1",
    )
    .bind(request_id)
    .bind(score)
    .bind(comment)
    .bind(now_unix_ms)
    .execute(pool)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(StorageError::NotFound {
            what: "request",
            id: request_id.to_owned(),
        });
    }
    Ok(())
}

/// Reads one request's record.
pub(crate) async fn get_record(
    pool: &Pool<Db>,
    id: &str,
) -> Result<Option<LedgerRecord>, StorageError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        record_columns!(),
        ", ",
        signal_columns!(),
        with_signals!(),
        " WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(ledger_record).transpose()
}

/// Totals for one team over `[since, until)`.
pub(crate) async fn team_usage(
    pool: &Pool<Db>,
    team: &str,
    since_unix_ms: i64,
    until_unix_ms: i64,
) -> Result<UsageSummary, StorageError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        usage_columns!(),
        " FROM ledger WHERE team = $1 AND created_unix_ms >= $2 AND created_unix_ms < $3"
    ))
    .bind(team)
    .bind(since_unix_ms)
    .bind(until_unix_ms)
    .fetch_one(pool)
    .await?;
    usage_summary(&row)
}

/// Totals per team over `[since, until)`, sorted by team name.
pub(crate) async fn spend_by_team(
    pool: &Pool<Db>,
    since_unix_ms: i64,
    until_unix_ms: i64,
) -> Result<Vec<(String, UsageSummary)>, StorageError> {
    let rows = sqlx::query(concat!(
        "SELECT COALESCE(team, '') AS team_name, ",
        usage_columns!(),
        " FROM ledger WHERE created_unix_ms >= $1 AND created_unix_ms < $2 \
          GROUP BY COALESCE(team, '')"
    ))
    .bind(since_unix_ms)
    .bind(until_unix_ms)
    .fetch_all(pool)
    .await?;
    let mut teams = rows
        .iter()
        .map(|row| Ok((row.try_get("team_name")?, usage_summary(row)?)))
        .collect::<Result<Vec<(String, UsageSummary)>, StorageError>>()?;
    // Sorted here rather than by ORDER BY, whose order depends on the database's collation.
    teams.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(teams)
}

/// Every request of an experiment that was assigned a variant, oldest first.
pub(crate) async fn variant_samples(
    pool: &Pool<Db>,
    experiment_id: &str,
) -> Result<Vec<VariantSample>, StorageError> {
    let rows = sqlx::query(
        "SELECT variant, route, cost_nanos, latency_ms, feedback_score, status FROM ledger \
         WHERE experiment = $1 AND variant IS NOT NULL ORDER BY created_unix_ms",
    )
    .bind(experiment_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(VariantSample {
                variant: row.try_get("variant")?,
                route: row.try_get("route")?,
                cost_nanos: from_db(row.try_get("cost_nanos")?, "cost_nanos")?,
                latency_ms: from_db(row.try_get("latency_ms")?, "latency_ms")?,
                feedback: row.try_get("feedback_score")?,
                status: status_from_db(row.try_get("status")?)?,
            })
        })
        .collect()
}

/// Columns and conditions of `records_with_signals`: requests with a confidence value in
/// `[$1, $2)`.
macro_rules! records_with_signals_query {
    ($team_condition:literal) => {
        concat!(
            "SELECT id, created_unix_ms, team, variant, route, confidence, confidence_aggregate, \
                    feedback_score, status, ",
            signal_columns_for_labels!(),
            with_signals!(),
            " WHERE confidence IS NOT NULL AND created_unix_ms >= $1 AND created_unix_ms < $2",
            $team_condition,
            " ORDER BY created_unix_ms LIMIT $3"
        )
    };
}

/// Up to `limit` requests in `[since, until)` with a confidence value, of `team` only when
/// given (in the query: kept signals are kilobytes a row, and other teams' are not read),
/// oldest first; hidden states only where the request can be a label
/// (`signal_columns_for_labels!`).
pub(crate) async fn records_with_signals(
    pool: &Pool<Db>,
    team: Option<&str>,
    since_unix_ms: i64,
    until_unix_ms: i64,
    limit: u32,
) -> Result<Vec<SignalRecord>, StorageError> {
    // Two fixed statements rather than `$4 IS NULL OR team = $4`, whose parameter type
    // PostgreSQL cannot infer from a bare NULL.
    let sql = match team {
        Some(_) => records_with_signals_query!(" AND team = $4"),
        None => records_with_signals_query!(""),
    };
    let mut query = sqlx::query(sql)
        .bind(since_unix_ms)
        .bind(until_unix_ms)
        .bind(i64::from(limit));
    if let Some(team) = team {
        query = query.bind(team);
    }
    let rows = query.fetch_all(pool).await?;
    rows.iter().map(signal_record).collect()
}

/// Decodes a row selected by `records_with_signals`.
fn signal_record(row: &<Db as Database>::Row) -> Result<SignalRecord, StorageError> {
    Ok(SignalRecord {
        id: row.try_get("id")?,
        created_unix_ms: row.try_get("created_unix_ms")?,
        team: row.try_get("team")?,
        variant: row.try_get("variant")?,
        route: row.try_get("route")?,
        confidence: row.try_get("confidence")?,
        confidence_aggregate: row.try_get("confidence_aggregate")?,
        feedback: row.try_get("feedback_score")?,
        status: status_from_db(row.try_get("status")?)?,
        signals: kept_signals(row)?,
    })
}

/// The signals selected with `signal_columns!`, when the request has them.
fn kept_signals(row: &<Db as Database>::Row) -> Result<Option<EncodedSignals>, StorageError> {
    let tokens: Option<Vec<u8>> = row.try_get("signal_tokens")?;
    tokens
        .map(|tokens| -> Result<EncodedSignals, StorageError> {
            Ok(EncodedSignals {
                tokens,
                hidden: row.try_get("signal_hidden")?,
            })
        })
        .transpose()
}

/// Decodes a row selected with `record_columns!`.
fn ledger_record(row: &<Db as Database>::Row) -> Result<LedgerRecord, StorageError> {
    Ok(LedgerRecord {
        id: row.try_get("id")?,
        created_unix_ms: row.try_get("created_unix_ms")?,
        team: row.try_get("team")?,
        key_id: row.try_get("key_id")?,
        experiment: row.try_get("experiment")?,
        variant: row.try_get("variant")?,
        route: row.try_get("route")?,
        reason: row.try_get("reason")?,
        confidence: row.try_get("confidence")?,
        confidence_aggregate: row.try_get("confidence_aggregate")?,
        local_tokens: from_db(row.try_get("local_tokens")?, "local_tokens")?,
        remote_model: row.try_get("remote_model")?,
        remote_input_tokens: from_db(row.try_get("remote_input_tokens")?, "remote_input_tokens")?,
        remote_output_tokens: from_db(
            row.try_get("remote_output_tokens")?,
            "remote_output_tokens",
        )?,
        cost_nanos: from_db(row.try_get("cost_nanos")?, "cost_nanos")?,
        latency_ms: from_db(row.try_get("latency_ms")?, "latency_ms")?,
        status: status_from_db(row.try_get("status")?)?,
        prompt_text: row.try_get("prompt_text")?,
        overrun_nanos: from_db(row.try_get("overrun_nanos")?, "overrun_nanos")?,
        signals: kept_signals(row)?,
    })
}

/// Decodes the columns selected with `usage_columns!`.
fn usage_summary(row: &<Db as Database>::Row) -> Result<UsageSummary, StorageError> {
    let count =
        |column: &str| -> Result<u64, StorageError> { from_db(row.try_get(column)?, column) };
    Ok(UsageSummary {
        requests: count("requests")?,
        escalated: count("escalated")?,
        cost_nanos: count("cost_nanos")?,
        local_tokens: count("local_tokens")?,
        remote_input_tokens: count("remote_input_tokens")?,
        remote_output_tokens: count("remote_output_tokens")?,
    })
}
