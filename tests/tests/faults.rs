//! Fault injection: every way a remote or the ledger's database can fail, and for each what
//! the client gets, what the ledger records, that budgets are settled, and that nothing hangs
//! past the configured deadline. docs/reliability.md is the table of these tests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use cascade::app::RunningServer;
use cascade::config::RawConfig;
use cascade::storage::LedgerRecord;
use cascade_e2e::{Fault, MockOptions, ResetServer, TcpProxy};
use common::*;
use policies::team::hash_api_key;
use serde_json::{json, Value};

/// Team alpha has a daily budget (every paid call reserves); beta has none.
const ALPHA: &str = "sk-faults-alpha";
const BETA: &str = "sk-faults-beta";
const TIMEOUT_MS: u64 = 500;
const MAX_RETRIES: u32 = 2;
const BACKOFF_MAX_MS: u64 = 50;
const LIMIT: u64 = 64 * 1024;

/// The mocks as remotes with a short timeout and response limit, a breaker that stays closed
/// (the breaker has its own test), and teams alpha (budgeted) and beta.
fn faulty_config(mocks: &[&cascade_e2e::MockUpstream]) -> RawConfig {
    let mut raw = raw_config(mocks);
    for remote in &mut raw.remotes {
        remote.timeout_ms = TIMEOUT_MS;
        remote.max_retries = MAX_RETRIES;
        remote.backoff_base_ms = 10;
        remote.backoff_max_ms = BACKOFF_MAX_MS;
        remote.max_response_bytes = LIMIT;
        remote.breaker_failures = 1000;
    }
    let names: Vec<String> = raw.remotes.iter().map(|r| r.name.clone()).collect();
    for name in &names {
        price(&mut raw, name, 1.0, 2.0);
    }
    set_teams(&mut raw, &names);
    raw
}

fn set_teams(raw: &mut RawConfig, remotes: &[String]) {
    raw.teams = [(ALPHA, "alpha", Some(100.0)), (BETA, "beta", None)]
        .into_iter()
        .map(|(key, name, budget)| {
            let mut policy = json!({"threshold": -1.0, "remotes": remotes,
                                    "allow_direct_models": true, "on_remote_failure": "error"});
            if let Some(b) = budget {
                policy["daily_budget_usd"] = json!(b);
            }
            serde_json::from_value(json!({
                "name": name, "api_key_hashes": [hash_api_key(key)], "policy": policy,
            }))
            .unwrap()
        })
        .collect();
}

/// Adds a remote at `base_url` named `name`, configured like the others.
fn add_remote(raw: &mut RawConfig, name: &str, base_url: String) {
    let mut remote = raw.remotes[0].clone();
    remote.name = name.into();
    remote.base_url = Some(base_url);
    raw.remotes.push(remote);
    price(raw, name, 1.0, 2.0);
    let names: Vec<String> = raw.remotes.iter().map(|r| r.name.clone()).collect();
    set_teams(raw, &names);
}

/// The longest a failing request may take: every attempt timing out, with the longest
/// backoff between, plus slack for a loaded machine.
fn deadline() -> Duration {
    let attempts = u64::from(MAX_RETRIES) + 1;
    Duration::from_millis(attempts * TIMEOUT_MS + u64::from(MAX_RETRIES) * BACKOFF_MAX_MS)
        + Duration::from_secs(2)
}

async fn ask(server: &RunningServer, key: &str, body: &Value) -> (Reply, Duration) {
    let auth = format!("Bearer {key}");
    let started = Instant::now();
    let r = post(
        server,
        "/v1/chat/completions",
        body,
        &[("authorization", &auth)],
    )
    .await;
    (r, started.elapsed())
}

fn streamed(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body
}

/// Alpha's day scope once every settlement task has run: (spent, reserved).
async fn alpha_budget(server: &RunningServer) -> (u64, u64) {
    let state = settled_team_scope(server, "alpha").await;
    (state.spent_nanos, state.reserved_nanos)
}

fn cost(rec: &LedgerRecord) -> u64 {
    rec.remote_input_tokens * 1_000 + rec.remote_output_tokens * 2_000
}

