//! The gateway against the mock upstream, without running the local model:
//! remote routes, streaming pass-through, retries, fallbacks, faults,
//! errors, and the operational endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use cascade_e2e::{Fault, MockOptions, ANSWER_PREFIX};
use common::*;
use futures::StreamExt;
use serde_json::json;

#[tokio::test]
async fn remote_model_by_name_gets_the_upstream_answer_with_cascade_headers() {
    let mock = mock().await;
    let server = start(raw_config(&[&mock]), None).await;
    let mut body = chat(REMOTE, "Hello there", 20);
    body["user"] = json!("u-42");
    body["logit_bias"] = json!({"1": -5});
    let r = post(
        &server,
        "/v1/chat/completions",
        &body,
        &[("x-request-id", "req-abc")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.answer().starts_with(ANSWER_PREFIX), "{}", r.text);
    assert_eq!(r.header("x-request-id"), "req-abc");
    assert_eq!(r.header("x-cascade-route"), "remote");
    assert_eq!(r.header("x-cascade-reason"), "model_requested");
    assert_eq!(r.header("x-cascade-confidence"), "none");
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer sk-test-key"));
    // The remote's own model name goes upstream; everything else as sent.
    assert_eq!(seen[0].body["model"], "mock-model");
    assert_eq!(seen[0].body["user"], "u-42");
    assert_eq!(seen[0].body["logit_bias"]["1"], -5);

    let r = post(
        &server,
        "/v1/completions",
        &json!({"model": REMOTE, "prompt": "Once upon"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.answer().starts_with(ANSWER_PREFIX));
    assert!(!r.header("x-request-id").is_empty());
    assert_eq!(mock.requests()[1].path, "/v1/completions");
}

#[tokio::test]
async fn streamed_remote_answer_is_passed_through_as_it_arrives() {
    let mock = mock().await;
    mock.set_options(MockOptions {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_millis(150),
        ..MockOptions::default()
    });
    let server = start(raw_config(&[&mock]), None).await;
    let mut body = chat(REMOTE, "Tell me a story", 20);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let started = Instant::now();
    let response = client()
        .post(url(&server, "/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-cascade-route"], "remote");
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let mut second_chunk_at = None;
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        chunks += 1;
        if chunks == 2 {
            second_chunk_at = Some(started.elapsed());
        }
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let total = started.elapsed();
    // Eleven events 150 ms apart: unbuffered, the second arrives long before the end.
    assert!(
        second_chunk_at.unwrap() + Duration::from_millis(600) < total,
        "second chunk at {second_chunk_at:?}, total {total:?}"
    );
    let r = Reply {
        status: 200,
        headers: Default::default(),
        text,
    };
    assert!(r.streamed_text().starts_with(ANSWER_PREFIX), "{}", r.text);
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(
        usage["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{usage}"
    );
}

#[tokio::test]
async fn transient_failures_are_retried_with_backoff() {
    let mock = mock().await;
    mock.push_faults([Fault::Status(500), Fault::Status(429)]);
    let server = start(raw_config(&[&mock]), None).await;
    let r = post(&server, "/v1/chat/completions", &chat(REMOTE, "Hi", 5), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(mock.request_count(), 3);
    let metrics = get(&server, "/metrics").await.text;
    assert_eq!(
        metric(
            &metrics,
            "cascade_upstream_errors_total",
            &["upstream=\"big\""]
        ),
        2.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_failing_upstream_falls_back_to_the_next_in_order() {
    let (first, second) = (mock().await, mock().await);
    first.set_fault(Some(Fault::Status(503)));
    let server = start(raw_config(&[&first, &second]), None).await;
    // The route header sends a cascade request straight to the policy's chain.
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", "Hi", 5),
        &[("x-cascade-route", "remote")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cascade-reason"), "route_header");
    assert_eq!(first.request_count(), 3, "one try and two retries");
    assert_eq!(second.request_count(), 1);
    // A 4xx is not retried: the next upstream is tried at once.
    first.set_fault(Some(Fault::Status(401)));
    let r = post(
        &server,
        "/v1/completions",
        &json!({"model": "cascade", "prompt": "x"}),
        &[("x-cascade-route", "remote")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(first.request_count(), 4);
}

#[tokio::test]
async fn when_every_remote_fails_and_there_is_no_local_answer_the_client_gets_502_or_504() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    raw.remotes[0].timeout_ms = 300;
    // Each fault's own error is the point here; the breaker (which these failures would
    // open) has its own test in faults.rs.
    raw.remotes[0].breaker_failures = 100;
    let server = start(raw, None).await;
    for (fault, status, code) in [
        (Fault::Status(500), 502, "upstream_unavailable"),
        (Fault::Malformed, 502, "upstream_unavailable"),
        (Fault::Cut, 502, "upstream_unavailable"),
        (Fault::Timeout, 504, "upstream_timeout"),
    ] {
        mock.set_fault(Some(fault));
        let started = Instant::now();
        let r = post(&server, "/v1/chat/completions", &chat(REMOTE, "Hi", 5), &[]).await;
        assert_eq!(r.status, status, "{fault:?}: {}", r.text);
        assert_eq!(r.json()["error"]["code"], code, "{fault:?}");
        assert_eq!(r.header("x-cascade-route"), "remote");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{fault:?} took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn a_stream_that_breaks_mid_way_ends_with_an_error_event_not_done() {
    let mock = mock().await;
    // Events spaced out, so the first ones reach the gateway before the break.
    mock.set_options(MockOptions {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_millis(30),
        ..MockOptions::default()
    });
    let server = start(raw_config(&[&mock]), None).await;
    for fault in [Fault::Cut, Fault::Malformed] {
        mock.set_fault(Some(fault));
        let mut body = chat(REMOTE, "Tell me a long story please", 20);
        body["stream"] = json!(true);
        let r = post(&server, "/v1/chat/completions", &body, &[]).await;
        assert_eq!(r.status, 200, "{fault:?}");
        let events = r.events();
        assert!(
            !events.iter().any(|e| e == "[DONE]"),
            "{fault:?}: {}",
            r.text
        );
        let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert!(last["error"]["message"].is_string(), "{fault:?}: {last}");
    }
    // A stream that breaks before its first event can still be retried elsewhere.
    mock.set_fault(None);
    mock.push_faults([Fault::Status(502)]);
    let mut body = chat(REMOTE, "Hi", 5);
    body["stream"] = json!(true);
    let r = post(&server, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(
        r.events().last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.text
    );
}

#[tokio::test]
async fn invalid_requests_get_openai_errors_with_the_right_status() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    raw.server.max_body_bytes = 4096;
    let server = start(raw, None).await;
    let send_raw = |body: String| {
        let client = client();
        let url = url(&server, "/v1/chat/completions");
        async move {
            let r = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let has_id = r.headers().contains_key("x-request-id");
            let v: serde_json::Value = r.json().await.unwrap();
            (status, has_id, v)
        }
    };
    let (status, has_id, v) = send_raw("{\"model\": \"cascade\", ".into()).await;
    assert_eq!((status, has_id), (400, true));
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (status, _, v) = send_raw(json!({"model": "cascade"}).to_string()).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("messages"))
    );
    let (status, _, v) = send_raw(chat("gpt-nonexistent", "Hi", 5).to_string()).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let (status, _, v) = send_raw(chat("cascade", &"x".repeat(10_000), 5).to_string()).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (413, Some("request_too_large"))
    );
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", "Hi", 5),
        &[("x-cascade-route", "sideways")],
    )
    .await;
    assert_eq!(r.status, 400);
    let r = get(&server, "/v1/nothing-here").await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn route_header_and_direct_models_only_where_the_policy_allows() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    raw.policy.allow_route_header = false;
    raw.policy.allow_direct_models = false;
    let server = start(raw, None).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", "Hi", 5),
        &[("x-cascade-route", "remote")],
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    // A configured model the policy does not let clients name: 403, as docs/api.md says.
    let r = post(&server, "/v1/chat/completions", &chat(REMOTE, "Hi", 5), &[]).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "not_allowed_by_policy");
    let models = get(&server, "/v1/models").await.json();
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn requests_the_local_model_cannot_read_escalate_with_their_reason() {
    let mock = mock().await;
    let server = start(raw_config(&[&mock]), None).await;
    let image = json!({"model": "cascade", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]});
    let r = post(&server, "/v1/chat/completions", &image, &[]).await;
    assert_eq!(
        (r.status, r.header("x-cascade-reason")),
        (200, "image_content"),
        "{}",
        r.text
    );
    assert_eq!(r.header("x-cascade-route"), "remote");
    let mut tools = chat("cascade", "What's the weather in Paris?", 10);
    tools["tools"] = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]);
    let r = post(&server, "/v1/chat/completions", &tools, &[]).await;
    assert_eq!((r.status, r.header("x-cascade-reason")), (200, "tools"));
    // The original content parts went upstream untouched.
    assert_eq!(
        mock.requests()[0].body["messages"][0]["content"][1]["type"],
        "image_url"
    );
    let metrics = get(&server, "/metrics").await.text;
    assert_eq!(
        metric(
            &metrics,
            "cascade_escalations_total",
            &["reason=\"image_content\""]
        ),
        1.0
    );
}

#[tokio::test]
async fn while_the_model_loads_requests_escalate_or_get_503_and_readyz_says_so() {
    let mock = mock().await;
    let server = start(raw_config(&[&mock]), None).await;
    assert_eq!(get(&server, "/healthz").await.status, 200);
    assert_eq!(get(&server, "/readyz").await.status, 503);
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", "Hi", 5),
        &[],
    )
    .await;
    assert_eq!(
        (r.status, r.header("x-cascade-reason")),
        (200, "local_loading"),
        "{}",
        r.text
    );

    let mut raw = raw_config(&[&mock]);
    raw.policy.on_overload = "reject".into();
    let server = start(raw, None).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", "Hi", 5),
        &[],
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(!r.header("retry-after").is_empty());
    let r = post(&server, "/v1/chat/completions", &chat(LOCAL, "Hi", 5), &[]).await;
    assert_eq!(r.status, 503, "{}", r.text);
}

#[tokio::test]
async fn models_and_metrics_describe_the_gateway() {
    let mock = mock().await;
    let server = start(raw_config(&[&mock]), None).await;
    let models = get(&server, "/v1/models").await.json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["cascade", LOCAL, REMOTE]);
    post(&server, "/v1/chat/completions", &chat(REMOTE, "Hi", 5), &[]).await;
    let metrics = get(&server, "/metrics").await;
    assert!(metrics.header("content-type").starts_with("text/plain"));
    let text = metrics.text;
    assert_eq!(
        metric(
            &text,
            "cascade_requests_total",
            &[
                "route=\"remote\"",
                "reason=\"model_requested\"",
                "status=\"200\""
            ]
        ),
        1.0,
        "{text}"
    );
    assert!(metric(&text, "cascade_gateway_overhead_seconds_count", &[]) >= 1.0);
    assert!(
        metric(
            &text,
            "cascade_upstream_latency_seconds_count",
            &["outcome=\"ok\""]
        ) >= 1.0
    );
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_upstream_call() {
    let mock = mock().await;
    mock.set_options(MockOptions {
        delay: Duration::from_secs(10),
        chunk_delay: Duration::ZERO,
        ..MockOptions::default()
    });
    let mut raw = raw_config(&[&mock]);
    raw.remotes[0].timeout_ms = 30_000;
    let server = start(raw, None).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let result = impatient
        .post(url(&server, "/v1/chat/completions"))
        .json(&chat(REMOTE, "Hi", 5))
        .send()
        .await;
    assert!(result.is_err());
    let deadline = Instant::now() + Duration::from_secs(3);
    while mock.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mock.request_count(), 1);
    assert_eq!(mock.in_flight(), 0, "the upstream call outlived its client");
}
