//! A loaded local model: weights, tokenizer, chat template, and generation.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use candle_transformers::models::{
    mixformer, phi, quantized_gemma3, quantized_llama, quantized_mixformer,
};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::backend::{Architecture, Backend, Next};
use crate::engine::gemma3::Gemma3;
use crate::engine::llama::{self as tuned_llama, Llama};
use crate::engine::phi2::Phi2;
use crate::engine::{DecodeStep, Kernels, PrefillWeights};
use crate::error::{GenerateError, LoadError};
use crate::generate::{Control, Generation, GenerationParams, Prompt, TokenEvent};
use crate::phi_mixed::{MixedPhi, PhiConfig};
use crate::sampling::Sampling;
use crate::sequence::Sequence;
use crate::signals::signals_from_logits;
use crate::spec::{ModelSpec, ResolvedModel};
use crate::template::ChatTemplate;
use crate::tokenizer;

/// Precision of unquantized (safetensors) weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for WeightDtype {
    type Err = LoadError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(WeightDtype::F32),
            "bf16" => Ok(WeightDtype::Bf16),
            other => Err(LoadError::UnsupportedDtype(other.to_string())),
        }
    }
}

/// Which chat template to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TemplateChoice {
    /// The model's own template if it has one, else Phi's for Phi models,
    /// else plain text.
    #[default]
    Auto,
    /// The model's own Jinja template; an error if it has none.
    Model,
    /// `Instruct: …\nOutput:`.
    Phi,
    /// Messages joined by blank lines.
    Plain,
}

impl std::str::FromStr for TemplateChoice {
    type Err = LoadError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(TemplateChoice::Auto),
            "model" => Ok(TemplateChoice::Model),
            "phi" => Ok(TemplateChoice::Phi),
            "plain" => Ok(TemplateChoice::Plain),
            other => Err(LoadError::Template(format!(
                "unknown template `{other}` (choose one of {})",
                crate::template::TEMPLATE_NAMES.join(", ")
            ))),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: WeightDtype,
    pub template: TemplateChoice,
    /// Which forward-pass code runs llama-family GGUF models.
    pub kernels: Kernels,
    /// Whether the tuned engine keeps a dense copy of the weights for prefill.
    pub prefill_weights: PrefillWeights,
    /// Whether the tuned engine skips the part of a prompt that repeats the
    /// previous prompt's start (a shared system prompt). Off by default:
    /// the skipped part was computed as part of another prompt, in chunks
    /// of another size, and the log-probs can then differ in the third
    /// decimal (measured up to 0.002 nats), so the same request could get a
    /// slightly different confidence depending on what ran before it.
    /// Applies to `LocalModel::generate`; the batching worker
    /// (`ModelHandle`) gives every request a cache of its own and never
    /// reuses a prefix.
    pub reuse_prompt_prefix: bool,
    /// The tuned engine runs every prompt in parts of this many tokens, at
    /// the same positions (0, n, 2n, ...) whether the request runs alone or
    /// joins a batch. The batching worker runs one part between two decode
    /// steps, so a long prompt delays the running requests by one part at
    /// a time (chunked prefill). The boundaries must not depend on load:
    /// a row's attention sums over its part's keys in an order that depends
    /// on the part's size, and with 8-bit activations a last-bit difference
    /// there moved SmolLM2's next-token logits by up to 1.0 in a test.
    pub prefill_chunk_tokens: usize,
}

/// Prompt tokens per prefill part unless set (see
/// [`LoadOptions::prefill_chunk_tokens`]).
pub const DEFAULT_PREFILL_CHUNK_TOKENS: usize = 64;

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: WeightDtype::default(),
            template: TemplateChoice::default(),
            kernels: Kernels::default(),
            prefill_weights: PrefillWeights::default(),
            reuse_prompt_prefix: false,
            prefill_chunk_tokens: DEFAULT_PREFILL_CHUNK_TOKENS,
        }
    }
}

/// Facts about a loaded model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// A short name: the file or directory name.
    pub name: String,
    pub architecture: Architecture,
    /// Maximum prompt plus generated tokens.
    pub context_window: usize,
    /// Name of the chat template in use.
    pub template: &'static str,
    /// Seconds spent loading.
    pub load_seconds: f64,
}

/// A model ready to generate; owns the weights and the KV cache, so it is
/// used from one thread at a time (see [`crate::worker`]).
pub struct LocalModel {
    backend: Backend,
    encoder: PromptEncoder,
    eos_ids: Vec<u32>,
    device: Device,
    info: ModelInfo,
}

