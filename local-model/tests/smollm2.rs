//! Behaviour of the real SmolLM2-135M-Instruct model (fetched by
//! `scripts/fetch-model.sh`): answers, signal ranges, and confidence that
//! separates easy questions from ones it cannot know.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Mutex;
use std::sync::OnceLock;

use local_model::{
    ChatMessage, Control, FinishReason, Generation, GenerationParams, LoadError, LoadOptions,
    LocalModel, Prompt,
};

fn model() -> &'static Mutex<LocalModel> {
    static MODEL: OnceLock<Mutex<LocalModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = common::smollm2_path();
        Mutex::new(LocalModel::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap())
    })
}

fn ask(question: &str, max_tokens: usize) -> Generation {
    let mut model = model().lock().unwrap_or_else(|e| e.into_inner());
    let params = GenerationParams {
        max_tokens,
        ..GenerationParams::default()
    };
    model
        .generate(
            &Prompt::Chat(vec![ChatMessage::new("user", question)]),
            &params,
            &mut |_| Control::Continue,
        )
        .unwrap()
}

fn mean_logprob(g: &Generation) -> f64 {
    g.tokens.iter().map(|t| t.logprob as f64).sum::<f64>() / g.tokens.len().max(1) as f64
}

#[test]
fn names_capital_cities() {
    let cases = [
        ("France", "paris"),
        ("Germany", "berlin"),
        ("Japan", "tokyo"),
    ];
    let mut right = 0;
    for (country, city) in cases {
        let g = ask(
            &format!("What is the capital of {country}? Answer with the city name only."),
            24,
        );
        println!("{country}: {:?} ({:?})", g.text, g.finish_reason);
        if g.text.to_lowercase().contains(city) {
            right += 1;
        }
    }
    assert!(right >= 2, "only {right} of 3 capitals named");
}

#[test]
fn signals_are_in_range_and_pieces_make_the_text() {
    let g = ask("Name three colours.", 32);
    common::assert_signals_in_range(&g);
    assert_eq!(g.usage.completion_tokens, g.tokens.len());
    assert!(g.usage.prompt_tokens > 10);
    assert!(g.timings.prefill_ms > 0.0);
}

#[test]
fn easy_questions_score_higher_confidence_than_unknowable_ones() {
    let easy = [
        "What is the capital of France? Answer with the city name only.",
        "What is 2 + 2? Answer with the number only.",
        "What colour is the sky on a clear day? Answer with one word.",
        "How many days are in a week? Answer with the number only.",
        "What is the opposite of hot? Answer with one word.",
    ];
    let unknowable = [
        "What is the name of my neighbour's cat? Answer with the name only.",
        "What number am I thinking of right now? Answer with the number only.",
        "What did I eat for breakfast on 3 March 2019? Answer in one word.",
        "What is the serial number of my laptop? Answer with the number only.",
        "What is the middle name of the cashier at my local shop? Answer with the name only.",
    ];
    let score = |qs: &[&str]| -> f64 {
        qs.iter().map(|q| mean_logprob(&ask(q, 16))).sum::<f64>() / qs.len() as f64
    };
    let easy_score = score(&easy);
    let hard_score = score(&unknowable);
    println!("easy {easy_score:.3} vs unknowable {hard_score:.3}");
    assert!(
        easy_score > hard_score,
        "easy {easy_score} <= unknowable {hard_score}"
    );
}

#[test]
fn chat_markup_tokenizes_like_the_reference_tokenizer() {
    let model = model().lock().unwrap_or_else(|e| e.into_inner());
    let tokenizer = model.encoder().tokenizer();
    let enc = tokenizer
        .encode("<|im_start|>user\nIn 2024?<|im_end|>\n", false)
        .unwrap();
    // SmolLM2's tokenizer: special tokens whole, no prefix space after them,
    // digits one by one ("Ċ" is the byte-level newline).
    assert_eq!(
        enc.get_tokens(),
        &[
            "<|im_start|>",
            "user",
            "Ċ",
            "In",
            "Ġ",
            "2",
            "0",
            "2",
            "4",
            "?",
            "<|im_end|>",
            "Ċ"
        ]
    );
    assert_eq!(enc.get_ids()[0], 1);
    assert_eq!(enc.get_ids()[10], 2);
    let text = model
        .encoder()
        .render(&Prompt::Chat(vec![ChatMessage::new("user", "Hi")]))
        .unwrap();
    assert!(text.starts_with("<|im_start|>system\n"), "{text:?}");
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
}

#[test]
fn stop_sequences_end_generation_and_are_not_returned() {
    let mut model = model().lock().unwrap_or_else(|e| e.into_inner());
    let params = GenerationParams {
        max_tokens: 40,
        stop: vec![" is".into()],
        ..GenerationParams::default()
    };
    let mut streamed = String::new();
    let g = model
        .generate(
            &Prompt::Chat(vec![ChatMessage::new(
                "user",
                "What is the capital of France? Answer with the city name only.",
            )]),
            &params,
            &mut |e| {
                streamed.push_str(e.text_delta);
                Control::Continue
            },
        )
        .unwrap();
    println!("{:?}", g.text);
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert!(!g.text.contains(" is"), "{:?}", g.text);
    assert!(
        g.text.starts_with(&streamed),
        "streamed {streamed:?} is not a prefix of {:?}",
        g.text
    );
}

#[test]
fn prompt_longer_than_the_context_window_is_rejected() {
    let mut model = model().lock().unwrap_or_else(|e| e.into_inner());
    let window = model.info().context_window;
    let long = "word ".repeat(window + 10);
    let err = model
        .generate(
            &Prompt::Text(long),
            &GenerationParams::default(),
            &mut |_| Control::Continue,
        )
        .unwrap_err();
    assert!(err.to_string().contains("context window"), "{err}");
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let source = std::fs::read(common::smollm2_path()).unwrap();
    let cut = dir.path().join("cut.gguf");
    // Header intact, tensor data cut short.
    std::fs::write(&cut, &source[..source.len() / 2]).unwrap();
    let err = LocalModel::load(cut.to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::InvalidGguf { .. }), "{err:?}");
    assert!(err.to_string().contains("truncated"), "{err}");
    // Cut inside the header.
    std::fs::write(&cut, &source[..1000]).unwrap();
    let err = LocalModel::load(cut.to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::InvalidGguf { .. }), "{err:?}");
    // Not a GGUF at all.
    std::fs::write(&cut, b"hello world, not a model").unwrap();
    let err = LocalModel::load(cut.to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::InvalidGguf { .. }), "{err:?}");
}

#[test]
fn incremental_decoding_never_splits_multibyte_characters() {
    let model = model().lock().unwrap_or_else(|e| e.into_inner());
    let tokenizer = model.encoder().tokenizer();
    let text = "Café au lait, 日本語, emoji 🦀 and Ελληνικά.";
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    // Byte-level BPE splits the CJK characters and the emoji across tokens.
    assert!(ids.len() > text.chars().count() / 2);
    common::assert_incremental_decoding_is_exact(tokenizer, &ids, text);
}
