//! Command-line interface of the `cascade` binary.

use std::path::PathBuf;

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
    /// Measure how well each confidence rule predicts the local model's correctness.
    Eval(EvalArgs),
    /// Choose a threshold and fit the learned confidence rule from an eval run.
    Calibrate(CalibrateArgs),
    /// Print spend by team and experiment results from the ledger.
    Report(ReportArgs),
}

/// `cascade report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The gateway's configuration file (its `[storage]` names the ledger).
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
    /// The budget window to report spend over: day or month (the current one).
    #[arg(long, default_value = "day")]
    pub window: String,
    /// Report this experiment only (default: every configured experiment).
    #[arg(long)]
    pub experiment: Option<String>,
    /// Print the admin API's JSON instead of tables.
    #[arg(long)]
    pub json: bool,
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
    #[command(flatten)]
    pub load: LoadArgs,
}

/// How to load a model (shared by every command that loads one).
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Chat template: auto, model (the model's own), phi, plain.
    #[arg(long, default_value = "auto")]
    pub template: String,
    /// Precision of safetensors weights: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Forward-pass code for llama-family, Gemma 3 and phi2 GGUF: tuned
    /// (Cascade's engine), reference (candle's model code on the file's
    /// weights as stored; not phi2) or exact (F32 products on the
    /// dequantised weights; slow).
    #[arg(long, default_value = "tuned")]
    pub kernels: String,
    /// Dense prefill copy of the weights (tuned engine): auto (when it
    /// takes at most 512 MiB), dense or quantized.
    #[arg(long, default_value = "auto")]
    pub prefill_weights: String,
}

