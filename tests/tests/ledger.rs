//! The ledger, exhausted budgets, feedback, usage and the admin API, end to end against the
//! mock upstream (no local model: cascade requests escalate at once).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use cascade::config::RawConfig;
use common::*;
use policies::team::hash_api_key;
use serde_json::{json, Value};

const KEY_A: &str = "sk-team-alpha";
const KEY_B: &str = "sk-team-beta";
const ADMIN: &str = "sk-admin-secret";

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// What `price` 1/2 USD per million charges for these tokens, in nano-USD.
fn cost_1_2(input: u64, output: u64) -> u64 {
    input * 1_000 + output * 2_000
}

#[tokio::test]
async fn every_request_is_in_the_ledger_when_its_response_completes() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    price(&mut raw, REMOTE, 1.0, 2.0);
    raw.teams = vec![team(
        "alpha",
        KEY_A,
        json!({"threshold": -1.0, "remotes": [REMOTE], "allow_direct_models": true,
               "daily_budget_usd": 100.0}),
    )];
    let server = start(raw, None).await;
    let auth = bearer(KEY_A);
    let headers = [("authorization", auth.as_str())];

    // Not streamed: the record is there the moment the body is (no waiting).
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat(REMOTE, "Hello there friend", 10),
        &headers,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let usage = r.json()["usage"].clone();
    let (input, output) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    let rec = record(&server, r.header("x-request-id")).await;
    assert_eq!(rec.team.as_deref(), Some("alpha"));
    assert_eq!(rec.route, "remote");
    assert_eq!(rec.reason, "model_requested");
    assert_eq!(rec.status, 200);
    assert_eq!(rec.remote_model.as_deref(), Some(REMOTE));
    assert_eq!(
        (rec.remote_input_tokens, rec.remote_output_tokens),
        (input, output)
    );
    assert_eq!(rec.cost_nanos, cost_1_2(input, output));
    assert_eq!(
        rec.prompt_text, None,
        "prompts are not kept unless the policy says so"
    );
    let mut total = rec.cost_nanos;

    // Streamed with a usage chunk: the real usage is recorded.
    let mut body = chat(REMOTE, "Tell me a story", 10);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post(&server, "/v1/chat/completions", &body, &headers).await;
    assert_eq!(r.status, 200);
    let usage_event: Value = r
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|v| v["usage"].is_object())
        .unwrap();
    let (input, output) = (
        usage_event["usage"]["prompt_tokens"].as_u64().unwrap(),
        usage_event["usage"]["completion_tokens"].as_u64().unwrap(),
    );
    let rec = record(&server, r.header("x-request-id")).await;
    assert_eq!(
        (rec.remote_input_tokens, rec.remote_output_tokens),
        (input, output)
    );
    assert_eq!(rec.cost_nanos, cost_1_2(input, output));
    total += rec.cost_nanos;

    // Streamed without usage: the gateway counts what was streamed and charges it.
    body["stream_options"] = json!({"include_usage": false});
    let r = post(&server, "/v1/chat/completions", &body, &headers).await;
    assert_eq!(r.status, 200);
    let text_events = r
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count() as u64;
    let rec = record(&server, r.header("x-request-id")).await;
    assert!(text_events > 0);
    assert!(rec.remote_output_tokens >= text_events, "{rec:?}");
    assert!(rec.remote_input_tokens > 0, "{rec:?}");
    assert_eq!(
        rec.cost_nanos,
        cost_1_2(rec.remote_input_tokens, rec.remote_output_tokens)
    );
    total += rec.cost_nanos;

    // The budget counters hold exactly what the ledger says was spent.
    let state = settled_team_scope(&server, "alpha").await;
    assert_eq!((state.spent_nanos, state.reserved_nanos), (total, 0));

    // A bad request after authentication is recorded with its status; an unknown key is not.
    let r = post(
        &server,
        "/v1/chat/completions",
        &json!({"model": REMOTE, "messages": "not a list"}),
        &headers,
    )
    .await;
    assert_eq!(r.status, 400);
    let rec = record(&server, r.header("x-request-id")).await;
    assert_eq!((rec.status, rec.route.as_str()), (400, "rejected"));
    assert_eq!(rec.cost_nanos, 0);
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat(REMOTE, "Hello", 10),
        &[("authorization", "Bearer sk-nobody")],
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(storage(&server)
        .get_record(r.header("x-request-id"))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn fallbacks_after_a_failure_are_charged_to_the_remote_that_answered() {
    let first = mock().await;
    let second = mock().await;
    let mut raw = raw_config(&[&first, &second]);
    raw.remotes[0].max_retries = 0;
    price(&mut raw, REMOTE, 1000.0, 1000.0);
    price(&mut raw, "big-1", 1.0, 2.0);
    raw.teams = vec![team(
        "alpha",
        KEY_A,
        json!({"threshold": -1.0, "remotes": [REMOTE, "big-1"], "daily_budget_usd": 100.0}),
    )];
    let server = start(raw, None).await;
    first.set_fault(Some(cascade_e2e::Fault::Status(500)));
    let auth = bearer(KEY_A);
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", "Hello there", 10),
        &[("authorization", auth.as_str())],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rec = record(&server, r.header("x-request-id")).await;
    assert_eq!(rec.remote_model.as_deref(), Some("big-1"));
    assert!(rec.cost_nanos > 0);
    assert_eq!(
        rec.cost_nanos,
        cost_1_2(rec.remote_input_tokens, rec.remote_output_tokens)
    );
    // The failed attempt at the expensive remote gave its reservation back.
    let state = settled_team_scope(&server, "alpha").await;
    assert_eq!(
        (state.spent_nanos, state.reserved_nanos),
        (rec.cost_nanos, 0)
    );
}

#[tokio::test]
async fn an_exhausted_budget_rejects_or_falls_back_as_the_policy_says() {
    let expensive = mock().await;
    let cheap = mock().await;
    let mut raw = raw_config(&[&expensive, &cheap]);
    price(&mut raw, REMOTE, 1000.0, 1000.0);
    price(&mut raw, "big-1", 0.001, 0.001);
    // $0.01 a day: 100 output tokens at $1000/M ($0.1) never fit, at $0.001/M always do.
    raw.teams = vec![
        team(
            "rejecting",
            KEY_A,
            json!({"threshold": -1.0, "remotes": [REMOTE], "daily_budget_usd": 0.01,
                   "on_budget_exhausted": "reject"}),
        ),
        team(
            "falling",
            KEY_B,
            json!({"threshold": -1.0, "remotes": [REMOTE, "big-1"], "daily_budget_usd": 0.01,
                   "on_budget_exhausted": "fallback"}),
        ),
        team(
            "capped",
            "sk-capped",
            json!({"threshold": -1.0, "remotes": ["big-1"], "max_cost_per_request_usd": 0.000000001,
                   "on_budget_exhausted": "reject"}),
        ),
        team(
            "local",
            "sk-local",
            json!({"threshold": -1.0, "remotes": [REMOTE], "daily_budget_usd": 0.01}),
        ),
    ];
    let server = start(raw, None).await;
    let ask = |key: &'static str| {
        let server = &server;
        async move {
            let auth = bearer(key);
            post(
                server,
                "/v1/chat/completions",
                &chat("cascade", "Hello there", 100),
                &[("authorization", auth.as_str())],
            )
            .await
        }
    };

    let r = ask(KEY_A).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "budget_exhausted");
    assert_eq!(r.json()["error"]["type"], "insufficient_quota");
    assert_eq!(r.header("x-cascade-reason"), "budget_exhausted");
    let rec = record(&server, r.header("x-request-id")).await;
    assert_eq!(
        (rec.route.as_str(), rec.reason.as_str(), rec.status),
        ("rejected", "budget_exhausted", 429)
    );

    let r = ask(KEY_B).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cascade-reason"), "budget_fallback");
    let rec = record(&server, r.header("x-request-id")).await;
    assert_eq!(rec.remote_model.as_deref(), Some("big-1"));
    assert_eq!(rec.reason, "budget_fallback");

    // A request over the per-request cap is refused though no budget is set.
    let r = ask("sk-capped").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "budget_exhausted");

    // serve_local (the default) with no local model to serve: refused, not paid for.
    let r = ask("sk-local").await;
    assert_eq!(r.status, 429, "{}", r.text);

    assert_eq!(
        expensive.request_count(),
        0,
        "no call the budget could not pay"
    );
    assert_eq!(cheap.request_count(), 1);
}

