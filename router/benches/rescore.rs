//! Times re-scoring a saved run of 10,000 synthetic items (no model): reading the JSONL,
//! every confidence rule, AUROC and deferral curves, the learned rule's cross-validation and
//! the summary; the plots separately. Prints the median of 5 repetitions under `cargo bench`
//! (which passes `--bench`); `cargo test --all-targets` runs it once as a smoke test.
//!
//! `cargo bench -p cascade --bench rescore`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::io::Write;
use std::time::{Duration, Instant};

use cascade::commands::eval::deferral_chart;
use cascade::eval::datasets::SplitMix64;
use cascade::eval::plot::write_chart;
use cascade::eval::record::{read_records, write_record, EvalRecord, SavedToken};
use cascade::eval::report::{evaluate, Settings};

const ITEMS: usize = 10_000;

fn unit(rng: &mut SplitMix64) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32
}

/// Answers of 4 to 40 tokens; harder items have lower log-probs and are more often wrong.
fn synthetic_run(path: &std::path::Path) {
    let mut rng = SplitMix64(7);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..ITEMS {
        let difficulty = unit(&mut rng);
        let len = 4 + (rng.next_u64() % 37) as usize;
        let tokens = (0..len)
            .map(|t| {
                let lp = -(difficulty * 3.0 * unit(&mut rng).powi(2));
                SavedToken {
                    id: t as u32,
                    text: format!("t{t}"),
                    logprob: lp,
                    entropy: -lp * 1.5,
                    margin: lp.exp(),
                }
            })
            .collect();
        let record = EvalRecord {
            id: i.to_string(),
            dataset: "synthetic".into(),
            prompt: "What is the capital of Somewhere? Answer with the city name only.".into(),
            output: "The capital is Somewhere City.".into(),
            correct: Some(unit(&mut rng) > difficulty),
            grader: None,
            tokens,
            prompt_tokens: 40,
            finish_reason: "stop".into(),
            elapsed_ms: 100.0,
        };
        write_record(&mut out, &record).unwrap();
    }
    out.flush().unwrap();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run.jsonl");
    synthetic_run(&run);
    let size = std::fs::metadata(&run).unwrap().len();
    let mut scoring = Vec::new();
    let mut plotting = Vec::new();
    let repetitions = if std::env::args().any(|a| a == "--bench") {
        5
    } else {
        1
    };
    for _ in 0..repetitions {
        let started = Instant::now();
        let records = read_records(&run).unwrap();
        let evaluation = evaluate(&records, &Settings::default(), "bench").unwrap();
        scoring.push(started.elapsed());
        let started = Instant::now();
        write_chart(&deferral_chart(&evaluation), &dir.path().join("deferral")).unwrap();
        plotting.push(started.elapsed());
        assert_eq!(evaluation.summary.items, ITEMS);
    }
    println!(
        "rescore {ITEMS} items ({:.1} MB JSONL, {} rules incl. learned 5-fold CV): median {:.0} ms; plots (SVG + PNG) median {:.0} ms",
        size as f64 / 1e6,
        cascade::eval::scoring::standard_aggregates().len() + 1,
        median(scoring).as_secs_f64() * 1000.0,
        median(plotting).as_secs_f64() * 1000.0
    );
}