/// Turns prompts into token ids: the tokenizer and the chat template.
/// Cheap to clone, so request handlers can count tokens without the model.
#[derive(Clone)]
pub struct PromptEncoder {
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
}

impl PromptEncoder {
    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Renders a prompt to the exact text the model sees.
    pub fn render(&self, prompt: &Prompt) -> Result<String, GenerateError> {
        match prompt {
            Prompt::Chat(messages) => self.template.render(messages),
            Prompt::Text(text) => Ok(text.clone()),
        }
    }

    /// Tokenizes a prompt as generation would.
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>, GenerateError> {
        let text = self.render(prompt)?;
        // A model's own (Jinja) template writes its BOS itself; raw text and
        // the built-in templates get the tokenizer's, which models such as
        // Gemma 3 were trained to see first.
        let add_special = match prompt {
            Prompt::Text(_) => true,
            Prompt::Chat(_) => !self.template.writes_bos(),
        };
        let encoding = self
            .tokenizer
            .encode(text.as_str(), add_special)
            .map_err(|e| GenerateError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Encodes a prompt once, for a caller that needs its length before generating (the
    /// gateway's context check and cost estimate) and then hands it to the worker with the
    /// request, so that the model's thread, which every batched sequence waits on, does not
    /// render and tokenize it a second time.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<EncodedPrompt, GenerateError> {
        Ok(EncodedPrompt {
            ids: self.encode(prompt)?,
            tokenizer: Arc::clone(&self.tokenizer),
        })
    }
}

/// A prompt's token ids from [`PromptEncoder::encode_prompt`], tied to the tokenizer that
/// produced them: a model whose tokenizer is another one encodes the prompt itself.
#[derive(Clone)]
pub struct EncodedPrompt {
    ids: Vec<u32>,
    tokenizer: Arc<Tokenizer>,
}

impl EncodedPrompt {
    /// The prompt's length in tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the prompt has no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl std::fmt::Debug for EncodedPrompt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedPrompt")
            .field("tokens", &self.ids.len())
            .finish_non_exhaustive()
    }
}

impl LocalModel {
    /// Loads a model from a spec string (path or hub id).
    pub fn load(spec: &str, options: &LoadOptions) -> Result<Self, LoadError> {
        let resolved = ModelSpec::parse(spec)?.resolve()?;
        Self::load_resolved(&resolved, options)
    }

    /// Loads a model from already resolved files.
    pub fn load_resolved(files: &ResolvedModel, options: &LoadOptions) -> Result<Self, LoadError> {
        let started = Instant::now();
        let device = Device::Cpu;
        let mut model = if let Some(gguf) = &files.gguf {
            load_gguf(gguf, files, options, &device)?
        } else if let Some(weights) = &files.safetensors {
            load_phi_safetensors(weights, files, options, &device)?
        } else {
            return Err(LoadError::MissingFile {
                path: files.origin.clone(),
                what: "weights".into(),
            });
        };
        model.info.load_seconds = started.elapsed().as_secs_f64();
        Ok(model)
    }

    /// Puts the parts every loader produces together.
    fn assemble(
        backend: Backend,
        info: ModelInfo,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        eos_ids: Vec<u32>,
        device: &Device,
    ) -> Self {
        Self {
            backend,
            info,
            encoder: PromptEncoder {
                tokenizer: Arc::new(tokenizer),
                template,
            },
            eos_ids,
            device: device.clone(),
        }
    }

    /// Facts about this model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The token ids that end generation (end-of-sequence and end-of-turn).
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The prompt encoder (tokenizer and chat template).
    pub fn encoder(&self) -> &PromptEncoder {
        &self.encoder
    }

    /// Forgets the cached sequence, so the next prompt is computed from its
    /// first token (benchmarks use this to time a full prefill every run).
    pub fn clear_cache(&mut self) {
        self.backend.reset();
    }

    /// Bytes held by a dense copy of the weights kept for prefill (0 when
    /// there is none).
    pub fn prefill_copy_bytes(&self) -> usize {
        match &self.backend {
            Backend::Tuned { model, .. } => model.dense_bytes(),
            _ => 0,
        }
    }

