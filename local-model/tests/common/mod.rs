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
            let quantizable = t.rank() == 2 && t.dims()[1].is_multiple_of(32);
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

/// Rewrites the tiny Phi-1.5 safetensors checkpoint in `dir` (see
/// [`write_tiny_phi`]) as a `phi2` GGUF the way llama.cpp's converter names
/// the tensors, every tensor kept in F32 (or the matrices in `matrices`),
/// query/key/value fused into `attn_qkv` when `fused`. Same weights, so the
/// two files must give the same log-probs.
pub fn write_tiny_phi2_gguf_from(dir: &Path, matrices: GgmlDType, fused: bool) -> PathBuf {
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let config = tiny_phi_config();
    let n = |key: &str| config[key].as_u64().unwrap() as u32;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut put = |name: String, t: &candle_core::Tensor| {
        let dtype = if t.rank() == 2 {
            matrices
        } else {
            GgmlDType::F32
        };
        tensors.push((name, QTensor::quantize(t, dtype).unwrap()));
    };
    put(
        "token_embd.weight".into(),
        &weights["model.embed_tokens.weight"],
    );
    put("output.weight".into(), &weights["lm_head.weight"]);
    put("output.bias".into(), &weights["lm_head.bias"]);
    put(
        "output_norm.weight".into(),
        &weights["model.final_layernorm.weight"],
    );
    put(
        "output_norm.bias".into(),
        &weights["model.final_layernorm.bias"],
    );
    for i in 0..n("num_hidden_layers") {
        let hf = |part: &str| &weights[&format!("model.layers.{i}.{part}")];
        let blk = |part: &str| format!("blk.{i}.{part}");
        for suffix in ["weight", "bias"] {
            if fused {
                let parts: Vec<&candle_core::Tensor> = ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .map(|p| hf(&format!("self_attn.{p}.{suffix}")))
                    .collect();
                put(
                    blk(&format!("attn_qkv.{suffix}")),
                    &candle_core::Tensor::cat(&parts, 0).unwrap(),
                );
            } else {
                for (hf_name, name) in [
                    ("q_proj", "attn_q"),
                    ("k_proj", "attn_k"),
                    ("v_proj", "attn_v"),
                ] {
                    put(
                        blk(&format!("{name}.{suffix}")),
                        hf(&format!("self_attn.{hf_name}.{suffix}")),
                    );
                }
            }
            put(
                blk(&format!("attn_output.{suffix}")),
                hf(&format!("self_attn.dense.{suffix}")),
            );
            put(
                blk(&format!("ffn_up.{suffix}")),
                hf(&format!("mlp.fc1.{suffix}")),
            );
            put(
                blk(&format!("ffn_down.{suffix}")),
                hf(&format!("mlp.fc2.{suffix}")),
            );
            put(
                blk(&format!("attn_norm.{suffix}")),
                hf(&format!("input_layernorm.{suffix}")),
            );
        }
    }
    let width = n("hidden_size");
    let heads = n("num_attention_heads");
    let rope_dim =
        ((width / heads) as f64 * config["partial_rotary_factor"].as_f64().unwrap()) as u32;
    use gguf_file::Value;
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("phi2".into())),
        (
            "phi2.context_length",
            Value::U32(n("max_position_embeddings")),
        ),
        ("phi2.embedding_length", Value::U32(width)),
        (
            "phi2.feed_forward_length",
            Value::U32(n("intermediate_size")),
        ),
        ("phi2.block_count", Value::U32(n("num_hidden_layers"))),
        ("phi2.attention.head_count", Value::U32(heads)),
        (
            "phi2.attention.head_count_kv",
            Value::U32(n("num_key_value_heads")),
        ),
        ("phi2.attention.layer_norm_epsilon", Value::F32(1e-5)),
        ("phi2.rope.dimension_count", Value::U32(rope_dim)),
    ];
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let name = if fused {
        "phi2-fused.gguf"
    } else {
        "phi2.gguf"
    };
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &refs).unwrap();
    path
}

/// Path of the real SmolLM2 model fetched by `scripts/fetch-model.sh` (the one definition
/// every test tree uses).
#[allow(unused_imports)] // some test binaries load only synthetic models
pub use cascade_e2e::fixtures::model_path as smollm2_path;

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
