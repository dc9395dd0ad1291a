//! Soak load for the gateway: an open loop at a steady rate of mixed traffic (easy capital
//! questions and hard MT-Bench prompts, alternating), for a fixed time, reporting
//! throughput, latency percentiles by route, errors, and the gateway's resident memory
//! sampled over the run.
//!
//! `cascade-soak --url BASE --pid PID --data DIR [--rate 2] [--seconds 180] [--max-tokens 32]`
//! prints one JSON object. `DIR` is the shared data folder (`capitals/capitals-dev.jsonl`,
//! `chat_prompts/mt_bench_question.jsonl`). Requests are bounded: `rate * seconds` in all,
//! each with a 120 s timeout, all to `BASE` (a loopback address).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Args {
    url: String,
    pid: u32,
    data: String,
    rate: f64,
    seconds: f64,
    max_tokens: u64,
}

fn usage() -> ! {
    eprintln!("usage: cascade-soak --url BASE --pid PID --data DIR [--rate 2] [--seconds 180] [--max-tokens 32]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        url: String::new(),
        pid: 0,
        data: String::new(),
        rate: 2.0,
        seconds: 180.0,
        max_tokens: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        let bad = |_| usage();
        match flag.as_str() {
            "--url" => a.url = v,
            "--pid" => a.pid = v.parse().unwrap_or_else(bad),
            "--data" => a.data = v,
            "--rate" => a.rate = v.parse().unwrap_or_else(|_| usage()),
            "--seconds" => a.seconds = v.parse().unwrap_or_else(|_| usage()),
            "--max-tokens" => a.max_tokens = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    // Written so that NaN is refused too.
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if a.url.is_empty() || a.data.is_empty() || !positive(a.rate) || !positive(a.seconds) {
        usage()
    }
    a
}

/// Easy questions (capitals) and hard ones (MT-Bench first turns), alternated.
fn prompts(dir: &str) -> Vec<String> {
    let read = |path: String| {
        std::fs::read_to_string(&path).unwrap_or_else(|e| {
            eprintln!("cannot read {path}: {e}");
            std::process::exit(1)
        })
    };
    let easy: Vec<String> = read(format!("{dir}/capitals/capitals-dev.jsonl"))
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["country"].as_str().map(str::to_string))
        .map(|c| format!("What is the capital of {c}? Answer with the city name only."))
        .collect();
    let hard: Vec<String> = read(format!("{dir}/chat_prompts/mt_bench_question.jsonl"))
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["turns"][0].as_str().map(str::to_string))
        .collect();
    easy.iter()
        .zip(hard.iter().cycle())
        .flat_map(|(e, h)| [e.clone(), h.clone()])
        .collect()
}

/// Resident set size of a process in KiB, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let prompts = prompts(&args.data);
    if prompts.is_empty() {
        eprintln!("no prompts found under {}", args.data);
        std::process::exit(1);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap_or_else(|e| {
            eprintln!("cannot build the HTTP client: {e}");
            std::process::exit(1)
        });
    // route -> latencies in ms; "error" collects failures by status.
    let latencies: Arc<Mutex<BTreeMap<String, Vec<f64>>>> = Arc::default();
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let total = (args.rate * args.seconds).round().max(1.0) as usize;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let started = Instant::now();
    let mut rss = vec![(0.0, rss_kib(args.pid))];
    let mut next_sample = Duration::from_secs(10);
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = interval * i as u32;
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        if started.elapsed() >= next_sample {
            rss.push((started.elapsed().as_secs_f64(), rss_kib(args.pid)));
            next_sample += Duration::from_secs(10);
        }
        let body = json!({"model": "cascade", "max_tokens": args.max_tokens,
                          "messages": [{"role": "user", "content": prompts[i % prompts.len()]}]});
        let (client, url) = (client.clone(), format!("{}/v1/chat/completions", args.url));
        let (latencies, errors) = (Arc::clone(&latencies), Arc::clone(&errors));
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let outcome = match client.post(url).json(&body).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let route = r
                        .headers()
                        .get("x-cascade-route")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("none")
                        .to_string();
                    match r.bytes().await {
                        Ok(_) if status == 200 => Ok(route),
                        Ok(_) => Err(status.to_string()),
                        Err(_) => Err("body".to_string()),
                    }
                }
                Err(e) if e.is_timeout() => Err("timeout".into()),
                Err(_) => Err("connect".into()),
            };
            let ms = sent.elapsed().as_secs_f64() * 1000.0;
            match outcome {
                Ok(route) => {
                    if let Ok(mut l) = latencies.lock() {
                        l.entry(route).or_default().push(ms);
                    }
                }
                Err(kind) => {
                    if let Ok(mut e) = errors.lock() {
                        *e.entry(kind).or_default() += 1;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    rss.push((elapsed, rss_kib(args.pid)));
    let latencies = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    let errors = errors.lock().map(|e| e.clone()).unwrap_or_default();
    let ok: usize = latencies.values().map(Vec::len).sum();
    let by_route: BTreeMap<String, Value> = latencies
        .into_iter()
        .map(|(route, mut ms)| {
            ms.sort_by(f64::total_cmp);
            let stats = json!({
                "requests": ms.len(),
                "p50_ms": percentile(&ms, 0.5),
                "p90_ms": percentile(&ms, 0.9),
                "p99_ms": percentile(&ms, 0.99),
                "max_ms": ms.last().copied().unwrap_or(f64::NAN),
            });
            (route, stats)
        })
        .collect();
    let report = json!({
        "offered_rate_per_s": args.rate,
        "requests": total,
        "ok": ok,
        "errors": errors,
        "seconds": elapsed,
        "throughput_per_s": ok as f64 / elapsed,
        "by_route": by_route,
        "rss_kib": rss.iter().map(|(t, kib)| json!({"t_s": t, "kib": kib})).collect::<Vec<_>>(),
    });
    println!("{report}");
}
