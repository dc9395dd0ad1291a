//! The request limits of `[limits]` (and `server.max_body_bytes`), end to end against the
//! mock upstream: each broken limit is a 4xx in OpenAI's error format, sent before any
//! remote call is paid for, and never a hang.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cascade::config::RawConfig;
use cascade_e2e::{MockOptions, MockUpstream};
use common::*;
use serde_json::{json, Value};

/// Small limits, so the tests send small bodies.
fn limited(mock: &MockUpstream) -> RawConfig {
    let mut raw = raw_config(&[mock]);
    raw.limits.max_messages = 3;
    raw.limits.max_prompt_chars = 100;
    raw.limits.max_output_tokens = 50;
    raw.limits.max_header_bytes = 4096;
    raw.server.max_body_bytes = 2048;
    raw
}

fn assert_openai_error(r: &Reply, status: u16, param: Option<&str>, code: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.text);
    let e = &r.json()["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.text
    );
    assert!(e["type"].is_string(), "{}", r.text);
    if let Some(param) = param {
        assert_eq!(e["param"], param, "{}", r.text);
    }
    if let Some(code) = code {
        assert_eq!(e["code"], code, "{}", r.text);
    }
    assert!(
        !r.header("x-request-id").is_empty(),
        "every answer carries a request id"
    );
}

fn messages(n: usize) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({"role": "user", "content": format!("m{i}")}))
            .collect(),
    )
}

#[tokio::test]
async fn requests_within_the_limits_are_served() {
    let mock = mock().await;
    let server = start(limited(&mock), None).await;
    let body = json!({"model": "cascade", "messages": messages(3), "max_tokens": 50});
    let r = post(&server, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn too_many_messages_is_a_400_naming_messages() {
    let mock = mock().await;
    let server = start(limited(&mock), None).await;
    let body = json!({"model": "cascade", "messages": messages(4)});
    let r = post(&server, "/v1/chat/completions", &body, &[]).await;
    assert_openai_error(&r, 400, Some("messages"), None);
    assert_eq!(
        mock.request_count(),
        0,
        "nothing is paid for a refused request"
    );
}

#[tokio::test]
async fn max_tokens_above_the_cap_is_a_400_naming_the_parameter() {
    let mock = mock().await;
    let server = start(limited(&mock), None).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", "hi", 51),
        &[],
    )
    .await;
    assert_openai_error(&r, 400, Some("max_tokens"), None);
    let body = json!({"model": "cascade", "prompt": "hi", "max_completion_tokens": 1_000_000});
    let r = post(&server, "/v1/completions", &body, &[]).await;
    assert_openai_error(&r, 400, Some("max_completion_tokens"), None);
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn a_prompt_over_the_character_cap_is_refused_before_any_remote_call() {
    let mock = mock().await;
    let server = start(limited(&mock), None).await;
    let long = "x".repeat(101);
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", &long, 5),
        &[],
    )
    .await;
    assert_openai_error(&r, 400, Some("messages"), Some("context_length_exceeded"));
    // Named remotes are held to the same cap: it exists so no remote is paid for it.
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat(REMOTE, &long, 5),
        &[],
    )
    .await;
    assert_openai_error(&r, 400, Some("messages"), Some("context_length_exceeded"));
    let body = json!({"model": "cascade", "prompt": [long]});
    let r = post(&server, "/v1/completions", &body, &[]).await;
    assert_openai_error(&r, 400, Some("prompt"), Some("context_length_exceeded"));
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn a_body_over_the_byte_cap_is_a_413() {
    let mock = mock().await;
    let server = start(limited(&mock), None).await;
    let body = json!({"model": "cascade", "prompt": "y".repeat(4096)});
    let r = post(&server, "/v1/completions", &body, &[]).await;
    assert_openai_error(&r, 413, None, Some("request_too_large"));
    let r = post(
        &server,
        "/v1/feedback",
        &json!({"request_id": "y".repeat(4096), "score": 1}),
        &[],
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.text);
}

#[tokio::test]
async fn headers_over_the_cap_are_a_431_in_openai_format() {
    let mock = mock().await;
    let server = start(limited(&mock), None).await;
    let big = "h".repeat(5000);
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", "hi", 5),
        &[("x-big", &big)],
    )
    .await;
    assert_openai_error(&r, 431, None, Some("request_header_fields_too_large"));
    // Every route, not only generation.
    let r = get_at(&url(&server, "/v1/models"), &[("x-big", &big)]).await;
    assert_eq!(r.status, 431);
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn headers_beyond_what_hyper_reads_are_a_431_not_a_hang() {
    let mock = mock().await;
    let server = start(limited(&mock), None).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    // One megabyte of header: over hyper's own read buffer, refused before any handler.
    let huge = "h".repeat(1 << 20);
    let r = client
        .get(url(&server, "/healthz"))
        .header("x-huge", huge)
        .send()
        .await
        .expect("an answer, not a hang or a reset");
    assert_eq!(r.status().as_u16(), 431);
    // More header fields than hyper parses (100).
    let mut request = client.get(url(&server, "/healthz"));
    for i in 0..200 {
        request = request.header(format!("x-h{i}"), "v");
    }
    let r = request.send().await.expect("an answer");
    assert_eq!(r.status().as_u16(), 431);
    // The server still serves afterwards.
    assert_eq!(get(&server, "/healthz").await.status, 200);
}

#[tokio::test]
async fn a_request_past_the_time_limit_is_a_504_and_the_server_keeps_serving() {
    // The remote answers after 5 s; the gateway gives a request 300 ms.
    let slow = MockUpstream::start(MockOptions {
        delay: Duration::from_secs(5),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let mut raw = limited(&slow);
    raw.limits.request_timeout_ms = 300;
    raw.remotes[0].timeout_ms = 20_000;
    let server = start(raw, None).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", "hi", 5),
        &[],
    )
    .await;
    assert_openai_error(&r, 504, None, Some("request_timeout"));
    assert_eq!(get(&server, "/healthz").await.status, 200);
}

#[tokio::test]
async fn the_time_limit_ends_at_the_headers_of_a_stream() {
    // Headers at once, then five events 200 ms apart: a stream longer than the limit.
    let mock = MockUpstream::start(MockOptions {
        chunk_delay: Duration::from_millis(200),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let mut raw = limited(&mock);
    raw.limits.request_timeout_ms = 500;
    let server = start(raw, None).await;
    let mut body = chat("cascade", "hi", 5);
    body["stream"] = json!(true);
    let r = post(&server, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.events().last().map(String::as_str),
        Some("[DONE]"),
        "the stream ran to its end: {}",
        r.text
    );
}

#[test]
fn a_zero_limit_stops_start_up_naming_its_key() {
    let mut raw = raw_config(&[]);
    raw.limits.max_output_tokens = 0;
    let e = cascade::config::Config::validate(raw, None, &|_| None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.max_output_tokens"), "{e}");
}