    /// The log-prob of each token of `continuation` after `prompt`, fed one
    /// at a time as decoding would: how sure the model is of a given answer.
    /// Tests use it to compare engines token for token.
    pub fn continuation_logprobs(
        &mut self,
        prompt: &Prompt,
        continuation: &[u32],
    ) -> Result<Vec<f32>, GenerateError> {
        let prompt_ids = self.encoder.encode(prompt)?;
        if prompt_ids.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let total = prompt_ids.len() + continuation.len();
        if total > self.info.context_window {
            return Err(GenerateError::PromptTooLong {
                prompt_tokens: total,
                context_window: self.info.context_window,
            });
        }
        self.backend.reset();
        let mut logits = self.backend.prefill(&prompt_ids, &self.device)?.0.logits;
        let mut logprobs = Vec::with_capacity(continuation.len());
        for (i, &token) in continuation.iter().enumerate() {
            if token as usize >= logits.len() {
                return Err(GenerateError::InvalidParameter(format!(
                    "token id {token} is outside the vocabulary of {}",
                    logits.len()
                )));
            }
            logprobs.push(signals_from_logits(&logits, token as usize).logprob);
            if i + 1 < continuation.len() {
                logits = self
                    .backend
                    .forward(&[token], prompt_ids.len() + i, &self.device)?
                    .logits;
            }
        }
        Ok(logprobs)
    }

    /// Runs one short generation so that lazily built state (weight
    /// repacking, allocations) is ready before the first real request.
    pub fn warm_up(&mut self) -> Result<(), GenerateError> {
        let params = GenerationParams {
            max_tokens: 2,
            ..GenerationParams::default()
        };
        self.generate(&Prompt::Text("Hello".into()), &params, &mut |_| {
            Control::Continue
        })?;
        Ok(())
    }

    /// Generates an answer, calling `on_token` after every token; the
    /// callback may stop generation early.
    pub fn generate(
        &mut self,
        prompt: &Prompt,
        params: &GenerationParams,
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> Control,
    ) -> Result<Generation, GenerateError> {
        let (prompt_ids, max_new) = self.prepare(prompt, None, params)?;
        let mut sequence =
            Sequence::new(&self.encoder.tokenizer, prompt_ids.len(), max_new, params);
        let (next, cached) = if max_new > 0 {
            self.backend.prefill(&prompt_ids, &self.device)?
        } else {
            (Next::default(), 0)
        };
        sequence.start(next, cached);
        while sequence.step(&self.eos_ids, on_token)? {
            let (token, position) = sequence.pending();
            let next = self.backend.forward(&[token], position, &self.device)?;
            sequence.advance(next);
        }
        sequence.finish()
    }

    /// Checks a request and encodes its prompt: the prompt's tokens and
    /// how many tokens it may generate (`max_tokens` within the context
    /// window).
    pub(crate) fn prepare(
        &self,
        prompt: &Prompt,
        encoded: Option<EncodedPrompt>,
        params: &GenerationParams,
    ) -> Result<(Vec<u32>, usize), GenerateError> {
        let is_empty = match prompt {
            Prompt::Chat(messages) => messages.iter().all(|m| m.content.trim().is_empty()),
            Prompt::Text(text) => text.trim().is_empty(),
        };
        if is_empty {
            return Err(GenerateError::EmptyPrompt);
        }
        if let Sampling::Sample { temperature, top_p } = params.sampling {
            if !temperature.is_finite() || temperature < 0.0 {
                return Err(GenerateError::InvalidParameter(format!(
                    "temperature {temperature}"
                )));
            }
            if !top_p.is_finite() || top_p <= 0.0 || top_p > 1.0 {
                return Err(GenerateError::InvalidParameter(format!("top_p {top_p}")));
            }
        }
        let prompt_ids = match encoded {
            Some(e) if Arc::ptr_eq(&e.tokenizer, &self.encoder.tokenizer) => e.ids,
            _ => self.encoder.encode(prompt)?,
        };
        let context_window = self.info.context_window;
        if prompt_ids.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if prompt_ids.len() >= context_window {
            return Err(GenerateError::PromptTooLong {
                prompt_tokens: prompt_ids.len(),
                context_window,
            });
        }
        let max_new = params.max_tokens.min(context_window - prompt_ids.len());
        Ok((prompt_ids, max_new))
    }

    /// Bytes of keys and values one position of a sequence takes, where
    /// this model decodes several sequences in one step; `None` where it
    /// runs one request at a time.
    pub(crate) fn batch_kv_bytes_per_position(&self) -> Option<usize> {
        self.backend.kv_bytes_per_position()
    }

