//! Our mixed-precision Phi-1.5 (`local_model::phi_mixed`) against candle's
//! `models::phi`, on the tiny random checkpoint with Phi-1.5's tensor names.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::phi;
use local_model::phi_mixed::{MixedPhi, PhiConfig};

/// A prompt long enough to exercise the causal mask, then single tokens
/// that go through the KV cache.
const PROMPT: [u32; 12] = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100];
const NEXT: [u32; 5] = [33, 10, 84, 104, 101];

/// One random checkpoint per test, loaded as `dtype` as often as needed.
struct Checkpoint {
    tensors: HashMap<String, Tensor>,
    config: serde_json::Value,
}

impl Checkpoint {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        common::write_tiny_phi(dir.path());
        let tensors =
            candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
                .unwrap();
        Self {
            tensors,
            config: common::tiny_phi_config(),
        }
    }

    fn weights(&self, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), dtype, &Device::Cpu)
    }

    fn mixed(&self, dtype: DType) -> MixedPhi {
        let config: PhiConfig = serde_json::from_value(self.config.clone()).unwrap();
        MixedPhi::new(&config, self.weights(dtype)).unwrap()
    }
}

/// Logits after the prompt, then after each following token.
fn run(mut step: impl FnMut(&Tensor) -> Tensor) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    let prompt = Tensor::new(&PROMPT[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    out.push(step(&prompt));
    for id in NEXT {
        let input = Tensor::new(&[id], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        out.push(step(&input));
    }
    out.into_iter()
        .map(|logits| {
            logits
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

fn log_softmax(rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    rows.iter()
        .map(|row| {
            let t = Tensor::new(row.as_slice(), &Device::Cpu).unwrap();
            candle_nn::ops::log_softmax(&t, D::Minus1)
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

#[test]
fn with_f32_weights_logits_match_candles_phi() {
    let checkpoint = Checkpoint::new();
    let config: phi::Config = serde_json::from_value(checkpoint.config.clone()).unwrap();
    let mut reference = phi::Model::new(&config, checkpoint.weights(DType::F32)).unwrap();
    let expected = run(|input| reference.forward(input).unwrap());

    let mut ours = checkpoint.mixed(DType::F32);
    let got = run(|input| ours.forward(input).unwrap());
    let diff = max_abs_diff(&expected, &got);
    println!("max |logit difference| {diff:e}");
    assert!(diff < 1e-4, "{diff}");

    // Clearing the cache starts a fresh sequence.
    ours.clear_kv_cache();
    assert_eq!(run(|input| ours.forward(input).unwrap()), got);
}

#[test]
fn with_bf16_weights_log_probs_stay_close_to_f32() {
    let checkpoint = Checkpoint::new();
    let mut f32_model = checkpoint.mixed(DType::F32);
    let mut bf16_model = checkpoint.mixed(DType::BF16);
    let f32_logits = run(|input| f32_model.forward(input).unwrap());
    let bf16_logits = run(|input| bf16_model.forward(input).unwrap());
    let scale = f32_logits
        .iter()
        .flatten()
        .fold(0.0f32, |m, x| m.max(x.abs()));
    let diff = max_abs_diff(&log_softmax(&f32_logits), &log_softmax(&bf16_logits));
    println!("max |logit| {scale}, max |log-prob difference| {diff}");
    // BF16 keeps 8 significant bits: each rounding is off by at most 2^-9
    // relative. On the way to a logit, the embedding, the input of every
    // projection and every weight are rounded: about ten roundings in this
    // two-block model, so even if they all added up a logit would move by
    // under 10 * 2^-9 ≈ 2% of the logits' scale, and a log-prob (a logit
    // minus their log-sum-exp) by about as much. Measured on 27 random
    // checkpoints: 0.7-1.3%.
    let tolerance = 0.02 * scale;
    assert!(diff < tolerance, "{diff} >= {tolerance}");
}
