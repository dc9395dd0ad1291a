//! The model thread: bounded queue, busy answers, cancellation, time budget.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::mpsc;
use std::time::Duration;

use local_model::{
    Control, GenerateRequest, GenerationParams, LoadOptions, LocalModel, ModelHandle, Prompt,
    WorkerError,
};

fn tiny_handle(queue_depth: usize) -> (tempfile::TempDir, ModelHandle) {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_phi(dir.path());
    let model = LocalModel::load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    (dir, ModelHandle::spawn(model, queue_depth).unwrap())
}

fn params(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        ignore_eos: true,
        ..GenerationParams::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_busy_at_once_and_reports_queue_wait() {
    let (_dir, handle) = tiny_handle(1);
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    // The first request blocks the model thread until released.
    let mut blocking = GenerateRequest::new(Prompt::Text("abc".into()), params(3));
    let mut signalled = false;
    blocking.on_token = Some(Box::new(move |_| {
        if !signalled {
            signalled = true;
            let _ = started_tx.send(());
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(30));
        }
        Control::Continue
    }));
    let h1 = handle.clone();
    let first = tokio::spawn(async move { h1.generate(blocking).await });
    tokio::task::spawn_blocking(move || started_rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();
    // Second waits in the queue (capacity 1).
    let h2 = handle.clone();
    let second = tokio::spawn(async move {
        h2.generate(GenerateRequest::new(Prompt::Text("abc".into()), params(2)))
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(handle.in_flight(), 2);
    // Third finds the queue full.
    let third = handle
        .generate(GenerateRequest::new(Prompt::Text("abc".into()), params(2)))
        .await;
    assert!(matches!(third, Err(WorkerError::Busy { .. })), "{third:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    release_tx.send(()).unwrap();
    let first = first.await.unwrap().unwrap();
    let second = second.await.unwrap().unwrap();
    assert_eq!(first.generation.tokens.len(), 3);
    assert!(
        second.generation.timings.queue_ms >= 100.0,
        "queue wait {} ms",
        second.generation.timings.queue_ms
    );
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_budget_stops_generation_and_is_reported() {
    let (_dir, handle) = tiny_handle(4);
    let mut request = GenerateRequest::new(Prompt::Text("abc".into()), params(100));
    request.time_budget = Some(Duration::from_millis(30));
    request.on_token = Some(Box::new(|_| {
        std::thread::sleep(Duration::from_millis(10));
        Control::Continue
    }));
    let out = handle.generate(request).await.unwrap();
    assert!(out.timed_out);
    assert!(out.generation.tokens.len() < 100);
    assert_eq!(
        out.generation.finish_reason,
        local_model::FinishReason::Aborted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_caller_stops_generation() {
    let (_dir, handle) = tiny_handle(4);
    let (count_tx, count_rx) = mpsc::channel::<usize>();
    let mut request = GenerateRequest::new(Prompt::Text("abc".into()), params(100));
    request.on_token = Some(Box::new(move |e| {
        let _ = count_tx.send(e.tokens_so_far.len());
        std::thread::sleep(Duration::from_millis(5));
        Control::Continue
    }));
    let h = handle.clone();
    let task = tokio::spawn(async move { h.generate(request).await });
    tokio::time::sleep(Duration::from_millis(40)).await;
    task.abort();
    let _ = task.await;
    // Wait for the worker to finish, then count the tokens it produced.
    for _ in 0..100 {
        if handle.in_flight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(handle.in_flight(), 0);
    let produced = count_rx.try_iter().last().unwrap_or(0);
    assert!(
        produced < 100,
        "generation ran to the end after the caller left"
    );
}