    /// Starts a request that will run in batched decode steps: prefills
    /// `prompt_ids` (from [`LocalModel::prepare`]) into a cache of its own,
    /// part after part.
    pub(crate) fn begin<'t>(
        &self,
        tokenizer: &'t Tokenizer,
        prompt_ids: &[u32],
        max_new: usize,
        params: &GenerationParams,
    ) -> Result<Sequence<'t>, GenerateError> {
        let mut sequence = self.open(tokenizer, prompt_ids.len(), max_new, params)?;
        while !self.prefill_next_part(&mut sequence, prompt_ids)? {}
        Ok(sequence)
    }

    /// A sequence for a request that will run in batched decode steps,
    /// with an empty cache of its own; its prompt goes in through
    /// [`LocalModel::prefill_next_part`].
    pub(crate) fn open<'t>(
        &self,
        tokenizer: &'t Tokenizer,
        prompt_tokens: usize,
        max_new: usize,
        params: &GenerationParams,
    ) -> Result<Sequence<'t>, GenerateError> {
        let mut sequence = Sequence::new(tokenizer, prompt_tokens, max_new, params);
        let cache = self
            .backend
            .new_sequence_cache()
            .ok_or_else(|| GenerateError::Model("this model runs one request at a time".into()))?;
        sequence.cache = Some(cache);
        Ok(sequence)
    }

    /// Prompt tokens per prefill part ([`LoadOptions::prefill_chunk_tokens`]).
    pub fn prefill_chunk_tokens(&self) -> usize {
        self.backend.prefill_chunk()
    }

    /// Prompt tokens the next [`LocalModel::prefill_next_part`] of
    /// `sequence` runs (0 when none is left, or none is needed).
    pub(crate) fn next_part_tokens(&self, sequence: &Sequence<'_>, prompt_ids: &[u32]) -> usize {
        if sequence.max_new() == 0 {
            return 0;
        }
        let from = sequence.prefilled();
        self.backend
            .part_end(from, prompt_ids.len())
            .saturating_sub(from)
    }

    /// Runs the next part of the prompt into `sequence`'s cache (parts end
    /// at multiples of [`LoadOptions::prefill_chunk_tokens`], as in
    /// [`LocalModel::generate`], so the log-probs do not depend on how the
    /// parts were scheduled). Once the whole prompt is in, decoding starts:
    /// the sequence takes the next-token logits (none when it may generate
    /// nothing) and the prefill time: from its opening until the last part
    /// is in, the decode steps and other prompts' parts between its own
    /// included (its time to first token counts them). Returns whether the
    /// whole prompt is in.
    pub(crate) fn prefill_next_part(
        &self,
        sequence: &mut Sequence<'_>,
        prompt_ids: &[u32],
    ) -> Result<bool, GenerateError> {
        if sequence.max_new() == 0 {
            // Nothing will be generated: the prompt need not run at all.
            sequence.start(Next::default(), 0);
            return Ok(true);
        }
        let from = sequence.prefilled();
        let to = self.backend.part_end(from, prompt_ids.len());
        let Some(cache) = sequence.cache.as_mut() else {
            return Err(GenerateError::Model(
                "a sequence without its own cache in a batched prefill".into(),
            ));
        };
        if from >= to {
            return Err(GenerateError::Model(format!(
                "no prompt left to prefill at position {from} of {}",
                prompt_ids.len()
            )));
        }
        let next = self
            .backend
            .prefill_part(cache, &prompt_ids[from..to], from)?;
        if to < prompt_ids.len() {
            return Ok(false);
        }
        sequence.start(next, 0);
        Ok(true)
    }

    /// One decode step of every sequence in `batch` (each from
    /// [`LocalModel::begin`], each with a pending token): one pass over the
    /// weights for all of them.
    pub(crate) fn decode_together(
        &mut self,
        batch: &mut [&mut Sequence<'_>],
    ) -> Result<(), GenerateError> {
        let logits = {
            let mut steps = Vec::with_capacity(batch.len());
            for sequence in batch.iter_mut() {
                let (token, position) = sequence.pending();
                let Some(cache) = sequence.cache.as_mut() else {
                    return Err(GenerateError::Model(
                        "a sequence without its own cache in a batched step".into(),
                    ));
                };
                steps.push(DecodeStep {
                    cache,
                    token,
                    position,
                });
            }
            self.backend.decode_batch(&mut steps)?
        };
        for (sequence, next) in batch.iter_mut().zip(logits) {
            sequence.advance(next);
        }
        Ok(())
    }
}

