//! Continuous batching in the model thread, on the real SmolLM2 model: a
//! request gets the same answer alone and beside others, each request ends
//! on its own, and the KV budget bounds the batch.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use local_model::{
    BatchLimits, ChatMessage, Control, FinishReason, GenerateRequest, Generation, GenerationParams,
    LoadOptions, LocalModel, ModelHandle, Prompt,
};

fn load() -> LocalModel {
    let path = common::smollm2_path();
    LocalModel::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

fn chat(question: &str) -> Prompt {
    Prompt::Chat(vec![ChatMessage::new("user", question)])
}

fn params(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        ignore_eos: true,
        ..GenerationParams::default()
    }
}

/// Each prompt generated alone, on the model before it goes to a worker.
fn alone(model: &mut LocalModel, requests: &[(Prompt, GenerationParams)]) -> Vec<Generation> {
    requests
        .iter()
        .map(|(prompt, params)| {
            model
                .generate(prompt, params, &mut |_| Control::Continue)
                .unwrap()
        })
        .collect()
}

/// Greedy tokens identical; log-probs within 1e-4 nats.
fn assert_same(got: &Generation, want: &Generation, what: &str) {
    let ids = |g: &Generation| g.tokens.iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(got), ids(want), "{what}: tokens differ");
    for (i, (a, b)) in got.tokens.iter().zip(&want.tokens).enumerate() {
        assert!(
            (a.logprob - b.logprob).abs() <= 1e-4,
            "{what}: token {i} log-prob {} against {} alone",
            a.logprob,
            b.logprob
        );
    }
    assert_eq!(got.text, want.text, "{what}");
    assert_eq!(got.finish_reason, want.finish_reason, "{what}");
    assert_same_probe(got, want, what);
}

/// The hidden-state probe's features: present on the tuned engine, and the same alone and
/// batched up to the summation order of the batched products (1e-3 of the vector's largest
/// value; the values reach tens to hundreds in the middle of the residual stream).
fn assert_same_probe(got: &Generation, want: &Generation, what: &str) {
    assert!(
        got.probe.is_some() && want.probe.is_some(),
        "{what}: no probe features ({} against {})",
        got.probe.is_some(),
        want.probe.is_some()
    );
    let (got, want) = (got.probe.as_ref().unwrap(), want.probe.as_ref().unwrap());
    for (name, a, b) in [
        ("final_mean", &got.final_mean, &want.final_mean),
        ("final_last", &got.final_last, &want.final_last),
        ("middle_mean", &got.middle_mean, &want.middle_mean),
        ("middle_last", &got.middle_last, &want.middle_last),
    ] {
        assert_eq!(a.len(), b.len(), "{what}: {name} width");
        assert!(!a.is_empty(), "{what}: {name} empty");
        let largest = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= 1e-3 * largest.max(1.0),
            "{what}: {name} differs by {worst} (largest value {largest})"
        );
    }
}

/// A request whose first token holds the model thread until `release`
/// fires: the requests sent meanwhile all join the batch at the next step.
fn gate(prompt: Prompt, params: GenerationParams) -> (GenerateRequest, mpsc::Sender<()>) {
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let mut request = GenerateRequest::new(prompt, params);
    let mut held = false;
    request.on_token = Some(Box::new(move |_| {
        if !held {
            held = true;
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(60));
        }
        Control::Continue
    }));
    (request, release_tx)
}

/// Sends `first` (held on its first token for 200 ms, see [`gate`]) and
/// then each of `rest`, in order, and returns the answers in that order:
/// every request of `rest` is queued before `first` lets the model go on.
async fn together(
    handle: &ModelHandle,
    first: &(Prompt, GenerationParams),
    rest: Vec<GenerateRequest>,
) -> Vec<Result<local_model::WorkerOutput, local_model::WorkerError>> {
    let (first, release) = gate(first.0.clone(), first.1.clone());
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        release.send(()).unwrap();
    });
    let mut tasks = Vec::new();
    for request in std::iter::once(first).chain(rest) {
        let h = handle.clone();
        tasks.push(tokio::spawn(async move { h.generate(request).await }));
        // Keep the arrival order, so the batch order is known.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    releaser.await.unwrap();
    out
}

