//! Loading and generating with tiny randomly initialised checkpoints that
//! have the real Phi-1.5 tensor names and config formats.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use local_model::{
    ChatMessage, Control, FinishReason, GenerationParams, LoadError, LoadOptions, LocalModel,
    Prompt, Sampling,
};

fn sampled(seed: u64) -> GenerationParams {
    GenerationParams {
        max_tokens: 12,
        sampling: Sampling::Sample {
            temperature: 0.8,
            top_p: 0.95,
        },
        seed,
        ..GenerationParams::default()
    }
}

fn generate(model: &mut LocalModel, params: &GenerationParams) -> local_model::Generation {
    model
        .generate(
            &Prompt::Chat(vec![ChatMessage::new("user", "Say something")]),
            params,
            &mut |_| Control::Continue,
        )
        .unwrap()
}

#[test]
fn tiny_phi_safetensors_loads_and_generates_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_phi(dir.path());
    let spec = dir.path().to_str().unwrap();
    let mut a = LocalModel::load(spec, &LoadOptions::default()).unwrap();
    assert_eq!(a.info().architecture, local_model::Architecture::Phi);
    assert_eq!(a.info().context_window, 128);
    // Phi-1.5 has no chat template: the built-in Instruct/Output one is used.
    assert_eq!(a.info().template, "phi");
    let first = generate(&mut a, &sampled(7));
    let again = generate(&mut a, &sampled(7));
    assert_eq!(
        first.tokens, again.tokens,
        "same seed, same model: same tokens"
    );
    let mut b = LocalModel::load(spec, &LoadOptions::default()).unwrap();
    assert_eq!(
        generate(&mut b, &sampled(7)).tokens,
        first.tokens,
        "reloaded model differs"
    );
    assert!(!first.tokens.is_empty());
    for t in &first.tokens {
        assert!(t.logprob <= 0.0 && t.logprob.is_finite());
        assert!(t.entropy >= 0.0 && t.margin >= 0.0 && t.margin <= 1.0);
    }
    let pieces: String = first.tokens.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(pieces, first.text);
}

#[test]
fn greedy_decoding_ignores_the_seed_and_max_tokens_bounds_length() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_phi(dir.path());
    let mut model =
        LocalModel::load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let greedy = |seed| GenerationParams {
        max_tokens: 5,
        seed,
        ignore_eos: true,
        ..GenerationParams::default()
    };
    let a = generate(&mut model, &greedy(1));
    let b = generate(&mut model, &greedy(2));
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.tokens.len(), 5);
    assert_eq!(a.finish_reason, FinishReason::Length);
    assert_eq!(a.usage.completion_tokens, 5);
}

#[test]
fn bf16_phi_generates_with_log_probs_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_phi(dir.path());
    let spec = dir.path().to_str().unwrap();
    let mut f32_model = LocalModel::load(spec, &LoadOptions::default()).unwrap();
    let bf16 = LoadOptions {
        dtype: local_model::WeightDtype::Bf16,
        ..LoadOptions::default()
    };
    let mut bf16_model = LocalModel::load(spec, &bf16).unwrap();
    let params = GenerationParams {
        max_tokens: 8,
        ignore_eos: true,
        ..GenerationParams::default()
    };
    let exact = generate(&mut f32_model, &params);
    let rounded = generate(&mut bf16_model, &params);
    assert_eq!(rounded.tokens.len(), 8);
    // Greedy decoding reports the largest log-prob, which moves no more
    // than the log-probs themselves, so the first step compares even if
    // rounding picks another of two near-tied tokens; later steps compare
    // while both runs saw the same tokens. 0.1 nats is 2% of this model's
    // logit scale (about 5), the bound argued in phi_mixed_precision.rs.
    for (a, b) in exact.tokens.iter().zip(&rounded.tokens) {
        assert!(
            (a.logprob - b.logprob).abs() < 0.1,
            "F32 {a:?} vs BF16 {b:?}"
        );
        if a.id != b.id {
            break;
        }
    }
}

#[test]
fn tiny_phi_gguf_loads_through_quantized_mixformer() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_tiny_phi_gguf(dir.path());
    let mut model = LocalModel::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(
        model.info().architecture,
        local_model::Architecture::PhiGguf
    );
    let a = generate(&mut model, &sampled(11));
    let b = generate(&mut model, &sampled(11));
    assert_eq!(a.tokens, b.tokens);
    assert!(!a.tokens.is_empty());
}

#[test]
fn callback_can_stop_generation_early() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_phi(dir.path());
    let mut model =
        LocalModel::load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let params = GenerationParams {
        max_tokens: 20,
        ignore_eos: true,
        ..GenerationParams::default()
    };
    let out = model
        .generate(&Prompt::Text("abc".into()), &params, &mut |e| {
            if e.tokens_so_far.len() >= 3 {
                Control::Stop
            } else {
                Control::Continue
            }
        })
        .unwrap();
    assert_eq!(out.tokens.len(), 3);
    assert_eq!(out.finish_reason, FinishReason::Aborted);
}

#[test]
fn wrong_config_json_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_phi(dir.path());
    let mut config = common::tiny_phi_config();
    config.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = LocalModel::load(dir.path().to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::InvalidConfig { .. }), "{err:?}");
    assert!(err.to_string().contains("hidden_size"), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");

    // A config whose sizes disagree with the weights is caught too.
    let mut config = common::tiny_phi_config();
    config["hidden_size"] = serde_json::json!(96);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = LocalModel::load(dir.path().to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::Weights { .. }), "{err:?}");
}

#[test]
fn missing_tokenizer_and_missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_phi(dir.path());
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = LocalModel::load(dir.path().to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    let err = LocalModel::load("/definitely/not/here.gguf", &LoadOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::NotFound(_)), "{err:?}");
    assert!(err.to_string().contains("/definitely/not/here.gguf"));
}

#[test]
fn empty_and_too_long_prompts_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_phi(dir.path());
    let mut model =
        LocalModel::load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let params = GenerationParams::default();
    let err = model
        .generate(&Prompt::Text("   ".into()), &params, &mut |_| {
            Control::Continue
        })
        .unwrap_err();
    assert!(
        matches!(err, local_model::GenerateError::EmptyPrompt),
        "{err:?}"
    );
    // Every byte is one token in the tiny vocabulary; the window is 128.
    let long = "x".repeat(500);
    let err = model
        .generate(&Prompt::Text(long), &params, &mut |_| Control::Continue)
        .unwrap_err();
    match err {
        local_model::GenerateError::PromptTooLong {
            prompt_tokens,
            context_window,
        } => {
            assert_eq!(context_window, 128);
            assert!(prompt_tokens >= 500);
        }
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
}

#[test]
fn generation_is_capped_by_the_context_window() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_phi(dir.path());
    let mut model =
        LocalModel::load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let params = GenerationParams {
        max_tokens: 1000,
        ignore_eos: true,
        ..GenerationParams::default()
    };
    let prompt = "y".repeat(120);
    let out = model
        .generate(&Prompt::Text(prompt), &params, &mut |_| Control::Continue)
        .unwrap();
    assert_eq!(out.usage.prompt_tokens + out.usage.completion_tokens, 128);
    assert_eq!(out.finish_reason, FinishReason::Length);
}