/// A fault case: the remote asked, the mock's fault, the status and error code the client
/// gets, and how many calls reach the mock (`None`: the remote is not the mock).
type Case = (
    &'static str,
    Option<Fault>,
    u16,
    &'static str,
    Option<usize>,
);

/// A port nothing listens on: bound, then released.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/v1")
}

#[tokio::test]
async fn every_remote_fault_gets_an_openai_error_a_ledger_record_and_a_settled_budget() {
    let mock = mock().await;
    let reset = ResetServer::start().await.unwrap();
    let mut raw = faulty_config(&[&mock]);
    add_remote(&mut raw, "refused", closed_port_url());
    add_remote(&mut raw, "reset", reset.base_url());
    let server = start(raw, None).await;

    // A healthy answer first: under the limit, recorded, charged.
    let (r, _) = ask(&server, ALPHA, &chat(REMOTE, "Hello", 5)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let healthy = record(&server, r.header("x-request-id")).await;
    assert!(healthy.cost_nanos > 0);

    let attempts = MAX_RETRIES as usize + 1;
    let cases: Vec<Case> = vec![
        (
            REMOTE,
            Some(Fault::Status(500)),
            502,
            "upstream_unavailable",
            Some(attempts),
        ),
        (
            REMOTE,
            Some(Fault::Status(502)),
            502,
            "upstream_unavailable",
            Some(attempts),
        ),
        (
            REMOTE,
            Some(Fault::Status(503)),
            502,
            "upstream_unavailable",
            Some(attempts),
        ),
        (
            REMOTE,
            Some(Fault::Status(429)),
            502,
            "upstream_unavailable",
            Some(attempts),
        ),
        (
            REMOTE,
            Some(Fault::RetryAfter(0)),
            502,
            "upstream_unavailable",
            Some(attempts),
        ),
        // A 4xx is the remote's considered answer: not retried.
        (
            REMOTE,
            Some(Fault::Status(400)),
            502,
            "upstream_unavailable",
            Some(1),
        ),
        (
            REMOTE,
            Some(Fault::Malformed),
            502,
            "upstream_unavailable",
            Some(1),
        ),
        (
            REMOTE,
            Some(Fault::Cut),
            502,
            "upstream_unavailable",
            Some(1),
        ),
        (
            REMOTE,
            Some(Fault::Timeout),
            504,
            "upstream_timeout",
            Some(1),
        ),
        (REMOTE, Some(Fault::Stall), 504, "upstream_timeout", Some(1)),
        (
            REMOTE,
            Some(Fault::StallMidway),
            504,
            "upstream_timeout",
            Some(1),
        ),
        (
            REMOTE,
            Some(Fault::Oversized),
            502,
            "upstream_response_too_large",
            Some(1),
        ),
        ("refused", None, 502, "upstream_unavailable", None),
        ("reset", None, 502, "upstream_unavailable", None),
    ];
    for (remote, fault, status, code, calls) in cases {
        mock.set_fault(fault);
        let before = mock.request_count();
        let (r, elapsed) = ask(&server, ALPHA, &chat(remote, "Hello", 5)).await;
        let what = format!("{remote} {fault:?}");
        assert_eq!(r.status, status, "{what}: {}", r.text);
        let error = &r.json()["error"];
        assert_eq!(error["code"], code, "{what}: {}", r.text);
        assert_eq!(error["type"], "upstream_error", "{what}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}"
        );
        assert_eq!(r.header("x-cascade-route"), "remote", "{what}");
        if let Some(calls) = calls {
            assert_eq!(
                mock.request_count() - before,
                calls,
                "{what}: upstream calls"
            );
        }
        assert!(elapsed < deadline(), "{what} took {elapsed:?}");
        let rec = record(&server, r.header("x-request-id")).await;
        assert_eq!(
            (rec.status, rec.route.as_str()),
            (status, "rejected"),
            "{what}"
        );
        assert_eq!(rec.cost_nanos, 0, "{what}: nothing billable arrived");
        assert_eq!(rec.remote_model, None, "{what}");
        // Every failed attempt gave its reservation back; only the healthy answer is spent.
        assert_eq!(
            alpha_budget(&server).await,
            (healthy.cost_nanos, 0),
            "{what}: budget settled"
        );
    }
    let metrics = get(&server, "/metrics").await.text;
    for kind in [
        "status_5xx",
        "status_429",
        "malformed",
        "network",
        "timeout",
        "too_large",
    ] {
        assert!(
            metric(
                &metrics,
                "cascade_upstream_errors_total",
                &[&format!("kind=\"{kind}\"")]
            ) >= 1.0,
            "{kind}: {metrics}"
        );
    }
    assert!(
        metric(
            &metrics,
            "cascade_upstream_errors_total",
            &["upstream=\"refused\"", "kind=\"connect\""]
        ) >= 3.0
    );
}

#[tokio::test]
async fn a_timeout_is_not_retried_so_the_client_waits_one_timeout_not_three() {
    let mock = mock().await;
    let server = start(faulty_config(&[&mock]), None).await;
    mock.set_fault(Some(Fault::Timeout));
    let (r, elapsed) = ask(&server, ALPHA, &chat(REMOTE, "Hello", 5)).await;
    assert_eq!(r.status, 504, "{}", r.text);
    assert_eq!(mock.request_count(), 1);
    // One timeout, well below the three of a retried one.
    assert!(
        elapsed < Duration::from_millis(TIMEOUT_MS * 2) + Duration::from_millis(700),
        "{elapsed:?}"
    );
    assert_eq!(alpha_budget(&server).await, (0, 0));
}

#[tokio::test]
async fn retry_after_is_honoured_up_to_the_backoff_cap() {
    let mock = mock().await;
    let mut raw = faulty_config(&[&mock]);
    raw.remotes[0].max_retries = 1;
    raw.remotes[0].backoff_max_ms = 1_000;
    let server = start(raw, None).await;
    // Asks for 30 s; the cap (1 s) wins, so the retry comes after about a second.
    mock.push_faults([Fault::RetryAfter(30)]);
    let (r, elapsed) = ask(&server, ALPHA, &chat(REMOTE, "Hello", 5)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(mock.request_count(), 2);
    assert!(
        elapsed >= Duration::from_millis(1_000),
        "waited {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "{elapsed:?}: the 30 s were not capped"
    );
    let rec = record(&server, r.header("x-request-id")).await;
    assert_eq!(alpha_budget(&server).await, (rec.cost_nanos, 0));
}

#[tokio::test]
async fn stream_faults_end_with_an_error_event_or_an_error_before_the_stream() {
    let mock = mock().await;
    mock.set_options(MockOptions {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_millis(20),
        ..MockOptions::default()
    });
    let server = start(faulty_config(&[&mock]), None).await;
    let mut spent = 0;

    // Broken after some text: the client has a 200 stream that ends with an error event and
    // no [DONE]; the text that arrived is charged and recorded as a failed (502) stream.
    for (fault, code) in [
        (Fault::Cut, "network"),
        (Fault::Malformed, "malformed"),
        (Fault::StallMidway, "timeout"),
    ] {
        mock.set_fault(Some(fault));
        let (r, elapsed) = ask(
            &server,
            ALPHA,
            &streamed(chat(REMOTE, "Tell me a long story", 20)),
        )
        .await;
        assert_eq!(r.status, 200, "{fault:?}: {}", r.text);
        let events = r.events();
        assert!(
            !events.iter().any(|e| e == "[DONE]"),
            "{fault:?}: {}",
            r.text
        );
        let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert_eq!(last["error"]["code"], code, "{fault:?}: {last}");
        assert!(
            !r.streamed_text().is_empty(),
            "{fault:?}: text before the break"
        );
        assert!(elapsed < deadline(), "{fault:?} took {elapsed:?}");
        let rec = record(&server, r.header("x-request-id")).await;
        assert_eq!(
            (rec.status, rec.route.as_str()),
            (502, "remote"),
            "{fault:?}"
        );
        assert_eq!(rec.remote_model.as_deref(), Some(REMOTE));
        assert!(rec.remote_output_tokens > 0, "{fault:?}: {rec:?}");
        assert_eq!(rec.cost_nanos, cost(&rec), "{fault:?}");
        spent += rec.cost_nanos;
        assert_eq!(alpha_budget(&server).await, (spent, 0), "{fault:?}");
    }

    // Failing before the first event: nothing was streamed, so the client gets a plain
    // OpenAI error (and another remote could have been tried).
    for (fault, status, code) in [
        (Fault::Status(500), 502, "upstream_unavailable"),
        (Fault::Stall, 504, "upstream_timeout"),
    ] {
        mock.set_fault(Some(fault));
        let (r, elapsed) = ask(&server, ALPHA, &streamed(chat(REMOTE, "Hello", 5))).await;
        assert_eq!(r.status, status, "{fault:?}: {}", r.text);
        assert_eq!(r.json()["error"]["code"], code, "{fault:?}");
        assert!(elapsed < deadline(), "{fault:?} took {elapsed:?}");
        let rec = record(&server, r.header("x-request-id")).await;
        assert_eq!(
            (rec.status, rec.route.as_str(), rec.cost_nanos),
            (status, "rejected", 0)
        );
        assert_eq!(alpha_budget(&server).await, (spent, 0), "{fault:?}");
    }
}

#[tokio::test]
async fn an_oversized_event_after_the_first_ends_the_stream_with_a_too_large_error() {
    let mock = mock().await;
    let server = start(faulty_config(&[&mock]), None).await;
    // The first (role) event is small, so the stream starts; the next is over the limit.
    mock.set_fault(Some(Fault::Oversized));
    let (r, elapsed) = ask(&server, ALPHA, &streamed(chat(REMOTE, "Hello", 5))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.text.len() < LIMIT as usize,
        "the oversized event was not forwarded"
    );
    let events = r.events();
    assert!(!events.iter().any(|e| e == "[DONE]"), "{}", r.text);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "too_large", "{last}");
    assert!(elapsed < deadline(), "{elapsed:?}");
    let rec = record(&server, r.header("x-request-id")).await;
    assert_eq!((rec.status, rec.route.as_str()), (502, "remote"));
    assert_eq!(rec.cost_nanos, 0, "no text arrived: nothing billable");
    assert_eq!(alpha_budget(&server).await, (0, 0));
}

#[tokio::test]
async fn an_open_circuit_fails_over_at_once_and_closes_after_the_upstream_recovers() {
    let (first, second) = (mock().await, mock().await);
    let mut raw = faulty_config(&[&first, &second]);
    raw.remotes[0].timeout_ms = 1_000;
    raw.remotes[0].max_retries = 0;
    raw.remotes[0].breaker_failures = 2;
    raw.remotes[0].breaker_cooldown_ms = 1_000;
    let server = start(raw, None).await;
    first.set_fault(Some(Fault::Timeout));
    let circuit = |text: &str| {
        metric(
            text,
            "cascade_upstream_circuit_state",
            &["upstream=\"big\""],
        )
    };

    // Two timeouts open the circuit; each request still gets the second remote's answer.
    for _ in 0..2 {
        let (r, elapsed) = ask(&server, ALPHA, &chat("cascade", "Hello", 5)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(
            elapsed >= Duration::from_millis(1_000),
            "waited the timeout: {elapsed:?}"
        );
        assert_eq!(
            record(&server, r.header("x-request-id"))
                .await
                .remote_model
                .as_deref(),
            Some("big-1")
        );
    }
    assert_eq!(first.request_count(), 2);
    assert_eq!(circuit(&get(&server, "/metrics").await.text), 1.0, "open");

    // Open: the failing remote is skipped without a call, far below its 1 s timeout.
    for _ in 0..3 {
        let (r, elapsed) = ask(&server, ALPHA, &chat("cascade", "Hello", 5)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(
            elapsed < Duration::from_millis(500),
            "failed over at once: {elapsed:?}"
        );
        let rec = record(&server, r.header("x-request-id")).await;
        assert_eq!(rec.remote_model.as_deref(), Some("big-1"));
    }
    assert_eq!(first.request_count(), 2, "no call while open");
    let metrics = get(&server, "/metrics").await.text;
    assert!(
        metric(
            &metrics,
            "cascade_upstream_errors_total",
            &["upstream=\"big\"", "kind=\"circuit_open\""]
        ) >= 3.0
    );

    // Only remote of its chain and open: a distinct, immediate 503 with Retry-After.
    let (r, elapsed) = ask(&server, ALPHA, &chat(REMOTE, "Hello", 5)).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "circuit_open");
    assert!(!r.header("retry-after").is_empty());
    assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");
    assert_eq!(record(&server, r.header("x-request-id")).await.status, 503);

    // Recovered: after the cooldown one probe goes through, succeeds, and closes the circuit.
    first.set_fault(None);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (r, _) = ask(&server, ALPHA, &chat("cascade", "Hello", 5)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        record(&server, r.header("x-request-id"))
            .await
            .remote_model
            .as_deref(),
        Some(REMOTE)
    );
    assert_eq!(first.request_count(), 3);
    assert_eq!(circuit(&get(&server, "/metrics").await.text), 0.0, "closed");
    // Every reservation was settled, and none was made for the skipped remote.
    let (_, reserved) = alpha_budget(&server).await;
    assert_eq!(reserved, 0);
}

/// Holds SQLite's write lock from a second connection, as another process could.
async fn lock_sqlite(path: &std::path::Path) -> sqlx::SqliteConnection {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN EXCLUSIVE")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

async fn unlock_sqlite(mut conn: sqlx::SqliteConnection) {
    use sqlx::Connection;
    sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

/// Waits (boundedly) until the ledger holds a record with this id.
async fn eventually_recorded(server: &RunningServer, id: &str, within: Duration) -> LedgerRecord {
    let until = Instant::now() + within;
    loop {
        if let Some(rec) = storage(server).get_record(id).await.unwrap() {
            return rec;
        }
        assert!(Instant::now() < until, "{id} never reached the database");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spool_text(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn a_locked_sqlite_ledger_spools_records_and_replays_them_when_it_heals() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let spool = dir.path().join("spool.jsonl");
    let mut raw = faulty_config(&[&mock]);
    raw.storage.url = format!("sqlite://{}", db.display());
    raw.storage.spool_path = spool.display().to_string();
    let server = start(raw, None).await;

    let (before, _) = ask(&server, ALPHA, &chat(REMOTE, "Before", 5)).await;
    assert_eq!(before.status, 200, "{}", before.text);
    let before_id = before.header("x-request-id").to_string();
    record(&server, &before_id).await;
    // Its settlement runs in its own task after the answer: let it land before the fault
    // (a settlement that meets a locked database waits for the TTL instead).
    assert_eq!(alpha_budget(&server).await.1, 0);

    let lock = lock_sqlite(&db).await;
    // No budget to reserve: the answer goes out once its record is in the spool.
    let (answered, _) = ask(&server, BETA, &chat(REMOTE, "During", 5)).await;
    assert_eq!(answered.status, 200, "{}", answered.text);
    let answered_id = answered.header("x-request-id").to_string();
    // A budgeted call cannot reserve: it fails closed, and that is recorded too.
    let (refused, _) = ask(&server, ALPHA, &chat(REMOTE, "During", 5)).await;
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(refused.json()["error"]["code"], "budget_store_unavailable");
    let refused_id = refused.header("x-request-id").to_string();
    let spooled = spool_text(&spool);
    assert!(
        spooled.contains(&answered_id) && spooled.contains(&refused_id),
        "{spooled}"
    );
    assert!(storage(&server)
        .get_record(&answered_id)
        .await
        .unwrap()
        .is_none());
    let metrics = get(&server, "/metrics").await.text;
    assert!(
        metric(&metrics, "cascade_ledger_spooled_total", &[]) >= 2.0,
        "{metrics}"
    );

    unlock_sqlite(lock).await;
    let rec = eventually_recorded(&server, &answered_id, Duration::from_secs(20)).await;
    assert_eq!((rec.status, rec.route.as_str()), (200, "remote"));
    assert_eq!(rec.team.as_deref(), Some("beta"));
    let rec = eventually_recorded(&server, &refused_id, Duration::from_secs(20)).await;
    assert_eq!(rec.status, 503);
    record(&server, &before_id).await;
    let until = Instant::now() + Duration::from_secs(5);
    while !spool_text(&spool).is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        spool_text(&spool),
        "",
        "the spool is emptied after the replay"
    );
    assert_eq!(alpha_budget(&server).await.1, 0);
}

#[tokio::test]
async fn a_spool_left_by_an_earlier_run_is_replayed_at_start_up() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let spool = dir.path().join("spool.jsonl");
    let mut raw = faulty_config(&[&mock]);
    raw.storage.url = format!("sqlite://{}", db.display());
    raw.storage.spool_path = spool.display().to_string();
    let server = start(raw.clone(), None).await;
    let (r, _) = ask(&server, BETA, &chat(REMOTE, "Hello", 5)).await;
    let mut rec = record(&server, r.header("x-request-id")).await;
    server.shutdown().await.unwrap();
    rec.id = "left-in-the-spool".into();
    std::fs::write(
        &spool,
        format!("{}\n", serde_json::to_string(&rec).unwrap()),
    )
    .unwrap();
    // Even a gateway that fails closed takes in what an earlier run spooled.
    raw.storage.on_ledger_failure = "fail_closed".into();
    let server = start(raw, None).await;
    assert_eq!(record(&server, "left-in-the-spool").await, rec);
    assert_eq!(spool_text(&spool), "");
}

#[tokio::test]
async fn a_fail_closed_ledger_withholds_answers_it_cannot_record() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let spool = dir.path().join("spool.jsonl");
    let mut raw = faulty_config(&[&mock]);
    raw.storage.url = format!("sqlite://{}", db.display());
    raw.storage.spool_path = spool.display().to_string();
    raw.storage.on_ledger_failure = "fail_closed".into();
    let server = start(raw, None).await;
    let (before, _) = ask(&server, BETA, &chat(REMOTE, "Before", 5)).await;
    assert_eq!(before.status, 200);
    let before_id = before.header("x-request-id").to_string();

    let lock = lock_sqlite(&db).await;
    let (r, _) = ask(&server, BETA, &chat(REMOTE, "During", 5)).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "ledger_unavailable");
    assert_eq!(r.json()["error"]["type"], "server_error");
    // A stream's text has gone out; its end is an error event instead of [DONE].
    let (s, _) = ask(&server, BETA, &streamed(chat(REMOTE, "During", 5))).await;
    assert_eq!(s.status, 200);
    let events = s.events();
    assert!(!events.iter().any(|e| e == "[DONE]"), "{}", s.text);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "ledger_unavailable", "{last}");
    assert_eq!(spool_text(&spool), "", "fail_closed does not spool");
    unlock_sqlite(lock).await;

    let (after, _) = ask(&server, BETA, &chat(REMOTE, "After", 5)).await;
    assert_eq!(after.status, 200, "{}", after.text);
    record(&server, after.header("x-request-id")).await;
    record(&server, &before_id).await;
}

#[tokio::test]
async fn an_unreachable_postgres_ledger_spools_records_and_replays_them_when_it_heals() {
    let schema = PgSchema::create("e2e_faults").await;
    // The gateway reaches the shared server through a proxy this test can cut: the server
    // itself is never stopped.
    let target: reqwest::Url = schema.base.parse().unwrap();
    let target_addr = format!(
        "{}:{}",
        target.host_str().unwrap(),
        target.port().unwrap_or(5432)
    );
    let proxy = TcpProxy::start(target_addr.parse().unwrap()).await.unwrap();
    let mut via_proxy = target.clone();
    via_proxy.set_port(Some(proxy.addr.port())).unwrap();
    let url = schema.url_via(via_proxy.as_str());

    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.jsonl");
    let mut raw = faulty_config(&[&mock]);
    raw.storage.url = url;
    raw.storage.spool_path = spool.display().to_string();
    let server = start(raw, None).await;
    let (before, _) = ask(&server, BETA, &chat(REMOTE, "Before", 5)).await;
    assert_eq!(before.status, 200, "{}", before.text);
    let before_id = before.header("x-request-id").to_string();

    proxy.set_up(false);
    let (during, _) = ask(&server, BETA, &chat(REMOTE, "During", 5)).await;
    assert_eq!(during.status, 200, "{}", during.text);
    let during_id = during.header("x-request-id").to_string();
    assert!(spool_text(&spool).contains(&during_id));

    proxy.set_up(true);
    let rec = eventually_recorded(&server, &during_id, Duration::from_secs(30)).await;
    let before_rec = storage(&server).get_record(&before_id).await.unwrap();
    schema.drop().await;
    assert_eq!((rec.status, rec.team.as_deref()), (200, Some("beta")));
    assert!(
        before_rec.is_some(),
        "records written before the fault are kept"
    );
}
