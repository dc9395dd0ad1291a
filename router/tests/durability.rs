//! Durability of the ledger: `cascade serve` killed with SIGKILL under load, restarted, and
//! every request a client saw complete has its ledger record.
//!
//! Runs the real binary (it is the process that dies) against a minimal in-test upstream;
//! needs the SmolLM2 file that `scripts/fetch-model.sh` downloads (the gateway loads its
//! local model at start-up even though this policy never uses it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// One client: sends requests back to back and notes the id of each it saw complete (a
/// full JSON body, or a stream through `[DONE]`).
async fn client_loop(
    client: reqwest::Client,
    base: String,
    streamed: bool,
    completed: Arc<Mutex<Vec<String>>>,
) {
    let mut body = json!({"model": "cascade", "messages": [{"role": "user", "content": "Hello"}],
                          "max_tokens": 8});
    if streamed {
        body["stream"] = json!(true);
    }
    loop {
        let Ok(response) = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
        else {
            return;
        };
        if response.status() != 200 {
            return;
        }
        let id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let Ok(text) = response.text().await else {
            return;
        };
        let complete = if streamed {
            text.contains("data: [DONE]")
        } else {
            serde_json::from_str::<Value>(&text).is_ok()
        };
        if !complete {
            return;
        }
        completed.lock().unwrap().push(id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_a_client_saw_complete_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream(Duration::from_millis(5)).await;
    let port = free_port();
    let config = write_config(dir.path(), port, upstream);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let mut child = spawn(&config);
    wait_healthy(&client, &base).await;
    let completed = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..16)
        .map(|i| {
            tokio::spawn(client_loop(
                client.clone(),
                base.clone(),
                i % 2 == 1,
                Arc::clone(&completed),
            ))
        })
        .collect();
    // Load until a good number of requests finished, then kill mid-flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while completed.lock().unwrap().len() < 300 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL: no shutdown, no flush
    child.wait().unwrap();
    for c in clients {
        let _ = c.await;
    }
    let completed = completed.lock().unwrap().clone();
    assert!(
        completed.len() >= 100,
        "only {} requests completed",
        completed.len()
    );

    // Restart on the same files: the gateway recovers its database and serves again.
    let mut child = spawn(&config);
    wait_healthy(&client, &base).await;
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "cascade", "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let storage = cascade::storage::connect(&cascade::storage::StorageConfig {
        url: format!("sqlite://{}", dir.path().join("ledger.db").display()),
        max_connections: 1,
        reservation_ttl_secs: 60,
        sqlite_sync: Default::default(),
    })
    .await
    .unwrap();
    let mut missing = Vec::new();
    for id in &completed {
        match storage.get_record(id).await.unwrap() {
            Some(rec) => {
                assert_eq!(rec.status, 200, "{rec:?}");
                assert_eq!(rec.cost_nanos, 7 * 1_000 + 3 * 2_000, "{rec:?}");
            }
            None => missing.push(id.clone()),
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        missing.is_empty(),
        "{} of {} completed requests have no ledger record: {:?}",
        missing.len(),
        completed.len(),
        &missing[..missing.len().min(5)]
    );
}
