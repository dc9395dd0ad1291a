//! Teams: API keys, who may call, and experiment variants.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use cascade::config::RawConfig;
use cascade_e2e::ANSWER_PREFIX;
use common::*;
use policies::team::hash_api_key;
use serde_json::json;

const KEY_A: &str = "sk-team-alpha";
const KEY_B: &str = "sk-team-beta";

/// Two teams on the mock remote; alpha runs a two-variant experiment by key.
fn with_teams(raw: &mut RawConfig) {
    raw.prices.insert(
        REMOTE.into(),
        serde_json::from_value(
            json!({"input_usd_per_million": 1.0, "output_usd_per_million": 2.0}),
        )
        .unwrap(),
    );
    // Alpha may address models directly but not pick a route; beta the other way round.
    raw.teams = [("alpha", KEY_A, true), ("beta", KEY_B, false)]
        .iter()
        .map(|(name, key, direct)| {
            serde_json::from_value(json!({
                "name": name,
                "api_key_hashes": [hash_api_key(key)],
                "policy": {"threshold": -1.0, "remotes": [REMOTE],
                           "allow_direct_models": direct, "allow_route_header": !direct},
            }))
            .unwrap()
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
    assert_eq!(r.status, 404, "{}", r.text);
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

#[tokio::test]
async fn concurrent_escalations_never_overspend_a_team_budget() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    raw.prices.insert(
        REMOTE.into(),
        serde_json::from_value(
            json!({"input_usd_per_million": 1000.0, "output_usd_per_million": 1000.0}),
        )
        .unwrap(),
    );
    raw.teams = vec![serde_json::from_value(json!({
        "name": "alpha",
        "api_key_hashes": [hash_api_key(KEY_A)],
        "policy": {"threshold": -1.0, "remotes": [REMOTE], "allow_direct_models": true,
                   "daily_budget_usd": 1.0, "on_budget_exhausted": "reject"},
    }))
    .unwrap()];
    let server = start(raw, None).await;
    let bearer = format!("Bearer {KEY_A}");
    let requests = (0..200).map(|i| {
        let server = &server;
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
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let refused = replies.iter().filter(|r| r.status == 429).count();
    assert_eq!(ok + refused, 200, "every request is answered or refused");
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");

    let budget = server.state.budget.as_ref().unwrap();
    let key_id = server
        .state
        .policies
        .load()
        .authenticate(KEY_A)
        .unwrap()
        .key_id
        .to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (scope, limit) = server
        .state
        .policies
        .load()
        .scopes_for("alpha", &key_id, now)
        .into_iter()
        .find(|(s, _)| s.storage_key().starts_with("team"))
        .unwrap();
    // Settling runs in its own task after the response: give it a moment.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let state = budget
        .storage()
        .scope_state(&scope.storage_key())
        .await
        .unwrap();
    assert_eq!(state.reserved_nanos, 0);
    // Every request has its record, and the ledger's cost is the budget's spend.
    let usage = budget
        .storage()
        .team_usage("alpha", 0, i64::MAX)
        .await
        .unwrap();
    assert_eq!(usage.requests, 200);
    assert_eq!(usage.escalated as usize, ok);
    assert_eq!(usage.cost_nanos, state.spent_nanos);
    assert!(
        state.spent_nanos > 0 && state.spent_nanos <= limit.0,
        "{state:?} vs {limit:?}"
    );
}

#[tokio::test]
async fn two_gateways_sharing_postgres_never_overspend_a_team_budget() {
    let base = std::env::var("CASCADE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!(
        "e2e_budget_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&base)
        .await
        .unwrap();
    sqlx::raw_sql(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");

    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    raw.storage.url = url;
    raw.prices.insert(
        REMOTE.into(),
        serde_json::from_value(
            json!({"input_usd_per_million": 1000.0, "output_usd_per_million": 1000.0}),
        )
        .unwrap(),
    );
    raw.teams = vec![serde_json::from_value(json!({
        "name": "alpha",
        "api_key_hashes": [hash_api_key(KEY_A)],
        "policy": {"threshold": -1.0, "remotes": [REMOTE], "allow_direct_models": true,
                   "daily_budget_usd": 1.0, "on_budget_exhausted": "reject"},
    }))
    .unwrap()];
    // Two instances, each with its own connection pool, one database.
    let first = start(raw.clone(), None).await;
    let second = start(raw, None).await;
    let bearer = format!("Bearer {KEY_A}");
    let requests = (0..200).map(|i| {
        let server = if i % 2 == 0 { &first } else { &second };
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
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let refused = replies.iter().filter(|r| r.status == 429).count();
    assert_eq!(ok + refused, 200, "every request is answered or refused");
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");

    let key_id = first
        .state
        .policies
        .load()
        .authenticate(KEY_A)
        .unwrap()
        .key_id
        .to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (scope, limit) = first
        .state
        .policies
        .load()
        .scopes_for("alpha", &key_id, now)
        .into_iter()
        .find(|(s, _)| s.storage_key().starts_with("team"))
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let storage = first.state.budget.as_ref().unwrap().storage();
    let state = storage.scope_state(&scope.storage_key()).await.unwrap();
    let usage = storage.team_usage("alpha", 0, i64::MAX).await.unwrap();
    sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
    assert_eq!(state.reserved_nanos, 0);
    assert!(
        state.spent_nanos > 0 && state.spent_nanos <= limit.0,
        "{state:?} vs {limit:?}"
    );
    assert_eq!((usage.requests, usage.escalated as usize), (200, ok));
    assert_eq!(usage.cost_nanos, state.spent_nanos);
}