/// Longest sequence the tuned engine serves: its rotary tables and KV cache
/// grow with it (the cache only as far as a sequence actually goes).
const TUNED_MAX_POSITIONS: usize = 8192;

fn read_gguf(path: &Path) -> Result<(gguf_file::Content, BufReader<File>), LoadError> {
    let file = File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            LoadError::NotFound(path.to_path_buf())
        } else {
            LoadError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| LoadError::InvalidGguf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    // A truncated file can have an intact header: check that every tensor's
    // data lies inside the file before reading any of it.
    let file_len = std::fs::metadata(path)
        .map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    for (name, info) in &content.tensor_infos {
        let elems = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        let bytes = (elems / block.max(1)) * info.ggml_dtype.type_size();
        let end = content.tensor_data_offset + info.offset + bytes as u64;
        if end > file_len {
            return Err(LoadError::InvalidGguf {
                path: path.to_path_buf(),
                reason: format!(
                    "tensor `{name}` ends at byte {end} but the file has {file_len} bytes (truncated download?)"
                ),
            });
        }
    }
    Ok((content, reader))
}

/// The tuned engine's architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TunedArch {
    Phi2,
    Llama,
    Gemma3,
}

impl TunedArch {
    /// Positions served when the file declares no context length.
    fn default_context(self) -> usize {
        match self {
            TunedArch::Phi2 => 2048,
            TunedArch::Llama => quantized_llama::MAX_SEQ_LEN,
            // The window applies while decoding too, so sequences may run past it (unlike
            // candle's Gemma 3).
            TunedArch::Gemma3 => 8192,
        }
    }
}

/// Which code runs a GGUF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GgufEngine {
    Tuned(TunedArch),
    ReferenceLlama,
    ReferenceGemma3,
}

impl GgufEngine {
    /// The engine for a file of this architecture under `kernels`: the tuned engine where it
    /// covers the file (phi2 always; the llama family when its tensors are supported; Gemma
    /// 3), candle's reference code where asked for or needed; exact kernels run only
    /// llama-family and phi2 files, and candle has no phi2 in the stored layout.
    fn choose(
        is_phi2: bool,
        is_llama: bool,
        tuned_llama_supported: bool,
        kernels: Kernels,
    ) -> Result<Self, LoadError> {
        if is_phi2 {
            return match kernels {
                Kernels::Reference => Err(LoadError::InvalidOption(
                    "reference kernels do not run phi2 GGUF files (candle's quantized_phi \
                     reads only the fused layout); use tuned or exact kernels"
                        .into(),
                )),
                Kernels::Tuned | Kernels::Exact => Ok(Self::Tuned(TunedArch::Phi2)),
            };
        }
        match (is_llama, kernels) {
            (true, Kernels::Tuned | Kernels::Exact) if tuned_llama_supported => {
                Ok(Self::Tuned(TunedArch::Llama))
            }
            (_, Kernels::Exact) => Err(LoadError::InvalidOption(
                "exact kernels run llama-family and phi2 GGUF only".into(),
            )),
            (false, Kernels::Tuned) => Ok(Self::Tuned(TunedArch::Gemma3)),
            (true, _) => Ok(Self::ReferenceLlama),
            (false, _) => Ok(Self::ReferenceGemma3),
        }
    }
}

