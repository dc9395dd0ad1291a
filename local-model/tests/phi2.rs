//! Phi-1.5 in llama.cpp's `phi2` GGUF layout on the tuned engine: the same
//! weights as a Hugging Face checkpoint give the same log-probs as candle's
//! `phi` model, whichever way query/key/value are stored; quantized files
//! stay close to exact arithmetic; a full-size random file is written and
//! read by the same code the benchmark uses (tiny here).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::quantized::GgmlDType;
use local_model::synthetic::{write_random_phi2, Phi2Dims, QkvLayout};
use local_model::{
    Architecture, Control, GenerationParams, Kernels, LoadError, LoadOptions, LocalModel, Prompt,
    Sampling,
};

fn load(path: &std::path::Path, kernels: Kernels) -> Result<LocalModel, LoadError> {
    let options = LoadOptions {
        kernels,
        ..LoadOptions::default()
    };
    LocalModel::load(path.to_str().unwrap(), &options)
}

fn prompt() -> Prompt {
    Prompt::Text("Alice was beginning to get very tired of sitting by her sister".into())
}

/// Continuation tokens: byte-level ids of a fixed text (tiny vocabulary).
fn continuation() -> Vec<u32> {
    b" on the bank, and of having nothing to do"
        .iter()
        .map(|&b| u32::from(b) % 256)
        .collect()
}

fn max_gap(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn phi2_gguf_matches_candles_phi_on_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_phi(dir.path());
    let mut hf = LocalModel::load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let expected = hf
        .continuation_logprobs(&prompt(), &continuation())
        .unwrap();
    // Random weights spread the log-probs: a wrong rotary layout or block
    // wiring would move them by far more than rounding does.
    assert!(expected.iter().any(|&l| l < -1.0));

    for fused in [false, true] {
        let path = common::write_tiny_phi2_gguf_from(dir.path(), GgmlDType::F32, fused);
        let mut model = load(&path, Kernels::Tuned).unwrap();
        assert_eq!(model.info().architecture, Architecture::Phi2);
        assert_eq!(model.info().context_window, 128);
        assert_eq!(model.info().template, "phi");
        let got = model
            .continuation_logprobs(&prompt(), &continuation())
            .unwrap();
        let gap = max_gap(&expected, &got);
        assert!(gap < 1e-3, "fused={fused}: {gap} nats from candle's phi");
    }
}

#[test]
fn quantized_phi2_stays_close_to_exact_arithmetic() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_phi(dir.path());
    let path = common::write_tiny_phi2_gguf_from(dir.path(), GgmlDType::Q8_0, false);
    let exact = load(&path, Kernels::Exact)
        .unwrap()
        .continuation_logprobs(&prompt(), &continuation())
        .unwrap();
    let tuned = load(&path, Kernels::Tuned)
        .unwrap()
        .continuation_logprobs(&prompt(), &continuation())
        .unwrap();
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    assert!((mean(&exact) - mean(&tuned)).abs() < 0.05);
    assert!(max_gap(&exact, &tuned) < 0.25);
}

#[test]
fn reference_kernels_refuse_phi2_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_phi(dir.path());
    let path = common::write_tiny_phi2_gguf_from(dir.path(), GgmlDType::F32, false);
    let err = load(&path, Kernels::Reference)
        .err()
        .expect("reference kernels must refuse phi2");
    assert!(matches!(err, LoadError::InvalidOption(_)), "{err}");
    assert!(err.to_string().contains("phi2"), "{err}");
}

#[test]
fn random_phi2_files_load_and_generate() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_tokenizer(dir.path());
    let dims = Phi2Dims {
        width: 64,
        blocks: 2,
        heads: 4,
        ffn: 256,
        vocab: common::TINY_VOCAB,
        rope_dim: 8,
        context: 96,
    };
    for (layout, name) in [
        (QkvLayout::Separate, "a.gguf"),
        (QkvLayout::Fused, "b.gguf"),
    ] {
        let path = dir.path().join(name);
        write_random_phi2(&path, dims, GgmlDType::Q8_0, layout, None, 3).unwrap();
        let mut model = load(&path, Kernels::Tuned).unwrap();
        assert_eq!(model.info().context_window, 96);
        let params = GenerationParams {
            max_tokens: 12,
            sampling: Sampling::Greedy,
            stop: Vec::new(),
            ..GenerationParams::default()
        };
        let first = model
            .generate(&prompt(), &params, &mut |_| Control::Continue)
            .unwrap();
        let again = model
            .generate(&prompt(), &params, &mut |_| Control::Continue)
            .unwrap();
        assert_eq!(first.tokens, again.tokens);
        assert!(!first.tokens.is_empty());
        common::assert_signals_in_range(&first);
    }
    // Dimensions that cannot form heads are refused before anything is written.
    let bad = Phi2Dims {
        rope_dim: 32,
        ..dims
    };
    let path = dir.path().join("bad.gguf");
    assert!(write_random_phi2(&path, bad, GgmlDType::Q8_0, QkvLayout::Separate, None, 3).is_err());
    assert!(!path.exists());
}
