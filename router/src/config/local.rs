//! `[local]`: the local model and its queue.

use super::*;

/// `[local]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLocal {
    /// A .gguf file, a Hugging Face-layout directory, or a hub id.
    pub model: String,
    /// The name clients use for the local model; defaults to the file stem.
    pub name: Option<String>,
    pub template: String,
    pub dtype: String,
    /// Forward-pass code for llama-family, Gemma 3 and phi2 GGUF: `tuned`, `reference` or `exact`.
    pub kernels: String,
    /// Dense prefill copy of the weights: `auto`, `dense` or `quantized`.
    pub prefill_weights: String,
    /// Skip the part of a prompt that repeats the previous prompt's start.
    pub reuse_prompt_prefix: bool,
    pub queue_depth: usize,
    /// Requests decoded together in one step at most (GGUF models on the tuned engine).
    pub max_batch: usize,
    /// KV-cache memory the requests running together may take, in MiB.
    pub kv_cache_mib: usize,
    /// Prompt tokens run between two decode steps while other requests decode.
    pub prefill_chunk_tokens: usize,
    /// Cap on tokens the local model generates per request.
    pub max_tokens: usize,
    pub warm_up: bool,
}

impl Default for RawLocal {
    fn default() -> Self {
        Self {
            model: String::new(),
            name: None,
            template: "auto".into(),
            dtype: "f32".into(),
            kernels: "tuned".into(),
            prefill_weights: "auto".into(),
            reuse_prompt_prefix: false,
            queue_depth: 8,
            max_batch: local_model::BatchLimits::default().max_batch,
            kv_cache_mib: local_model::BatchLimits::default().kv_cache_mib,
            prefill_chunk_tokens: local_model::DEFAULT_PREFILL_CHUNK_TOKENS,
            max_tokens: 256,
            warm_up: true,
        }
    }
}

/// Validated `[local]`.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub model: String,
    pub name: String,
    pub template: local_model::TemplateChoice,
    pub dtype: local_model::WeightDtype,
    pub kernels: local_model::Kernels,
    pub prefill_weights: local_model::PrefillWeights,
    pub reuse_prompt_prefix: bool,
    pub queue_depth: usize,
    pub batch: local_model::BatchLimits,
    /// Prompt tokens per prefill part (`local_model::LoadOptions::prefill_chunk_tokens`).
    pub prefill_chunk_tokens: usize,
    pub max_tokens: usize,
    pub warm_up: bool,
}

pub(super) fn validate_local(
    raw: &RawLocal,
    base_dir: Option<&Path>,
) -> Result<LocalConfig, ConfigError> {
    if raw.model.trim().is_empty() {
        return Err(invalid(
            "local.model",
            "is required: a .gguf file, a model directory or a hub id",
        ));
    }
    // A path relative to the config file wins when it exists there; anything
    // else (a path relative to the working directory, a hub id) is kept as is.
    let model = match base_dir.map(|d| d.join(&raw.model)) {
        Some(p) if Path::new(&raw.model).is_relative() && p.exists() => {
            p.to_string_lossy().into_owned()
        }
        _ => raw.model.clone(),
    };
    let name = match &raw.name {
        Some(n) if n.trim().is_empty() => return Err(invalid("local.name", "must not be empty")),
        Some(n) => n.clone(),
        None => default_local_name(&raw.model),
    };
    let template = raw
        .template
        .parse()
        .map_err(|e: local_model::LoadError| invalid("local.template", e.to_string()))?;
    let dtype = raw
        .dtype
        .parse()
        .map_err(|e: local_model::LoadError| invalid("local.dtype", e.to_string()))?;
    let kernels = raw
        .kernels
        .parse()
        .map_err(|e: local_model::LoadError| invalid("local.kernels", e.to_string()))?;
    let prefill_weights = raw
        .prefill_weights
        .parse()
        .map_err(|e: local_model::LoadError| invalid("local.prefill_weights", e.to_string()))?;
    if raw.max_tokens == 0 {
        return Err(invalid("local.max_tokens", "must be positive"));
    }
    if raw.max_batch == 0 {
        return Err(invalid(
            "local.max_batch",
            "must be positive (1 runs one request at a time)",
        ));
    }
    if raw.kv_cache_mib == 0 {
        return Err(invalid("local.kv_cache_mib", "must be positive"));
    }
    if raw.prefill_chunk_tokens == 0 {
        return Err(invalid("local.prefill_chunk_tokens", "must be positive"));
    }
    Ok(LocalConfig {
        model,
        name,
        template,
        dtype,
        kernels,
        prefill_weights,
        reuse_prompt_prefix: raw.reuse_prompt_prefix,
        queue_depth: raw.queue_depth,
        batch: local_model::BatchLimits {
            max_batch: raw.max_batch,
            kv_cache_mib: raw.kv_cache_mib,
        },
        prefill_chunk_tokens: raw.prefill_chunk_tokens,
        max_tokens: raw.max_tokens,
        warm_up: raw.warm_up,
    })
}

/// `models/SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct.Q4_1`.
pub(super) fn default_local_name(spec: &str) -> String {
    let last = spec
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or(spec);
    last.strip_suffix(".gguf").unwrap_or(last).to_string()
}