impl LoadArgs {
    /// The load options these arguments name.
    pub fn options(&self) -> anyhow::Result<local_model::LoadOptions> {
        Ok(local_model::LoadOptions {
            dtype: self.dtype.parse()?,
            template: self.template.parse()?,
            kernels: self.kernels.parse()?,
            prefill_weights: self.prefill_weights.parse()?,
            ..local_model::LoadOptions::default()
        })
    }
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

/// How escalated items are valued in `cascade eval` and `cascade calibrate`.
#[derive(Debug, Args, Clone)]
pub struct EscalationArgs {
    /// Share of escalated items the remote model answers correctly.
    #[arg(long, default_value_t = 1.0)]
    pub remote_accuracy: f64,
    /// Remote price per million input tokens, USD (default: gpt-4o-mini).
    #[arg(long, default_value_t = 0.15)]
    pub price_input: f64,
    /// Remote price per million output tokens, USD.
    #[arg(long, default_value_t = 0.60)]
    pub price_output: f64,
    /// Cross-validation folds (learned rule, threshold checks).
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// Seed of the item selection and the folds.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `cascade eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Local model (.gguf file, Hugging Face directory or hub id); not used with --rescore.
    #[arg(long, env = "CASCADE_MODEL")]
    pub model: Option<String>,
    #[command(flatten)]
    pub load: LoadArgs,
    /// capitals, arc, gsm8k, mmlu, nq_open, webquestions, mawps, or a labeled .jsonl file (see docs/confidence.md).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Folder of the public development sets.
    #[arg(long, default_value = "../shared/data")]
    pub data_dir: PathBuf,
    /// Evaluate this many items, drawn at random with --seed (all, in file order, if absent).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only items whose position is K modulo N, written `K/N`: splits one run over processes.
    #[arg(long)]
    pub shard: Option<String>,
    /// Generation limit per answer (default: 24 short answers, 8 multiple choice, 256 arithmetic).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Score saved runs (repeatable; pooled) instead of generating.
    #[arg(long)]
    pub rescore: Vec<PathBuf>,
    /// With --rescore: grade the saved answers again with their saved graders.
    #[arg(long)]
    pub regrade: bool,
    /// Output folder: run.jsonl, summary.json, deferral.svg, deferral.png.
    #[arg(long, default_value = "eval-out")]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub escalation: EscalationArgs,
}

/// `cascade calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// A run.jsonl written by `cascade eval` (repeatable; pooled). Items without a grade
    /// (unlabeled traffic) support --target-rate only.
    #[arg(long, required_unless_present = "ledger")]
    pub run: Vec<PathBuf>,
    /// The gateway's own traffic instead: the ledger (`sqlite://...` or `postgres://...`)
    /// over the last --since-days. Requests served locally with /v1/feedback scores are the
    /// labels of a calibrated rule, a learned rule and --min-p-correct (when there are enough);
    /// --target-rate fits a threshold on every recorded --rule value, labeled or not. Where the
    /// policy kept the answers' signals (`log_signals`), those requests are items as in a
    /// labeled run: every rule, the learned rule on every feature, and --probe.
    #[arg(long, conflicts_with_all = ["run", "target_quality"])]
    pub ledger: Option<String>,
    /// With --ledger: how many days of traffic to read.
    #[arg(long, default_value_t = 30)]
    pub since_days: u32,
    /// With --ledger: only this team's requests (its own traffic and feedback).
    #[arg(long, requires = "ledger")]
    pub team: Option<String>,
    /// With --ledger: a feedback score (0..1; thumbs up is 1, down 0) at or above this counts
    /// as a right local answer, below it as a wrong one.
    #[arg(long, requires = "ledger", default_value_t = crate::eval::feedback::DEFAULT_CUTOFF)]
    pub feedback_cutoff: f64,
    /// The rule to threshold: sum_logprob (the default rule), mean_logprob, min_logprob,
    /// quantile_0.1, ..., or learned.
    #[arg(long, default_value = "sum_logprob")]
    pub rule: String,
    /// Threshold giving this escalation rate (0..1).
    #[arg(long, conflicts_with = "target_quality")]
    pub target_rate: Option<f64>,
    /// Threshold reaching this quality (0..1) with the fewest escalations.
    #[arg(long)]
    pub target_quality: Option<f64>,
    /// Instead of choosing one: what this threshold does (rate, quality, the baselines at the
    /// same rate, early-exit savings).
    #[arg(long, allow_hyphen_values = true, conflicts_with_all = ["target_rate", "target_quality", "ledger"])]
    pub threshold: Option<f64>,
    /// Also judge rule choice across kinds of traffic: for each dataset in the runs, the rule
    /// chosen on the others (and the learned rule fitted on the others) scored on it.
    #[arg(long)]
    pub leave_one_dataset_out: bool,
    /// Serve-local probability for the calibrated rule (--rule through isotonic regression,
    /// saved as <name>-<rule>.json): prints the raw threshold it amounts to on this data.
    #[arg(long)]
    pub min_p_correct: Option<f64>,
    /// Also fit and judge the hidden-state probe (logistic regression on the features
    /// `cascade eval` saved beside each run, in run.probe.jsonl, or the ledger kept for a
    /// policy with `log_signals = "hidden"`, with the learned rule's
    /// log-prob features): in-set k-fold and cross-set figures per dataset against sum_logprob
    /// and mean_logprob, and the probe fitted on every item saved as <name>-probe.json.
    #[arg(long)]
    pub probe: bool,
    /// The probe's hidden inputs, comma-separated: final_mean, final_last, middle_mean,
    /// middle_last.
    #[arg(long, default_value = "middle_mean,middle_last", requires = "probe")]
    pub probe_inputs: String,
    /// Dimensions of the probe's fixed random projection of the standardised hidden values
    /// (0: none).
    #[arg(long, default_value_t = 64, requires = "probe")]
    pub probe_dims: usize,
    /// The probe on hidden states alone, without the log-prob features.
    #[arg(long, requires = "probe")]
    pub probe_hidden_only: bool,
    /// Name of the learned rule (its file is <name>.json in --out; the calibrated rule's is
    /// <name>-<rule>.json).
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Output folder: <name>.json, calibration.json, reliability.svg/png.
    #[arg(long, default_value = "calibrate-out")]
    pub out: PathBuf,
    #[command(flatten)]
    pub escalation: EscalationArgs,
}
