//! One matrix product on block-quantized weights, Cascade's kernel
//! (`local_model::engine::kernels`) against candle's plain CPU kernel, on
//! the same random weights and activations.
//!
//! ```sh
//! cargo run --release -p local-model --example kernel_bench -- FORMAT ROWS COLS M [REPS] [COPIES]
//! # FORMAT: q8_0, q4_1, q5_0 or q4k; M: activation rows (1 = a decode step);
//! # COPIES: distinct matrices cycled through, so that they stream from
//! # memory as a model's layers do (default 1: the matrix stays in cache).
//! cargo run --release -p local-model --example kernel_bench -- q4_1 3072 576 1 2000 100
//! ```
//!
//! Prints the time per product and the weight bytes read per second, three
//! rounds, and the largest difference between candle's result and ours
//! (they round activations differently). Where the CPU has AVX-512, it
//! times Cascade's AVX2 kernel on the same weights as well; and on every
//! CPU, the AVX2 kernel that unpacks the nibble formats' values on every
//! pass of activation rows instead of once per group (for 8 rows or more).

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use local_model::engine::kernels::GroupedWeights;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: kernel_bench FORMAT(q8_0|q4_1|q5_0|q4k) ROWS COLS M [REPS] [COPIES]";
    let format = match args.first().map(String::as_str) {
        Some("q8_0") => GgmlDType::Q8_0,
        Some("q4_1") => GgmlDType::Q4_1,
        Some("q5_0") => GgmlDType::Q5_0,
        Some("q4k") => GgmlDType::Q4K,
        _ => bail!("{usage}"),
    };
    let number = |i: usize, default: Option<usize>| -> anyhow::Result<usize> {
        match (args.get(i), default) {
            (Some(v), _) => v.parse().with_context(|| format!("{v}: {usage}")),
            (None, Some(d)) => Ok(d),
            (None, None) => bail!("{usage}"),
        }
    };
    let (rows, cols, m) = (number(1, None)?, number(2, None)?, number(3, None)?);
    let (reps, copies) = (number(4, Some(100))?, number(5, Some(1))?.max(1));

    let mut theirs = Vec::with_capacity(copies);
    let mut ours = Vec::with_capacity(copies);
    let mut ours_avx2 = Vec::with_capacity(copies);
    let mut ours_per_pass = Vec::with_capacity(copies);
    for _ in 0..copies {
        let dense = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
        let q = QTensor::quantize(&dense, format)?;
        let QStorage::Cpu(blocks) = QStorage::from_data(q.data()?, &Device::Cpu, format)? else {
            bail!("expected CPU storage")
        };
        theirs.push(blocks);
        let grouped = GroupedWeights::new(format, &q.data()?, rows, cols)?
            .context("this CPU lacks AVX2/FMA: no Cascade kernel to time")?;
        if grouped.uses_avx512() {
            ours_avx2.push(grouped.clone().without_avx512());
        }
        ours_per_pass.push(grouped.clone().without_avx512().without_unpacking());
        ours.push(grouped);
    }
    let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    let gigabytes =
        (rows * cols) as f64 * format.type_size() as f64 / format.block_size() as f64 / 1e9;
    let mut candle_out = vec![0f32; m * rows];
    for round in 0..3 {
        let start = Instant::now();
        for r in 0..reps {
            theirs[r % copies].matmul_t((m, cols, rows), &x, &mut candle_out)?;
        }
        let candle = start.elapsed().as_secs_f64() / reps as f64;
        let start = Instant::now();
        let mut cascade_out = Vec::new();
        for r in 0..reps {
            cascade_out = ours[r % copies].matmul(&x)?;
        }
        let cascade = start.elapsed().as_secs_f64() / reps as f64;
        let diff = candle_out
            .iter()
            .zip(&cascade_out)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let avx2 = if ours_avx2.is_empty() {
            String::new()
        } else {
            let start = Instant::now();
            for r in 0..reps {
                ours_avx2[r % copies].matmul(&x)?;
            }
            let avx2 = start.elapsed().as_secs_f64() / reps as f64;
            format!(
                "  cascade AVX2 {:.3} ms ({:.1} GB/s)",
                avx2 * 1e3,
                gigabytes / avx2
            )
        };
        let start = Instant::now();
        for r in 0..reps {
            ours_per_pass[r % copies].matmul(&x)?;
        }
        let per_pass = start.elapsed().as_secs_f64() / reps as f64;
        eprintln!(
            "round {round}: candle {:.3} ms ({:.1} GB/s)  cascade {:.3} ms ({:.1} GB/s){avx2}  AVX2 unpacking per pass {:.3} ms  max diff {diff:.4}",
            candle * 1e3,
            gigabytes / candle,
            cascade * 1e3,
            gigabytes / cascade,
            per_pass * 1e3
        );
    }
    Ok(())
}
