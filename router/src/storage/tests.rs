//! One behavioural suite, run against both backends: SQLite in a temporary file, and the
//! PostgreSQL server at `CASCADE_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! each test in a fresh schema that is dropped afterwards. PostgreSQL being down is a test
//! failure, not a skip: budgets shared between replicas are exactly what must not regress.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use super::{connect, Backend, SqliteSync, Storage, StorageConfig, StorageError};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The reservation TTL every test database is opened with.
const TTL_SECS: u64 = 60;
const TTL_MS: i64 = 60_000;

/// No single test may take longer; a hang is a failure, not a stuck CI job.
const TEST_TIME_LIMIT: Duration = Duration::from_secs(60);

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The database of one test; every `open` is a new pool, i.e. another replica.
#[derive(Debug, Clone)]
struct TestDb {
    url: String,
    /// Keeps the SQLite file's directory alive for the test's duration.
    _dir: Option<Arc<tempfile::TempDir>>,
}

impl TestDb {
    async fn open(&self) -> Result<Storage, StorageError> {
        connect(&StorageConfig {
            url: self.url.clone(),
            max_connections: 8,
            reservation_ttl_secs: TTL_SECS,
            sqlite_sync: SqliteSync::default(),
        })
        .await
    }
}

mod harness {
    use super::*;

    /// Runs a case against a new SQLite file.
    pub(super) async fn sqlite<F, Fut>(case: F) -> TestResult
    where
        F: FnOnce(TestDb) -> Fut,
        Fut: Future<Output = TestResult>,
    {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("cascade.db").display());
        within_time_limit(case(TestDb {
            url,
            _dir: Some(Arc::new(dir)),
        }))
        .await
    }

    /// Runs a case in a new PostgreSQL schema and drops the schema afterwards, even if the
    /// case panicked.
    pub(super) async fn postgres<F, Fut>(case: F) -> TestResult
    where
        F: FnOnce(TestDb) -> Fut,
        Fut: Future<Output = TestResult>,
    {
        let base = std::env::var("CASCADE_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&base)
            .await
            .map_err(|e| {
                format!(
                    "the storage tests need PostgreSQL at {base} (set CASCADE_TEST_POSTGRES_URL, \
                     or start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) \
                     main start): {e}"
                )
            })?;
        // A generated identifier, not a value: schema names cannot be bound parameters.
        let schema = format!("t_storage_{}", uuid::Uuid::new_v4().simple());
        sqlx::raw_sql(&format!("CREATE SCHEMA {schema}"))
            .execute(&admin)
            .await?;
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
        let outcome = AssertUnwindSafe(within_time_limit(case(TestDb { url, _dir: None })))
            .catch_unwind()
            .await;
        let dropped = sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&admin)
            .await;
        admin.close().await;
        match outcome {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(result) => {
                result?;
                dropped?;
                Ok(())
            }
        }
    }

    async fn within_time_limit(case: impl Future<Output = TestResult>) -> TestResult {
        tokio::time::timeout(TEST_TIME_LIMIT, case)
            .await
            .map_err(|_| format!("test took longer than {TEST_TIME_LIMIT:?}"))?
    }
}

/// Instantiates every case once per backend: `storage::tests::{sqlite,postgres}::<case>`.
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        suite!(@on sqlite: $($case),*);
        suite!(@on postgres: $($case),*);
    };
    (@on $backend:ident: $($case:ident),*) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() -> super::TestResult {
                    super::harness::$backend(super::cases::$case).await
                }
            )*
        }
    };
}

suite!(
    reserve_then_settle_moves_the_amount_from_reserved_to_spent,
    settle_records_the_real_cost_even_above_the_limit,
    settling_twice_is_a_no_op,
    release_returns_the_reservation_without_spend_and_is_idempotent,
    one_full_scope_means_nothing_is_reserved_in_any_scope,
    exhaustion_names_the_first_full_scope_in_the_callers_order,
    unknown_reservations_are_not_found,
    amounts_beyond_bigint_are_rejected,
    expiry_releases_only_reservations_older_than_the_ttl,
    settling_an_expired_reservation_still_records_the_spend,
    reserve_reclaims_stale_reservations_when_the_budget_is_full,
    concurrent_reservations_never_overspend_the_scope_locked_first,
    concurrent_reservations_never_overspend_a_scope_locked_after_others,
    two_replicas_never_overspend_the_scope_locked_first,
    two_replicas_never_overspend_a_scope_locked_after_others,
    record_then_get_returns_the_same_record,
    a_duplicate_request_id_is_stored_once_and_the_first_write_wins,
    feedback_on_an_unknown_request_is_not_found,
    feedback_is_stored_and_reaches_the_variant_samples,
    team_usage_counts_only_that_team_within_the_window,
    spend_by_team_totals_every_team_sorted_by_name,
    records_with_signals_returns_confident_records_in_the_window_up_to_the_limit,
    labels_are_the_local_requests_with_feedback_of_the_team_asked_for,
    kept_signals_are_stored_with_their_record_and_read_back_with_the_labels,
    a_recorded_request_is_read_back_by_a_fresh_pool,
    connecting_again_applies_no_migration_twice,
);

mod cases {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::*;
    use crate::storage::{LedgerRecord, ScopeLimit, ScopeState};

    /// An arbitrary "now" for the tests: 2026-11-28T00:00:00Z.
    const T0: i64 = 1_795_824_000_000;
    const HOUR_MS: i64 = 3_600_000;

