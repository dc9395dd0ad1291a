//! Two `cascade serve` processes sharing one PostgreSQL database never overspend a team
//! budget between them: 200 concurrent escalations, split across both, against a budget that
//! fits only some. Needs the PostgreSQL that `scripts/start-postgres.sh` starts
//! (`CASCADE_TEST_POSTGRES_URL`, default postgres://postgres@127.0.0.1:5432/test); each run
//! works in a schema of its own and drops it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_sharing_postgres_never_overspend_a_team_budget() {
    let schema = cascade_e2e::fixtures::PgSchema::create("replicas").await;
    let url = schema.url();

    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream(Duration::from_millis(20)).await;
    // $1 a day at $1000 per million tokens: each call reserves (input + 10) tokens' worth,
    // settles 10 tokens ($0.013), so some dozens fit and the rest must be refused.
    let policy = r#"{ remote_only = true, remotes = ["big"], daily_budget_usd = 1.0, on_budget_exhausted = "reject" }"#;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut children = Vec::new();
    let mut bases = Vec::new();
    for i in 0..2 {
        let port = free_port();
        let sub = dir.path().join(format!("replica-{i}"));
        std::fs::create_dir(&sub).unwrap();
        let config = sub.join("cascade.toml");
        std::fs::write(
            &config,
            config_with(port, upstream, &url, (1000.0, 1000.0), policy),
        )
        .unwrap();
        children.push(spawn(&config));
        let base = format!("http://127.0.0.1:{port}");
        wait_healthy(&client, &base).await;
        bases.push(base);
    }

    let requests = (0..200).map(|i| {
        let (client, base) = (client.clone(), bases[i % 2].clone());
        async move {
            let body = json!({"model": "cascade", "max_tokens": 10,
                              "messages": [{"role": "user", "content": format!("Hello number {i}")}]});
            let r = client
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(KEY)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            (status, text)
        }
    });
    let replies = futures::future::join_all(requests).await;
    let ok = replies.iter().filter(|(s, _)| *s == 200).count();
    let refused = replies
        .iter()
        .filter(|(s, body)| *s == 429 && body.contains("budget_exhausted"))
        .count();

    for child in &children {
        signal(child, "TERM");
    }
    for child in &mut children {
        let status = wait_exit(child, Duration::from_secs(30)).expect("still running");
        assert!(status.success(), "{status:?}");
    }
    let storage = cascade::storage::connect(&cascade::storage::StorageConfig {
        url: url.clone(),
        max_connections: 1,
        reservation_ttl_secs: 3600,
        sqlite_sync: Default::default(),
    })
    .await
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let day = policies::budget::window_key(now, policies::Tz::UTC, policies::Window::Day);
    let state = storage
        .scope_state(&format!("team/alpha/day/{day}"))
        .await
        .unwrap();
    let usage = storage.team_usage("alpha", 0, i64::MAX).await.unwrap();
    storage.close().await;
    schema.drop().await;

    assert_eq!(
        ok + refused,
        200,
        "every request is answered or refused as the policy says"
    );
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    assert_eq!(state.reserved_nanos, 0);
    assert!(
        state.spent_nanos > 0 && state.spent_nanos <= 1_000_000_000,
        "{state:?}"
    );
    assert_eq!((usage.requests, usage.escalated as usize), (200, ok));
    assert_eq!(usage.cost_nanos, state.spent_nanos);
}
