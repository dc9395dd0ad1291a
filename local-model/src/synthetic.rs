//! Randomly initialised GGUF checkpoints with real tensor names and
//! metadata, for tests and benchmarks where the real weights cannot be had.
//!
//! Speed does not depend on the weights' values, so a random Phi-1.5 at full
//! size in llama.cpp's `phi2` layout measures Cascade and llama.cpp on the
//! same file; a tiny one tests the loader.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::LoadError;

/// Dimensions of a `phi2`-architecture model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phi2Dims {
    pub width: usize,
    pub blocks: usize,
    pub heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    /// Leading dimensions of each head with rotary embeddings.
    pub rope_dim: usize,
    pub context: usize,
}

impl Phi2Dims {
    /// Phi-1.5 (1.4 B parameters), as in its `config.json`.
    pub fn phi_1_5() -> Self {
        Self {
            width: 2048,
            blocks: 24,
            heads: 32,
            ffn: 8192,
            vocab: 51200,
            rope_dim: 32,
            context: 2048,
        }
    }
}

/// How the query, key and value projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// `attn_q`, `attn_k`, `attn_v` (today's converters).
    Separate,
    /// One `attn_qkv` (older converters).
    Fused,
}

/// A vocabulary to embed: `tokenizer.ggml.*` metadata, padded with unused
/// tokens to the model's vocabulary size.
pub type Vocabulary = Vec<(String, gguf_file::Value)>;

/// The `tokenizer.ggml.*` entries of a GGUF file (a byte-level BPE
/// vocabulary such as SmolLM2's), for [`write_random_phi2`].
pub fn vocabulary_of(path: &Path) -> Result<Vocabulary, LoadError> {
    let mut file = std::fs::File::open(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| LoadError::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut entries: Vocabulary = content
        .metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with("tokenizer.ggml.") || k == "tokenizer.chat_template")
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    if !entries.iter().any(|(k, _)| k == "tokenizer.ggml.tokens") {
        return Err(LoadError::Tokenizer {
            path: path.to_path_buf(),
            reason: "no tokenizer.ggml.tokens in the file".into(),
        });
    }
    Ok(entries)
}