    fn scope(name: &str, limit_nanos: u64) -> ScopeLimit {
        ScopeLimit {
            scope: name.to_owned(),
            limit_nanos,
        }
    }

    fn state(spent_nanos: u64, reserved_nanos: u64) -> ScopeState {
        ScopeState {
            spent_nanos,
            reserved_nanos,
        }
    }

    /// A request answered locally.
    fn local_request(id: &str, team: &str, created_unix_ms: i64) -> LedgerRecord {
        LedgerRecord {
            id: id.to_owned(),
            created_unix_ms,
            team: Some(team.to_owned()),
            key_id: Some(format!("{team}-key")),
            experiment: None,
            variant: None,
            route: "local".to_owned(),
            reason: "confident".to_owned(),
            confidence: Some(-0.25),
            confidence_aggregate: Some("mean_logprob".to_owned()),
            local_tokens: 120,
            remote_model: None,
            remote_input_tokens: 0,
            remote_output_tokens: 0,
            cost_nanos: 0,
            latency_ms: 80,
            status: 200,
            prompt_text: None,
            overrun_nanos: 0,
            signals: None,
        }
    }

    /// A request escalated to a paid model.
    fn remote_request(id: &str, team: &str, created_unix_ms: i64, cost_nanos: u64) -> LedgerRecord {
        LedgerRecord {
            route: "remote".to_owned(),
            reason: "low_confidence".to_owned(),
            confidence: Some(-2.5),
            remote_model: Some("gpt-4o-mini".to_owned()),
            remote_input_tokens: 100,
            remote_output_tokens: 50,
            cost_nanos,
            latency_ms: 900,
            ..local_request(id, team, created_unix_ms)
        }
    }

    fn is_exhausted(result: &Result<impl std::fmt::Debug, StorageError>, scope: &str) -> bool {
        matches!(result, Err(StorageError::BudgetExhausted { scope: s }) if s == scope)
    }

    pub(super) async fn reserve_then_settle_moves_the_amount_from_reserved_to_spent(
        db: TestDb,
    ) -> TestResult {
        let s = db.open().await?;
        let scopes = [scope("key:k:day", 100), scope("team:t:month", 1_000)];
        let r = s.reserve("req-1", &scopes, 30, T0).await?;
        assert_eq!(r.amount_nanos, 30);
        assert_eq!(s.scope_state("key:k:day").await?, state(0, 30));
        assert_eq!(s.scope_state("team:t:month").await?, state(0, 30));
        s.settle(&r.id, 25).await?;
        assert_eq!(s.scope_state("key:k:day").await?, state(25, 0));
        assert_eq!(s.scope_state("team:t:month").await?, state(25, 0));
        // The freed 5 and the remaining budget are usable again: 25 + 75 = 100.
        let r2 = s.reserve("req-2", &scopes, 75, T0).await?;
        assert!(is_exhausted(
            &s.reserve("req-3", &scopes, 1, T0).await,
            "key:k:day"
        ));
        s.settle(&r2.id, 75).await?;
        assert_eq!(s.scope_state("key:k:day").await?, state(100, 0));
        assert_eq!(s.scope_state("never-used").await?, state(0, 0));
        Ok(())
    }

    pub(super) async fn settle_records_the_real_cost_even_above_the_limit(
        db: TestDb,
    ) -> TestResult {
        let s = db.open().await?;
        let scopes = [scope("key:k", 100)];
        let r = s.reserve("req-1", &scopes, 80, T0).await?;
        s.settle(&r.id, 150).await?;
        assert_eq!(s.scope_state("key:k").await?, state(150, 0));
        assert!(is_exhausted(
            &s.reserve("req-2", &scopes, 0, T0).await,
            "key:k"
        ));
        Ok(())
    }

    pub(super) async fn settling_twice_is_a_no_op(db: TestDb) -> TestResult {
        let s = db.open().await?;
        let r = s.reserve("req-1", &[scope("key:k", 100)], 40, T0).await?;
        s.settle(&r.id, 30).await?;
        s.settle(&r.id, 30).await?;
        s.settle(&r.id, 99).await?;
        s.release(&r.id).await?;
        assert_eq!(s.scope_state("key:k").await?, state(30, 0));
        Ok(())
    }

    pub(super) async fn release_returns_the_reservation_without_spend_and_is_idempotent(
        db: TestDb,
    ) -> TestResult {
        let s = db.open().await?;
        let scopes = [scope("key:k", 100), scope("team:t", 100)];
        let r = s.reserve("req-1", &scopes, 60, T0).await?;
        s.release(&r.id).await?;
        s.release(&r.id).await?;
        assert_eq!(s.scope_state("key:k").await?, state(0, 0));
        assert_eq!(s.scope_state("team:t").await?, state(0, 0));
        s.reserve("req-2", &scopes, 100, T0).await?;
        Ok(())
    }

    pub(super) async fn one_full_scope_means_nothing_is_reserved_in_any_scope(
        db: TestDb,
    ) -> TestResult {
        let s = db.open().await?;
        let first = s.reserve("req-1", &[scope("team:t", 50)], 40, T0).await?;
        s.settle(&first.id, 40).await?;
        let scopes = [
            scope("key:k", 1_000),
            scope("team:t", 50),
            scope("global", 1_000),
        ];
        assert!(is_exhausted(
            &s.reserve("req-2", &scopes, 20, T0).await,
            "team:t"
        ));
        assert_eq!(s.scope_state("key:k").await?, state(0, 0));
        assert_eq!(s.scope_state("team:t").await?, state(40, 0));
        assert_eq!(s.scope_state("global").await?, state(0, 0));
        // A request that fits everywhere still goes through.
        s.reserve("req-3", &scopes, 10, T0).await?;
        assert_eq!(s.scope_state("global").await?, state(0, 10));
        Ok(())
    }

