//! No request spends past a cap or a budget: a property test over the budget gate and the
//! gateway together. Each seed draws a policy (per-request cap or not, what to do when the
//! budget runs out, a fallback chain with a failing remote first or not, an experiment) and
//! a burst of requests (`n`, `best_of`, several prompts, streamed or not, tools, direct
//! models, with and without `max_tokens`), sent concurrently to a gateway whose mock remotes
//! bill the largest output each request allows. After each run, from the ledger and the
//! budget tables:
//! - no budget scope (key, team, global) spent past its limit, and nothing stays reserved;
//! - no record cost more than the per-request cap, and none records an overrun;
//! - every call a remote answered has its ledger row with its real cost: the ledger's
//!   remote costs add up to what the mocks billed, and to the scopes' spend.
//!
//! The same runs on PostgreSQL with two gateways sharing the database.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use cascade::app::RunningServer;
use cascade::config::RawConfig;
use cascade_e2e::{max_billed_usage, Fault, MockOptions, MockUpstream};
use common::*;
use policies::NanoUsd;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const KEY: &str = "sk-spend-caps";
/// USD per million tokens, input and output, of every remote.
const PRICE: f64 = 10.0;
const TEAM_DAILY_USD: f64 = 0.05;
const KEY_DAILY_USD: f64 = 0.04;
const GLOBAL_DAILY_USD: f64 = 0.045;
const CAP_USD: f64 = 0.01;
const REQUESTS: usize = 40;
const BURST: usize = 8;

/// The three mocks: `big` and `big-1` bill the worst case; `big-2` fails every call.
struct Mocks {
    big: MockUpstream,
    other: MockUpstream,
    failing: MockUpstream,
}

impl Mocks {
    async fn start() -> Self {
        let billing = MockOptions {
            bill_max_output: true,
            ..MockOptions::default()
        };
        let failing = MockUpstream::start(MockOptions::default()).await.unwrap();
        failing.set_fault(Some(Fault::Status(503)));
        Self {
            big: MockUpstream::start(billing).await.unwrap(),
            other: MockUpstream::start(billing).await.unwrap(),
            failing,
        }
    }

    /// What the remotes billed, in nano-USD, for the calls they answered.
    fn billed(&self, raw: &RawConfig) -> u64 {
        let price = policies::PriceTable::try_from(raw.prices[REMOTE]).unwrap();
        [&self.big, &self.other, &self.failing]
            .iter()
            .flat_map(|m| m.requests())
            .filter(|r| r.answered)
            .map(|r| {
                let (input, output) = max_billed_usage(&r.body, r.bytes);
                price.cost(input, output).0
            })
            .sum()
    }
}

/// A configuration drawn from `rng`.
fn config(rng: &mut StdRng, mocks: &Mocks) -> RawConfig {
    let mut raw = raw_config(&[&mocks.big, &mocks.other, &mocks.failing]);
    for remote in [REMOTE, "big-1", "big-2"] {
        price(&mut raw, remote, PRICE, PRICE);
    }
    raw.global.daily_budget_usd = Some(GLOBAL_DAILY_USD);
    // Failing remotes open their breaker after two failures, so later requests meet it open.
    for remote in &mut raw.remotes {
        remote.max_retries = 1;
        remote.breaker_failures = 2;
        remote.breaker_cooldown_ms = 60_000;
    }
    let remotes = match rng.random_range(0..3) {
        0 => json!([REMOTE]),
        1 => json!(["big-2", REMOTE, "big-1"]),
        _ => json!(["big-2", "big-1"]),
    };
    let on_exhausted = ["serve_local", "fallback", "reject"][rng.random_range(0..3)];
    let mut policy = json!({
        "threshold": -1.0,
        "remotes": remotes,
        "daily_budget_usd": TEAM_DAILY_USD,
        "on_budget_exhausted": on_exhausted,
        "allow_direct_models": true,
        "allow_route_header": true,
    });
    if rng.random_bool(0.7) {
        policy["max_cost_per_request_usd"] = json!(CAP_USD);
    }
    let mut team = team("t", KEY, policy);
    let id = policies::team::key_id(&policies::team::hash_api_key(KEY));
    team.keys.insert(
        id,
        serde_json::from_value(json!({"daily_budget_usd": KEY_DAILY_USD})).unwrap(),
    );
    raw.teams = vec![team];
    if rng.random_bool(0.5) {
        // A variant with another chain: experiments may change routing, never the limits.
        raw.experiments = vec![serde_json::from_value(json!({
            "id": "spend", "team": "t", "subject": "user",
            "variants": [{"name": "a", "weight": 1.0},
                         {"name": "b", "weight": 1.0, "overrides": {"remotes": ["big-1", REMOTE]}}],
        }))
        .unwrap()];
    }
    raw
}

