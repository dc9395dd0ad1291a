//! Shared set-up of the end-to-end tests: configurations, a gateway started
//! in-process on 127.0.0.1:0, the mock upstream, and the real model.

// Each test binary uses its own subset of these helpers.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use cascade::app::RunningServer;
use cascade::cascade::local::LocalEngine;
use cascade::config::{Config, RawConfig, RawRemote};
use cascade::storage::{LedgerRecord, ScopeState, Storage};
pub use cascade_e2e::fixtures::{model_path, PgSchema};
use cascade_e2e::{MockOptions, MockUpstream};
use local_model::{LoadOptions, LocalModel, ModelHandle};
use serde_json::{json, Value};

/// The name the tests give the local model.
pub const LOCAL: &str = "smollm2";
/// The name of the remote backed by the first mock.
pub const REMOTE: &str = "big";

/// A question SmolLM2 answers confidently.
pub const EASY: &str = "What is the capital of France? Answer with the city name only.";
/// A question it cannot know: over 12 greedy tokens its mean log-prob is
/// about -0.79 (EASY: -0.26) and a token falls to about -2.65 (EASY's
/// lowest: -1.17).
pub const HARD: &str = "What is the name of my neighbor's cat? Answer with the name only.";

/// A raw configuration: local model `LOCAL`, one remote per mock, in order.
pub fn raw_config(mocks: &[&MockUpstream]) -> RawConfig {
    let mut raw = RawConfig::default();
    raw.server.listen = "127.0.0.1:0".into();
    raw.local.model = "unused-in-process.gguf".into();
    raw.local.name = Some(LOCAL.into());
    raw.local.max_tokens = 32;
    raw.storage.url = "sqlite::memory:".into();
    // Each gateway its own spool: one left in the working directory would be replayed into
    // whichever test's database started next.
    raw.storage.spool_path = unique_spool_path().display().to_string();
    raw.policy.allow_route_header = true;
    raw.remotes = mocks
        .iter()
        .enumerate()
        .map(|(i, m)| RawRemote {
            name: if i == 0 {
                REMOTE.to_string()
            } else {
                format!("{REMOTE}-{i}")
            },
            model: Some("mock-model".into()),
            base_url: Some(m.base_url()),
            api_key_env: Some("TEST_KEY".into()),
            timeout_ms: 2_000,
            max_retries: 2,
            backoff_base_ms: 10,
            backoff_max_ms: 50,
            ..RawRemote::default()
        })
        .collect();
    raw
}

/// A spool file path no other gateway of this run uses.
pub fn unique_spool_path() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "cascade-e2e-spool-{}-{n}.jsonl",
        std::process::id()
    ))
}

/// Validates a raw configuration with a fake key in `TEST_KEY`.
pub fn validate(raw: RawConfig) -> Config {
    Config::validate(raw, None, &|name| {
        (name == "TEST_KEY").then(|| "sk-test-key".to_string())
    })
    .unwrap()
}

/// Starts a gateway, attaching `local` when given.
pub async fn start(raw: RawConfig, local: Option<LocalEngine>) -> RunningServer {
    let server = RunningServer::start(&validate(raw)).await.unwrap();
    if let Some(engine) = local {
        server.state.gateway.attach_local(engine);
    }
    server
}

/// A mock answering at once.
pub async fn mock() -> MockUpstream {
    MockUpstream::start(MockOptions::default()).await.unwrap()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

pub fn url(server: &RunningServer, path: &str) -> String {
    format!("http://{}{path}", server.addr)
}

/// A chat request body.
pub fn chat(model: &str, question: &str, max_tokens: u64) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens})
}

/// A reply read in full.
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
    /// The `data:` payloads of an SSE body.
    pub fn events(&self) -> Vec<String> {
        self.text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
    /// The text streamed in an SSE body (chat deltas or completion text).
    pub fn streamed_text(&self) -> String {
        self.events()
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|v| {
                let c = v["choices"].get(0)?.clone();
                c["delta"]["content"]
                    .as_str()
                    .or(c["text"].as_str())
                    .map(str::to_string)
            })
            .collect()
    }
    /// The answer text of a non-streamed body.
    pub fn answer(&self) -> String {
        let v = self.json();
        v["choices"][0]["message"]["content"]
            .as_str()
            .or(v["choices"][0]["text"].as_str())
            .unwrap_or_default()
            .to_string()
    }
}