    pub(super) async fn exhaustion_names_the_first_full_scope_in_the_callers_order(
        db: TestDb,
    ) -> TestResult {
        let s = db.open().await?;
        // "b" sorts before "z" and is locked first, but the caller listed "z" first.
        let scopes = [scope("z:key", 10), scope("b:team", 10)];
        assert!(is_exhausted(
            &s.reserve("req-1", &scopes, 20, T0).await,
            "z:key"
        ));
        let scopes = [scope("z:key", 100), scope("b:team", 10)];
        assert!(is_exhausted(
            &s.reserve("req-2", &scopes, 20, T0).await,
            "b:team"
        ));
        Ok(())
    }

    pub(super) async fn unknown_reservations_are_not_found(db: TestDb) -> TestResult {
        let s = db.open().await?;
        assert!(matches!(
            s.settle("nope", 1).await,
            Err(StorageError::NotFound { .. })
        ));
        assert!(matches!(
            s.release("nope").await,
            Err(StorageError::NotFound { .. })
        ));
        Ok(())
    }

    pub(super) async fn amounts_beyond_bigint_are_rejected(db: TestDb) -> TestResult {
        let s = db.open().await?;
        let too_big = u64::MAX;
        let huge = s.reserve("req-1", &[scope("key:k", 10)], too_big, T0).await;
        assert!(matches!(huge, Err(StorageError::InvalidInput(_))));
        let huge_limit = s.reserve("req-2", &[scope("key:k", too_big)], 1, T0).await;
        assert!(matches!(huge_limit, Err(StorageError::InvalidInput(_))));
        let r = s.reserve("req-3", &[scope("key:k", 10)], 1, T0).await?;
        assert!(matches!(
            s.settle(&r.id, too_big).await,
            Err(StorageError::InvalidInput(_))
        ));
        let mut rec = local_request("req-4", "t", T0);
        rec.cost_nanos = too_big;
        assert!(matches!(
            s.record(&rec).await,
            Err(StorageError::InvalidInput(_))
        ));
        assert_eq!(s.scope_state("key:k").await?, state(0, 1));
        Ok(())
    }

    pub(super) async fn expiry_releases_only_reservations_older_than_the_ttl(
        db: TestDb,
    ) -> TestResult {
        let s = db.open().await?;
        let scopes = [scope("key:k", 1_000), scope("team:t", 1_000)];
        s.reserve("old", &scopes, 20, T0).await?;
        let young = s.reserve("young", &scopes, 30, T0 + 50_000).await?;
        assert_eq!(
            s.expire_reservations(T0 + TTL_MS).await?,
            0,
            "exactly TTL old is not stale"
        );
        assert_eq!(s.expire_reservations(T0 + TTL_MS + 1).await?, 1);
        assert_eq!(s.scope_state("key:k").await?, state(0, 30));
        assert_eq!(s.scope_state("team:t").await?, state(0, 30));
        assert_eq!(s.expire_reservations(T0 + TTL_MS + 1).await?, 0);
        s.settle(&young.id, 30).await?;
        assert_eq!(s.scope_state("team:t").await?, state(30, 0));
        Ok(())
    }

    pub(super) async fn settling_an_expired_reservation_still_records_the_spend(
        db: TestDb,
    ) -> TestResult {
        let s = db.open().await?;
        let r = s.reserve("slow", &[scope("key:k", 100)], 20, T0).await?;
        assert_eq!(s.expire_reservations(T0 + TTL_MS + 1).await?, 1);
        assert_eq!(s.scope_state("key:k").await?, state(0, 0));
        s.release(&r.id).await?;
        s.settle(&r.id, 15).await?;
        s.settle(&r.id, 15).await?;
        assert_eq!(s.scope_state("key:k").await?, state(15, 0));
        Ok(())
    }

    pub(super) async fn reserve_reclaims_stale_reservations_when_the_budget_is_full(
        db: TestDb,
    ) -> TestResult {
        let s = db.open().await?;
        let scopes = [scope("key:k", 100)];
        s.reserve("crashed", &scopes, 100, T0).await?;
        assert!(is_exhausted(
            &s.reserve("req-1", &scopes, 10, T0 + 1_000).await,
            "key:k"
        ));
        s.reserve("req-2", &scopes, 10, T0 + TTL_MS + 1).await?;
        assert_eq!(s.scope_state("key:k").await?, state(0, 10));
        Ok(())
    }

    // Scopes are locked in name order: "global:day", "key:k:day", "team:t:month". A full scope
    // locked first is where a check-then-increment race would show; a full scope locked after
    // others exercises rolling back the increments already made.

    pub(super) async fn concurrent_reservations_never_overspend_the_scope_locked_first(
        db: TestDb,
    ) -> TestResult {
        no_overspend(&[db.open().await?], "global:day").await
    }

    pub(super) async fn concurrent_reservations_never_overspend_a_scope_locked_after_others(
        db: TestDb,
    ) -> TestResult {
        no_overspend(&[db.open().await?], "team:t:month").await
    }