/// A request drawn from `rng`: (path, body, route header).
fn request(rng: &mut StdRng, i: usize) -> (&'static str, Value, Option<&'static str>) {
    let max_tokens = [None, Some(1), Some(16), Some(200), Some(4000)][rng.random_range(0..5)];
    let n = [1, 1, 2, 8, 64][rng.random_range(0..5)];
    let stream = rng.random_bool(0.4);
    let completions = rng.random_bool(0.3);
    let mut body = if completions {
        let prompts = rng.random_range(1..=3);
        let prompt: Vec<String> = (0..prompts)
            .map(|p| format!("Prompt {i}.{p}: tell me a story"))
            .collect();
        let mut b = json!({"model": "cascade", "prompt": prompt});
        if rng.random_bool(0.4) {
            b["best_of"] = json!(n.max(1) * rng.random_range(1..=3));
        }
        b
    } else {
        let mut b = json!({"model": "cascade", "messages": [{"role": "user", "content": format!("Question {i}: tell me a story")}]});
        if rng.random_bool(0.3) {
            b["tools"] = json!([{"type": "function", "function": {"name": "lookup",
                "description": "x".repeat(rng.random_range(10..2000)),
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]);
        }
        b
    };
    if let Some(m) = max_tokens {
        body["max_tokens"] = json!(m);
    }
    if n > 1 {
        body["n"] = json!(n);
    }
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body["user"] = json!(format!("user-{}", rng.random_range(0..4)));
    let header = match rng.random_range(0..6) {
        0 => {
            body["model"] = json!([REMOTE, "big-1", "big-2"][rng.random_range(0..3)]);
            None
        }
        1 => Some("remote"),
        _ => None,
    };
    let path = if completions {
        "/v1/completions"
    } else {
        "/v1/chat/completions"
    };
    (path, body, header)
}

/// Sends the seed's requests in concurrent bursts over `servers` (which share a database)
/// and checks the invariants.
async fn run_seed(seed: u64, servers: &[&RunningServer], raw: &RawConfig, mocks: &Mocks) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(7919) + 1);
    let bearer = format!("Bearer {KEY}");
    let mut ids = Vec::new();
    let mut statuses = Vec::new();
    for burst in 0..REQUESTS / BURST {
        let requests: Vec<_> = (0..BURST)
            .map(|j| request(&mut rng, burst * BURST + j))
            .collect();
        let sent = requests
            .into_iter()
            .enumerate()
            .map(|(j, (path, body, header))| {
                let server = servers[j % servers.len()];
                let bearer = bearer.clone();
                async move {
                    let mut headers = vec![("authorization", bearer.as_str())];
                    if let Some(h) = header {
                        headers.push(("x-cascade-route", h));
                    }
                    post(server, path, &body, &headers).await
                }
            });
        for r in futures::future::join_all(sent).await {
            assert!(
                r.status < 500 || r.status == 502 || r.status == 503,
                "seed {seed}: {} {}",
                r.status,
                r.text
            );
            statuses.push(r.status);
            ids.push(r.header("x-request-id").to_string());
        }
    }

    let server = servers[0];
    let store = storage(server);
    // Settlements land in their own tasks after each response: wait until none is held.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let key_id = policies::team::key_id(&policies::team::hash_api_key(KEY));
    let scopes = server.state.policies.load().scopes_for("t", &key_id, now);
    assert_eq!(scopes.len(), 3, "key, team and global daily scopes");
    let mut states = Vec::new();
    for (scope, limit) in &scopes {
        let mut state = store.scope_state(&scope.storage_key()).await.unwrap();
        for _ in 0..200 {
            if state.reserved_nanos == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            state = store.scope_state(&scope.storage_key()).await.unwrap();
        }
        assert_eq!(
            state.reserved_nanos, 0,
            "seed {seed}: {scope:?} still holds a reservation"
        );
        assert!(
            state.spent_nanos <= limit.0,
            "seed {seed}: {scope:?} spent {} past its limit {}",
            state.spent_nanos,
            limit.0
        );
        states.push(state);
    }

    let cap = NanoUsd::from_usd(CAP_USD).unwrap();
    let capped = server
        .state
        .policies
        .load()
        .policy("t", &key_id, None)
        .unwrap()
        .max_cost_per_request()
        .is_some();
    let mut ledger_cost = 0u64;
    for id in &ids {
        let record = record(server, id).await;
        assert_eq!(record.overrun_nanos, 0, "seed {seed}: {record:?}");
        if capped {
            assert!(
                record.cost_nanos <= cap.0,
                "seed {seed}: past the per-request cap: {record:?}"
            );
        }
        ledger_cost += record.cost_nanos;
    }
    let billed = mocks.billed(raw);
    assert_eq!(
        ledger_cost, billed,
        "seed {seed}: the ledger's costs against what the remotes billed"
    );
    // Every scope saw every call of this seed (one key, so one key scope).
    for state in &states {
        assert_eq!(
            state.spent_nanos, billed,
            "seed {seed}: scope spend against the bills"
        );
    }
    assert!(
        statuses.contains(&200),
        "seed {seed}: nothing was answered: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_never_spend_past_a_cap_or_a_budget() {
    for seed in 0..12 {
        let mocks = Mocks::start().await;
        let mut rng = StdRng::seed_from_u64(seed);
        let raw = config(&mut rng, &mocks);
        // No local model attached: every cascade request escalates, which is the paid path.
        let server = start(raw.clone(), None).await;
        run_seed(seed, &[&server], &raw, &mocks).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_postgres_never_spend_past_a_cap_or_a_budget() {
    for seed in 100..104 {
        let schema = PgSchema::create("e2e_spend").await;
        let mocks = Mocks::start().await;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut raw = config(&mut rng, &mocks);
        raw.storage.url = schema.url();
        let first = start(raw.clone(), None).await;
        let second = start(raw.clone(), None).await;
        run_seed(seed, &[&first, &second], &raw, &mocks).await;
        drop((first, second));
        schema.drop().await;
    }
}
