//! Behaviour of the real Gemma 3 270M model (Q4_K_M GGUF, fetched by
//! `scripts/fetch-gemma.sh`): the tokenizer rebuilt from the GGUF's
//! SentencePiece vocabulary, end-of-sequence handling, and answers.
//!
//! Expected token ids come from llama.cpp's SentencePiece algorithm (join
//! the adjacent pair that makes the highest-scoring piece, user-defined
//! and control pieces matched whole first) run over this file's vocabulary.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use local_model::{
    ChatMessage, Control, FinishReason, Generation, GenerationParams, LoadError, LoadOptions,
    LocalModel, Prompt, TemplateChoice,
};

fn model() -> &'static Mutex<LocalModel> {
    static MODEL: OnceLock<Mutex<LocalModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = common::gemma3_path();
        let started = Instant::now();
        let model = LocalModel::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
        println!("loaded in {:.2} s", started.elapsed().as_secs_f64());
        Mutex::new(model)
    })
}

fn complete(prompt: Prompt, max_tokens: usize) -> Generation {
    let mut model = model().lock().unwrap_or_else(|e| e.into_inner());
    let params = GenerationParams {
        max_tokens,
        ..GenerationParams::default()
    };
    model
        .generate(&prompt, &params, &mut |_| Control::Continue)
        .unwrap()
}

fn encode(text: &str, add_special: bool) -> (Vec<u32>, Vec<String>) {
    let model = model().lock().unwrap_or_else(|e| e.into_inner());
    let enc = model
        .encoder()
        .tokenizer()
        .encode(text, add_special)
        .unwrap();
    (enc.get_ids().to_vec(), enc.get_tokens().to_vec())
}

fn decode(ids: &[u32]) -> String {
    let model = model().lock().unwrap_or_else(|e| e.into_inner());
    model.encoder().tokenizer().decode(ids, true).unwrap()
}

#[test]
fn chat_markup_encodes_like_sentencepiece() {
    let (ids, tokens) = encode("<start_of_turn>user\nHello world<end_of_turn>\n", false);
    assert_eq!(
        tokens,
        [
            "<start_of_turn>",
            "user",
            "\n",
            "Hello",
            "▁world",
            "<end_of_turn>",
            "\n"
        ]
    );
    assert_eq!(ids, [105, 2364, 107, 9259, 1902, 106, 107]);

    let (ids, _) = encode(
        "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
        false,
    );
    assert_eq!(
        ids,
        [105, 2364, 107, 3689, 563, 506, 5279, 529, 7001, 236881, 106, 107, 105, 4368, 107]
    );
}

#[test]
fn prose_digits_and_whitespace_encode_like_sentencepiece() {
    let cases: &[(&str, &[u32])] = &[
        (
            "The capital of France is Paris.",
            &[818, 5279, 529, 7001, 563, 9079, 236761],
        ),
        // No dummy prefix (add_space_prefix is false), a leading space is "▁".
        (" leading space", &[5830, 2557]),
        // Digits are single pieces.
        (
            "In 2024, 12345 people.",
            &[
                902, 236743, 236778, 236771, 236778, 236812, 236764, 236743, 236770, 236778,
                236800, 236812, 236810, 1331, 236761,
            ],
        ),
        // Runs of spaces, newlines and tabs are user-defined pieces.
        (
            "Hello  world\n\n  indented\tx",
            &[9259, 138, 12392, 108, 138, 724, 16764, 255968, 236781],
        ),
        (
            "def f(x):\n    return x  # two spaces",
            &[
                2063, 517, 236769, 236781, 1473, 107, 140, 2060, 1123, 138, 236865, 1156, 9952,
            ],
        ),
        // Characters in the vocabulary stay whole, even outside Latin script.
        ("café 日本", &[123125, 236859, 33375]),
        (
            "naïve façade — “quoted” 🦀",
            &[
                1789, 238527, 560, 96008, 2192, 999, 148758, 236919, 236743, 248714,
            ],
        ),
        // A character outside it falls back to its UTF-8 bytes.
        ("rune 𓀀 end", &[165149, 236743, 478, 385, 366, 366, 1345]),
    ];
    for (text, expected) in cases {
        let (ids, tokens) = encode(text, false);
        assert_eq!(&ids, expected, "{text:?} became {tokens:?}");
    }
}