    pub(super) async fn two_replicas_never_overspend_the_scope_locked_first(
        db: TestDb,
    ) -> TestResult {
        no_overspend(&[db.open().await?, db.open().await?], "global:day").await
    }

    pub(super) async fn two_replicas_never_overspend_a_scope_locked_after_others(
        db: TestDb,
    ) -> TestResult {
        no_overspend(&[db.open().await?, db.open().await?], "team:t:month").await
    }

    /// 200 concurrent requests, spread over the given replicas, each reserve X against three
    /// scopes of which `full` has a limit of 37.5 X and the others plenty: exactly 37 get
    /// through, every scope holds exactly their 37 X, and no observer ever sees more than the
    /// limit spent or held.
    async fn no_overspend(replicas: &[Storage], full: &'static str) -> TestResult {
        const REQUESTS: usize = 200;
        const X: u64 = 1_000_000;
        const LIMIT: u64 = 37 * X + X / 2;
        const FITS: usize = 37;
        let names = ["key:k:day", "team:t:month", "global:day"];
        let scopes: Vec<_> = names
            .iter()
            .map(|&name| scope(name, if name == full { LIMIT } else { 1_000 * X }))
            .collect();

        let observing = Arc::new(AtomicBool::new(true));
        let most_committed = Arc::new(AtomicU64::new(0));
        let observer = tokio::spawn({
            let (s, observing, most) = (
                replicas[0].clone(),
                observing.clone(),
                most_committed.clone(),
            );
            async move {
                while observing.load(Ordering::Relaxed) {
                    let st = s.scope_state(full).await?;
                    most.fetch_max(st.spent_nanos + st.reserved_nanos, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Ok::<_, StorageError>(())
            }
        });

        let attempts: Vec<_> = (0..REQUESTS)
            .map(|i| {
                let s = replicas[i % replicas.len()].clone();
                let scopes = scopes.clone();
                tokio::spawn(async move { s.reserve(&format!("req-{i}"), &scopes, X, T0).await })
            })
            .collect();
        let mut granted = Vec::new();
        for attempt in attempts {
            match attempt.await? {
                Ok(r) => granted.push(r),
                Err(StorageError::BudgetExhausted { scope }) => assert_eq!(scope, full),
                Err(other) => return Err(other.into()),
            }
        }
        assert_eq!(granted.len(), FITS);
        let held = FITS as u64 * X;
        for name in names {
            assert_eq!(
                replicas[0].scope_state(name).await?,
                state(0, held),
                "{name}"
            );
        }

        let settles: Vec<_> = granted
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let s = replicas[i % replicas.len()].clone();
                tokio::spawn(async move { s.settle(&r.id, X).await })
            })
            .collect();
        for settle in settles {
            settle.await??;
        }
        observing.store(false, Ordering::Relaxed);
        observer.await??;
        for name in names {
            assert_eq!(
                replicas[0].scope_state(name).await?,
                state(held, 0),
                "{name}"
            );
        }
        assert!(held <= LIMIT);
        let most = most_committed.load(Ordering::Relaxed);
        assert!(
            most <= LIMIT,
            "observed {most} committed against a limit of {LIMIT}"
        );
        Ok(())
    }

    pub(super) async fn record_then_get_returns_the_same_record(db: TestDb) -> TestResult {
        let s = db.open().await?;
        let rec = LedgerRecord {
            experiment: Some("exp-1".to_owned()),
            variant: Some("b".to_owned()),
            prompt_text: Some("What is 2 + 2? ünïcödé".to_owned()),
            overrun_nanos: 0,
            status: 203,
            ..remote_request("req-1", "alpha", T0, 12_345)
        };
        s.record(&rec).await?;
        assert_eq!(s.get_record("req-1").await?, Some(rec));
        assert_eq!(s.get_record("req-2").await?, None);
        // No usable confidence is stored as none on both backends.
        let nan = LedgerRecord {
            confidence: Some(f64::NAN),
            ..local_request("req-3", "alpha", T0)
        };
        s.record(&nan).await?;
        assert_eq!(
            s.get_record("req-3").await?.and_then(|r| r.confidence),
            None
        );
        Ok(())
    }

    pub(super) async fn a_duplicate_request_id_is_stored_once_and_the_first_write_wins(
        db: TestDb,
    ) -> TestResult {
        let s = db.open().await?;
        let first = remote_request("req-1", "alpha", T0, 1_000);
        s.record(&first).await?;
        s.record(&remote_request("req-1", "alpha", T0, 9_999))
            .await?;
        assert_eq!(s.get_record("req-1").await?, Some(first));
        let usage = s.team_usage("alpha", T0, T0 + 1).await?;
        assert_eq!((usage.requests, usage.cost_nanos), (1, 1_000));
        Ok(())
    }

    pub(super) async fn feedback_on_an_unknown_request_is_not_found(db: TestDb) -> TestResult {
        let s = db.open().await?;
        let result = s.record_feedback("nope", 0.5, None, T0).await;
        assert!(matches!(
            result,
            Err(StorageError::NotFound {
                what: "request",
                ..
            })
        ));
        Ok(())
    }

