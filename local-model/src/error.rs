//! Error types of the local model engine.

use std::path::PathBuf;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model file not found: {0}")]
    NotFound(PathBuf),
    #[error("{path}: missing {what}")]
    MissingFile { path: PathBuf, what: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid GGUF file: {reason}")]
    InvalidGguf { path: PathBuf, reason: String },
    #[error("{path}: invalid config: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
    #[error("{path}: unsupported model architecture `{arch}` (supported: llama-family GGUF, gemma3 GGUF, Phi-1.5 safetensors or GGUF)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: cannot build tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{path}: cannot load weights: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("invalid chat template: {0}")]
    Template(String),
    #[error("model spec `{spec}` is not a local path and the hub is unreachable ({reason}); download the files and pass their local path")]
    HubUnavailable { spec: String, reason: String },
    #[error("invalid model spec `{spec}`: {reason}")]
    InvalidSpec { spec: String, reason: String },
    #[error("unsupported dtype `{0}` (use f32 or bf16)")]
    UnsupportedDtype(String),
    #[error("invalid model option: {0}")]
    InvalidOption(String),
}

/// Why a generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt_tokens} tokens; the model's context window is {context_window}"
    )]
    PromptTooLong {
        prompt_tokens: usize,
        context_window: usize,
    },
    #[error("invalid generation parameter: {0}")]
    InvalidParameter(String),
    #[error("chat template failed: {0}")]
    Template(String),
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
    #[error("model forward pass failed: {0}")]
    Model(String),
}

impl From<candle_core::Error> for GenerateError {
    fn from(e: candle_core::Error) -> Self {
        GenerateError::Model(e.to_string())
    }
}
