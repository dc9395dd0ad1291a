//! Who can call what, on every route the gateway serves: no key, a wrong key, a team key, the
//! admin key, and one team's key on another team's data. Also: the OpenAPI document lists
//! exactly the routes served, and keys and prompts never reach the logs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use cascade::config::RawConfig;
use cascade::{app::RunningServer, http::ROUTES};
use common::*;
use policies::team::hash_api_key;
use serde_json::{json, Value};

const KEY_A: &str = "sk-access-alpha-5d1f0c";
const KEY_B: &str = "sk-access-beta-88e2aa";
const ADMIN: &str = "sk-access-admin-41b7e9";
const WRONG: &str = "sk-access-wrong-000000";
/// A prompt word that must never appear in the logs (no team here logs prompts).
const SECRET_PROMPT: &str = "zanzibar-prompt-7c4e";

fn two_teams(mock: &cascade_e2e::MockUpstream) -> RawConfig {
    let mut raw = raw_config(&[mock]);
    price(&mut raw, REMOTE, 1.0, 2.0);
    let policy = json!({"remote_only": true, "remotes": [REMOTE]});
    raw.teams = vec![
        team("alpha", KEY_A, policy.clone()),
        team("beta", KEY_B, policy),
    ];
    raw.experiments = vec![serde_json::from_value(json!({
        "id": "alpha-exp",
        "team": "alpha",
        "subject": "key",
        "variants": [{"name": "one", "weight": 1.0}, {"name": "two", "weight": 1.0}],
    }))
    .unwrap()];
    raw.admin.api_key_hash = Some(hash_api_key(ADMIN));
    raw
}

/// Every log line the process writes, at every level, for the log tests to search.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn captured_logs() -> Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        logs
    })
    .clone()
}

/// One request: method, path, optional bearer key, optional JSON body (`{}` for a POST
/// without one).
async fn call(
    server: &RunningServer,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Reply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    if method == "GET" {
        get_at(&url(server, path), &headers).await
    } else {
        post(server, path, body.unwrap_or(&json!({})), &headers).await
    }
}

/// Feedback on request `id` with `key`.
async fn score(server: &RunningServer, key: &str, id: &str) -> Reply {
    let body = json!({"request_id": id, "score": 0.5});
    call(server, "POST", "/v1/feedback", Some(key), Some(&body)).await
}

fn chat_body() -> Value {
    chat("cascade", &format!("Say hello {SECRET_PROMPT}"), 5)
}

fn completion_body() -> Value {
    json!({"model": "cascade", "prompt": format!("Hello {SECRET_PROMPT}"), "max_tokens": 5})
}

#[tokio::test]
async fn every_route_lets_in_exactly_who_it_should() {
    let logs = captured_logs();
    let mock = mock().await;
    let server = start(two_teams(&mock), None).await;
    let chat = chat_body();
    let completion = completion_body();
    let feedback = json!({"request_id": "unknown-id", "score": 1});
    // (method, path, body, what a team key gets, what the admin key gets)
    let routes: [(&str, &str, Option<&Value>, u16, u16); 7] = [
        ("POST", "/v1/chat/completions", Some(&chat), 200, 401),
        ("POST", "/v1/completions", Some(&completion), 200, 401),
        ("GET", "/v1/models", None, 200, 401),
        // An unknown id (a team key passes authentication, then finds nothing).
        ("POST", "/v1/feedback", Some(&feedback), 404, 401),
        ("GET", "/v1/usage", None, 200, 401),
        ("GET", "/admin/spend", None, 403, 200),
        ("GET", "/admin/experiments/alpha-exp", None, 403, 200),
    ];
    for (method, path, body, team, admin) in routes {
        let r = call(&server, method, path, None, body).await;
        assert_eq!(r.status, 401, "{method} {path} without a key: {}", r.text);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key", "{path}");
        let r = call(&server, method, path, Some(WRONG), body).await;
        assert_eq!(
            r.status, 401,
            "{method} {path} with a wrong key: {}",
            r.text
        );
        for key in [KEY_A, KEY_B] {
            let r = call(&server, method, path, Some(key), body).await;
            assert_eq!(
                r.status, team,
                "{method} {path} with a team key: {}",
                r.text
            );
        }
        let r = call(&server, method, path, Some(ADMIN), body).await;
        assert_eq!(
            r.status, admin,
            "{method} {path} with the admin key: {}",
            r.text
        );
    }
    // Open to anyone: liveness, metrics and the API description. (Readiness is open too;
    // it is 503 here only because no local model is loaded.)
    for path in ["/healthz", "/metrics", "/openapi.json"] {
        let r = call(&server, "GET", path, None, None).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
    }
    assert_ne!(
        call(&server, "GET", "/readyz", None, None).await.status,
        401
    );

    // Nothing of the keys or the prompts went to the logs, although requests (and failures)
    // were logged.
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("request failed"), "the capture works: {text}");
    for secret in [KEY_A, KEY_B, ADMIN, WRONG, SECRET_PROMPT, "sk-test-key"] {
        assert!(!text.contains(secret), "`{secret}` was logged");
    }
}