/// Writes a randomly initialised `phi2` GGUF: every matrix in `dtype`,
/// norms and biases in F32, with `vocabulary` (padded to `dims.vocab`) or
/// none (then a `tokenizer.json` must sit beside the file).
///
/// Values are drawn from a fixed generator seeded by `seed`, small enough
/// (±0.02, as in Phi's initialisation) that activations stay finite.
pub fn write_random_phi2(
    path: &Path,
    dims: Phi2Dims,
    dtype: GgmlDType,
    layout: QkvLayout,
    vocabulary: Option<Vocabulary>,
    seed: u64,
) -> Result<(), LoadError> {
    let weights_err = |e: candle_core::Error| LoadError::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if dims.heads == 0
        || !dims.width.is_multiple_of(dims.heads)
        || dims.rope_dim > dims.width / dims.heads
    {
        return Err(LoadError::InvalidOption(format!(
            "inconsistent dimensions {dims:?}"
        )));
    }
    let mut rng = SplitMix64(seed);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut matrix = |name: String, rows: usize, cols: usize, rng: &mut SplitMix64| {
        let values: Vec<f32> = (0..rows * cols).map(|_| rng.symmetric(0.02)).collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu)
            .and_then(|t| QTensor::quantize(&t, dtype))
            .map_err(weights_err)?;
        tensors.push((name, t));
        Ok::<(), LoadError>(())
    };
    let (w, f) = (dims.width, dims.ffn);
    matrix("token_embd.weight".into(), dims.vocab, w, &mut rng)?;
    for i in 0..dims.blocks {
        match layout {
            QkvLayout::Fused => matrix(format!("blk.{i}.attn_qkv.weight"), 3 * w, w, &mut rng)?,
            QkvLayout::Separate => {
                for part in ["attn_q", "attn_k", "attn_v"] {
                    matrix(format!("blk.{i}.{part}.weight"), w, w, &mut rng)?;
                }
            }
        }
        matrix(format!("blk.{i}.attn_output.weight"), w, w, &mut rng)?;
        matrix(format!("blk.{i}.ffn_up.weight"), f, w, &mut rng)?;
        matrix(format!("blk.{i}.ffn_down.weight"), w, f, &mut rng)?;
    }
    matrix("output.weight".into(), dims.vocab, w, &mut rng)?;

    let vector = |name: String, len: usize, value: Option<f32>, rng: &mut SplitMix64| {
        let values: Vec<f32> = (0..len)
            .map(|_| value.unwrap_or_else(|| rng.symmetric(0.02)))
            .collect();
        Tensor::from_vec(values, len, &Device::Cpu)
            .and_then(|t| QTensor::quantize(&t, GgmlDType::F32))
            .map(|t| (name, t))
            .map_err(weights_err)
    };
    let mut small = Vec::new();
    for i in 0..dims.blocks {
        small.push(vector(
            format!("blk.{i}.attn_norm.weight"),
            w,
            Some(1.0),
            &mut rng,
        )?);
        small.push(vector(
            format!("blk.{i}.attn_norm.bias"),
            w,
            None,
            &mut rng,
        )?);
        match layout {
            QkvLayout::Fused => small.push(vector(
                format!("blk.{i}.attn_qkv.bias"),
                3 * w,
                None,
                &mut rng,
            )?),
            QkvLayout::Separate => {
                for part in ["attn_q", "attn_k", "attn_v"] {
                    small.push(vector(format!("blk.{i}.{part}.bias"), w, None, &mut rng)?);
                }
            }
        }
        small.push(vector(
            format!("blk.{i}.attn_output.bias"),
            w,
            None,
            &mut rng,
        )?);
        small.push(vector(format!("blk.{i}.ffn_up.bias"), f, None, &mut rng)?);
        small.push(vector(format!("blk.{i}.ffn_down.bias"), w, None, &mut rng)?);
    }
    small.push(vector("output_norm.weight".into(), w, Some(1.0), &mut rng)?);
    small.push(vector("output_norm.bias".into(), w, None, &mut rng)?);
    small.push(vector("output.bias".into(), dims.vocab, None, &mut rng)?);
    tensors.extend(small);

    use gguf_file::Value;
    let u32_of = |v: usize| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("phi2".into())),
        ("general.name".into(), Value::String("random phi2".into())),
        ("general.file_type".into(), Value::U32(file_type(dtype))),
        ("phi2.context_length".into(), u32_of(dims.context)),
        ("phi2.embedding_length".into(), u32_of(w)),
        ("phi2.feed_forward_length".into(), u32_of(f)),
        ("phi2.block_count".into(), u32_of(dims.blocks)),
        ("phi2.attention.head_count".into(), u32_of(dims.heads)),
        ("phi2.attention.head_count_kv".into(), u32_of(dims.heads)),
        ("phi2.attention.layer_norm_epsilon".into(), Value::F32(1e-5)),
        ("phi2.rope.dimension_count".into(), u32_of(dims.rope_dim)),
    ];
    if let Some(vocabulary) = vocabulary {
        metadata.extend(padded(vocabulary, dims.vocab)?);
    }
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let io_err = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(io_err)?);
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).map_err(weights_err)?;
    std::io::Write::flush(&mut file).map_err(io_err)
}

/// The vocabulary with unused tokens appended up to `size` entries (the
/// model's embedding rows), as llama.cpp requires one token per row.
fn padded(vocabulary: Vocabulary, size: usize) -> Result<Vocabulary, LoadError> {
    use gguf_file::Value;
    let mut entries: HashMap<String, Value> = vocabulary.into_iter().collect();
    let tokens = match entries.remove("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => tokens,
        _ => {
            return Err(LoadError::InvalidOption(
                "vocabulary without a token list".into(),
            ))
        }
    };
    if tokens.len() > size {
        return Err(LoadError::InvalidOption(format!(
            "vocabulary of {} tokens does not fit {size} embedding rows",
            tokens.len()
        )));
    }
    let real = tokens.len();
    let mut tokens = tokens;
    tokens.extend((real..size).map(|i| Value::String(format!("<|unused_{i}|>"))));
    entries.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens));
    if let Some(Value::Array(mut types)) = entries.remove("tokenizer.ggml.token_type") {
        // 4: user-defined, a token matched as a whole and never produced by merges.
        types.extend((types.len()..size).map(|_| Value::I32(4)));
        entries.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
    }
    let mut out: Vocabulary = entries.into_iter().collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// llama.cpp's `general.file_type` for a file of mostly `dtype` weights.
fn file_type(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 12,
        GgmlDType::Q4K => 15,
        GgmlDType::Q5K => 17,
        GgmlDType::Q6K => 18,
        _ => 0,
    }
}

/// SplitMix64: output fixed by its definition, so a seed means the same
/// file across crate versions.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-scale, scale)`.
    fn symmetric(&mut self, scale: f32) -> f32 {
        let unit = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * scale
    }
}