fn load_gguf(
    path: &Path,
    files: &ResolvedModel,
    options: &LoadOptions,
    device: &Device,
) -> Result<LocalModel, LoadError> {
    let (content, mut reader) = read_gguf(path)?;
    let weights_err = |e: candle_core::Error| LoadError::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let arch_name = tokenizer::gguf_string(&content, "general.architecture");
    let is_mixformer = content
        .tensor_infos
        .keys()
        .any(|k| k.starts_with("layers.0.wte"));
    let name = file_stem(path);
    match (arch_name.as_deref(), is_mixformer) {
        (_, true) => {
            let config = match &files.config {
                Some(config_path) => read_json_config::<mixformer::Config>(config_path)?,
                None => mixformer::Config::v1_5(),
            };
            let context_window = mixformer_context(files.config.as_deref())?;
            let tokenizer_path = files
                .tokenizer
                .clone()
                .ok_or_else(|| LoadError::MissingFile {
                    path: path.to_path_buf(),
                    what: "tokenizer.json beside the GGUF (Phi GGUF files carry no vocabulary)"
                        .into(),
                })?;
            let tokenizer = tokenizer::from_file(&tokenizer_path)?;
            drop(reader);
            let vb =
                candle_transformers::quantized_var_builder::VarBuilder::from_gguf(path, device)
                    .map_err(weights_err)?;
            let model = quantized_mixformer::MixFormerSequentialForCausalLM::new(&config, vb)
                .map_err(weights_err)?;
            let template = choose_template(options.template, None, files, true, &tokenizer)?;
            let eos_ids = eos_from_vocab(&tokenizer, &[]);
            Ok(LocalModel::assemble(
                Backend::PhiGguf(Box::new(model)),
                ModelInfo {
                    name,
                    architecture: Architecture::PhiGguf,
                    context_window,
                    template: template.name(),
                    load_seconds: 0.0,
                },
                tokenizer,
                template,
                eos_ids,
                device,
            ))
        }
        (Some("llama" | "gemma3" | "phi2"), false) => {
            let is_llama = arch_name.as_deref() == Some("llama");
            let is_phi2 = arch_name.as_deref() == Some("phi2");
            let tokenizer = match &files.tokenizer {
                Some(p) => tokenizer::from_file(p)?,
                None => tokenizer::from_gguf(&content, path)?,
            };
            let gguf_template = tokenizer::gguf_string(&content, "tokenizer.chat_template");
            // Before the weights: a bad template choice fails in an instant.
            let template =
                choose_template(options.template, gguf_template, files, is_phi2, &tokenizer)?;
            let declared_eos = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
                .iter()
                .filter_map(|k| tokenizer::gguf_u32(&content, k))
                .collect::<Vec<_>>();
            let arch_prefix = arch_name.clone().unwrap_or_default();
            let declared_ctx =
                tokenizer::gguf_u32(&content, &format!("{arch_prefix}.context_length"))
                    .map(|v| v as usize);
            let sliding_window =
                tokenizer::gguf_u32(&content, &format!("{arch_prefix}.attention.sliding_window"))
                    .map(|v| v as usize);
            let engine = GgufEngine::choose(
                is_phi2,
                is_llama,
                is_llama && tuned_llama::supports(&content),
                options.kernels,
            )?;
            let (backend, max_ctx) = match engine {
                GgufEngine::Tuned(arch) => {
                    let max_ctx = declared_ctx
                        .unwrap_or(arch.default_context())
                        .min(TUNED_MAX_POSITIONS);
                    let exact = options.kernels == Kernels::Exact;
                    let weights = options.prefill_weights;
                    let model: crate::engine::TunedModel = match arch {
                        TunedArch::Phi2 => Box::new(
                            Phi2::from_gguf(&content, &mut reader, max_ctx, weights, exact, device)
                                .map_err(weights_err)?,
                        ),
                        TunedArch::Llama => Box::new(
                            Llama::from_gguf(
                                &content,
                                &mut reader,
                                max_ctx,
                                weights,
                                exact,
                                device,
                            )
                            .map_err(weights_err)?,
                        ),
                        TunedArch::Gemma3 => Box::new(
                            Gemma3::from_gguf(&content, &mut reader, max_ctx, weights, device)
                                .map_err(weights_err)?,
                        ),
                    };
                    (
                        Backend::tuned(
                            model,
                            options.reuse_prompt_prefix,
                            options.prefill_chunk_tokens,
                        ),
                        max_ctx,
                    )
                }
                GgufEngine::ReferenceLlama => {
                    let weights =
                        quantized_llama::ModelWeights::from_gguf(content, &mut reader, device)
                            .map_err(weights_err)?;
                    (
                        Backend::Llama {
                            pristine: Box::new(weights.clone()),
                            live: Box::new(weights),
                        },
                        quantized_llama::MAX_SEQ_LEN,
                    )
                }
                GgufEngine::ReferenceGemma3 => {
                    let weights =
                        quantized_gemma3::ModelWeights::from_gguf(content, &mut reader, device)
                            .map_err(weights_err)?;
                    (
                        Backend::Gemma3 {
                            pristine: Box::new(weights.clone()),
                            live: Box::new(weights),
                        },
                        // candle 0.11's Gemma 3 applies the local layers'
                        // sliding window only within a prefill, not while
                        // decoding, so past the window those layers would attend
                        // to tokens the model was never trained to see. Keeping
                        // every sequence within the window keeps attention as
                        // trained; 8192 bounds the KV cache otherwise.
                        sliding_window.unwrap_or(8192).min(8192),
                    )
                }
            };
            let context_window = declared_ctx.unwrap_or(max_ctx).min(max_ctx);
            let eos_ids = eos_from_vocab(&tokenizer, &declared_eos);
            Ok(LocalModel::assemble(
                backend,
                ModelInfo {
                    name,
                    architecture: if is_llama {
                        Architecture::Llama
                    } else if is_phi2 {
                        Architecture::Phi2
                    } else {
                        Architecture::Gemma3
                    },
                    context_window,
                    template: template.name(),
                    load_seconds: 0.0,
                },
                tokenizer,
                template,
                eos_ids,
                device,
            ))
        }
        (Some(other), false) => Err(LoadError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            arch: other.to_string(),
        }),
        (None, false) => Err(LoadError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            arch: "unknown (no general.architecture and no mixformer tensors)".into(),
        }),
    }
}