pub async fn post(
    server: &RunningServer,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Reply {
    let mut request = client().post(url(server, path)).json(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap_or_default();
    Reply {
        status,
        headers,
        text,
    }
}

pub async fn get(server: &RunningServer, path: &str) -> Reply {
    get_at(&url(server, path), &[]).await
}

/// GET any URL with headers.
pub async fn get_at(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = client().get(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap_or_default();
    Reply {
        status,
        headers,
        text,
    }
}

/// Loads the real model behind a queue of `queue_depth`.
pub fn load_engine(queue_depth: usize) -> LocalEngine {
    let path = model_path();
    let model = LocalModel::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let handle = ModelHandle::spawn(model, queue_depth).unwrap();
    LocalEngine::new(handle, LOCAL.into(), 32)
}

/// The real model running one request at a time behind a queue of `queue_depth`, seen
/// through two engines: one with the tests' usual 32-token cap, and one whose cap lets a
/// long generation occupy the model for as long as a test needs it busy (32 tokens can
/// finish between two polls on a loaded machine). One at a time, so that one running
/// request and `queue_depth` waiting ones fill it.
pub fn load_engine_with_occupier(queue_depth: usize) -> (LocalEngine, LocalEngine) {
    let path = model_path();
    let model = LocalModel::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let one_at_a_time = local_model::BatchLimits {
        max_batch: 1,
        ..local_model::BatchLimits::default()
    };
    let handle = ModelHandle::spawn_with(model, queue_depth, one_at_a_time).unwrap();
    (
        LocalEngine::new(handle.clone(), LOCAL.into(), 32),
        LocalEngine::new(handle, LOCAL.into(), 4000),
    )
}

/// A direct-local chat request that keeps the model generating for up to `max_tokens`.
/// Through the chat template: SmolLM2 greedily tells a story of 2,000 tokens and more. As a
/// raw completion the same words end at once on some builds (end of text is the likeliest
/// first token), and the model is free again before a test sees it busy.
pub fn occupying_chat(max_tokens: u32) -> Value {
    json!({"model": LOCAL, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}]})
}

/// One real model shared by the tests of a binary (its thread serves them in turn).
pub fn shared_engine() -> LocalEngine {
    static ENGINE: OnceLock<LocalEngine> = OnceLock::new();
    ENGINE.get_or_init(|| load_engine(16)).clone()
}

/// The value of a sample line in Prometheus text, summed over label sets
/// that contain every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Prices `remote` at `input` / `output` USD per million tokens.
pub fn price(raw: &mut RawConfig, remote: &str, input: f64, output: f64) {
    raw.prices.insert(
        remote.into(),
        serde_json::from_value(
            json!({"input_usd_per_million": input, "output_usd_per_million": output}),
        )
        .unwrap(),
    );
}

/// A team with one key and `policy` (JSON of a `[teams.policy]` table).
pub fn team(name: &str, key: &str, policy: Value) -> policies::TeamConfig {
    serde_json::from_value(json!({
        "name": name,
        "api_key_hashes": [policies::team::hash_api_key(key)],
        "policy": policy,
    }))
    .unwrap()
}

/// The ledger and budget store of a server started with [`start`].
pub fn storage(server: &RunningServer) -> &Storage {
    server.state.storage.as_ref().unwrap()
}

/// The ledger record of a request, which must exist.
pub async fn record(server: &RunningServer, id: &str) -> LedgerRecord {
    storage(server)
        .get_record(id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no ledger record for {id}"))
}

/// Today's budget scope of `team` (its storage key) and that scope's limit.
pub fn team_day_scope(server: &RunningServer, team: &str) -> (String, policies::NanoUsd) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (scope, limit) = server
        .state
        .policies
        .load()
        .scopes_for(team, "", now)
        .into_iter()
        .find(|(s, _)| s.kind == policies::ScopeKind::Team && s.window == policies::Window::Day)
        .unwrap_or_else(|| panic!("team {team} has no daily budget"));
    (scope.storage_key(), limit)
}

/// The spend and reservations of `team`'s budget today, as they are now.
pub async fn team_scope_state(server: &RunningServer, team: &str) -> ScopeState {
    let (scope, _) = team_day_scope(server, team);
    storage(server).scope_state(&scope).await.unwrap()
}

/// The same once settlements, which run in their own tasks after each response, have
/// landed: waits (at most 2 s) until nothing is reserved.
pub async fn settled_team_scope(server: &RunningServer, team: &str) -> ScopeState {
    let mut state = team_scope_state(server, team).await;
    for _ in 0..100 {
        if state.reserved_nanos == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        state = team_scope_state(server, team).await;
    }
    state
}
