//! Teams: API keys, who may call, and experiment variants.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use cascade::app::RunningServer;
use cascade::config::RawConfig;
use cascade_e2e::ANSWER_PREFIX;
use common::*;
use serde_json::json;

const KEY_A: &str = "sk-team-alpha";
const KEY_B: &str = "sk-team-beta";

/// Two teams on the mock remote; alpha runs a two-variant experiment by key.
fn with_teams(raw: &mut RawConfig) {
    price(raw, REMOTE, 1.0, 2.0);
    // Alpha may address models directly but not pick a route; beta the other way round.
    raw.teams = [("alpha", KEY_A, true), ("beta", KEY_B, false)]
        .iter()
        .map(|(name, key, direct)| {
            team(
                name,
                key,
                json!({"threshold": -1.0, "remotes": [REMOTE],
                       "allow_direct_models": direct, "allow_route_header": !direct}),
            )
        })
        .collect();
    raw.experiments = vec![serde_json::from_value(json!({
        "id": "alpha-exp",
        "team": "alpha",
        "subject": "key",
        "variants": [{"name": "only", "weight": 1.0}],
    }))
    .unwrap()];
}

#[tokio::test]
async fn with_teams_configured_requests_need_a_known_key() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    with_teams(&mut raw);
    let server = start(raw, None).await;
    let body = chat(REMOTE, "Hello", 10);

    for headers in [vec![], vec![("authorization", "Bearer sk-nobody")]] {
        let r = post(&server, "/v1/chat/completions", &body, &headers).await;
        assert_eq!(r.status, 401, "{}", r.text);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    assert!(mock.requests().is_empty(), "nothing unpaid went upstream");

    let bearer_a = format!("Bearer {KEY_A}");
    let r = post(
        &server,
        "/v1/chat/completions",
        &body,
        &[("authorization", &bearer_a)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.answer().starts_with(ANSWER_PREFIX));
    assert_eq!(r.header("x-cascade-variant"), "only");

    // Each team's own policy applies, not the gateway's `[policy]` (which allows both).
    let route_remote = [
        ("authorization", bearer_a.as_str()),
        ("x-cascade-route", "remote"),
    ];
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", "Hi", 10),
        &route_remote,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);

    let bearer_b = format!("Bearer {KEY_B}");
    let r = post(
        &server,
        "/v1/chat/completions",
        &body,
        &[("authorization", &bearer_b)],
    )
    .await;
    // Beta may not name models: 403, the policy's refusal (the model exists).
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "not_allowed_by_policy");
    let route_remote = [
        ("authorization", bearer_b.as_str()),
        ("x-cascade-route", "remote"),
    ];
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", "Hi", 10),
        &route_remote,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cascade-route"), "remote");
    // Beta is in no experiment.
    assert_eq!(r.header("x-cascade-variant"), "");
}

#[tokio::test]
async fn without_teams_no_key_is_needed() {
    let mock = mock().await;
    let server = start(raw_config(&[&mock]), None).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat(REMOTE, "Hello", 10),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// Team alpha on a $1 daily budget at $1000 per million tokens, refusing what it cannot
/// pay: only some of 200 escalations fit.
fn budgeted_alpha(raw: &mut RawConfig) {
    price(raw, REMOTE, 1000.0, 1000.0);
    raw.teams = vec![team(
        "alpha",
        KEY_A,
        json!({"threshold": -1.0, "remotes": [REMOTE], "allow_direct_models": true,
               "daily_budget_usd": 1.0, "on_budget_exhausted": "reject"}),
    )];
}

/// What 200 concurrent escalations against alpha's budget came to.
struct Overspend {
    ok: usize,
    refused: usize,
    state: cascade::storage::ScopeState,
    limit: policies::NanoUsd,
    usage: cascade::storage::UsageSummary,
}

impl Overspend {
    /// Sends 200 concurrent escalations for alpha, alternating over `servers` (which share
    /// one database), and reads the budget and the ledger once settlements have landed.
    async fn run(servers: &[&RunningServer]) -> Self {
        let bearer = format!("Bearer {KEY_A}");
        let requests = (0..200).map(|i| {
            let server = servers[i % servers.len()];
            let bearer = bearer.clone();
            async move {
                let body = chat(REMOTE, &format!("Hello number {i}"), 10);
                post(
                    server,
                    "/v1/chat/completions",
                    &body,
                    &[("authorization", &bearer)],
                )
                .await
            }
        });
        let replies = futures::future::join_all(requests).await;
        let (_, limit) = team_day_scope(servers[0], "alpha");
        let state = settled_team_scope(servers[0], "alpha").await;
        let usage = storage(servers[0])
            .team_usage("alpha", 0, i64::MAX)
            .await
            .unwrap();
        Self {
            ok: replies.iter().filter(|r| r.status == 200).count(),
            refused: replies.iter().filter(|r| r.status == 429).count(),
            state,
            limit,
            usage,
        }
    }

    /// Spend never passed the budget, every request was answered or refused, nothing stays
    /// reserved, and every request has its record, whose costs add up to the budget's spend.
    fn check(&self) {
        let (ok, refused, state, limit) = (self.ok, self.refused, self.state, self.limit);
        assert_eq!(ok + refused, 200, "every request is answered or refused");
        assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
        assert_eq!(state.reserved_nanos, 0);
        assert!(
            state.spent_nanos > 0 && state.spent_nanos <= limit.0,
            "{state:?} vs {limit:?}"
        );
        assert_eq!(
            (self.usage.requests, self.usage.escalated as usize),
            (200, ok)
        );
        assert_eq!(self.usage.cost_nanos, state.spent_nanos);
    }
}

#[tokio::test]
async fn concurrent_escalations_never_overspend_a_team_budget() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    budgeted_alpha(&mut raw);
    let server = start(raw, None).await;
    Overspend::run(&[&server]).await.check();
}

#[tokio::test]
async fn two_gateways_sharing_postgres_never_overspend_a_team_budget() {
    let schema = PgSchema::create("e2e_budget").await;
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    raw.storage.url = schema.url();
    budgeted_alpha(&mut raw);
    // Two instances, each with its own connection pool, one database.
    let first = start(raw.clone(), None).await;
    let second = start(raw, None).await;
    let outcome = Overspend::run(&[&first, &second]).await;
    schema.drop().await;
    outcome.check();
}