fn load_phi_safetensors(
    weights: &[PathBuf],
    files: &ResolvedModel,
    options: &LoadOptions,
    device: &Device,
) -> Result<LocalModel, LoadError> {
    let config_path = files.config.clone().ok_or_else(|| LoadError::MissingFile {
        path: files.origin.clone(),
        what: "config.json".into(),
    })?;
    let raw: serde_json::Value = read_json_config(&config_path)?;
    let model_type = raw.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    if model_type != "phi" {
        return Err(LoadError::InvalidConfig {
            path: config_path,
            reason: format!(
                "model_type is `{model_type}`; only `phi` (Phi-1.5) is supported for safetensors"
            ),
        });
    }
    // candle's phi runs only in F32 on the CPU (with BF16 weights its F32
    // rotary tables make the forward pass fail); BF16 goes to our Phi that
    // keeps everything but the matrix products in F32. The config is parsed
    // before the weights are read, so a broken one fails fast.
    enum Flavour {
        Candle(phi::Config),
        Mixed(PhiConfig),
    }
    let flavour = match options.dtype {
        WeightDtype::F32 => Flavour::Candle(read_json_config(&config_path)?),
        WeightDtype::Bf16 => Flavour::Mixed(read_json_config(&config_path)?),
    };
    let context_window = raw
        .get("max_position_embeddings")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| LoadError::InvalidConfig {
            path: config_path.clone(),
            reason: "max_position_embeddings is missing".into(),
        })?;
    let tokenizer_path = files
        .tokenizer
        .clone()
        .ok_or_else(|| LoadError::MissingFile {
            path: files.origin.clone(),
            what: "tokenizer.json".into(),
        })?;
    let tokenizer = tokenizer::from_file(&tokenizer_path)?;
    let dtype = match options.dtype {
        WeightDtype::F32 => DType::F32,
        WeightDtype::Bf16 => DType::BF16,
    };
    let mut tensors = std::collections::HashMap::new();
    for path in weights {
        let loaded =
            candle_core::safetensors::load(path, device).map_err(|e| LoadError::Weights {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        tensors.extend(loaded);
    }
    let vb = candle_nn::VarBuilder::from_tensors(tensors, dtype, device);
    let weights_err = |e: candle_core::Error| LoadError::Weights {
        path: files.origin.clone(),
        reason: e.to_string(),
    };
    let backend = match &flavour {
        Flavour::Candle(config) => {
            Backend::Phi(Box::new(phi::Model::new(config, vb).map_err(weights_err)?))
        }
        Flavour::Mixed(config) => {
            Backend::PhiMixed(Box::new(MixedPhi::new(config, vb).map_err(weights_err)?))
        }
    };
    let template = choose_template(options.template, None, files, true, &tokenizer)?;
    let eos_ids = eos_from_vocab(&tokenizer, &[]);
    Ok(LocalModel::assemble(
        backend,
        ModelInfo {
            name: files
                .origin
                .parent()
                .filter(|_| files.origin.is_file())
                .map(file_stem)
                .unwrap_or_else(|| file_stem(&files.origin)),
            architecture: Architecture::Phi,
            context_window,
            template: template.name(),
            load_seconds: 0.0,
        },
        tokenizer,
        template,
        eos_ids,
        device,
    ))
}

fn read_json_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| LoadError::InvalidConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn mixformer_context(config: Option<&Path>) -> Result<usize, LoadError> {
    // candle's mixformer precomputes rotary tables for 4096 positions.
    const MIXFORMER_MAX: usize = 4096;
    let declared = match config {
        Some(p) => read_json_config::<serde_json::Value>(p)?
            .get("n_positions")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize),
        None => Some(2048),
    };
    Ok(declared.unwrap_or(2048).min(MIXFORMER_MAX))
}

