//! Speed measurements of a loaded model: prefill and decode tokens per
//! second over several runs, and peak resident memory.

use serde::Serialize;

use crate::error::GenerateError;
use crate::generate::{Control, GenerationParams, Prompt};
use crate::model::LocalModel;

/// One timed generation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BenchRun {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
}

/// Medians over all runs, and memory.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub runs: Vec<BenchRun>,
    pub median_prefill_tokens_per_second: f64,
    pub median_decode_tokens_per_second: f64,
    /// Peak resident set of the process, in MiB (Linux only).
    pub peak_rss_mib: Option<f64>,
}

/// A prompt of roughly `tokens` tokens made of plain English text.
pub fn synthetic_prompt(model: &LocalModel, tokens: usize) -> Result<String, GenerateError> {
    const SENTENCE: &str = "The quick brown fox jumps over the lazy dog near the river bank. ";
    let mut text = String::new();
    loop {
        text.push_str(SENTENCE);
        let n = model.encoder().encode(&Prompt::Text(text.clone()))?.len();
        if n >= tokens {
            return Ok(text);
        }
    }
}

/// Runs `runs` generations of `decode_tokens` tokens on `prompt`,
/// ignoring end-of-sequence so every run decodes the same number.
pub fn run(
    model: &mut LocalModel,
    prompt: &str,
    decode_tokens: usize,
    runs: usize,
) -> Result<BenchReport, GenerateError> {
    let params = GenerationParams {
        max_tokens: decode_tokens,
        ignore_eos: true,
        ..GenerationParams::default()
    };
    let mut results = Vec::with_capacity(runs);
    for _ in 0..runs {
        // Time the whole prompt every run, not a cached prefix.
        model.clear_cache();
        let generation = model.generate(&Prompt::Text(prompt.to_string()), &params, &mut |_| {
            Control::Continue
        })?;
        let generated = generation.tokens.len();
        let prefill_s = generation.timings.prefill_ms / 1000.0;
        let decode_s = generation.timings.decode_ms / 1000.0;
        results.push(BenchRun {
            prompt_tokens: generation.usage.prompt_tokens,
            generated_tokens: generated,
            prefill_tokens_per_second: rate(generation.usage.prompt_tokens, prefill_s),
            // The first token comes from the prefill's logits; the decode
            // phase runs one forward pass per further token.
            decode_tokens_per_second: rate(generated.saturating_sub(1), decode_s),
        });
    }
    Ok(BenchReport {
        median_prefill_tokens_per_second: median(
            results.iter().map(|r| r.prefill_tokens_per_second),
        ),
        median_decode_tokens_per_second: median(results.iter().map(|r| r.decode_tokens_per_second)),
        runs: results,
        peak_rss_mib: peak_rss_mib(),
    })
}

fn rate(tokens: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        tokens as f64 / seconds
    } else {
        0.0
    }
}

/// Median of the values (mean of the middle two for an even count).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Peak resident set size from `/proc/self/status` (`VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    proc_status_kib("VmHWM:").map(|kib| kib as f64 / 1024.0)
}

/// Current resident set size from `/proc/self/status` (`VmRSS`).
pub fn current_rss_mib() -> Option<f64> {
    proc_status_kib("VmRSS:").map(|kib| kib as f64 / 1024.0)
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