    pub(super) async fn feedback_is_stored_and_reaches_the_variant_samples(
        db: TestDb,
    ) -> TestResult {
        let s = db.open().await?;
        let in_experiment = |id: &str, variant: &str, at: i64| LedgerRecord {
            experiment: Some("exp-1".to_owned()),
            variant: Some(variant.to_owned()),
            ..local_request(id, "alpha", at)
        };
        s.record(&in_experiment("req-1", "a", T0)).await?;
        s.record(&LedgerRecord {
            cost_nanos: 700,
            ..in_experiment("req-2", "b", T0 + 1)
        })
        .await?;
        s.record(&local_request("req-3", "alpha", T0 + 2)).await?;
        s.record_feedback("req-2", 0.2, Some("meh"), T0 + 10)
            .await?;
        s.record_feedback("req-2", 0.75, Some("better on reflection"), T0 + 20)
            .await?;
        for bad in [-0.1, 1.5, f64::NAN] {
            let result = s.record_feedback("req-1", bad, None, T0).await;
            assert!(
                matches!(result, Err(StorageError::InvalidInput(_))),
                "score {bad}"
            );
        }
        let samples = s.variant_samples("exp-1").await?;
        let summary: Vec<_> = samples
            .iter()
            .map(|v| {
                (
                    v.variant.as_str(),
                    v.route.as_str(),
                    v.cost_nanos,
                    v.feedback,
                    v.status,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("a", "local", 0, None, 200),
                ("b", "local", 700, Some(0.75), 200)
            ]
        );
        assert!(s.variant_samples("exp-2").await?.is_empty());
        Ok(())
    }

    pub(super) async fn team_usage_counts_only_that_team_within_the_window(
        db: TestDb,
    ) -> TestResult {
        let s = db.open().await?;
        s.record(&local_request("a-1", "alpha", T0)).await?;
        s.record(&remote_request("a-2", "alpha", T0 + HOUR_MS - 1, 5_000))
            .await?;
        s.record(&remote_request("a-late", "alpha", T0 + HOUR_MS, 7_000))
            .await?;
        s.record(&remote_request("a-early", "alpha", T0 - 1, 7_000))
            .await?;
        s.record(&remote_request("b-1", "beta", T0 + 5, 3_000))
            .await?;
        let alpha = s.team_usage("alpha", T0, T0 + HOUR_MS).await?;
        assert_eq!(alpha.requests, 2);
        assert_eq!(alpha.escalated, 1);
        assert_eq!(alpha.cost_nanos, 5_000);
        assert_eq!(alpha.local_tokens, 240);
        assert_eq!(
            (alpha.remote_input_tokens, alpha.remote_output_tokens),
            (100, 50)
        );
        let beta = s.team_usage("beta", T0, T0 + HOUR_MS).await?;
        assert_eq!((beta.requests, beta.cost_nanos), (1, 3_000));
        assert_eq!(
            s.team_usage("gamma", T0, T0 + HOUR_MS).await?,
            Default::default()
        );
        Ok(())
    }

    pub(super) async fn spend_by_team_totals_every_team_sorted_by_name(db: TestDb) -> TestResult {
        let s = db.open().await?;
        s.record(&remote_request("z-1", "zulu", T0, 1)).await?;
        s.record(&remote_request("a-1", "Alpha", T0, 2)).await?;
        s.record(&remote_request("a-2", "Alpha", T0 + 1, 3)).await?;
        s.record(&remote_request("b-1", "beta", T0 + HOUR_MS, 4))
            .await?;
        s.record(&LedgerRecord {
            team: None,
            ..remote_request("anon", "x", T0, 5)
        })
        .await?;
        let teams = s.spend_by_team(T0, T0 + HOUR_MS).await?;
        let costs: Vec<_> = teams
            .iter()
            .map(|(team, u)| (team.as_str(), u.requests, u.cost_nanos))
            .collect();
        assert_eq!(costs, [("", 1, 5), ("Alpha", 2, 5), ("zulu", 1, 1)]);
        Ok(())
    }

    pub(super) async fn records_with_signals_returns_confident_records_in_the_window_up_to_the_limit(
        db: TestDb,
    ) -> TestResult {
        let s = db.open().await?;
        for i in 0..5 {
            s.record(&local_request(&format!("req-{i}"), "alpha", T0 + i))
                .await?;
        }
        s.record(&LedgerRecord {
            confidence: None,
            ..local_request("no-signal", "alpha", T0)
        })
        .await?;
        s.record(&local_request("outside", "alpha", T0 + HOUR_MS))
            .await?;
        s.record_feedback("req-1", 1.0, None, T0).await?;
        let signals = s.records_with_signals(None, T0, T0 + HOUR_MS, 3).await?;
        let ids: Vec<_> = signals.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["req-0", "req-1", "req-2"]);
        assert_eq!(signals[1].feedback, Some(1.0));
        assert_eq!(signals[1].confidence, -0.25);
        assert_eq!(
            signals[1].confidence_aggregate.as_deref(),
            Some("mean_logprob")
        );
        assert_eq!(
            s.records_with_signals(None, T0, T0 + HOUR_MS, 100)
                .await?
                .len(),
            5
        );
        s.record(&local_request("beta-1", "beta", T0)).await?;
        let beta = s
            .records_with_signals(Some("beta"), T0, T0 + HOUR_MS, 100)
            .await?;
        assert_eq!(beta.len(), 1);
        assert_eq!(beta[0].id, "beta-1");
        assert_eq!(
            s.records_with_signals(Some("alpha"), T0, T0 + HOUR_MS, 100)
                .await?
                .len(),
            5
        );
        Ok(())
    }

