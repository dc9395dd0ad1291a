//! The cascade with the real SmolLM2 model and the mock upstream: local
//! answers, escalations and their reasons, streaming both ways, remote
//! failures handled as the policy says, overload, and cancellation.
//!
//! Each generation costs seconds on CPU, so every test asks for few tokens.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use cascade_e2e::{Fault, ANSWER_PREFIX};
use common::*;
use serde_json::json;

/// A policy that separates `EASY` (mean log-prob ≈ -0.26) from `HARD` (≈ -0.79).
fn mean_policy(raw: &mut cascade::config::RawConfig) {
    raw.policy.aggregate = "mean_logprob".into();
    raw.policy.threshold = Some(-0.5);
}

fn confidence(r: &Reply) -> f64 {
    r.header("x-cascade-confidence")
        .parse()
        .unwrap_or_else(|_| panic!("no confidence: {:?}", r.headers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_easy_question_is_answered_locally_and_a_hard_one_escalates() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    mean_policy(&mut raw);
    let server = start(raw, Some(shared_engine())).await;

    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", EASY, 12),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cascade-route"), "local", "{:?}", r.headers);
    assert_eq!(r.header("x-cascade-reason"), "confident");
    assert!(confidence(&r) >= -0.5);
    assert!(r.answer().contains("Paris"), "{}", r.text);
    let body = r.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], LOCAL);
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", HARD, 12),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cascade-route"), "remote", "{:?}", r.headers);
    // Low confidence, found either at the end or (the mean over at most 12 tokens can no
    // longer reach -0.5) before it.
    let reason = r.header("x-cascade-reason").to_string();
    assert!(
        reason == "low_confidence" || reason == "early_exit",
        "{reason}"
    );
    assert!(confidence(&r) < -0.5);
    assert!(r.answer().starts_with(ANSWER_PREFIX), "{}", r.text);
    // The client's original messages went upstream.
    assert_eq!(mock.requests()[0].body["messages"][0]["content"], HARD);

    let metrics = get(&server, "/metrics").await.text;
    assert_eq!(
        metric(&metrics, "cascade_confidence_count", &[]),
        2.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "cascade_local_tokens_total", &[]) > 0.0);
    assert_eq!(
        metric(
            &metrics,
            "cascade_escalations_total",
            &[&format!("reason=\"{reason}\"")]
        ),
        1.0
    );
    // Both local runs reached a first token; the batch gauges are exported. (Their values
    // are the shared engine's, which other tests use at the same time: the test with an
    // engine of its own checks them.)
    assert_eq!(
        metric(
            &metrics,
            "cascade_local_time_to_first_token_seconds_count",
            &[]
        ),
        2.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("cascade_local_active_sequences"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cascade_local_batch_size_mean"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minimum_aggregate_stops_generating_at_the_first_unsure_token() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    raw.policy.aggregate = "min_logprob".into();
    raw.policy.threshold = Some(-2.0);
    let server = start(raw, Some(shared_engine())).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", HARD, 32),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.header("x-cascade-reason"),
        "early_exit",
        "{:?}",
        r.headers
    );
    assert!(confidence(&r) < -2.0);
    assert!(r.answer().starts_with(ANSWER_PREFIX));
    let metrics = get(&server, "/metrics").await.text;
    let generated = metric(&metrics, "cascade_local_tokens_total", &[]);
    assert!(
        generated < 32.0,
        "generated {generated} tokens despite early exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_works_for_local_and_escalated_answers() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    mean_policy(&mut raw);
    let server = start(raw, Some(shared_engine())).await;

    let mut body = chat("cascade", EASY, 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post(&server, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(
        (r.status, r.header("x-cascade-route")),
        (200, "local"),
        "{}",
        r.text
    );
    assert!(r.header("content-type").starts_with("text/event-stream"));
    assert!(r.streamed_text().contains("Paris"), "{}", r.text);
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(
        usage["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{usage}"
    );

    let mut body = chat("cascade", HARD, 12);
    body["stream"] = json!(true);
    let r = post(&server, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(
        (r.status, r.header("x-cascade-route")),
        (200, "remote"),
        "{}\n{:?}",
        r.text,
        r.headers
    );
    assert!(r.streamed_text().starts_with(ANSWER_PREFIX), "{}", r.text);
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_model_streams_token_by_token_when_addressed_directly() {
    let mock = mock().await;
    let server = start(raw_config(&[&mock]), Some(shared_engine())).await;
    let mut body = chat(LOCAL, EASY, 12);
    body["stream"] = json!(true);
    let r = post(&server, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(
        (r.status, r.header("x-cascade-reason")),
        (200, "model_requested"),
        "{}",
        r.text
    );
    assert!(r.streamed_text().contains("Paris"), "{}", r.text);
    // One event per token or so, not one block.
    assert!(r.events().len() >= 5, "{}", r.text);
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    // Raw-text completions reach the model too.
    let r = post(
        &server,
        "/v1/completions",
        &json!({"model": LOCAL, "prompt": "The capital of France is", "max_tokens": 4}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["object"], "text_completion");
    assert!(!r.answer().is_empty(), "{}", r.text);
    assert!(confidence(&r) <= 0.0);
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_remote_fails_the_policy_decides_between_the_local_answer_and_an_error() {
    let mock = mock().await;
    mock.set_fault(Some(Fault::Status(500)));
    let mut raw = raw_config(&[&mock]);
    mean_policy(&mut raw);
    raw.policy.on_remote_failure = "serve_local".into();
    let server = start(raw.clone(), Some(shared_engine())).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", HARD, 12),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cascade-route"), "local");
    assert_eq!(r.header("x-cascade-reason"), "remote_unavailable");
    assert_eq!(r.header("x-cascade-degraded"), "remote-unavailable");
    // The whole answer, even when the local run had stopped early to escalate.
    assert!(!r.answer().is_empty());
    assert_eq!(
        r.json()["choices"][0]["finish_reason"],
        "length",
        "all 12 tokens: {}",
        r.text
    );
    assert_eq!(mock.request_count(), 3, "one try and two retries");

    mock.set_fault(Some(Fault::Timeout));
    raw.policy.on_remote_failure = "error".into();
    raw.remotes[0].timeout_ms = 300;
    let server = start(raw, Some(shared_engine())).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", HARD, 12),
        &[],
    )
    .await;
    assert_eq!(r.status, 504, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    assert_eq!(r.header("x-cascade-route"), "remote");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_answers_that_are_not_json_escalate_when_json_was_asked_for() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    raw.policy.threshold = Some(-5.0);
    let server = start(raw, Some(shared_engine())).await;
    let mut body = chat("cascade", EASY, 8);
    body["response_format"] = json!({"type": "json_object"});
    let r = post(&server, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(
        (r.status, r.header("x-cascade-reason")),
        (200, "invalid_json"),
        "{}",
        r.text
    );
    assert_eq!(r.header("x-cascade-route"), "remote");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_time_budget_escalates_with_its_own_reason() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    raw.policy.threshold = Some(-5.0);
    raw.policy.max_local_ms = 1;
    let server = start(raw, Some(shared_engine())).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", EASY, 32),
        &[],
    )
    .await;
    assert_eq!(
        (r.status, r.header("x-cascade-reason")),
        (200, "local_time_budget"),
        "{}",
        r.text
    );
    assert!(r.answer().starts_with(ANSWER_PREFIX));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_the_context_window_escalates_without_generating() {
    let mock = mock().await;
    let server = start(raw_config(&[&mock]), Some(shared_engine())).await;
    let long = "lorem ipsum dolor sit amet ".repeat(4000);
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", &long, 8),
        &[],
    )
    .await;
    assert_eq!(
        (r.status, r.header("x-cascade-reason")),
        (200, "context_too_long"),
        "{}",
        r.text
    );
    let metrics = get(&server, "/metrics").await.text;
    assert_eq!(metric(&metrics, "cascade_local_tokens_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_local_queue_escalates_or_answers_429_and_a_departed_client_frees_it() {
    // Its own model with no waiting room: one running request fills it.
    let (engine, occupier) = load_engine_with_occupier(0);
    let mock = mock().await;
    let escalating = start(raw_config(&[&mock]), Some(engine.clone())).await;
    let mut raw = raw_config(&[&mock]);
    raw.policy.on_overload = "reject".into();
    let rejecting = start(raw, Some(engine.clone())).await;
    let busy_server = start(raw_config(&[&mock]), Some(occupier)).await;

    // A long direct-local generation occupies the model.
    let busy_url = url(&busy_server, "/v1/chat/completions");
    let busy = tokio::spawn(async move {
        client()
            .post(busy_url)
            .json(&occupying_chat(400))
            .send()
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while engine.load().in_flight == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(engine.load().in_flight, 1);

    let r = post(
        &escalating,
        "/v1/chat/completions",
        &chat("cascade", EASY, 8),
        &[],
    )
    .await;
    assert_eq!(
        (r.status, r.header("x-cascade-reason")),
        (200, "local_overloaded"),
        "{}",
        r.text
    );
    assert_eq!(r.header("x-cascade-route"), "remote");
    let r = post(
        &rejecting,
        "/v1/chat/completions",
        &chat("cascade", EASY, 8),
        &[],
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "local_queue_full");
    assert!(r.header("retry-after").parse::<u64>().unwrap() >= 1);

    // The client of the long generation goes away: generation stops at the next token.
    busy.abort();
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.load().in_flight > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(engine.load().in_flight, 0, "generation outlived its client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_budget_serves_the_full_local_answer_marked_degraded() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    price(&mut raw, REMOTE, 1000.0, 1000.0);
    // Threshold 0 escalates every answer (its first unsure token ends the local run early);
    // a budget of a thousandth of a cent pays for no call.
    raw.teams = vec![team(
        "alpha",
        "sk-alpha",
        json!({"threshold": 0.0, "remotes": [REMOTE], "daily_budget_usd": 0.00001}),
    )];
    let server = start(raw, Some(shared_engine())).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", EASY, 12),
        &[("authorization", "Bearer sk-alpha")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cascade-route"), "local", "{:?}", r.headers);
    assert_eq!(r.header("x-cascade-reason"), "budget_exhausted");
    assert_eq!(r.header("x-cascade-degraded"), "budget-exhausted");
    // The answer is whole, not the fragment the early exit left.
    assert!(r.answer().contains("Paris"), "{}", r.text);
    assert_eq!(mock.request_count(), 0);
    let rec = record(&server, r.header("x-request-id")).await;
    assert_eq!(
        (rec.route.as_str(), rec.reason.as_str(), rec.cost_nanos),
        ("local", "budget_exhausted", 0)
    );
    assert!(rec.local_tokens > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_signals_keeps_the_local_answers_tokens_and_hidden_state_with_its_record() {
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    mean_policy(&mut raw);
    raw.policy.log_signals = policies::SignalLog::Hidden;
    let server = start(raw.clone(), Some(shared_engine())).await;
    for (question, route) in [(EASY, "local"), (HARD, "remote")] {
        let r = post(
            &server,
            "/v1/chat/completions",
            &chat("cascade", question, 12),
            &[],
        )
        .await;
        assert_eq!(r.header("x-cascade-route"), route, "{:?}", r.headers);
        let rec = record(&server, r.header("x-request-id")).await;
        // Kept for the escalated answer too: its tokens serve a rate target.
        let kept = rec
            .signals
            .as_ref()
            .unwrap_or_else(|| panic!("{route}: no signals kept"))
            .decode()
            .unwrap();
        assert!(!kept.tokens.is_empty() && kept.tokens.len() <= 12);
        if route == "local" {
            let completion = r.json()["usage"]["completion_tokens"].as_u64().unwrap();
            assert_eq!(kept.tokens.len() as u64, completion);
        }
        // The kept tokens give back the score the routing decision read.
        let mean = policies::Aggregate::MeanLogprob
            .score(&kept.tokens)
            .unwrap();
        let recorded = rec.confidence.unwrap();
        assert!((mean - recorded).abs() < 1e-9, "{mean} {recorded}");
        let hidden = kept.hidden.expect("the tuned engine returns hidden states");
        for v in [
            &hidden.final_mean,
            &hidden.final_last,
            &hidden.middle_mean,
            &hidden.middle_last,
        ] {
            assert_eq!(v.len(), 576, "SmolLM2's width");
            assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|x| *x != 0.0));
        }
    }
    // `tokens` keeps no hidden state; the default keeps nothing.
    for (log, want_hidden) in [
        (policies::SignalLog::Tokens, Some(false)),
        (policies::SignalLog::None, None),
    ] {
        raw.policy.log_signals = log;
        let server = start(raw.clone(), Some(shared_engine())).await;
        let r = post(
            &server,
            "/v1/chat/completions",
            &chat("cascade", EASY, 12),
            &[],
        )
        .await;
        let rec = record(&server, r.header("x-request-id")).await;
        let kept = rec.signals.map(|s| s.decode().unwrap().hidden.is_some());
        assert_eq!(kept, want_hidden, "{log:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_rule_loaded_by_name_routes_by_its_probability() {
    let mock = mock().await;
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/confidence");
    let mut raw = raw_config(&[&mock]);
    raw.confidence.rules_dir = rules.display().to_string();
    raw.policy.aggregate = "learned".into();
    raw.policy.learned_rule = Some("smollm2-135m-dev".into());
    // Probability >= 0 always holds: served locally, with the rule's probability.
    raw.policy.threshold = Some(0.0);
    let server = start(raw.clone(), Some(shared_engine())).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", EASY, 12),
        &[],
    )
    .await;
    assert_eq!(r.header("x-cascade-route"), "local", "{:?}", r.headers);
    let p = confidence(&r);
    assert!((0.0..=1.0).contains(&p), "{p}");
    // No probability reaches 1: everything escalates.
    raw.policy.threshold = Some(1.0);
    let server = start(raw, Some(shared_engine())).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", EASY, 12),
        &[],
    )
    .await;
    assert_eq!(r.header("x-cascade-route"), "remote", "{:?}", r.headers);
    assert_eq!(r.header("x-cascade-reason"), "low_confidence");
    assert!(
        (confidence(&r) - p).abs() < 1e-3,
        "same answer, same probability"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calibrated_rule_routes_by_min_p_correct() {
    let mock = mock().await;
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/confidence");
    let mut raw = raw_config(&[&mock]);
    raw.confidence.rules_dir = rules.display().to_string();
    raw.policy.aggregate = cascade::config::RawAggregate::Table(policies::Aggregate::Calibrated {
        name: "smollm2-135m-dev6-sum_logprob".into(),
        rule: None,
    });
    // P >= 0 always holds: served locally, scored with the calibrated probability.
    raw.policy.threshold = None;
    raw.policy.min_p_correct = Some(0.0);
    let server = start(raw.clone(), Some(shared_engine())).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", EASY, 12),
        &[],
    )
    .await;
    assert_eq!(r.header("x-cascade-route"), "local", "{:?}", r.headers);
    let p = confidence(&r);
    assert!((0.0..=1.0).contains(&p), "{p}");
    // The documented map never reaches 0.99 (its top step is below 0.4): everything escalates,
    // and early exit knows it before generating (no score can reach the map's step).
    raw.policy.min_p_correct = Some(0.99);
    let server = start(raw, Some(shared_engine())).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", EASY, 12),
        &[],
    )
    .await;
    assert_eq!(r.header("x-cascade-route"), "remote", "{:?}", r.headers);
    assert_eq!(r.header("x-cascade-reason"), "early_exit");
}

/// A probe rule over SmollM2's final mean hidden state (width 576) whose weights are all zero:
/// its probability is exactly sigmoid(intercept) when the engine's hidden state reaches the
/// gateway with the rule's width, and NaN (escalate) when it does not.
fn flat_probe(width: usize, intercept: f64) -> policies::ProbeRule {
    policies::ProbeRule {
        format: policies::probe::FORMAT.to_owned(),
        name: "flat".to_owned(),
        hidden: vec![policies::HiddenInput::FinalMean],
        width,
        hidden_weights: vec![0.0; width],
        features: Vec::new(),
        center: Vec::new(),
        scale: Vec::new(),
        weights: Vec::new(),
        intercept,
        fitted_on: serde_json::Value::Null,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_rule_scores_the_hidden_state_the_engine_returns() {
    let mock = mock().await;
    let rules = tempfile::tempdir().unwrap();
    let write = |rule: &policies::ProbeRule, name: &str| {
        std::fs::write(rules.path().join(format!("{name}.json")), rule.to_json()).unwrap();
    };
    // sigmoid(ln 3) = 0.75.
    write(&flat_probe(576, 3f64.ln()), "flat");
    write(&flat_probe(575, 3f64.ln()), "other-width");
    let mut raw = raw_config(&[&mock]);
    raw.confidence.rules_dir = rules.path().display().to_string();
    let probe = |name: &str| {
        cascade::config::RawAggregate::Table(policies::Aggregate::Probe {
            name: name.into(),
            rule: None,
        })
    };
    raw.policy.aggregate = probe("flat");
    raw.policy.threshold = None;
    raw.policy.min_p_correct = Some(0.7);
    let server = start(raw.clone(), Some(shared_engine())).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", EASY, 8),
        &[],
    )
    .await;
    assert_eq!(r.header("x-cascade-route"), "local", "{:?}", r.headers);
    assert!((confidence(&r) - 0.75).abs() < 1e-9, "{:?}", r.headers);
    raw.policy.min_p_correct = Some(0.8);
    let server = start(raw.clone(), Some(shared_engine())).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", EASY, 8),
        &[],
    )
    .await;
    assert_eq!(r.header("x-cascade-route"), "remote", "{:?}", r.headers);
    assert_eq!(r.header("x-cascade-reason"), "low_confidence");
    // A rule for another model's width never serves locally, however low the bar.
    raw.policy.aggregate = probe("other-width");
    raw.policy.min_p_correct = Some(0.0);
    let server = start(raw, Some(shared_engine())).await;
    let r = post(
        &server,
        "/v1/chat/completions",
        &chat("cascade", EASY, 8),
        &[],
    )
    .await;
    assert_eq!(r.header("x-cascade-route"), "remote", "{:?}", r.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_questions_stay_local_when_the_engine_batches_them() {
    // Eight decode together and eight may wait: sixteen at once all fit, so none is
    // escalated for overload (a one-at-a-time queue of eight would send half of them out).
    let path = model_path();
    let model =
        local_model::LocalModel::load(path.to_str().unwrap(), &local_model::LoadOptions::default())
            .unwrap();
    let limits = local_model::BatchLimits {
        max_batch: 8,
        ..local_model::BatchLimits::default()
    };
    let handle = local_model::ModelHandle::spawn_with(model, 8, limits).unwrap();
    let engine = cascade::cascade::local::LocalEngine::new(handle, LOCAL.into(), 32);
    let mock = mock().await;
    let mut raw = raw_config(&[&mock]);
    raw.policy.aggregate = "mean_logprob".into();
    raw.policy.threshold = Some(-5.0);
    let server = start(raw, Some(engine)).await;
    let body = chat("cascade", EASY, 12);
    let replies = futures::future::join_all(
        (0..16).map(|_| post(&server, "/v1/chat/completions", &body, &[])),
    )
    .await;
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            (r.header("x-cascade-route"), r.header("x-cascade-reason")),
            ("local", "confident"),
            "{:?}",
            r.headers
        );
    }
    assert_eq!(mock.request_count(), 0);
    let metrics = get(&server, "/metrics").await.text;
    assert!(
        metric(&metrics, "cascade_local_batch_size_mean", &[]) > 1.0,
        "the requests ran one at a time: {metrics}"
    );
    // Every sequence has left the batch by the time its answer was sent.
    assert_eq!(
        metric(&metrics, "cascade_local_active_sequences", &[]),
        0.0,
        "{metrics}"
    );
}
