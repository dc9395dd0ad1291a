//! A small closed-loop HTTP load generator for the gateway benchmark:
//! `concurrency` workers each send one request after another for
//! `duration`, over kept-alive connections, and the latencies are reported.
//!
//! `cascade-loadgen --url URL --body JSON [--concurrency 8] [--seconds 10] [--warmup-seconds 2] [--stream]`
//! prints one JSON object: requests, errors, rps, p50/p90/p99/p999/max in ms, and for
//! OpenAI-style completions the generated tokens (`usage.completion_tokens`, else one per
//! streamed content chunk) with their aggregate rate. With `--stream` (the body should ask for
//! a stream) it also reports the time to the first content chunk, p50/p99.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

struct Args {
    url: String,
    body: String,
    concurrency: usize,
    seconds: f64,
    warmup_seconds: f64,
    stream: bool,
}

/// One answered request.
struct Outcome {
    latency_us: u64,
    /// Time to the first streamed content chunk.
    first_token_us: Option<u64>,
    completion_tokens: u64,
}

fn usage() -> ! {
    eprintln!("usage: cascade-loadgen --url URL --body JSON [--concurrency 8] [--seconds 10] [--warmup-seconds 2]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        url: String::new(),
        body: String::new(),
        concurrency: 8,
        seconds: 10.0,
        warmup_seconds: 2.0,
        stream: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--stream" {
            a.stream = true;
            continue;
        }
        let v = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--url" => a.url = v,
            "--body" => a.body = v,
            "--concurrency" => a.concurrency = v.parse().unwrap_or_else(|_| usage()),
            "--seconds" => a.seconds = v.parse().unwrap_or_else(|_| usage()),
            "--warmup-seconds" => a.warmup_seconds = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    if a.url.is_empty() || a.concurrency == 0 {
        usage()
    }
    a
}

/// `usage.completion_tokens` of a completion (or of a stream's last chunk).
fn usage_tokens(value: &serde_json::Value) -> Option<u64> {
    value.get("usage")?.get("completion_tokens")?.as_u64()
}

/// Whether a stream chunk carries generated text.
fn has_content(value: &serde_json::Value) -> bool {
    value
        .get("choices")
        .and_then(|c| c.get(0))
        .and_then(|c| c.get("delta").or(Some(c)))
        .and_then(|d| d.get("content").or_else(|| d.get("text")))
        .and_then(serde_json::Value::as_str)
        .is_some_and(|t| !t.is_empty())
}

/// Sends one request and reads its whole answer; `None` when it failed.
///
/// A request that fails before any response arrived is sent once more on a new connection:
/// some servers (llama.cpp's, after five requests) close a kept-alive connection that the
/// client's pool still holds, and the failure is the pool's, not the server's. `retried`
/// counts those.
async fn send(client: &reqwest::Client, args: &Args, retried: &mut usize) -> Option<Outcome> {
    let started = Instant::now();
    let post = || {
        client
            .post(&args.url)
            .header("content-type", "application/json")
            .body(args.body.clone())
            .send()
    };
    let mut response = match post().await {
        Ok(response) => response,
        Err(_) => {
            *retried += 1;
            post().await.ok()?
        }
    };
    if !response.status().is_success() {
        return None;
    }
    let mut first_token_us = None;
    let mut body = Vec::new();
    let mut content_chunks = 0u64;
    let mut usage = None;
    let mut line_start = 0;
    while let Some(chunk) = response.chunk().await.ok()? {
        body.extend_from_slice(&chunk);
        if !args.stream {
            continue;
        }
        // Server-sent events: look at each complete `data:` line as it arrives.
        while let Some(end) = body[line_start..].iter().position(|&b| b == b'\n') {
            let line = &body[line_start..line_start + end];
            line_start += end + 1;
            let Some(data) = line.strip_prefix(b"data: ") else {
                continue;
            };
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
                continue;
            };
            if has_content(&value) {
                content_chunks += 1;
                first_token_us.get_or_insert(started.elapsed().as_micros() as u64);
            }
            usage = usage_tokens(&value).or(usage);
        }
    }
    let completion_tokens = if args.stream {
        usage.unwrap_or(content_chunks)
    } else {
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .as_ref()
            .and_then(usage_tokens)
            .unwrap_or(0)
    };
    Some(Outcome {
        latency_us: started.elapsed().as_micros() as u64,
        first_token_us,
        completion_tokens,
    })
}

/// Runs workers until `until`; returns what each answered request took, the error count and
/// the requests sent again on a new connection.
async fn run(
    client: &reqwest::Client,
    args: &Arc<Args>,
    until: Instant,
) -> (Vec<Outcome>, usize, usize) {
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let client = client.clone();
        let args = Arc::clone(args);
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut errors = 0usize;
            let mut retried = 0usize;
            while Instant::now() < until {
                match send(&client, &args, &mut retried).await {
                    Some(outcome) => outcomes.push(outcome),
                    None => errors += 1,
                }
            }
            (outcomes, errors, retried)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut retried = 0;
    for t in tasks {
        if let Ok((l, e, r)) = t.await {
            all.extend(l);
            errors += e;
            retried += r;
        }
    }
    (all, errors, retried)
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[rank] as f64 / 1000.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Arc::new(parse_args());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(args.concurrency)
            .build()?;
        let warm_until = Instant::now() + Duration::from_secs_f64(args.warmup_seconds);
        run(&client, &args, warm_until).await;
        let started = Instant::now();
        let (outcomes, errors, retried) = run(
            &client,
            &args,
            started + Duration::from_secs_f64(args.seconds),
        )
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        let mut latencies: Vec<u64> = outcomes.iter().map(|o| o.latency_us).collect();
        latencies.sort_unstable();
        let mut first_tokens: Vec<u64> = outcomes.iter().filter_map(|o| o.first_token_us).collect();
        first_tokens.sort_unstable();
        let tokens: u64 = outcomes.iter().map(|o| o.completion_tokens).sum();
        let out = json!({
            "concurrency": args.concurrency,
            "requests": latencies.len(),
            "errors": errors,
            "retried_on_new_connection": retried,
            "seconds": elapsed,
            "rps": latencies.len() as f64 / elapsed,
            "p50_ms": percentile(&latencies, 0.50),
            "p90_ms": percentile(&latencies, 0.90),
            "p99_ms": percentile(&latencies, 0.99),
            "p999_ms": percentile(&latencies, 0.999),
            "max_ms": latencies.last().map_or(0.0, |&m| m as f64 / 1000.0),
            "completion_tokens": tokens,
            "tokens_per_second": tokens as f64 / elapsed,
            "ttft_p50_ms": percentile(&first_tokens, 0.50),
            "ttft_p99_ms": percentile(&first_tokens, 0.99),
        });
        println!("{out}");
        Ok(())
    })
}
