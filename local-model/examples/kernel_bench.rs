//! Q8_0 matrix products: Cascade's kernel against candle's, same weights,
//! cycling through `copies` matrices so that they stream from memory.
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use local_model::engine::kernels::GroupedWeights;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let format = match std::env::var("FORMAT").as_deref() { Ok("q4_1") => GgmlDType::Q4_1, Ok("q4k") => GgmlDType::Q4K, _ => GgmlDType::Q8_0 };
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap_or(1)).collect();
    let (rows, cols, m, reps, copies) = (args[0], args[1], args[2], args[3], args[4]);
    let mut theirs = Vec::new();
    let mut ours = Vec::new();
    for _ in 0..copies {
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
        let q = QTensor::quantize(&w, format)?;
        let QStorage::Cpu(blocks) = QStorage::from_data(q.data()?, &Device::Cpu, format)? else { anyhow::bail!("cpu") };
        theirs.push(blocks);
        ours.push(GroupedWeights::new(format, &q.data()?, rows, cols)?.ok_or_else(|| anyhow::anyhow!("no avx2"))?);
    }
    let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu)?.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; m * rows];
    let gb = (rows * cols) as f64 * format.type_size() as f64 / format.block_size() as f64 / 1e9;
    for round in 0..3 {
        let t = Instant::now();
        for r in 0..reps { theirs[r % copies].matmul_t((m, cols, rows), &x, &mut out)?; }
        let candle = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        let mut o = Vec::new();
        for r in 0..reps { o = ours[r % copies].matmul(&x)?; }
        let cascade = t.elapsed().as_secs_f64() / reps as f64;
        let diff = out.iter().zip(&o).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("round {round}: candle {:.3} ms ({:.1} GB/s)  cascade {:.3} ms ({:.1} GB/s)  max diff {diff:.4}",
            candle * 1e3, gb / candle, cascade * 1e3, gb / cascade);
    }
    Ok(())
}