/// Alpha runs an experiment; the admin key is configured.
fn two_teams_with_admin(raw: &mut RawConfig) {
    price(raw, REMOTE, 1.0, 2.0);
    raw.teams = vec![
        team(
            "alpha",
            KEY_A,
            json!({"threshold": -1.0, "remotes": [REMOTE], "allow_direct_models": true,
                   "daily_budget_usd": 5.0, "log_prompts": true}),
        ),
        team(
            "beta",
            KEY_B,
            json!({"threshold": -1.0, "remotes": [REMOTE], "allow_direct_models": true}),
        ),
    ];
    raw.experiments = vec![serde_json::from_value(json!({
        "id": "alpha-exp",
        "team": "alpha",
        "subject": "user",
        "variants": [{"name": "low", "weight": 1.0, "overrides": {"threshold": -2.0}},
                     {"name": "high", "weight": 1.0, "overrides": {"threshold": -0.5}}],
    }))
    .unwrap()];
    raw.admin.api_key_hash = Some(hash_api_key(ADMIN));
}

#[tokio::test]
async fn teams_see_only_their_own_usage_and_only_the_admin_key_opens_the_admin_api() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut raw = raw_config(&[&mock]);
    raw.storage.url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    two_teams_with_admin(&mut raw);
    let server = start(raw.clone(), None).await;
    let (auth_a, auth_b) = (bearer(KEY_A), bearer(KEY_B));
    let mut alpha_ids = Vec::new();
    for user in 0..6 {
        let mut body = chat(REMOTE, "Hello there", 10);
        body["user"] = json!(format!("user-{user}"));
        let r = post(
            &server,
            "/v1/chat/completions",
            &body,
            &[("authorization", &auth_a)],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        alpha_ids.push(r.header("x-request-id").to_string());
    }
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat(REMOTE, "Hello", 10),
        &[("authorization", &auth_b)],
    )
    .await;
    let beta_id = r.header("x-request-id").to_string();
    let rec = record(&server, &alpha_ids[0]).await;
    assert!(
        rec.prompt_text.unwrap().contains("Hello there"),
        "alpha logs prompts"
    );
    assert!(rec.variant.is_some() && rec.experiment.as_deref() == Some("alpha-exp"));

    let base = format!("http://{}", server.addr);
    let usage = |key: Option<&str>| {
        let url = format!("{base}/v1/usage");
        let auth = key.map(bearer);
        async move {
            let headers: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|a| vec![("authorization", a)])
                .unwrap_or_default();
            get_at(&url, &headers).await
        }
    };
    // Usage: each team its own, nobody without a key.
    let a = usage(Some(KEY_A)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = a.json();
    assert_eq!(a["team"], "alpha");
    assert_eq!(a["day"]["requests"], 6);
    assert_eq!(a["day"]["escalation_rate"], 1.0);
    assert_eq!(a["day"]["budget_usd"], 5.0);
    assert!(a["day"]["budget_remaining_usd"].as_f64().unwrap() < 5.0);
    let b = usage(Some(KEY_B)).await.json();
    assert_eq!(
        (b["team"].as_str(), b["day"]["requests"].as_u64()),
        (Some("beta"), Some(1))
    );
    assert_eq!(b["day"]["budget_usd"], Value::Null);
    assert_eq!(usage(None).await.status, 401);
    assert_eq!(usage(Some("sk-wrong")).await.status, 401);

    // Feedback: on one's own requests only; another team's look like unknown ids.
    let fb = |key: &str, id: &str, body: Value| {
        let server = &server;
        let auth = bearer(key);
        let mut body = body;
        body["request_id"] = json!(id);
        async move { post(server, "/v1/feedback", &body, &[("authorization", &auth)]).await }
    };
    assert_eq!(
        fb(KEY_A, &alpha_ids[0], json!({"thumbs": "up"}))
            .await
            .status,
        200
    );
    assert_eq!(
        fb(
            KEY_A,
            &alpha_ids[1],
            json!({"score": 0.25, "comment": "meh"})
        )
        .await
        .status,
        200
    );
    let r = fb(KEY_A, &beta_id, json!({"score": 1.0})).await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(
        fb(KEY_B, &alpha_ids[0], json!({"score": 1.0})).await.status,
        404
    );
    let r = fb(KEY_A, &alpha_ids[0], json!({"score": 7})).await;
    assert_eq!(
        (r.status, r.json()["error"]["param"].as_str()),
        (400, Some("score"))
    );
    assert_eq!(
        post(
            &server,
            "/v1/feedback",
            &json!({"request_id": beta_id, "score": 1}),
            &[]
        )
        .await
        .status,
        401
    );

    // Admin API: 401 without a key or with a wrong one, 403 for a team key.
    let admin = |path: &str, key: Option<&str>| {
        let url = format!("{base}{path}");
        let auth = key.map(bearer);
        async move {
            let headers: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|a| vec![("authorization", a)])
                .unwrap_or_default();
            get_at(&url, &headers).await
        }
    };
    for path in ["/admin/spend", "/admin/experiments/alpha-exp"] {
        assert_eq!(admin(path, None).await.status, 401, "{path}");
        assert_eq!(admin(path, Some("sk-wrong")).await.status, 401, "{path}");
        assert_eq!(admin(path, Some(KEY_A)).await.status, 403, "{path}");
        assert_eq!(admin(path, Some(KEY_B)).await.status, 403, "{path}");
    }
    let spend = admin("/admin/spend?window=month", Some(ADMIN)).await;
    assert_eq!(spend.status, 200, "{}", spend.text);
    let spend = spend.json();
    let teams: Vec<&str> = spend["teams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["team"].as_str().unwrap())
        .collect();
    assert_eq!(teams, ["alpha", "beta"]);
    assert_eq!(spend["teams"][0]["requests"], 6);
    assert_eq!(
        admin("/admin/spend?window=year", Some(ADMIN)).await.status,
        400
    );
    let exp = admin("/admin/experiments/alpha-exp", Some(ADMIN)).await;
    assert_eq!(exp.status, 200, "{}", exp.text);
    let exp = exp.json();
    let variants = exp["variants"].as_array().unwrap();
    let requests: u64 = variants
        .iter()
        .map(|v| v["requests"].as_u64().unwrap())
        .sum();
    let feedback: u64 = variants
        .iter()
        .map(|v| v["feedback_count"].as_u64().unwrap())
        .sum();
    assert_eq!((requests, feedback), (6, 2));
    for v in variants {
        let rate = &v["escalation_rate"];
        assert!(rate["low"].as_f64().unwrap() <= rate["value"].as_f64().unwrap());
        assert!(v["cost_per_1k_requests_usd"]["value"].as_f64().unwrap() > 0.0);
        assert!(v["latency_p50_ms"].is_object());
    }
    assert_eq!(
        admin("/admin/experiments/nope", Some(ADMIN)).await.status,
        404
    );

    // Metrics: spend by team, budget left, requests and cost by variant.
    let text = get(&server, "/metrics").await.text;
    assert!(metric(&text, "cascade_team_spend_usd_total", &["team=\"alpha\""]) > 0.0);
    let left = metric(
        &text,
        "cascade_team_budget_remaining_usd",
        &["team=\"alpha\"", "window=\"day\""],
    );
    assert!(left > 0.0 && left < 5.0, "{left}");
    assert_eq!(
        metric(
            &text,
            "cascade_variant_requests_total",
            &["experiment=\"alpha-exp\""]
        ),
        6.0
    );
    assert!(
        metric(
            &text,
            "cascade_variant_cost_usd_total",
            &["experiment=\"alpha-exp\""]
        ) > 0.0
    );

    // `cascade report` reads the same ledger and prints the same numbers.
    server.shutdown().await.unwrap();
    let config = validate(raw);
    let args = cascade::cli::ReportArgs {
        config: None,
        window: "day".into(),
        experiment: None,
        json: false,
    };
    let text = cascade::commands::report::report(&config, &args)
        .await
        .unwrap();
    assert!(text.contains("alpha") && text.contains("beta"), "{text}");
    assert!(text.contains("Experiment alpha-exp, team alpha"), "{text}");
    let alpha_line = text.lines().find(|l| l.starts_with("alpha")).unwrap();
    assert!(
        alpha_line.split_whitespace().nth(1) == Some("6"),
        "{alpha_line}"
    );
    let json_args = cascade::cli::ReportArgs { json: true, ..args };
    let json: Value = serde_json::from_str(
        &cascade::commands::report::report(&config, &json_args)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(json["experiments"][0]["experiment"], "alpha-exp");
}

#[tokio::test]
async fn the_admin_api_can_have_its_own_listener() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    two_teams_with_admin(&mut raw);
    raw.admin.listen = Some("127.0.0.1:0".into());
    let server = start(raw, None).await;
    let auth = bearer(ADMIN);
    let main = get_at(
        &format!("http://{}/admin/spend", server.addr),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(main.status, 404, "not on the main listener");
    let admin_addr = server.admin_addr.unwrap();
    let own = get_at(
        &format!("http://{admin_addr}/admin/spend"),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(own.status, 200, "{}", own.text);
    let chat_on_admin = get_at(&format!("http://{admin_addr}/v1/models"), &[]).await;
    assert_eq!(
        chat_on_admin.status, 404,
        "the admin listener serves the admin API only"
    );
}
