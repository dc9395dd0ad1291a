//! Shared set-up of the router's integration tests: the model file, a minimal upstream, a
//! configuration file, starting the `cascade` binary and waiting for it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

pub const KEY: &str = "sk-durability-team";

/// An upstream that answers every chat request after `delay`, streamed or not, with
/// usage 7 prompt + 3 completion tokens.
pub async fn upstream(delay: Duration) -> SocketAddr {
    async fn answer(
        axum::extract::State(delay): axum::extract::State<Duration>,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        tokio::time::sleep(delay).await;
        let request: Value = serde_json::from_slice(&body).unwrap_or_default();
        let usage = json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10});
        if request["stream"] == json!(true) {
            let chunk = |delta: Value, usage: Value| {
                format!(
                    "data: {}\n\n",
                    json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                           "choices": [{"index": 0, "delta": delta, "finish_reason": null}], "usage": usage})
                )
            };
            let body = [
                chunk(json!({"role": "assistant", "content": "Hi"}), Value::Null),
                chunk(json!({"content": " there"}), usage),
                "data: [DONE]\n\n".to_string(),
            ]
            .concat();
            return ([("content-type", "text/event-stream")], body).into_response();
        }
        axum::Json(json!({
            "id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"},
                         "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response()
    }
    let app = Router::new()
        .route("/v1/chat/completions", post(answer))
        .with_state(delay);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

pub use cascade_e2e::fixtures::model_path;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The configuration of a gateway on `port` with one remote `big` at `upstream`, the ledger
/// in `dir`, and team `alpha` (key [`KEY`], remote only).
pub fn config_text(dir: &Path, port: u16, upstream: SocketAddr) -> String {
    config_with(
        port,
        upstream,
        &format!("sqlite://{}", dir.join("ledger.db").display()),
        (1.0, 2.0),
        r#"{ remote_only = true, remotes = ["big"], daily_budget_usd = 1000.0 }"#,
    )
}

/// A configuration with its own storage URL, price of `big` (USD per million input and
/// output tokens) and policy of team `alpha` (an inline TOML table).
pub fn config_with(
    port: u16,
    upstream: SocketAddr,
    storage_url: &str,
    price: (f64, f64),
    alpha_policy: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"

[local]
model = "{model}"
name = "smollm2"
warm_up = false

[storage]
url = "{storage_url}"

[[remotes]]
name = "big"
base_url = "http://{upstream}/v1"
timeout_ms = 5000
max_retries = 0

[prices.big]
input_usd_per_million = {input:?}
output_usd_per_million = {output:?}

[[teams]]
name = "alpha"
api_key_hashes = ["{hash}"]
policy = {alpha_policy}
"#,
        model = model_path().display(),
        hash = policies::team::hash_api_key(KEY),
        input = price.0,
        output = price.1,
    )
}

/// Writes [`config_text`] to `dir/cascade.toml`.
pub fn write_config(dir: &Path, port: u16, upstream: SocketAddr) -> PathBuf {
    let path = dir.join("cascade.toml");
    std::fs::write(&path, config_text(dir, port, upstream)).unwrap();
    path
}

/// Sends a signal to a child process with the `kill` command.
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} failed");
}

/// Waits up to `limit` for the child to exit.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

pub fn spawn(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

pub async fn wait_healthy(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cascade serve did not come up at {base}");
}
