//! The process lifecycle of `cascade serve`: graceful shutdown on SIGTERM and reloading the
//! policy sections of its configuration on SIGHUP. Runs the real binary against a minimal
//! in-test upstream (see `common`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn chat(client: &reqwest::Client, base: &str, key: &str, stream: bool) -> (u16, String) {
    let mut body = json!({"model": "cascade", "messages": [{"role": "user", "content": "Hi"}],
                          "max_tokens": 8});
    if stream {
        body["stream"] = json!(true);
    }
    match client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_requests_in_flight_records_them_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    // Every answer takes 1.5 s: the requests are in flight when the signal comes.
    let upstream = upstream(Duration::from_millis(1500)).await;
    let port = free_port();
    let config = write_config(dir.path(), port, upstream);
    let base = format!("http://127.0.0.1:{port}");
    let client = client();
    let mut child = spawn(&config);
    wait_healthy(&client, &base).await;

    let in_flight: Vec<_> = (0..4)
        .map(|i| {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move { chat(&client, &base, KEY, i % 2 == 1).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let signalled = Instant::now();
    signal(&child, "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No new requests once shutting down.
    let (late, _) = chat(
        &reqwest::Client::builder()
            .timeout(Duration::from_millis(800))
            .build()
            .unwrap(),
        &base,
        KEY,
        false,
    )
    .await;
    assert_ne!(late, 200, "a request after SIGTERM was served");

    for request in in_flight {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("[DONE]") || serde_json::from_str::<Value>(&body).is_ok(),
            "incomplete: {body}"
        );
    }
    let status = wait_exit(&mut child, Duration::from_secs(20)).expect("still running");
    assert!(status.success(), "exit status {status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(20));

    // Every request is in the ledger and every reservation settled.
    let storage = cascade::storage::connect(&cascade::storage::StorageConfig {
        url: format!("sqlite://{}", dir.path().join("ledger.db").display()),
        max_connections: 1,
        reservation_ttl_secs: 3600,
        sqlite_sync: Default::default(),
    })
    .await
    .unwrap();
    let usage = storage.team_usage("alpha", 0, i64::MAX).await.unwrap();
    assert_eq!(usage.requests, 4);
    assert_eq!(usage.cost_nanos, 4 * (7 * 1_000 + 3 * 2_000));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let day = policies::budget::window_key(now, policies::Tz::UTC, policies::Window::Day);
    let scope = storage
        .scope_state(&format!("team/alpha/day/{day}"))
        .await
        .unwrap();
    assert_eq!(
        (scope.reserved_nanos, scope.spent_nanos),
        (0, usage.cost_nanos)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_teams_and_prices_and_refuses_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream(Duration::from_millis(5)).await;
    let port = free_port();
    let config = write_config(dir.path(), port, upstream);
    let base = format!("http://127.0.0.1:{port}");
    let client = client();
    let mut child = spawn(&config);
    wait_healthy(&client, &base).await;
    const BETA: &str = "sk-beta-added-by-reload";
    assert_eq!(chat(&client, &base, BETA, false).await.0, 401);

    // A new team appears on SIGHUP.
    let original = config_text(dir.path(), port, upstream);
    let with_beta = format!(
        "{original}\n[[teams]]\nname = \"beta\"\napi_key_hashes = [\"{}\"]\npolicy = {{ remote_only = true, remotes = [\"big\"] }}\n",
        policies::team::hash_api_key(BETA)
    );
    std::fs::write(&config, &with_beta).unwrap();
    signal(&child, "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while chat(&client, &base, BETA, false).await.0 != 200 {
        assert!(Instant::now() < deadline, "beta's key never worked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A file that does not validate is refused: both teams keep working.
    std::fs::write(
        &config,
        with_beta.replace(
            "remote_only = true, remotes",
            "remote_only = true, local_only = true, remotes",
        ),
    )
    .unwrap();
    signal(&child, "HUP");
    // A changed remote needs a restart: refused too.
    let metrics = || async {
        client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let refused = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("cascade_config_reloads_total{result=\"refused\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused(&metrics().await) < 1.0 {
        assert!(Instant::now() < deadline, "the bad file was not refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(
        &config,
        with_beta.replace("timeout_ms = 5000", "timeout_ms = 6000"),
    )
    .unwrap();
    signal(&child, "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused(&metrics().await) < 2.0 {
        assert!(
            Instant::now() < deadline,
            "the remote change was not refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(chat(&client, &base, BETA, false).await.0, 200);
    assert_eq!(chat(&client, &base, KEY, true).await.0, 200);

    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(20)).expect("still running");
    assert!(status.success(), "exit status {status:?}");
}
