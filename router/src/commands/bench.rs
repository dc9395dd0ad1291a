//! `cascade bench`: load time, prefill and decode speed, peak memory.

use std::time::Instant;

use local_model::{bench, Kernels};

use crate::cli::BenchArgs;

/// Runs the benchmark and prints the report, medians first.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let kernels: Kernels = args.model.load.kernels.parse()?;
    let started = Instant::now();
    let mut model = super::load_model(&args.model)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let prompt = bench::synthetic_prompt(&model, args.prompt_tokens)?;
    // One untimed run: candle repacks some weight formats on first use.
    bench::run(&mut model, &prompt, args.decode_tokens.min(8), 1)?;
    let report = bench::run(&mut model, &prompt, args.decode_tokens, args.runs.max(1))?;
    let info = model.info();
    if args.json {
        let out = serde_json::json!({
            "model": info.name,
            "architecture": info.architecture,
            "threads": candle_threads(),
            "kernel_path": kernel_path(kernels),
            "load_seconds": load_seconds,
            "prefill_copy_mib": model.prefill_copy_bytes() as f64 / (1024.0 * 1024.0),
            "report": report,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "model            {} ({})",
        info.name,
        info.architecture.as_str()
    );
    println!("threads          {}", candle_threads());
    println!("kernels          {}", kernel_path(kernels));
    println!("load time        {load_seconds:.2} s");
    println!(
        "prefill          {:.1} tok/s (median of {}, {} prompt tokens)",
        report.median_prefill_tokens_per_second,
        report.runs.len(),
        report.runs.first().map(|r| r.prompt_tokens).unwrap_or(0)
    );
    println!(
        "decode           {:.1} tok/s (median of {}, {} tokens per run)",
        report.median_decode_tokens_per_second,
        report.runs.len(),
        report.runs.first().map(|r| r.generated_tokens).unwrap_or(0)
    );
    println!(
        "prefill copy     {:.0} MiB (dense weights kept for prefill; 0 = none)",
        model.prefill_copy_bytes() as f64 / (1024.0 * 1024.0)
    );
    match report.peak_rss_mib {
        Some(mib) => println!("peak memory      {mib:.0} MiB resident"),
        None => println!("peak memory      unavailable on this platform"),
    }
    for (i, r) in report.runs.iter().enumerate() {
        println!(
            "  run {}: prefill {:.1} tok/s, decode {:.1} tok/s",
            i + 1,
            r.prefill_tokens_per_second,
            r.decode_tokens_per_second
        );
    }
    Ok(())
}

/// The code the products run on: for `--kernels tuned`, the CPU's path per
/// format (after `CASCADE_NO_AVX512`, `CASCADE_NO_VNNI`, `CASCADE_AMX`).
fn kernel_path(kernels: Kernels) -> String {
    match kernels {
        Kernels::Tuned => format!("tuned: {}", local_model::engine::kernels::describe_paths()),
        Kernels::Reference => "reference: candle's model code and kernels".into(),
        Kernels::Exact => "exact: F32 products on the dequantised weights".into(),
    }
}

fn candle_threads() -> usize {
    candle_core::utils::get_num_threads()
}
