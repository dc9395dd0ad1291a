//! Test fixtures: tiny randomly initialised checkpoints with the real
//! tensor names and config formats, written to a temporary directory.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::{mixformer, phi};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Vocabulary of the tiny models: the 256 byte-level symbols, then `<|endoftext|>`.
pub const TINY_VOCAB: usize = 320;

/// Writes a byte-level BPE `tokenizer.json` with no merges: every byte is a token.
pub fn write_tiny_tokenizer(dir: &Path) -> PathBuf {
    let mut symbols: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    symbols.sort();
    let vocab: tokenizers::models::bpe::Vocab = symbols
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .unwrap();
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer
        .add_special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .unwrap();
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path, false).unwrap();
    path
}

/// The `config.json` of a tiny Phi-1.5-architecture model (HF format).
pub fn tiny_phi_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "hidden_act": "gelu_new",
        "max_position_embeddings": 128,
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "qk_layernorm": false,
        "torch_dtype": "float32"
    })
}

/// Writes a tiny Phi-1.5 checkpoint (config.json, model.safetensors,
/// tokenizer.json) with random weights; returns its directory.
pub fn write_tiny_phi(dir: &Path) -> PathBuf {
    let config_json = tiny_phi_config();
    std::fs::write(dir.join("config.json"), config_json.to_string()).unwrap();
    let config: phi::Config = serde_json::from_value(config_json).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    // Building the model registers every tensor it reads, under the real names.
    phi::Model::new(&config, vb).unwrap();
    varmap.save(dir.join("model.safetensors")).unwrap();
    write_tiny_tokenizer(dir);
    dir.to_path_buf()
}

/// The mixformer-format config of a tiny Phi-1.5 GGUF.
pub fn tiny_mixformer_config() -> serde_json::Value {
    serde_json::json!({
        "vocab_size": TINY_VOCAB,
        "n_positions": 128,
        "n_embd": 64,
        "n_layer": 2,
        "n_inner": null,
        "n_head": 4,
        "rotary_dim": 16,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": false,
        "pad_vocab_size_multiple": 64
    })
}

/// Writes a tiny Phi-1.5 GGUF in candle's mixformer layout (`layers.N.*`),
/// 2-D weights quantized to Q8_0, with its config.json and tokenizer.json.
pub fn write_tiny_phi_gguf(dir: &Path) -> PathBuf {
    let config_json = tiny_mixformer_config();
    std::fs::write(dir.join("config.json"), config_json.to_string()).unwrap();
    let config: mixformer::Config = serde_json::from_value(config_json).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    mixformer::MixFormerSequentialForCausalLM::new(&config, vb).unwrap();
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|name| {
            let t = data[name].as_tensor();
            let quantizable = t.rank() == 2 && t.dims()[1] % 32 == 0;
            let dtype = if quantizable {
                GgmlDType::Q8_0
            } else {
                GgmlDType::F32
            };
            (name.clone(), QTensor::quantize(t, dtype).unwrap())
        })
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let path = dir.join("model-q4k.gguf");
    let mut file = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut file, &[], &refs).unwrap();
    write_tiny_tokenizer(dir);
    path
}

/// Path of the real SmolLM2 model fetched by `scripts/fetch-model.sh`.
pub fn smollm2_path() -> PathBuf {
    if let Ok(p) = std::env::var("CASCADE_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh first",
        path.display()
    );
    path
}

/// Path of the real Gemma 3 270M model fetched by `scripts/fetch-gemma.sh`
/// (or `CASCADE_GEMMA_MODEL`). Fails, never skips, when it is missing.
pub fn gemma3_path() -> PathBuf {
    let path = match std::env::var("CASCADE_GEMMA_MODEL") {
        Ok(p) => PathBuf::from(p),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/gemma-3-270m-Q4_K_M.gguf"),
    };
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-gemma.sh first",
        path.display()
    );
    path
}

/// Checks every token's signals are in range and the tokens' text pieces
/// make up the generated text.
pub fn assert_signals_in_range(g: &local_model::Generation) {
    assert!(!g.tokens.is_empty());
    for t in &g.tokens {
        assert!(t.logprob.is_finite() && t.logprob <= 0.0, "{t:?}");
        assert!(t.entropy.is_finite() && t.entropy >= 0.0, "{t:?}");
        assert!((0.0..=1.0).contains(&t.margin), "{t:?}");
    }
    let pieces: String = g.tokens.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(pieces, g.text);
}

/// Decodes `ids` token by token and checks that no piece holds a broken
/// character, that at least one token completed none (so the test splits
/// a character), and that the pieces make up `text`.
pub fn assert_incremental_decoding_is_exact(tokenizer: &Tokenizer, ids: &[u32], text: &str) {
    let mut decoder = local_model::detok::IncrementalDecoder::new(tokenizer);
    let mut pieces = Vec::new();
    for &id in ids {
        pieces.push(decoder.push(id).unwrap());
    }
    pieces.push(decoder.finish().unwrap());
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert!(
        pieces.iter().any(|p| p.is_empty()),
        "expected a token that completes no character"
    );
    assert_eq!(pieces.concat(), text);
}