    pub(super) async fn labels_are_the_local_requests_with_feedback_of_the_team_asked_for(
        db: TestDb,
    ) -> TestResult {
        let s = db.open().await?;
        for (id, team) in [("a-1", "alpha"), ("a-2", "alpha"), ("b-1", "beta")] {
            s.record(&local_request(id, team, T0)).await?;
            s.record_feedback(id, 0.0, None, T0).await?;
        }
        // Not labels: no feedback; escalated (the feedback judges the remote's answer); no
        // confidence value; outside the window.
        s.record(&local_request("a-unrated", "alpha", T0)).await?;
        s.record(&remote_request("a-remote", "alpha", T0, 5))
            .await?;
        s.record_feedback("a-remote", 1.0, None, T0).await?;
        s.record(&LedgerRecord {
            confidence: None,
            ..local_request("a-no-signal", "alpha", T0)
        })
        .await?;
        s.record_feedback("a-no-signal", 1.0, None, T0).await?;
        s.record(&local_request("a-late", "alpha", T0 + HOUR_MS))
            .await?;
        s.record_feedback("a-late", 1.0, None, T0).await?;
        s.record_feedback("a-2", 0.75, None, T0).await?;

        // The labels `cascade calibrate --ledger` picks (`eval::feedback::labels`) from what
        // `records_with_signals` reads: served locally, with feedback.
        let label_ids = |records: &[crate::storage::SignalRecord]| {
            let mut ids: Vec<String> = records
                .iter()
                .filter(|r| r.route == "local" && r.feedback.is_some())
                .map(|r| r.id.clone())
                .collect();
            ids.sort();
            ids
        };
        let alpha = s
            .records_with_signals(Some("alpha"), T0, T0 + HOUR_MS, 100)
            .await?;
        assert_eq!(label_ids(&alpha), ["a-1", "a-2"]);
        let a2 = alpha.iter().find(|r| r.id == "a-2").ok_or("a-2 missing")?;
        assert_eq!(a2.feedback, Some(0.75));
        assert_eq!(a2.confidence, -0.25);
        let all = s.records_with_signals(None, T0, T0 + HOUR_MS, 100).await?;
        assert_eq!(label_ids(&all), ["a-1", "a-2", "b-1"]);
        assert_eq!(
            s.records_with_signals(None, T0, T0 + HOUR_MS, 2)
                .await?
                .len(),
            2
        );
        assert!(s
            .records_with_signals(Some("gamma"), T0, T0 + HOUR_MS, 100)
            .await?
            .is_empty());
        Ok(())
    }

    pub(super) async fn kept_signals_are_stored_with_their_record_and_read_back_with_the_labels(
        db: TestDb,
    ) -> TestResult {
        use crate::storage::EncodedSignals;
        use policies::TokenSignal;
        let s = db.open().await?;
        let tokens = [
            TokenSignal {
                logprob: -0.5,
                entropy: 1.25,
                margin: 0.5,
            },
            TokenSignal {
                logprob: f32::NEG_INFINITY,
                entropy: 0.0,
                margin: 1.0,
            },
        ];
        let hidden = local_model::ProbeFeatures {
            final_mean: vec![1.0, 2.0],
            final_last: vec![3.0, 4.0],
            middle_mean: vec![-1.0, 0.5],
            middle_last: vec![0.25, 8.0],
        };
        let with_hidden = LedgerRecord {
            signals: Some(EncodedSignals::encode(&tokens, Some(&hidden))),
            ..local_request("with-hidden", "alpha", T0)
        };
        let tokens_only = LedgerRecord {
            signals: Some(EncodedSignals::encode(&tokens[..1], None)),
            ..local_request("tokens-only", "alpha", T0)
        };
        let without = local_request("without", "alpha", T0);
        // Alone (one transaction for the record and its signals) and in a batch.
        s.record(&with_hidden).await?;
        s.record_batch(&[tokens_only.clone(), without.clone()])
            .await?;
        assert_eq!(
            s.get_record("with-hidden").await?,
            Some(with_hidden.clone())
        );
        assert_eq!(
            s.get_record("tokens-only").await?,
            Some(tokens_only.clone())
        );
        assert_eq!(s.get_record("without").await?, Some(without));
        // A retried write keeps the first record and its first signals.
        s.record(&LedgerRecord {
            signals: Some(EncodedSignals::encode(&[], None)),
            ..with_hidden.clone()
        })
        .await?;
        assert_eq!(
            s.get_record("with-hidden").await?,
            Some(with_hidden.clone())
        );

        for id in ["with-hidden", "tokens-only", "without"] {
            s.record_feedback(id, 1.0, None, T0).await?;
        }
        let labeled = s
            .records_with_signals(Some("alpha"), T0, T0 + HOUR_MS, 100)
            .await?;
        let kept = |id: &str| {
            labeled
                .iter()
                .find(|r| r.id == id)
                .map(|r| r.signals.clone())
        };
        let decoded = kept("with-hidden")
            .flatten()
            .ok_or("with-hidden lost its signals")?
            .decode()?;
        assert_eq!(decoded.tokens, tokens);
        assert_eq!(decoded.hidden, Some(hidden));
        let decoded = kept("tokens-only")
            .flatten()
            .ok_or("tokens-only lost its signals")?
            .decode()?;
        assert_eq!((decoded.tokens.len(), decoded.hidden), (1, None));
        assert_eq!(kept("without"), Some(None));
        let unlabeled = s.records_with_signals(None, T0, T0 + HOUR_MS, 100).await?;
        assert_eq!(unlabeled.iter().filter(|r| r.signals.is_some()).count(), 2);
        // A request that cannot be a label (no feedback) brings its tokens to a calibration,
        // not its hidden state (a probe is fitted on labels only); the record keeps both.
        let unrated = LedgerRecord {
            id: "unrated".to_owned(),
            ..with_hidden.clone()
        };
        s.record(&unrated).await?;
        let read = s.records_with_signals(None, T0, T0 + HOUR_MS, 100).await?;
        let unrated_read = read
            .iter()
            .find(|r| r.id == "unrated")
            .and_then(|r| r.signals.clone())
            .ok_or("unrated lost its signals")?;
        assert_eq!((unrated_read.tokens.len(), unrated_read.hidden), (24, None));
        let labeled_read = read
            .iter()
            .find(|r| r.id == "with-hidden")
            .and_then(|r| r.signals.clone())
            .ok_or("with-hidden lost its signals")?;
        assert!(labeled_read.hidden.is_some());
        assert_eq!(s.get_record("unrated").await?, Some(unrated));

        // Retention: signals of requests before the cutoff go, their records stay.
        let later = LedgerRecord {
            signals: Some(EncodedSignals::encode(&tokens, None)),
            ..local_request("later", "alpha", T0 + 2 * HOUR_MS)
        };
        s.record(&later).await?;
        assert_eq!(s.forget_signals(T0).await?, 0);
        assert_eq!(s.forget_signals(T0 + HOUR_MS).await?, 3);
        let forgotten = s.get_record("with-hidden").await?.ok_or("record deleted")?;
        assert_eq!(forgotten.signals, None);
        assert_eq!(s.get_record("later").await?, Some(later));
        assert_eq!(s.forget_signals(T0 + HOUR_MS).await?, 0);
        Ok(())
    }

