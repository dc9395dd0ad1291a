//! The policy decision table of docs/policies.md, row by row, end to end: a gateway over
//! HTTP with the real local model, two mock remotes that count their calls, and the ledger
//! read back. One row is one line of `ROWS`; every row checks the status, the route and
//! reason (header and ledger alike), whether the local model ran, how many paid calls each
//! remote received, and that a request with no paid call cost nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use cascade::cascade::local::LocalEngine;
use cascade_e2e::Fault;
use common::*;
use serde_json::{json, Value};

const KEY: &str = "sk-table-team";
/// The second mock remote's name (`raw_config` names it).
const OTHER: &str = "big-1";

/// The local model's state while the row runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Load {
    /// Idle, loaded.
    Idle,
    /// One request runs and no one may wait (`queue_depth = 0`).
    Full,
    /// Not attached yet.
    Loading,
}

/// What the client sends.
#[derive(Clone, Copy, Debug)]
enum Ask {
    /// A question the local model answers confidently.
    Easy,
    /// One it does not know.
    Hard,
    /// A long answer and no `max_tokens`: the local run reaches `local.max_tokens` (32).
    Long,
    Tools,
    Image,
    JsonSchema,
    /// `n = 2`.
    TwoChoices,
    /// A prompt longer than the local context window.
    TooLong,
    /// The model named directly.
    Model(&'static str),
}

/// How the remotes behave.
#[derive(Clone, Copy, Debug)]
enum Remotes {
    Up,
    /// Every call to `big` fails with 500.
    BigFails,
}

struct Row {
    name: &'static str,
    /// The team's policy (JSON of `[teams.policy]`); `aggregate` defaults to mean_logprob.
    policy: Value,
    /// The key's override (`[teams.keys.<id>]`), when any.
    key: Option<Value>,
    /// An experiment variant's overrides for the team, when any.
    variant: Option<Value>,
    ask: Ask,
    header: Option<&'static str>,
    load: Load,
    remotes: Remotes,
    /// USD per million tokens (input = output) of `big` and `big-1`.
    prices: (f64, f64),
    expect: Expect,
}

struct Expect {
    status: u16,
    /// `x-cascade-route`, checked on 200s.
    route: &'static str,
    reason: &'static str,
    local_ran: bool,
    /// Paid calls received by `big` and `big-1`.
    calls: (usize, usize),
}

fn cascade_policy() -> Value {
    json!({"aggregate": {"kind": "mean_logprob"}, "threshold": -5.0, "remotes": ["big"]})
}

fn with(base: Value, extra: Value) -> Value {
    let mut v = base;
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// Shorthands for rows.
fn row(name: &'static str, policy: Value, ask: Ask, expect: Expect) -> Row {
    Row {
        name,
        policy,
        key: None,
        variant: None,
        ask,
        header: None,
        load: Load::Idle,
        remotes: Remotes::Up,
        prices: (1.0, 1.0),
        expect,
    }
}

fn ok(route: &'static str, reason: &'static str, local_ran: bool, calls: (usize, usize)) -> Expect {
    Expect {
        status: 200,
        route,
        reason,
        local_ran,
        calls,
    }
}

fn refused(status: u16, reason: &'static str, local_ran: bool, calls: (usize, usize)) -> Expect {
    Expect {
        status,
        route: "",
        reason,
        local_ran,
        calls,
    }
}

impl Row {
    fn key(mut self, o: Value) -> Self {
        self.key = Some(o);
        self
    }
    fn variant(mut self, o: Value) -> Self {
        self.variant = Some(o);
        self
    }
    fn header(mut self, h: &'static str) -> Self {
        self.header = Some(h);
        self
    }
    fn load(mut self, l: Load) -> Self {
        self.load = l;
        self
    }
    fn remotes(mut self, r: Remotes) -> Self {
        self.remotes = r;
        self
    }
    fn prices(mut self, big: f64, other: f64) -> Self {
        self.prices = (big, other);
        self
    }
}

/// The decision table. A row's name is its line in docs/policies.md.
fn rows() -> Vec<Row> {
    use Ask::*;
    let cascade = cascade_policy;
    // The minimum log-prob under -2 settles as soon as one token is unsure.
    let unsure = || {
        with(
            cascade(),
            json!({"aggregate": {"kind": "min_logprob"}, "threshold": -2.0}),
        )
    };
    let local_only = || json!({"local_only": true});
    let local_only_listing_remotes = || json!({"local_only": true, "remotes": ["big"]});
    let remote_only = || json!({"remote_only": true, "remotes": ["big"]});
    let tiny_budget = json!({"daily_budget_usd": 0.000001});
    vec![
        // The cascade.
        row(
            "cascade: confident",
            cascade(),
            Easy,
            ok("local", "confident", true, (0, 0)),
        ),
        row(
            "cascade: unsure, settled early",
            unsure(),
            Hard,
            ok("remote", "early_exit", true, (1, 0)),
        ),
        row(
            "cascade: local time cap",
            with(cascade(), json!({"max_local_ms": 1})),
            Hard,
            ok("remote", "local_time_budget", true, (1, 0)),
        ),
        row(
            "cascade: local token cap",
            cascade(),
            Long,
            ok("remote", "local_token_cap", true, (1, 0)),
        ),
        row(
            "cascade: queue full, escalate",
            cascade(),
            Easy,
            ok("remote", "local_overloaded", false, (1, 0)),
        )
        .load(Load::Full),
        row(
            "cascade: queue full, reject",
            with(cascade(), json!({"on_overload": "reject"})),
            Easy,
            refused(429, "local_overloaded", false, (0, 0)),
        )
        .load(Load::Full),
        row(
            "cascade: loading, escalate",
            cascade(),
            Easy,
            ok("remote", "local_loading", false, (1, 0)),
        )
        .load(Load::Loading),
        row(
            "cascade: loading, reject",
            with(cascade(), json!({"on_overload": "reject"})),
            Easy,
            refused(503, "local_loading", false, (0, 0)),
        )
        .load(Load::Loading),
        row(
            "cascade: tools",
            cascade(),
            Tools,
            ok("remote", "tools", false, (1, 0)),
        ),
        row(
            "cascade: image",
            cascade(),
            Image,
            ok("remote", "image_content", false, (1, 0)),
        ),
        row(
            "cascade: json_schema",
            cascade(),
            JsonSchema,
            ok("remote", "json_schema", false, (1, 0)),
        ),
        row(
            "cascade: n = 2",
            cascade(),
            TwoChoices,
            ok("remote", "multiple_choices", false, (1, 0)),
        ),
        row(
            "cascade: prompt over the context window",
            cascade(),
            TooLong,
            ok("remote", "context_too_long", false, (1, 0)),
        ),
        row(
            "cascade: route header remote",
            with(cascade(), json!({"allow_route_header": true})),
            Easy,
            ok("remote", "route_header", false, (1, 0)),
        )
        .header("remote"),
        row(
            "cascade: route header local",
            with(cascade(), json!({"allow_route_header": true})),
            Hard,
            ok("local", "route_header", true, (0, 0)),
        )
        .header("local"),
        row(
            "cascade: route header not allowed",
            cascade(),
            Easy,
            refused(403, "", false, (0, 0)),
        )
        .header("remote"),
        row(
            "cascade: direct remote",
            with(cascade(), json!({"allow_direct_models": true})),
            Model("big"),
            ok("remote", "model_requested", false, (1, 0)),
        ),
        row(
            "cascade: direct local",
            with(cascade(), json!({"allow_direct_models": true})),
            Model(LOCAL),
            ok("local", "model_requested", true, (0, 0)),
        ),
        row(
            "cascade: direct model not allowed",
            cascade(),
            Model("big"),
            refused(403, "", false, (0, 0)),
        ),
        row(
            "cascade: direct remote outside the policy's remotes",
            with(cascade(), json!({"allow_direct_models": true})),
            Model(OTHER),
            refused(403, "", false, (0, 0)),
        ),
        row(
            "cascade: remote fails, serve_local",
            unsure(),
            Hard,
            ok("local", "remote_unavailable", true, (3, 0)),
        )
        .remotes(Remotes::BigFails),
        row(
            "cascade: remote fails, error",
            with(unsure(), json!({"on_remote_failure": "error"})),
            Hard,
            refused(502, "early_exit", true, (3, 0)),
        )
        .remotes(Remotes::BigFails),
        row(
            "cascade: remote fails, next remote answers",
            with(unsure(), json!({"remotes": ["big", OTHER]})),
            Hard,
            ok("remote", "early_exit", true, (3, 1)),
        )
        .remotes(Remotes::BigFails),
        row(
            "cascade: budget exhausted, serve_local",
            with(unsure(), tiny_budget.clone()),
            Hard,
            ok("local", "budget_exhausted", true, (0, 0)),
        ),
        row(
            "cascade: budget exhausted, reject",
            with(
                unsure(),
                with(
                    tiny_budget.clone(),
                    json!({"on_budget_exhausted": "reject"}),
                ),
            ),
            Hard,
            refused(429, "budget_exhausted", true, (0, 0)),
        ),
        row(
            "cascade: budget exhausted, no local answer (tools)",
            with(cascade(), tiny_budget.clone()),
            Tools,
            refused(429, "budget_exhausted", false, (0, 0)),
        ),
        row(
            "cascade: budget exhausted, direct remote",
            with(
                cascade(),
                with(tiny_budget.clone(), json!({"allow_direct_models": true})),
            ),
            Model("big"),
            refused(429, "budget_exhausted", false, (0, 0)),
        ),
        row(
            "cascade: budget fallback",
            with(
                unsure(),
                json!({"remotes": ["big", OTHER], "max_cost_per_request_usd": 0.01,
                                  "on_budget_exhausted": "fallback"}),
            ),
            Hard,
            ok("remote", "budget_fallback", true, (0, 1)),
        )
        .prices(1000.0, 1.0),
        row(
            "cascade: over max_cost_per_request, reject",
            with(
                unsure(),
                json!({"max_cost_per_request_usd": 0.01, "on_budget_exhausted": "reject"}),
            ),
            Hard,
            refused(429, "budget_exhausted", true, (0, 0)),
        )
        .prices(1000.0, 1.0),
        row(
            "cascade: first remote fails, next is over max_cost_per_request",
            with(
                unsure(),
                json!({"remotes": ["big", OTHER], "max_cost_per_request_usd": 0.01}),
            ),
            Hard,
            ok("local", "budget_exhausted", true, (3, 0)),
        )
        .prices(1.0, 1000.0)
        .remotes(Remotes::BigFails),
        // remote_only: the local model is never touched.
        row(
            "remote_only",
            remote_only(),
            Easy,
            ok("remote", "remote_only", false, (1, 0)),
        ),
        row(
            "remote_only: queue full",
            remote_only(),
            Easy,
            ok("remote", "remote_only", false, (1, 0)),
        )
        .load(Load::Full),
        row(
            "remote_only: loading",
            remote_only(),
            Easy,
            ok("remote", "remote_only", false, (1, 0)),
        )
        .load(Load::Loading),
        row(
            "remote_only: route header local",
            with(remote_only(), json!({"allow_route_header": true})),
            Easy,
            ok("remote", "remote_only", false, (1, 0)),
        )
        .header("local"),
        row(
            "remote_only: direct local",
            with(remote_only(), json!({"allow_direct_models": true})),
            Model(LOCAL),
            refused(403, "", false, (0, 0)),
        ),
        row(
            "remote_only: budget exhausted",
            with(remote_only(), tiny_budget.clone()),
            Easy,
            refused(429, "budget_exhausted", false, (0, 0)),
        ),
        row(
            "remote_only: remote fails",
            remote_only(),
            Easy,
            refused(502, "remote_only", false, (3, 0)),
        )
        .remotes(Remotes::BigFails),
        row(
            "remote_only: with a threshold",
            with(remote_only(), json!({"threshold": -5.0})),
            Easy,
            ok("remote", "remote_only", false, (1, 0)),
        ),
        row(
            "remote_only: key override",
            cascade(),
            Easy,
            ok("remote", "remote_only", false, (1, 0)),
        )
        .key(json!({"remote_only": true})),
        row(
            "remote_only: variant override",
            cascade(),
            Easy,
            ok("remote", "remote_only", false, (1, 0)),
        )
        .variant(json!({"remote_only": true})),
        // local_only: no remote is ever called.
        row(
            "local_only: confident",
            local_only(),
            Easy,
            ok("local", "local_only", true, (0, 0)),
        ),
        row(
            "local_only: unsure",
            local_only(),
            Hard,
            ok("local", "local_only", true, (0, 0)),
        ),
        row(
            "local_only: token cap",
            local_only(),
            Long,
            ok("local", "local_only", true, (0, 0)),
        ),
        row(
            "local_only: time cap",
            with(local_only(), json!({"max_local_ms": 1})),
            Hard,
            ok("local", "local_only", true, (0, 0)),
        ),
        row(
            "local_only: queue full",
            local_only(),
            Easy,
            refused(429, "local_overloaded", false, (0, 0)),
        )
        .load(Load::Full),
        row(
            "local_only: loading",
            local_only(),
            Easy,
            refused(503, "local_loading", false, (0, 0)),
        )
        .load(Load::Loading),
        row(
            "local_only: tools",
            local_only(),
            Tools,
            refused(400, "tools", false, (0, 0)),
        ),
        row(
            "local_only: image",
            local_only(),
            Image,
            refused(400, "image_content", false, (0, 0)),
        ),
        row(
            "local_only: json_schema",
            local_only(),
            JsonSchema,
            refused(400, "json_schema", false, (0, 0)),
        ),
        row(
            "local_only: n = 2",
            local_only(),
            TwoChoices,
            refused(400, "multiple_choices", false, (0, 0)),
        ),
        row(
            "local_only: direct remote",
            local_only(),
            Model("big"),
            refused(403, "", false, (0, 0)),
        ),
        row(
            "local_only: prompt over the context window",
            local_only_listing_remotes(),
            TooLong,
            refused(400, "local_only", false, (0, 0)),
        ),
        row(
            "local_only listing remotes: unsure",
            local_only_listing_remotes(),
            Hard,
            ok("local", "local_only", true, (0, 0)),
        ),
        row(
            "local_only listing remotes: token cap",
            local_only_listing_remotes(),
            Long,
            ok("local", "local_only", true, (0, 0)),
        ),
        row(
            "local_only listing remotes: queue full",
            local_only_listing_remotes(),
            Easy,
            refused(429, "local_overloaded", false, (0, 0)),
        )
        .load(Load::Full),
        row(
            "local_only listing remotes: loading",
            local_only_listing_remotes(),
            Easy,
            refused(503, "local_loading", false, (0, 0)),
        )
        .load(Load::Loading),
        row(
            "local_only listing remotes: route header remote",
            with(
                local_only_listing_remotes(),
                json!({"allow_route_header": true}),
            ),
            Hard,
            ok("local", "local_only", true, (0, 0)),
        )
        .header("remote"),
        row(
            "local_only listing remotes: tools",
            local_only_listing_remotes(),
            Tools,
            refused(400, "tools", false, (0, 0)),
        ),
        row(
            "local_only listing remotes: n = 2",
            local_only_listing_remotes(),
            TwoChoices,
            refused(400, "multiple_choices", false, (0, 0)),
        ),
        row(
            "local_only: key override on a cascading team",
            unsure(),
            Hard,
            ok("local", "local_only", true, (0, 0)),
        )
        .key(json!({"local_only": true})),
        row(
            "local_only: key override, token cap",
            cascade(),
            Long,
            ok("local", "local_only", true, (0, 0)),
        )
        .key(json!({"local_only": true})),
        row(
            "local_only: key override, queue full",
            cascade(),
            Easy,
            refused(429, "local_overloaded", false, (0, 0)),
        )
        .key(json!({"local_only": true}))
        .load(Load::Full),
        row(
            "local_only: variant adds remotes",
            local_only(),
            Hard,
            ok("local", "local_only", true, (0, 0)),
        )
        .variant(json!({"remotes": ["big"], "threshold": -5.0})),
    ]
}

fn body(ask: Ask) -> (&'static str, Value) {
    let chat_path = "/v1/chat/completions";
    let mut b = match ask {
        Ask::Easy => chat("cascade", EASY, 12),
        Ask::Hard => chat("cascade", HARD, 12),
        Ask::Long => json!({"model": "cascade", "messages": [{"role": "user",
            "content": "Write a long story about a dragon who learns to bake bread."}]}),
        Ask::Model(m) => chat(m, EASY, 12),
        Ask::TooLong => chat("cascade", &"lorem ipsum dolor sit amet ".repeat(4000), 8),
        _ => chat("cascade", EASY, 12),
    };
    match ask {
        Ask::Tools => {
            b["tools"] = json!([{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        }
        Ask::Image => {
            b["messages"] = json!([{"role": "user", "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]);
        }
        Ask::JsonSchema => {
            b["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "city",
                "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}});
        }
        Ask::TwoChoices => b["n"] = json!(2),
        _ => {}
    }
    (chat_path, b)
}

/// Keeps a queue-depth-0 engine busy with a long direct-local generation until dropped.
struct Busy {
    task: tokio::task::JoinHandle<()>,
    engine: LocalEngine,
}

impl Busy {
    async fn start(engine: &LocalEngine) -> Self {
        let mock = mock().await;
        let mut raw = raw_config(&[&mock]);
        price(&mut raw, REMOTE, 1.0, 1.0);
        raw.policy.allow_direct_models = true;
        let server = start(raw, Some(engine.clone())).await;
        let task = tokio::spawn(async move {
            let _keep = (&server, &mock);
            let _ = client()
                .post(url(&server, "/v1/chat/completions"))
                .json(&occupying_chat(2000))
                .send()
                .await;
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while engine.load().in_flight == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            engine.load().in_flight,
            1,
            "the busy generation did not start"
        );
        Self {
            task,
            engine: engine.clone(),
        }
    }

    async fn stop(self) {
        self.task.abort();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.engine.load().in_flight > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Runs one row; returns what differs from the table, if anything.
async fn run(
    row: &Row,
    idle: &LocalEngine,
    full: &LocalEngine,
    occupier: &LocalEngine,
) -> Option<String> {
    let big = mock().await;
    let other = mock().await;
    let mut raw = raw_config(&[&big, &other]);
    price(&mut raw, REMOTE, row.prices.0, row.prices.0);
    price(&mut raw, OTHER, row.prices.1, row.prices.1);
    let mut team = team("t", KEY, row.policy.clone());
    if let Some(o) = &row.key {
        let id = policies::team::key_id(&policies::team::hash_api_key(KEY));
        team.keys
            .insert(id, serde_json::from_value(o.clone()).unwrap());
    }
    raw.teams = vec![team];
    if let Some(o) = &row.variant {
        raw.experiments = vec![serde_json::from_value(json!({
            "id": "table", "team": "t", "subject": "key",
            "variants": [{"name": "only", "weight": 1.0, "overrides": o}],
        }))
        .unwrap()];
    }
    if matches!(row.remotes, Remotes::BigFails) {
        big.set_fault(Some(Fault::Status(500)));
    }
    let engine = match row.load {
        Load::Idle => Some(idle.clone()),
        Load::Full => Some(full.clone()),
        Load::Loading => None,
    };
    let server = start(raw, engine).await;
    let busy = if row.load == Load::Full {
        Some(Busy::start(occupier).await)
    } else {
        None
    };
    let (path, body) = body(row.ask);
    let bearer = format!("Bearer {KEY}");
    let mut headers = vec![("authorization", bearer.as_str())];
    if let Some(h) = row.header {
        headers.push(("x-cascade-route", h));
    }
    let r = post(&server, path, &body, &headers).await;
    if let Some(b) = busy {
        b.stop().await;
    }
    let e = &row.expect;
    let mut wrong = Vec::new();
    if r.status != e.status {
        wrong.push(format!(
            "status {} (want {}): {}",
            r.status, e.status, r.text
        ));
    }
    if e.status == 200 && r.header("x-cascade-route") != e.route {
        wrong.push(format!(
            "route {} (want {})",
            r.header("x-cascade-route"),
            e.route
        ));
    }
    if !e.reason.is_empty() && r.header("x-cascade-reason") != e.reason {
        wrong.push(format!(
            "reason {} (want {})",
            r.header("x-cascade-reason"),
            e.reason
        ));
    }
    let calls = (big.request_count(), other.request_count());
    if calls != e.calls {
        wrong.push(format!("remote calls {calls:?} (want {:?})", e.calls));
    }
    let id = r.header("x-request-id").to_string();
    let record = record(&server, &id).await;
    if record.status != r.status {
        wrong.push(format!(
            "ledger status {} (answered {})",
            record.status, r.status
        ));
    }
    if !e.reason.is_empty() && record.reason != e.reason {
        wrong.push(format!(
            "ledger reason {} (want {})",
            record.reason, e.reason
        ));
    }
    if e.status == 200 && record.route != e.route {
        wrong.push(format!("ledger route {} (want {})", record.route, e.route));
    }
    if (record.local_tokens > 0) != e.local_ran {
        wrong.push(format!(
            "ledger local_tokens {} (local model should {}run)",
            record.local_tokens,
            if e.local_ran { "" } else { "not " }
        ));
    }
    if e.calls == (0, 0) && record.cost_nanos != 0 {
        wrong.push(format!("cost {} without a paid call", record.cost_nanos));
    }
    if e.status == 429 && e.reason == "local_overloaded" && r.header("retry-after").is_empty() {
        wrong.push("429 without retry-after".into());
    }
    (!wrong.is_empty()).then(|| format!("{}: {}", row.name, wrong.join("; ")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_the_policy_decision_table_holds_end_to_end() {
    let idle = shared_engine();
    // A model with no waiting room: the gateway under test sees it with the usual 32-token
    // cap, the busy generation through its own engine without one.
    let (full, occupier) = load_engine_with_occupier(0);
    let mut failures = Vec::new();
    for row in rows() {
        if let Some(f) = run(&row, &idle, &full, &occupier).await {
            failures.push(f);
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows of the decision table do not hold:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
