//! Command-line interface of the `cascade` binary.

use clap::{Args, Parser, Subcommand};

/// Cascade: answers LLM requests with a local model first and escalates to a
/// remote model only when the local one is unsure.
#[derive(Debug, Parser)]
#[command(name = "cascade", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate an answer with the local model and print it.
    Generate(GenerateArgs),
    /// Measure load time, prefill and decode speed, and peak memory.
    Bench(BenchArgs),
    /// Manage team API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Run the OpenAI-compatible gateway.
    Serve(ServeArgs),
}

/// `cascade keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print a new random API key once, with the SHA-256 hash to put in the config.
    New,
}

/// `cascade serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The configuration file (TOML); `CASCADE_<SECTION>__<KEY>` variables override it.
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
    /// Address to listen on, overriding `server.listen`.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
}

/// Which model and how to load it.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A .gguf file, a Hugging Face-layout directory, or a hub id (org/name[:file.gguf]).
    #[arg(long, env = "CASCADE_MODEL")]
    pub model: String,
    /// Chat template: auto, model (the model's own), phi, plain.
    #[arg(long, default_value = "auto")]
    pub template: String,
    /// Precision of safetensors weights: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// `cascade generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass (with temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed for sampled decoding.
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
    /// Stop sequence (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Treat the prompt as raw text instead of a chat user message.
    #[arg(long)]
    pub raw: bool,
    /// Print one JSON object with text, per-token signals, usage and timings.
    #[arg(long)]
    pub json: bool,
    /// The prompt.
    pub prompt: String,
}

/// `cascade bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 200)]
    pub prompt_tokens: usize,
    /// Tokens to decode per run.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Number of timed runs (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}