/// Plain requests of the given prompts and parameters.
fn plain(requests: &[(Prompt, GenerationParams)]) -> Vec<GenerateRequest> {
    requests
        .iter()
        .map(|(prompt, params)| GenerateRequest::new(prompt.clone(), params.clone()))
        .collect()
}

fn questions() -> Vec<Prompt> {
    [
        "What is the capital of France? Answer with the city name only.",
        "Write a haiku about the sea.",
        "List three prime numbers.",
        "Explain in one sentence why the sky is blue, in simple words for a child of six.",
    ]
    .into_iter()
    .map(chat)
    .collect()
}

/// Waits for the worker to have nothing waiting or running, and checks
/// that it gets there.
async fn wait_idle(handle: &ModelHandle) {
    for _ in 0..500 {
        if handle.in_flight() == 0 && handle.active() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(handle.in_flight(), 0, "requests still in flight");
    assert_eq!(handle.active(), 0, "requests still running");
}

/// Runs `requests` alone on the model, alone through a batching worker,
/// then all together, and holds every answer to the first. The requests
/// that join a running one have their prompts run part by part between
/// decode steps.
async fn alone_and_together_agree(
    load: impl Fn() -> LocalModel,
    requests: Vec<(Prompt, GenerationParams)>,
) {
    let mut model = load();
    let want = alone(&mut model, &requests);
    let limits = BatchLimits {
        max_batch: requests.len(),
        kv_cache_mib: 256,
    };
    let handle = ModelHandle::spawn_with(model, 8, limits).unwrap();
    assert_eq!(handle.max_batch(), requests.len());
    // Through the worker one at a time: the batched path with one row.
    for ((prompt, params), want) in requests.iter().zip(&want) {
        let got = handle
            .generate(GenerateRequest::new(prompt.clone(), params.clone()))
            .await
            .unwrap();
        assert_same(&got.generation, want, "alone through the worker");
    }
    assert!((handle.mean_batch_size() - 1.0).abs() < 1e-9);
    wait_idle(&handle).await;
    // All together, on a fresh worker so the batch sizes are theirs.
    let handle = ModelHandle::spawn_with(load(), 8, limits).unwrap();
    let answers = together(&handle, &requests[0], plain(&requests[1..])).await;
    for (i, (answer, want)) in answers.into_iter().zip(&want).enumerate() {
        assert_same(
            &answer.unwrap().generation,
            want,
            &format!("request {i} in a batch"),
        );
    }
    assert!(
        handle.mean_batch_size() > 1.5,
        "the requests did not run together: mean batch {}",
        handle.mean_batch_size()
    );
    wait_idle(&handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_gets_the_same_tokens_and_logprobs_alone_and_in_a_batch() {
    let requests = questions()
        .into_iter()
        .map(|p| {
            (
                p,
                GenerationParams {
                    max_tokens: 24,
                    ..GenerationParams::default()
                },
            )
        })
        .collect();
    alone_and_together_agree(load, requests).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_gets_the_same_answers_alone_and_in_a_batch() {
    let load = || {
        let path = common::gemma3_path();
        LocalModel::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap()
    };
    let requests = questions().into_iter().map(|p| (p, params(20))).collect();
    alone_and_together_agree(load, requests).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phi2_gets_the_same_answers_alone_and_in_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_phi(dir.path());
    let path = common::write_tiny_phi2_gguf_from(
        dir.path(),
        candle_core::quantized::GgmlDType::Q8_0,
        false,
    );
    let load = || LocalModel::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let requests = [
        "abc",
        "hello there",
        "x",
        "a longer prompt of several words",
    ]
    .into_iter()
    .map(|t| (Prompt::Text(t.into()), params(12)))
    .collect();
    alone_and_together_agree(load, requests).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_run_in_small_parts_between_decode_steps_get_the_same_answers() {
    // Parts of 3 and 7 tokens: every prompt that joins the batch runs in several parts, the
    // last of one to seven tokens, interleaved with the others' decode steps and with other
    // prompts' parts; alone, the same prompt runs in the same parts one after another.
    let in_parts = |path: std::path::PathBuf, chunk: usize| {
        move || {
            let options = LoadOptions {
                prefill_chunk_tokens: chunk,
                ..LoadOptions::default()
            };
            LocalModel::load(path.to_str().unwrap(), &options).unwrap()
        }
    };
    // Long enough answers that the first request still decodes while the last prompt runs in.
    let requests: Vec<_> = questions().into_iter().map(|p| (p, params(48))).collect();
    alone_and_together_agree(in_parts(common::smollm2_path(), 3), requests).await;
    let requests: Vec<_> = questions().into_iter().map(|p| (p, params(16))).collect();
    alone_and_together_agree(in_parts(common::gemma3_path(), 7), requests).await;
}

/// SmolLM2 with prompts cut in parts of `chunk` tokens.
fn load_in_parts(chunk: usize) -> LocalModel {
    let path = common::smollm2_path();
    let options = LoadOptions {
        prefill_chunk_tokens: chunk,
        ..LoadOptions::default()
    };
    LocalModel::load(path.to_str().unwrap(), &options).unwrap()
}

/// A worker of four slots on `model`, with a 400-token stream already decoding in it (five
/// tokens picked): the stream's task, and the instant of each of its later tokens.
async fn beside_a_stream(
    model: LocalModel,
) -> (
    ModelHandle,
    tokio::task::JoinHandle<Result<local_model::WorkerOutput, local_model::WorkerError>>,
    mpsc::Receiver<std::time::Instant>,
) {
    let handle = ModelHandle::spawn_with(
        model,
        8,
        BatchLimits {
            max_batch: 4,
            ..BatchLimits::default()
        },
    )
    .unwrap();
    let (token_tx, token_rx) = mpsc::channel::<std::time::Instant>();
    let mut stream = GenerateRequest::new(questions()[3].clone(), params(400));
    stream.on_token = Some(Box::new(move |_| {
        let _ = token_tx.send(std::time::Instant::now());
        Control::Continue
    }));
    let h = handle.clone();
    let streaming = tokio::spawn(async move { h.generate(stream).await });
    let token_rx = tokio::task::spawn_blocking(move || {
        for _ in 0..5 {
            token_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        }
        token_rx
    })
    .await
    .unwrap();
    (handle, streaming, token_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_runs_in_parts_while_a_running_stream_keeps_decoding() {
    let chunk = 64;
    let mut model = load_in_parts(chunk);
    let long_text = ["the river runs past seven green stones"; 80].join(" and ");
    let long = (Prompt::Text(long_text), params(2));
    let prompt_tokens = model.encoder().encode(&long.0).unwrap().len();
    assert!(prompt_tokens > 500, "{prompt_tokens} tokens");
    let want = alone(&mut model, std::slice::from_ref(&long));
    // The running stream reports each token as it is picked.
    let (handle, streaming, token_rx) = beside_a_stream(model).await;
    let sent = std::time::Instant::now();
    let answer = handle
        .generate(GenerateRequest::new(long.0.clone(), long.1.clone()))
        .await
        .unwrap();
    let answered = std::time::Instant::now();
    assert_same(&answer.generation, &want[0], "the long prompt run in parts");
    let meanwhile = token_rx
        .try_iter()
        .filter(|t| *t > sent && *t < answered)
        .count();
    // One part per decode step: the stream picks a token between every two parts. Run in one
    // piece, the prompt would let it pick one or two.
    let parts = prompt_tokens.div_ceil(chunk);
    assert!(
        meanwhile + 2 >= parts,
        "the stream picked {meanwhile} tokens while a prompt of {parts} parts ran in"
    );
    let streamed = streaming.await.unwrap().unwrap();
    assert_eq!(streamed.generation.tokens.len(), 400);
    wait_idle(&handle).await;
}

/// A prompt run in parts between a running stream's decode steps reports as its time to first
/// token (queue plus prefill) the time it waited for its first token, the steps between its
/// parts included: counting only its parts' own work understated it under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_run_in_parts_reports_the_time_to_its_first_token() {
    // Small parts, so the stream's steps between them are a large share of the wait.
    let chunk = 16;
    let model = load_in_parts(chunk);
    let long_text = ["the river runs past seven green stones"; 20].join(" and ");
    let prompt_tokens = model
        .encoder()
        .encode(&Prompt::Text(long_text.clone()))
        .unwrap()
        .len();
    assert!(prompt_tokens > 8 * chunk, "{prompt_tokens} tokens");
    let (handle, streaming, _tokens) = beside_a_stream(model).await;

    let first_token = Arc::new(Mutex::new(None::<std::time::Instant>));
    let mut request = GenerateRequest::new(Prompt::Text(long_text), params(2));
    let seen = first_token.clone();
    request.on_token = Some(Box::new(move |_| {
        seen.lock()
            .unwrap()
            .get_or_insert_with(std::time::Instant::now);
        Control::Continue
    }));
    let sent = std::time::Instant::now();
    let answer = handle.generate(request).await.unwrap();
    let waited = first_token.lock().unwrap().unwrap().duration_since(sent);
    let timings = &answer.generation.timings;
    let reported = Duration::from_secs_f64((timings.queue_ms + timings.prefill_ms) / 1000.0);
    // What lies between the prefill's end and the callback: picking one token.
    assert!(
        reported.as_secs_f64() >= 0.97 * waited.as_secs_f64(),
        "time to first token reported {reported:?} (queue {} ms, prefill {} ms), waited {waited:?}",
        timings.queue_ms,
        timings.prefill_ms
    );
    assert!(
        reported <= waited,
        "reported {reported:?}, waited {waited:?}"
    );
    streaming.abort();
    wait_idle(&handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_end_on_their_own_and_the_others_go_on_unchanged() {
    let mut model = load();
    let prompts = questions();
    // Lengths 3, 30, 12; the fourth stops itself after 5 tokens (early
    // exit) and must not disturb the others.
    let lengths = [3, 30, 12, 30];
    let requests: Vec<(Prompt, GenerationParams)> = prompts
        .iter()
        .zip(lengths)
        .map(|(p, n)| (p.clone(), params(n)))
        .collect();
    let want = alone(&mut model, &requests);
    let handle = ModelHandle::spawn_with(model, 8, BatchLimits::default()).unwrap();
    let mut batch = plain(&requests[1..3]);
    let mut stopper = GenerateRequest::new(requests[3].0.clone(), requests[3].1.clone());
    stopper.on_token = Some(Box::new(|event| {
        if event.tokens_so_far.len() >= 5 {
            Control::Stop
        } else {
            Control::Continue
        }
    }));
    batch.push(stopper);
    let answers: Vec<Generation> = together(&handle, &requests[0], batch)
        .await
        .into_iter()
        .map(|a| a.unwrap().generation)
        .collect();
    for i in 0..3 {
        assert_eq!(answers[i].finish_reason, FinishReason::Length);
        assert_eq!(answers[i].tokens.len(), lengths[i]);
        assert_same(&answers[i], &want[i], &format!("request {i}"));
    }
    assert_eq!(answers[3].finish_reason, FinishReason::Aborted);
    assert_eq!(answers[3].tokens.len(), 5);
    assert_eq!(
        answers[3].tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
        want[3].tokens[..5].iter().map(|t| t.id).collect::<Vec<_>>()
    );
    wait_idle(&handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_batch_frees_its_slot_and_the_others_finish() {
    let mut model = load();
    let prompts = questions();
    let requests: Vec<(Prompt, GenerationParams)> =
        prompts.iter().map(|p| (p.clone(), params(40))).collect();
    let want = alone(&mut model, &requests[..2]);
    let handle = ModelHandle::spawn_with(model, 8, BatchLimits::default()).unwrap();
    // The leaving request reports each token it sees.
    let (seen_tx, seen_rx) = mpsc::channel::<usize>();
    let mut leaving = GenerateRequest::new(requests[2].0.clone(), requests[2].1.clone());
    leaving.on_token = Some(Box::new(move |event| {
        let _ = seen_tx.send(event.tokens_so_far.len());
        Control::Continue
    }));
    // The others are slowed down so that the leaving one is cancelled
    // while they still run.
    let slow = |(prompt, params): &(Prompt, GenerationParams)| {
        let mut r = GenerateRequest::new(prompt.clone(), params.clone());
        r.on_token = Some(Box::new(|_| {
            std::thread::sleep(Duration::from_millis(5));
            Control::Continue
        }));
        r
    };
    let mut tasks = Vec::new();
    for request in [slow(&requests[0]), slow(&requests[1])] {
        let h = handle.clone();
        tasks.push(tokio::spawn(async move { h.generate(request).await }));
    }
    let h = handle.clone();
    let gone = tokio::spawn(async move { h.generate(leaving).await });
    // Leave after a few tokens.
    let seen = tokio::task::spawn_blocking(move || {
        let mut last = 0;
        while last < 3 {
            last = seen_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        }
        seen_rx
    })
    .await
    .unwrap();
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    for (task, want) in tasks.into_iter().zip(&want) {
        let got = task.await.unwrap().unwrap();
        assert_same(&got.generation, want, "a request beside the cancelled one");
    }
    wait_idle(&handle).await;
    let produced = seen.try_iter().last().unwrap_or(0);
    assert!(
        produced < 40,
        "the cancelled request ran to its end ({produced} tokens)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_kv_budget_makes_requests_wait_instead_of_joining() {
    let mut model = load();
    let prompts = questions();
    let requests: Vec<(Prompt, GenerationParams)> =
        prompts.iter().map(|p| (p.clone(), params(16))).collect();
    let want = alone(&mut model, &requests);
    // SmolLM2 Q4_1 holds its cache in F16: 30 layers x 2 x 3 kv heads x
    // 64 x 2 bytes = 22.5 KiB per position; each of these requests takes
    // one 256-position step of cache (5.625 MiB), so 6 MiB holds one of
    // them and 12 MiB two.
    for (mib, most) in [(6, 1.0), (12, 2.0)] {
        let handle = ModelHandle::spawn_with(
            load(),
            8,
            BatchLimits {
                max_batch: 8,
                kv_cache_mib: mib,
            },
        )
        .unwrap();
        let answers = together(&handle, &requests[0], plain(&requests[1..])).await;
        for (i, (answer, want)) in answers.into_iter().zip(&want).enumerate() {
            assert_same(
                &answer.unwrap().generation,
                want,
                &format!("{mib} MiB: request {i}"),
            );
        }
        // At most `most` at a time, and more than one where two fit.
        let mean = handle.mean_batch_size();
        assert!(
            mean <= most && (most == 1.0 || mean > 1.0),
            "{mib} MiB: mean batch {mean}, expected at most {most}"
        );
        wait_idle(&handle).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_arrivals_with_mixed_prompts_are_all_answered() {
    let mut model = load();
    // A small deterministic generator: the test must not depend on a
    // seed that a crate version bump could change.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    let words = [
        "alpha", "river", "seven", "cloud", "stone", "quick", "green",
    ];
    let mut requests = Vec::new();
    for i in 0..14 {
        let len = 1 + next(60) as usize;
        let text: Vec<&str> = (0..len).map(|_| words[next(7) as usize]).collect();
        let mut p = params(1 + next(24) as usize);
        p.ignore_eos = i % 3 == 0;
        if i % 4 == 1 {
            p.stop = vec!["e".into()];
        }
        let prompt = if i % 2 == 0 {
            chat(&text.join(" "))
        } else {
            Prompt::Text(text.join(" "))
        };
        requests.push((prompt, p, next(150)));
    }
    let plain: Vec<(Prompt, GenerationParams)> = requests
        .iter()
        .map(|(p, g, _)| (p.clone(), g.clone()))
        .collect();
    let want = alone(&mut model, &plain);
    let handle = ModelHandle::spawn_with(
        model,
        16,
        BatchLimits {
            max_batch: 5,
            kv_cache_mib: 256,
        },
    )
    .unwrap();
    let answers = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, (prompt, p, delay)) in requests.into_iter().enumerate() {
        let h = handle.clone();
        let answers = Arc::clone(&answers);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let out = h.generate(GenerateRequest::new(prompt, p)).await;
            answers.lock().unwrap().push((i, out));
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut answers = std::mem::take(&mut *answers.lock().unwrap());
    answers.sort_by_key(|(i, _)| *i);
    assert_eq!(answers.len(), want.len(), "every request is answered");
    for ((i, out), want) in answers.into_iter().zip(&want) {
        assert!(out.is_ok(), "request {i}: {:?}", out.err());
        assert_same(&out.unwrap().generation, want, &format!("request {i}"));
    }
    wait_idle(&handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_up_to_the_limit_is_accepted_whatever_the_worker_has_taken_and_one_more_is_not() {
    // `max_batch` running plus `queue_depth` waiting: 4 + 3. The burst is sent in one poll,
    // before the model thread can take many (or any) of them off its channel; the limit is
    // the same either way. The first request holds the model thread on its first token, so
    // nothing finishes before the eighth arrives.
    let handle = ModelHandle::spawn_with(
        load(),
        3,
        BatchLimits {
            max_batch: 4,
            ..BatchLimits::default()
        },
    )
    .unwrap();
    let limit = 7;
    let (first, release) = gate(chat("Name a colour."), params(4));
    let requests = std::iter::once(first)
        .chain((1..limit).map(|_| GenerateRequest::new(chat("Name a colour."), params(4))));
    let burst: Vec<_> = requests
        .map(|request| {
            let handle = handle.clone();
            async move { handle.generate(request).await }
        })
        .collect();
    let answers = tokio::spawn(futures::future::join_all(burst));
    for _ in 0..500 {
        if handle.in_flight() == limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(handle.in_flight(), limit, "the burst was not all accepted");
    let one_more = handle
        .generate(GenerateRequest::new(chat("Name a colour."), params(4)))
        .await;
    assert!(
        matches!(one_more, Err(local_model::WorkerError::Busy { .. })),
        "{one_more:?}"
    );
    release.send(()).unwrap();
    for answer in answers.await.unwrap() {
        assert_eq!(answer.unwrap().generation.tokens.len(), 4);
    }
    wait_idle(&handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_encoded_by_the_caller_is_not_encoded_again_unless_its_tokenizer_differs() {
    let france = chat("What is the capital of France?");
    let japan = chat("What is the capital of Japan?");
    let p = params(6);
    let mut reference = load();
    let want = alone(
        &mut reference,
        &[(france.clone(), p.clone()), (japan.clone(), p.clone())],
    );
    let handle = ModelHandle::spawn(load(), 4).unwrap();
    let run = |prompt: &Prompt, encoded: Option<local_model::EncodedPrompt>| {
        let mut job = GenerateRequest::new(prompt.clone(), p.clone());
        job.encoded = encoded;
        let handle = handle.clone();
        async move { handle.generate(job).await.unwrap().generation }
    };
    // Its own encoding: the same answer as encoding inside the worker.
    let own = handle.encoder().encode_prompt(&france).unwrap();
    assert_eq!(own.len(), want[0].usage.prompt_tokens);
    assert_same(&run(&france, Some(own)).await, &want[0], "pre-encoded");
    // The worker reads the ids it is given, not the prompt: proven by giving it Japan's ids
    // with France's prompt (a caller must not do that; here it shows the encoding is skipped).
    let japan_ids = handle.encoder().encode_prompt(&japan).unwrap();
    assert_same(&run(&france, Some(japan_ids)).await, &want[1], "ids used");
    // Ids from another model's tokenizer (another load) are ignored: France is answered.
    let foreign = reference.encoder().encode_prompt(&japan).unwrap();
    assert_same(
        &run(&france, Some(foreign)).await,
        &want[0],
        "foreign ids ignored",
    );
}