    pub(super) async fn a_recorded_request_is_read_back_by_a_fresh_pool(db: TestDb) -> TestResult {
        let writer = db.open().await?;
        let rec = remote_request("req-1", "alpha", T0, 42);
        writer.record(&rec).await?;
        let r = writer
            .reserve("req-1", &[scope("key:k", 100)], 42, T0)
            .await?;
        writer.settle(&r.id, 42).await?;
        writer.close().await;
        drop(writer);
        let reader = db.open().await?;
        assert_eq!(reader.get_record("req-1").await?, Some(rec));
        assert_eq!(reader.scope_state("key:k").await?, state(42, 0));
        Ok(())
    }

    pub(super) async fn connecting_again_applies_no_migration_twice(db: TestDb) -> TestResult {
        let first = db.open().await?;
        first.record(&local_request("req-1", "alpha", T0)).await?;
        let second = db.open().await?;
        assert!(second.get_record("req-1").await?.is_some());
        let versions: Vec<i64> = match &second.backend {
            Backend::Sqlite(pool) => {
                sqlx::query_scalar("SELECT version FROM schema_migrations")
                    .fetch_all(pool)
                    .await?
            }
            Backend::Postgres(pool) => {
                sqlx::query_scalar("SELECT version FROM schema_migrations")
                    .fetch_all(pool)
                    .await?
            }
        };
        assert_eq!(versions, [1, 2, 3]);
        Ok(())
    }
}

/// What only the embedded backend has: the file, its pragmas, in-memory databases.
mod sqlite_only {
    use super::*;
    use crate::storage::{LedgerRecord, ScopeLimit};

