//! A small closed-loop HTTP load generator for the gateway benchmark:
//! `concurrency` workers each send one request after another for
//! `duration`, over kept-alive connections, and the latencies are reported.
//!
//! `cascade-loadgen --url URL --body JSON [--concurrency 8] [--seconds 10] [--warmup-seconds 2]`
//! prints one JSON object: requests, errors, rps, p50/p90/p99/p999/max in ms.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

struct Args {
    url: String,
    body: String,
    concurrency: usize,
    seconds: f64,
    warmup_seconds: f64,
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
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
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

/// Runs workers until `until`; returns latencies (µs) and the error count.
async fn run(client: &reqwest::Client, args: &Arc<Args>, until: Instant) -> (Vec<u64>, usize) {
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let client = client.clone();
        let args = Arc::clone(args);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            while Instant::now() < until {
                let started = Instant::now();
                let ok = match client
                    .post(&args.url)
                    .header("content-type", "application/json")
                    .body(args.body.clone())
                    .send()
                    .await
                {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    latencies.push(started.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    (all, errors)
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
        let (mut latencies, errors) = run(
            &client,
            &args,
            started + Duration::from_secs_f64(args.seconds),
        )
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort_unstable();
        let out = json!({
            "concurrency": args.concurrency,
            "requests": latencies.len(),
            "errors": errors,
            "seconds": elapsed,
            "rps": latencies.len() as f64 / elapsed,
            "p50_ms": percentile(&latencies, 0.50),
            "p90_ms": percentile(&latencies, 0.90),
            "p99_ms": percentile(&latencies, 0.99),
            "p999_ms": percentile(&latencies, 0.999),
            "max_ms": latencies.last().map_or(0.0, |&m| m as f64 / 1000.0),
        });
        println!("{out}");
        Ok(())
    })
}
