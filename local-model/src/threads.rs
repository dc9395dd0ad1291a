//! The compute thread count, settled once per process.

/// Fixes candle's compute thread count for the life of the process.
///
/// candle asks for its thread count on every dense matrix product (in
/// decoding: two per layer per token, for attention) and, unless
/// `RAYON_NUM_THREADS` is set, works it out afresh each time by reading
/// `/proc/cpuinfo`. On SmolLM2 that cost 17% of decode speed (53.6 against
/// 64.6 tok/s, docs/benchmarks.md). Working it out once and setting the
/// variable gives the same count without the cost; a count the user set is
/// kept. Call it at start-up, before any other thread exists: the
/// environment is process-wide.
pub fn settle_thread_count() -> usize {
    if let Some(n) = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    let n = candle_core::utils::get_num_threads();
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}