fn choose_template(
    choice: TemplateChoice,
    gguf_template: Option<String>,
    files: &ResolvedModel,
    is_phi: bool,
    tokenizer: &Tokenizer,
) -> Result<ChatTemplate, LoadError> {
    let own = gguf_template.or_else(|| {
        let path = files.tokenizer_config.as_ref()?;
        let text = std::fs::read_to_string(path).ok()?;
        let value: serde_json::Value = serde_json::from_str(&text).ok()?;
        value.get("chat_template")?.as_str().map(str::to_string)
    });
    let jinja = |source: String| {
        ChatTemplate::jinja(
            source,
            special_token_text(tokenizer, &["<bos>", "<s>", "<|begin_of_text|>"]),
            special_token_text(tokenizer, &["<eos>", "</s>", "<|im_end|>", "<|endoftext|>"]),
        )
    };
    match choice {
        TemplateChoice::Auto => match own {
            Some(source) => jinja(source),
            None if is_phi => Ok(ChatTemplate::PhiInstruct),
            None => Ok(ChatTemplate::Plain),
        },
        TemplateChoice::Model => match own {
            Some(source) => jinja(source),
            None => Err(LoadError::Template(
                "the model has no chat template of its own".into(),
            )),
        },
        TemplateChoice::Phi => Ok(ChatTemplate::PhiInstruct),
        TemplateChoice::Plain => Ok(ChatTemplate::Plain),
    }
}

/// The text of the first candidate that is a special token, for the
/// `bos_token`/`eos_token` template variables.
/// Models without such a token (most byte-level BPE chat models) get "".
fn special_token_text(tokenizer: &Tokenizer, candidates: &[&str]) -> String {
    candidates
        .iter()
        .find(|c| is_special(tokenizer, c))
        .map(|c| (*c).to_string())
        .unwrap_or_default()
}

fn eos_from_vocab(tokenizer: &Tokenizer, declared: &[u32]) -> Vec<u32> {
    let mut ids: Vec<u32> = declared.to_vec();
    for token in [
        "<|endoftext|>",
        "<|im_end|>",
        "</s>",
        "<eos>",
        "<end_of_turn>",
        "<|eot_id|>",
    ] {
        if !is_special(tokenizer, token) {
            continue;
        }
        if let Some(id) = tokenizer.token_to_id(token) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// Whether `token` is one of the tokenizer's special tokens. Only those can
/// end a sequence: in Gemma's vocabulary `<s>` and `</s>` are ordinary
/// HTML tags.
fn is_special(tokenizer: &Tokenizer, token: &str) -> bool {
    tokenizer.get_added_vocabulary().is_special_token(token)
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "local".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_gguf_file_gets_the_engine_its_kernels_allow() {
        use Kernels::{Exact, Reference, Tuned};
        // `LoadError` has no `PartialEq`: compare the chosen engine, `None` for a refusal.
        let choose = |phi2, llama, supported, kernels| {
            GgufEngine::choose(phi2, llama, supported, kernels).ok()
        };
        let tuned = |arch| Some(GgufEngine::Tuned(arch));
        assert_eq!(choose(true, false, false, Tuned), tuned(TunedArch::Phi2));
        assert_eq!(choose(true, false, false, Exact), tuned(TunedArch::Phi2));
        assert!(choose(true, false, false, Reference).is_none());
        assert_eq!(choose(false, true, true, Tuned), tuned(TunedArch::Llama));
        assert_eq!(choose(false, true, true, Exact), tuned(TunedArch::Llama));
        assert_eq!(
            choose(false, true, true, Reference),
            Some(GgufEngine::ReferenceLlama)
        );
        // Llama-family tensors the tuned engine does not cover run on candle's code.
        assert_eq!(
            choose(false, true, false, Tuned),
            Some(GgufEngine::ReferenceLlama)
        );
        assert!(choose(false, true, false, Exact).is_none());
        assert_eq!(choose(false, false, false, Tuned), tuned(TunedArch::Gemma3));
        assert_eq!(
            choose(false, false, false, Reference),
            Some(GgufEngine::ReferenceGemma3)
        );
        assert!(choose(false, false, false, Exact).is_none());
    }
}
