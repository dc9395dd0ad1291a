//! Tokenizers: from `tokenizer.json`, or from the vocabulary embedded in a GGUF.

mod sentencepiece;

use std::path::Path;

use candle_core::quantized::{gguf_file, tokenizer::TokenizerFromGguf};
use tokenizers::pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence};
use tokenizers::Tokenizer;

use crate::error::LoadError;

/// Loads a `tokenizer.json`.
pub fn from_file(path: &Path) -> Result<Tokenizer, LoadError> {
    Tokenizer::from_file(path).map_err(|e| LoadError::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Builds the tokenizer described by a GGUF's `tokenizer.ggml.*` metadata.
pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Tokenizer, LoadError> {
    let err = |reason: String| LoadError::Tokenizer {
        path: path.to_path_buf(),
        reason,
    };
    // candle reads only byte-level BPE vocabularies (`gpt2`, with merges);
    // SentencePiece ones (`llama`: Gemma, Llama 2) carry scores instead.
    if gguf_string(content, "tokenizer.ggml.model").as_deref() == Some("llama") {
        return sentencepiece::Vocabulary::from_gguf(content)
            .and_then(sentencepiece::Vocabulary::into_tokenizer)
            .map_err(err);
    }
    let mut tokenizer = Tokenizer::from_gguf(content).map_err(|e| err(e.to_string()))?;
    let pre = content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if pre == "smollm" {
        // candle falls back to GPT-2's ByteLevel with a prefix space for
        // `smollm`, which encodes "system" after "<|im_start|>" as "Ġsystem"
        // and breaks the chat template. SmolLM2's own tokenizer.json splits
        // digits individually and adds no prefix space; with this the ids
        // match llama.cpp's.
        let pre_tokenizer = Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ]);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    }
    Ok(tokenizer)
}

/// Reads a string metadata value from a GGUF.
pub fn gguf_string(content: &gguf_file::Content, key: &str) -> Option<String> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .cloned()
}

/// Reads an integer metadata value from a GGUF.
pub fn gguf_u32(content: &gguf_file::Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok())
}
