//! Local LLM inference on candle, scoring every generated token.
//!
//! Loads Phi-1.5 (safetensors, quantized mixformer GGUF, or llama.cpp's
//! phi2 GGUF), llama-family GGUF (SmolLM2) and Gemma 3 GGUF; generates with greedy or sampled
//! decoding; reports each token's log-prob, entropy and top-1/top-2 margin
//! from the raw logits; and runs the model on its own thread behind a
//! bounded queue.

pub mod backend;
pub mod bench;
pub mod detok;
pub mod engine;
pub mod error;
pub mod generate;
pub mod model;
pub mod phi_mixed;
pub mod probe;
pub mod sampling;
mod sequence;
pub mod signals;
pub mod spec;
pub mod synthetic;
pub mod template;
pub mod threads;
pub mod tokenizer;
pub mod worker;

pub use backend::Architecture;
pub use engine::{Kernels, PrefillWeights};
pub use error::{GenerateError, LoadError};
pub use generate::{
    Control, FinishReason, Generation, GenerationParams, Prompt, Timings, TokenEvent, Usage,
};
pub use model::{
    EncodedPrompt, LoadOptions, LocalModel, ModelInfo, PromptEncoder, TemplateChoice, WeightDtype,
    DEFAULT_PREFILL_CHUNK_TOKENS,
};
pub use probe::ProbeFeatures;
pub use sampling::Sampling;
pub use signals::TokenRecord;
pub use spec::ModelSpec;
pub use template::{ChatMessage, ChatTemplate};
pub use worker::{
    BatchLimits, GenerateRequest, ModelHandle, TokenCallback, WorkerError, WorkerOutput,
};