    #[tokio::test]
    async fn a_database_of_the_first_schema_is_upgraded_and_its_rows_read_no_overrun() -> TestResult
    {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("old.db").display());
        // The schema and one row as a binary of migration 1 left them.
        {
            use sqlx::ConnectOptions;
            use std::str::FromStr;
            let mut conn = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?
                .create_if_missing(true)
                .connect()
                .await?;
            sqlx::raw_sql(crate::storage::schema::CREATE_MIGRATIONS_TABLE)
                .execute(&mut conn)
                .await?;
            sqlx::raw_sql(crate::storage::schema::SQLITE[0].sql)
                .execute(&mut conn)
                .await?;
            sqlx::raw_sql(
                "INSERT INTO schema_migrations VALUES (1, 'ledger and budget reservations', 0); \
                 INSERT INTO ledger (id, created_unix_ms, route, reason, local_tokens, \
                 remote_input_tokens, remote_output_tokens, cost_nanos, latency_ms, status) \
                 VALUES ('old-1', 1, 'remote', 'low_confidence', 3, 10, 20, 500, 7, 200)",
            )
            .execute(&mut conn)
            .await?;
        }
        let s = connect(&StorageConfig {
            url,
            max_connections: 1,
            reservation_ttl_secs: TTL_SECS,
            sqlite_sync: SqliteSync::default(),
        })
        .await?;
        let old = s.get_record("old-1").await?.ok_or("the old row is gone")?;
        assert_eq!((old.cost_nanos, old.overrun_nanos), (500, 0));
        Ok(())
    }

    #[tokio::test]
    async fn a_missing_database_file_and_directory_are_created_in_wal_mode_at_the_chosen_sync(
    ) -> TestResult {
        // PRAGMA synchronous reads 1 for NORMAL and 2 for FULL.
        for (sync, expected) in [(SqliteSync::ProcessCrash, 1), (SqliteSync::PowerLoss, 2)] {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("data").join("new.db");
            let s = connect(&StorageConfig {
                url: format!("sqlite://{}", path.display()),
                max_connections: 2,
                reservation_ttl_secs: TTL_SECS,
                sqlite_sync: sync,
            })
            .await?;
            assert!(path.exists());
            let Backend::Sqlite(pool) = &s.backend else {
                return Err("a sqlite url opened another backend".into());
            };
            // Every pooled connection must carry the level, not just the first one.
            let mut held = Vec::new();
            for _ in 0..2 {
                let mut conn = pool.acquire().await?;
                let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                    .fetch_one(&mut *conn)
                    .await?;
                let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
                    .fetch_one(&mut *conn)
                    .await?;
                assert_eq!((mode.as_str(), level), ("wal", expected), "{sync:?}");
                held.push(conn);
            }
        }
        Ok(())
    }

    /// Environment variable that turns `kill_9_child_writer` on and names its database.
    const KILL_9_URL_VAR: &str = "CASCADE_TEST_KILL_9_URL";

    #[tokio::test]
    async fn every_acknowledged_record_survives_kill_9_of_the_writing_process() -> TestResult {
        use std::io::BufRead;

        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("cascade.db").display());
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "storage::tests::sqlite_only::kill_9_child_writer",
            ])
            .args(["--ignored", "--nocapture", "--test-threads=1"])
            .env(KILL_9_URL_VAR, &url)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("child has no stdout")?;
        // Read acknowledgements until 50 records are known written, then kill -9 the writer
        // while it is in the middle of writing more.
        let acknowledged = tokio::task::spawn_blocking(move || {
            let mut acknowledged = Vec::new();
            for line in std::io::BufReader::new(stdout).lines() {
                if let Some(id) = line?.strip_prefix("recorded ") {
                    acknowledged.push(id.to_owned());
                    if acknowledged.len() == 50 {
                        break;
                    }
                }
            }
            Ok::<_, std::io::Error>(acknowledged)
        })
        .await??;
        child.kill()?;
        child.wait()?;
        assert_eq!(acknowledged.len(), 50, "the writer stopped early");
        let s = connect(&StorageConfig {
            url,
            max_connections: 1,
            reservation_ttl_secs: TTL_SECS,
            sqlite_sync: SqliteSync::default(),
        })
        .await?;
        for id in &acknowledged {
            assert!(
                s.get_record(id).await?.is_some(),
                "acknowledged {id} was lost"
            );
        }
        Ok(())
    }

    /// The writer killed by the test above; does nothing unless that test started it.
    #[tokio::test]
    #[ignore = "a child process of every_acknowledged_record_survives_kill_9_of_the_writing_process"]
    async fn kill_9_child_writer() -> TestResult {
        use std::io::Write;

        let Ok(url) = std::env::var(KILL_9_URL_VAR) else {
            return Ok(());
        };
        let s = connect(&StorageConfig {
            url,
            max_connections: 2,
            reservation_ttl_secs: TTL_SECS,
            sqlite_sync: SqliteSync::default(),
        })
        .await?;
        let mut stdout = std::io::stdout();
        for i in 0_u64.. {
            let id = format!("req-{i}");
            s.record(&LedgerRecord {
                id: id.clone(),
                created_unix_ms: 0,
                team: Some("alpha".to_owned()),
                key_id: None,
                experiment: None,
                variant: None,
                route: "local".to_owned(),
                reason: "confident".to_owned(),
                confidence: None,
                confidence_aggregate: None,
                local_tokens: i,
                remote_model: None,
                remote_input_tokens: 0,
                remote_output_tokens: 0,
                cost_nanos: 0,
                latency_ms: 1,
                status: 200,
                prompt_text: None,
                overrun_nanos: 0,
                signals: None,
            })
            .await?;
            writeln!(stdout, "recorded {id}")?;
            stdout.flush()?;
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_in_memory_database_is_one_database_whatever_the_pool_size() -> TestResult {
        let s = connect(&StorageConfig {
            url: "sqlite::memory:".to_owned(),
            max_connections: 8,
            reservation_ttl_secs: TTL_SECS,
            sqlite_sync: SqliteSync::default(),
        })
        .await?;
        let scopes = [ScopeLimit {
            scope: "key:k".to_owned(),
            limit_nanos: 10,
        }];
        let attempts: Vec<_> = (0..20)
            .map(|i| {
                let (s, scopes) = (s.clone(), scopes.clone());
                tokio::spawn(async move { s.reserve(&format!("req-{i}"), &scopes, 1, 0).await })
            })
            .collect();
        let mut granted = 0;
        for attempt in attempts {
            granted += usize::from(attempt.await?.is_ok());
        }
        assert_eq!(granted, 10);
        Ok(())
    }

    #[tokio::test]
    async fn unusable_configurations_are_rejected_at_connect() -> TestResult {
        let config = |url: &str, max_connections, reservation_ttl_secs| StorageConfig {
            url: url.to_owned(),
            max_connections,
            reservation_ttl_secs,
            sqlite_sync: SqliteSync::default(),
        };
        for bad in [
            config("mysql://localhost/db", 4, 60),
            config("sqlite::memory:", 0, 60),
            config("sqlite::memory:", 4, 0),
            config("sqlite::memory:", 4, u64::MAX),
        ] {
            assert!(
                matches!(connect(&bad).await, Err(StorageError::Config(_))),
                "{bad:?}"
            );
        }
        Ok(())
    }
}