#[test]
fn decoding_restores_the_text_exactly() {
    for text in [
        "café 日本",
        "naïve façade — “quoted” 🦀",
        "rune 𓀀 end",
        " leading space and trailing ",
        "def f(x):\n    return x  # two spaces\n\n\tdone",
        "<b>bold</b> and </s> are HTML here",
    ] {
        let (ids, _) = encode(text, false);
        assert_eq!(decode(&ids), text);
    }
}

#[test]
fn incremental_decoding_never_splits_multibyte_characters() {
    let model = model().lock().unwrap_or_else(|e| e.into_inner());
    let tokenizer = model.encoder().tokenizer();
    // "𓀀" is not in the vocabulary: four byte-fallback tokens.
    let text = "Café 日本語, rune 𓀀 and 🦀.";
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    common::assert_incremental_decoding_is_exact(tokenizer, &ids, text);
}

#[test]
fn raw_text_starts_with_bos_and_special_tokens_are_hidden_when_decoding() {
    let (ids, _) = encode("Hello world", true);
    assert_eq!(ids, [2, 9259, 1902]);
    assert_eq!(decode(&[2, 105, 9259, 1902, 106, 1]), "Hello world");
}

#[test]
fn loads_as_gemma3_without_a_chat_template() {
    let model = model().lock().unwrap_or_else(|e| e.into_inner());
    let info = model.info();
    assert_eq!(info.architecture, local_model::Architecture::Gemma3);
    // This is the base (pretrained) model: its GGUF has no chat template.
    assert_eq!(info.template, "plain");
    // Generation stops on both of Gemma's end markers.
    let mut stops = model.stop_token_ids().to_vec();
    stops.sort();
    assert_eq!(stops, [1, 106], "<eos> and <end_of_turn>");
    // The HTML tag "</s>" is ordinary text in Gemma's vocabulary.
    assert!(!stops.contains(&model.encoder().tokenizer().token_to_id("</s>").unwrap()));
    // The tuned engine applies the local layers' window while decoding, so
    // the context is the file's (32,768), capped at 8192.
    assert_eq!(info.context_window, 8192);
    drop(model);

    // candle's own Gemma 3 does not: it stays within the 512-token window.
    let reference = LocalModel::load(
        common::gemma3_path().to_str().unwrap(),
        &LoadOptions {
            kernels: local_model::Kernels::Reference,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        reference.info().context_window,
        512,
        "kept within the sliding window"
    );
    drop(reference);

    let err = LocalModel::load(
        common::gemma3_path().to_str().unwrap(),
        &LoadOptions {
            template: TemplateChoice::Model,
            ..LoadOptions::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, LoadError::Template(_)), "{err:?}");
}

#[test]
fn answers_the_capital_of_france() {
    // A base model: asked plainly, it continues the text and names Paris.
    let g = complete(
        Prompt::Chat(vec![ChatMessage::new(
            "user",
            "What is the capital of France?",
        )]),
        24,
    );
    println!("{:?} ({:?})", g.text, g.finish_reason);
    assert!(g.text.contains("Paris"), "{:?}", g.text);

    // Given the pattern, it answers with Paris alone and is sure of it.
    let g = complete(
        Prompt::Text(
            "Q: What is the capital of Germany?\nA: Berlin\nQ: What is the capital of France?\nA:"
                .into(),
        ),
        2,
    );
    println!("{:?} {:?}", g.text, g.tokens.first());
    assert_eq!(g.tokens[0].text, " Paris");
    assert!(g.tokens[0].logprob > -0.5, "{:?}", g.tokens[0]);
}

#[test]
fn chat_messages_get_bos_with_the_plain_template() {
    let model = model().lock().unwrap_or_else(|e| e.into_inner());
    let ids = model
        .encoder()
        .encode(&Prompt::Chat(vec![ChatMessage::new("user", "Hello world")]))
        .unwrap();
    assert_eq!(ids, [2, 9259, 1902]);
}

#[test]
fn signals_are_in_range_and_pieces_make_the_text() {
    let g = complete(Prompt::Text("Three primary colours are red,".into()), 24);
    println!("{:?}", g.text);
    common::assert_signals_in_range(&g);
    assert!(matches!(
        g.finish_reason,
        FinishReason::Length | FinishReason::Stop
    ));
}