#[tokio::test]
async fn a_team_sees_and_scores_only_its_own_requests() {
    let mock = mock().await;
    let server = start(two_teams(&mock), None).await;
    let chat = chat_body();
    let a = call(
        &server,
        "POST",
        "/v1/chat/completions",
        Some(KEY_A),
        Some(&chat),
    )
    .await;
    let b = call(
        &server,
        "POST",
        "/v1/chat/completions",
        Some(KEY_B),
        Some(&chat),
    )
    .await;
    assert_eq!((a.status, b.status), (200, 200));
    let (a_id, b_id) = (a.header("x-request-id"), b.header("x-request-id"));

    let r = score(&server, KEY_A, b_id).await;
    assert_eq!(
        r.status, 404,
        "alpha cannot score beta's request: {}",
        r.text
    );
    let r = score(&server, KEY_B, a_id).await;
    assert_eq!(
        r.status, 404,
        "beta cannot score alpha's request: {}",
        r.text
    );
    // The 404 of another team's id reads exactly as that of an id that does not exist.
    let unknown = score(&server, KEY_A, "nope").await.json();
    let foreign = score(&server, KEY_A, b_id).await.json();
    for field in ["code", "type"] {
        assert_eq!(unknown["error"][field], foreign["error"][field], "{field}");
    }
    let r = score(&server, KEY_A, a_id).await;
    assert_eq!(r.status, 200, "{}", r.text);

    let usage = call(&server, "GET", "/v1/usage", Some(KEY_B), None)
        .await
        .json();
    assert_eq!(usage["team"], "beta");
    assert_eq!(
        usage["day"]["requests"], 1,
        "beta's usage counts beta's request only"
    );
}

#[tokio::test]
async fn without_an_admin_key_the_admin_api_does_not_exist() {
    let mock = mock().await;
    let mut raw = two_teams(&mock);
    raw.admin.api_key_hash = None;
    let server = start(raw, None).await;
    for key in [Some(KEY_A), Some(ADMIN), None] {
        let r = call(&server, "GET", "/admin/spend", key, None).await;
        assert_eq!(r.status, 404, "{}", r.text);
    }
}

#[tokio::test]
async fn the_openapi_document_describes_exactly_the_routes_served() {
    let mock = mock().await;
    let server = start(two_teams(&mock), None).await;
    let r = get(&server, "/openapi.json").await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").starts_with("application/json"));
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let documented: BTreeSet<&str> = paths.keys().map(String::as_str).collect();
    let served: BTreeSet<&str> = ROUTES.iter().copied().collect();
    assert_eq!(documented, served);
    // Each documented operation is routed (the fallback answers `No route for …` otherwise),
    // and documents its error responses in OpenAI's format where it has any.
    for (path, operations) in paths {
        for (method, operation) in operations.as_object().unwrap() {
            let concrete = path.replace("{id}", "some-id");
            let r = call(&server, &method.to_uppercase(), &concrete, None, None).await;
            assert!(
                !r.text.contains("No route for"),
                "{method} {path} is documented but not served: {}",
                r.text
            );
            assert!(operation["responses"]["200"].is_object(), "{method} {path}");
        }
    }
    let r = get(&server, "/v1/not-a-route").await;
    assert_eq!(r.status, 404);
    assert!(r.text.contains("No route for"));
}
