//! Configuration: `cascade.toml` overridden by `CASCADE_<SECTION>__<KEY>`
//! environment variables, read into plain serde structs and then validated
//! into typed values, so a bad value stops the process at start-up with the
//! name of its key instead of surfacing in the middle of a request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use policies::{
    ExhaustedAction, ExperimentConfig, GlobalBudgetConfig, LearnedRule, NanoUsd, Policies,
    PoliciesConfig, PriceConfig, TeamConfig,
};

use crate::limits::{Limits, RawLimits};
use crate::routing::{Aggregate, OnOverload, OnRemoteFailure, Policy};
use crate::storage::StorageConfig;

/// A configuration that cannot be used, naming the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Read(String),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The file as written, before validation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub local: RawLocal,
    pub policy: RawPolicy,
    pub remotes: Vec<RawRemote>,
    pub storage: RawStorage,
    pub admin: RawAdmin,
    pub confidence: RawConfidence,
    /// `[limits]`: hard limits on one request.
    pub limits: RawLimits,
    // The `policies` crate's sections, spelled as in docs/policies.md. They are
    // listed one by one rather than flattened because serde's `flatten` would
    // switch off `deny_unknown_fields` for the whole file.
    /// IANA time zone of budget days and months; UTC when absent.
    pub timezone: Option<String>,
    /// `[prices.<remote>]`: USD per million input/output tokens.
    pub prices: BTreeMap<String, PriceConfig>,
    /// `[local_price]`: notional compute price of the local model.
    pub local_price: PriceConfig,
    /// `[global]`: gateway-wide budgets.
    pub global: GlobalBudgetConfig,
    /// `[[teams]]`; none means requests need no key and use `[policy]`.
    pub teams: Vec<TeamConfig>,
    /// `[[experiments]]`.
    pub experiments: Vec<ExperimentConfig>,
}

/// `[confidence]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfidence {
    /// Where learned rules (`<name>.json`, written by `cascade calibrate`) are read from;
    /// relative to the configuration file's folder.
    pub rules_dir: String,
}

impl Default for RawConfidence {
    fn default() -> Self {
        Self {
            rules_dir: "rules".into(),
        }
    }
}

/// `[storage]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStorage {
    /// `sqlite://file` (relative to the config file's folder), `sqlite::memory:`
    /// or `postgres://user@host/db`.
    pub url: String,
    pub max_connections: u32,
    /// After this long an unsettled reservation is presumed orphaned.
    pub reservation_ttl_secs: u64,
    /// What a ledger record that cannot be written does: `spool` (to `spool_path`, replayed
    /// later; the answer goes out) or `fail_closed` (the client gets 503).
    pub on_ledger_failure: String,
    /// The JSONL file of records waiting for the database; relative to the config's folder.
    pub spool_path: String,
}

impl Default for RawStorage {
    fn default() -> Self {
        Self {
            url: "sqlite://cascade.db".into(),
            max_connections: 8,
            reservation_ttl_secs: 300,
            on_ledger_failure: "spool".into(),
            spool_path: "cascade-ledger-spool.jsonl".into(),
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// Hex SHA-256 of the admin key; no admin API without it.
    pub api_key_hash: Option<String>,
    /// A separate address for the admin API; the main listener when absent.
    pub listen: Option<String>,
}

/// `[server]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    /// The model name that routes through the cascade.
    pub model_name: String,
    pub max_body_bytes: u64,
    /// Async worker threads; 0 picks min(4, CPUs).
    pub worker_threads: usize,
    /// On SIGTERM, how long in-flight requests may take to finish (and, after that, how
    /// long settling reservations and writing the ledger may take).
    pub shutdown_grace_ms: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            model_name: "cascade".into(),
            max_body_bytes: 4 * 1024 * 1024,
            worker_threads: 0,
            shutdown_grace_ms: 30_000,
        }
    }
}

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
            max_tokens: 256,
            warm_up: true,
        }
    }
}

/// `[policy]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicy {
    /// `sum_logprob`, `mean_logprob`, `min_logprob`, `quantile`, `fraction_above`,
    /// `mean_entropy`, `mean_margin` or `learned` (with `learned_rule`).
    pub aggregate: String,
    /// The rule file's name (`<rules_dir>/<name>.json`) for `aggregate = "learned"`.
    pub learned_rule: Option<String>,
    /// The quantile for `aggregate = "quantile"`.
    pub quantile: f64,
    /// The log-prob bound for `aggregate = "fraction_above"`.
    pub bound: f64,
    pub threshold: f64,
    /// Remote names in fallback order; empty means every remote, in file order.
    pub remotes: Vec<String>,
    /// `serve_local` or `error`.
    pub on_remote_failure: String,
    /// `escalate` or `reject`.
    pub on_overload: String,
    /// 0 means no cap.
    pub max_local_ms: u64,
    /// 0 means no bound beyond the queue depth.
    pub max_queue_wait_ms: u64,
    pub allow_route_header: bool,
    pub allow_direct_models: bool,
    /// `serve_local`, `fallback` or `reject`: when no budget can pay for the remote call.
    pub on_budget_exhausted: String,
    /// The largest estimated cost of one remote call, in USD; none when absent.
    pub max_cost_per_request_usd: Option<f64>,
    /// Keep prompt text in the ledger.
    pub log_prompts: bool,
}

impl Default for RawPolicy {
    fn default() -> Self {
        Self {
            // The rule and threshold chosen by cross-validation (docs/confidence.md).
            aggregate: "sum_logprob".into(),
            learned_rule: None,
            quantile: 0.1,
            bound: -2.0,
            threshold: policies::confidence::DEFAULT_THRESHOLD,
            remotes: Vec::new(),
            on_remote_failure: "serve_local".into(),
            on_overload: "escalate".into(),
            max_local_ms: 0,
            max_queue_wait_ms: 0,
            allow_route_header: false,
            allow_direct_models: true,
            on_budget_exhausted: "serve_local".into(),
            max_cost_per_request_usd: None,
            log_prompts: false,
        }
    }
}

/// One `[[remotes]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRemote {
    /// The name clients and the policy use.
    pub name: String,
    /// Model name sent upstream; defaults to `name`.
    pub model: Option<String>,
    /// e.g. `https://api.openai.com/v1`.
    pub base_url: Option<String>,
    /// Environment variable holding the base URL; wins over `base_url` when set.
    pub base_url_env: Option<String>,
    /// Environment variable holding the API key (never the key itself).
    pub api_key_env: Option<String>,
    /// How the key is sent: `bearer` (Authorization header) or `api-key`
    /// (Azure OpenAI's header).
    pub auth: String,
    pub timeout_ms: u64,
    pub max_retries: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// The largest response body (or, streamed, the largest event) read from this remote.
    pub max_response_bytes: u64,
    /// Consecutive failed attempts that open this remote's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before letting one probe through.
    pub breaker_cooldown_ms: u64,
}

impl Default for RawRemote {
    fn default() -> Self {
        Self {
            name: String::new(),
            model: None,
            base_url: None,
            base_url_env: None,
            api_key_env: None,
            auth: "bearer".into(),
            timeout_ms: 60_000,
            max_retries: 2,
            backoff_base_ms: 100,
            backoff_max_ms: 2_000,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
        }
    }
}

/// 16 MiB: far above any chat completion, far below what would hurt the process.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub local: LocalConfig,
    pub policy: Policy,
    /// Remotes in the policy's fallback order.
    pub policy_remotes: Vec<String>,
    pub remotes: Vec<RemoteConfig>,
    pub storage: StorageConfig,
    /// What happens to ledger records the database does not take.
    pub ledger: LedgerConfig,
    pub admin: AdminConfig,
    /// Teams, keys, prices, budgets and experiments.
    pub policies: Policies,
    /// Hard limits on one request.
    pub limits: Limits,
}

/// What a ledger record that cannot be written does (`storage.on_ledger_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLedgerFailure {
    /// Append it to the spool file (fsynced) and answer; replay it when the database heals.
    Spool,
    /// Answer 503 `ledger_unavailable` instead of an answer without a record.
    FailClosed,
}

/// Validated ledger-failure settings from `[storage]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    pub on_failure: OnLedgerFailure,
    /// The spool file (resolved against the config's folder).
    pub spool_path: PathBuf,
}

/// Validated `[admin]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminConfig {
    /// Lower-case hex SHA-256 of the admin key.
    pub api_key_hash: Option<String>,
    pub listen: Option<SocketAddr>,
}

/// Validated `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub model_name: String,
    pub max_body_bytes: usize,
    pub worker_threads: usize,
    pub shutdown_grace: Duration,
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
    pub max_tokens: usize,
    pub warm_up: bool,
}

/// Validated `[[remotes]]` entry. Its `Debug` leaves the API key out, so no debug print or
/// log of a configuration can leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    pub name: String,
    pub model: String,
    /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub api_key: Option<String>,
    pub auth: RemoteAuth,
    pub timeout: Duration,
    pub max_retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// The largest body, or streamed event, read from this remote.
    pub max_response_bytes: usize,
    /// Consecutive failed attempts that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before a probe.
    pub breaker_cooldown: Duration,
}

impl std::fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("name", &self.name)
            .field("model", &self.model)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("auth", &self.auth)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

/// How a remote expects its API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteAuth {
    /// `Authorization: Bearer <key>` (OpenAI, vLLM, llama.cpp, Cascade).
    Bearer,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKey,
}

impl Config {
    /// Reads `path` (if given) and `CASCADE_*` variables, then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let raw = RawConfig::load(path)?;
        let base = path.and_then(Path::parent).map(Path::to_path_buf);
        Config::validate(raw, base.as_deref(), &|name| std::env::var(name).ok())
    }

    /// Checks every value; `env` reads the variables that hold secrets and
    /// URLs; relative model paths are tried against `base_dir` first.
    pub fn validate(
        raw: RawConfig,
        base_dir: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let server = validate_server(&raw.server)?;
        let limits = Limits::validate(&raw.limits)?;
        let local = validate_local(&raw.local, base_dir)?;
        let mut remotes = Vec::with_capacity(raw.remotes.len());
        for (i, r) in raw.remotes.iter().enumerate() {
            let remote = validate_remote(i, r, env)?;
            if remotes.iter().any(|o: &RemoteConfig| o.name == remote.name) {
                return Err(invalid(
                    format!("remotes[{i}].name"),
                    format!("duplicate remote `{}`", remote.name),
                ));
            }
            if remote.name == server.model_name || remote.name == local.name {
                return Err(invalid(
                    format!("remotes[{i}].name"),
                    format!(
                        "`{}` is already the cascade or the local model's name",
                        remote.name
                    ),
                ));
            }
            remotes.push(remote);
        }
        if local.name == server.model_name {
            return Err(invalid("local.name", "must differ from server.model_name"));
        }
        let mut policies_config = PoliciesConfig {
            timezone: raw.timezone,
            prices: raw.prices,
            local_price: raw.local_price,
            global: raw.global,
            teams: raw.teams,
            experiments: raw.experiments,
        };
        let rules = load_learned_rules(&raw.confidence, &raw.policy, &policies_config, base_dir)?;
        policies::learned::resolve_learned(&mut policies_config, &rules)
            .map_err(|e| invalid("policies", e.to_string()))?;
        let (policy, policy_remotes) = validate_policy(&raw.policy, &remotes, &rules)?;
        let storage = validate_storage(&raw.storage, base_dir)?;
        let ledger = validate_ledger(&raw.storage, base_dir)?;
        let admin = validate_admin(&raw.admin)?;
        let policies =
            Policies::try_from(policies_config).map_err(|e| invalid("policies", e.to_string()))?;
        check_team_policies(&policies, &remotes)?;
        Ok(Config {
            server,
            local,
            policy,
            policy_remotes,
            remotes,
            storage,
            ledger,
            admin,
            policies,
            limits,
        })
    }
}

impl RawConfig {
    /// Merges defaults, the TOML file and the environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
        if let Some(path) = path {
            if !path.is_file() {
                return Err(ConfigError::Read(format!(
                    "{}: no such file",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        // Only `CASCADE_<SECTION>__<KEY>` names are configuration; other
        // `CASCADE_*` variables (CASCADE_MODEL for `generate`, test
        // settings) must not trip the unknown-key check.
        let env = Env::prefixed("CASCADE_")
            .filter(|key| key.as_str().contains("__"))
            .split("__");
        figment = figment.merge(env);
        figment
            .extract()
            .map_err(|e| ConfigError::Read(e.to_string()))
    }

    /// Reads TOML text over the defaults, as `load` reads a file (without the environment).
    pub fn parse_toml(text: &str) -> Result<Self, ConfigError> {
        Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Read(e.to_string()))
    }
}

fn validate_server(raw: &RawServer) -> Result<ServerConfig, ConfigError> {
    let listen = raw.listen.parse().map_err(|e| {
        invalid(
            "server.listen",
            format!("`{}` is not an address:port ({e})", raw.listen),
        )
    })?;
    if raw.model_name.trim().is_empty() {
        return Err(invalid("server.model_name", "must not be empty"));
    }
    if raw.max_body_bytes == 0 {
        return Err(invalid("server.max_body_bytes", "must be positive"));
    }
    // The gateway's own work per request is tens of microseconds; more
    // threads than that needs only add cross-thread wake-ups (p99 jitter)
    // and compete with the local model's compute threads for cores.
    let worker_threads = match raw.worker_threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
        n => n,
    };
    Ok(ServerConfig {
        listen,
        model_name: raw.model_name.clone(),
        max_body_bytes: usize::try_from(raw.max_body_bytes).unwrap_or(usize::MAX),
        worker_threads,
        shutdown_grace: Duration::from_millis(raw.shutdown_grace_ms),
    })
}

/// What the `policies` crate accepts but this gateway cannot route by, or could not count
/// the cost of: a remote a team, key or variant policy names that is priced but not
/// configured; a remote without a price under a `[global]` budget (the `policies` crate
/// already makes every remote a team policy names priced, and a direct model reaches only
/// its caller's `remotes`). A `local_only` policy that lists remotes is accepted, and they
/// are ignored with a warning: it never calls one.
fn check_team_policies(policies: &Policies, remotes: &[RemoteConfig]) -> Result<(), ConfigError> {
    let global = policies.global_limits();
    if global.daily.is_some() || global.monthly.is_some() {
        if let Some(r) = remotes.iter().find(|r| policies.price(&r.name).is_none()) {
            return Err(invalid(
                format!("prices.{}", r.name),
                format!(
                    "remote `{}` has no price, and the [global] budget applies to every paid \
                     call: add [prices.{}]",
                    r.name, r.name
                ),
            ));
        }
    }
    for team in policies.teams().values() {
        let keys = team
            .keys
            .iter()
            .map(|(id, k)| (format!("teams.{}.keys.{id}", team.name), &k.policy));
        let variants = policies
            .experiment_for(&team.name)
            .into_iter()
            .flat_map(|e| {
                let key_ids = std::iter::once("").chain(team.keys.keys().map(String::as_str));
                e.variants().iter().flat_map(move |v| {
                    key_ids.clone().filter_map(move |key_id| {
                        let at = format!("experiments.{}.variants.{}", e.id(), v.name);
                        Some((at, policies.policy(&team.name, key_id, Some(&v.name))?))
                    })
                })
            });
        let all = std::iter::once((format!("teams.{}.policy", team.name), &team.policy))
            .chain(keys)
            .chain(variants);
        for (at, policy) in all {
            if let Some(r) = policy
                .remotes()
                .iter()
                .find(|r| !remotes.iter().any(|c| &c.name == *r))
            {
                return Err(invalid(
                    format!("{at}.remotes"),
                    format!("`{r}` is not a configured [[remotes]] entry"),
                ));
            }
            if policy.local_only() && !policy.remotes().is_empty() {
                tracing::warn!(
                    policy = %at,
                    "local_only: the remotes this policy lists are ignored; it never calls a remote"
                );
            }
        }
    }
    Ok(())
}

fn validate_storage(
    raw: &RawStorage,
    base_dir: Option<&Path>,
) -> Result<StorageConfig, ConfigError> {
    let url = raw.url.trim();
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        return Err(invalid(
            "storage.url",
            format!("`{url}` must start with sqlite:, postgres:// or postgresql://"),
        ));
    }
    if raw.max_connections == 0 {
        return Err(invalid("storage.max_connections", "must be positive"));
    }
    if raw.reservation_ttl_secs == 0 {
        return Err(invalid("storage.reservation_ttl_secs", "must be positive"));
    }
    Ok(StorageConfig {
        url: resolve_sqlite_path(url, base_dir),
        max_connections: raw.max_connections,
        reservation_ttl_secs: raw.reservation_ttl_secs,
    })
}

fn validate_ledger(raw: &RawStorage, base_dir: Option<&Path>) -> Result<LedgerConfig, ConfigError> {
    let on_failure = match raw.on_ledger_failure.as_str() {
        "spool" => OnLedgerFailure::Spool,
        "fail_closed" => OnLedgerFailure::FailClosed,
        other => {
            return Err(invalid(
                "storage.on_ledger_failure",
                format!("unknown behaviour `{other}` (choose spool or fail_closed)"),
            ))
        }
    };
    let spool = raw.spool_path.trim();
    if spool.is_empty() {
        return Err(invalid("storage.spool_path", "must not be empty"));
    }
    let spool_path = match base_dir {
        Some(dir) if Path::new(spool).is_relative() => dir.join(spool),
        _ => PathBuf::from(spool),
    };
    Ok(LedgerConfig {
        on_failure,
        spool_path,
    })
}

/// A relative SQLite file is taken relative to the config file's folder, so the
/// ledger does not move with the directory the server happens to start in.
fn resolve_sqlite_path(url: &str, base_dir: Option<&Path>) -> String {
    let (Some(rest), Some(dir)) = (url.strip_prefix("sqlite://"), base_dir) else {
        return url.to_string();
    };
    let (file, query) = match rest.split_once('?') {
        Some((f, q)) => (f, Some(q)),
        None => (rest, None),
    };
    if file.is_empty() || file == ":memory:" || Path::new(file).is_absolute() {
        return url.to_string();
    }
    let joined = dir.join(file).to_string_lossy().into_owned();
    match query {
        Some(q) => format!("sqlite://{joined}?{q}"),
        None => format!("sqlite://{joined}"),
    }
}

fn validate_admin(raw: &RawAdmin) -> Result<AdminConfig, ConfigError> {
    let api_key_hash = match &raw.api_key_hash {
        None => None,
        Some(h) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
            Some(h.to_ascii_lowercase())
        }
        Some(_) => {
            return Err(invalid(
                "admin.api_key_hash",
                "must be the hex SHA-256 of the admin key (64 hex digits)",
            ))
        }
    };
    let listen = match &raw.listen {
        None => None,
        Some(l) => Some(l.parse().map_err(|e| {
            invalid(
                "admin.listen",
                format!("`{l}` is not an address:port ({e})"),
            )
        })?),
    };
    Ok(AdminConfig {
        api_key_hash,
        listen,
    })
}

fn validate_local(raw: &RawLocal, base_dir: Option<&Path>) -> Result<LocalConfig, ConfigError> {
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
        max_tokens: raw.max_tokens,
        warm_up: raw.warm_up,
    })
}

/// `models/SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct.Q4_1`.
fn default_local_name(spec: &str) -> String {
    let last = spec
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or(spec);
    last.strip_suffix(".gguf").unwrap_or(last).to_string()
}

fn validate_remote(
    i: usize,
    raw: &RawRemote,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RemoteConfig, ConfigError> {
    let key = |field: &str| format!("remotes[{i}].{field}");
    if raw.name.trim().is_empty() {
        return Err(invalid(key("name"), "is required"));
    }
    let from_env = raw
        .base_url_env
        .as_ref()
        .and_then(|var| env(var))
        .filter(|v| !v.is_empty());
    let base_url = match (from_env, &raw.base_url) {
        (Some(url), _) => url,
        (None, Some(url)) => url.clone(),
        (None, None) => {
            let hint = match &raw.base_url_env {
                Some(var) => format!("set the environment variable {var} or base_url"),
                None => "set base_url or base_url_env".into(),
            };
            return Err(invalid(key("base_url"), format!("no base URL: {hint}")));
        }
    };
    let parsed = reqwest::Url::parse(&base_url)
        .map_err(|e| invalid(key("base_url"), format!("`{base_url}` is not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(
            key("base_url"),
            format!("`{base_url}` is not an http(s) URL"),
        ));
    }
    let api_key = match &raw.api_key_env {
        None => None,
        Some(var) => match env(var) {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                return Err(invalid(
                    key("api_key_env"),
                    format!("the environment variable {var} is not set"),
                ))
            }
        },
    };
    let auth = match raw.auth.as_str() {
        "bearer" => RemoteAuth::Bearer,
        "api-key" => RemoteAuth::ApiKey,
        other => {
            return Err(invalid(
                key("auth"),
                format!("unknown scheme `{other}` (choose bearer or api-key)"),
            ))
        }
    };
    if raw.timeout_ms == 0 {
        return Err(invalid(key("timeout_ms"), "must be positive"));
    }
    if raw.backoff_max_ms < raw.backoff_base_ms {
        return Err(invalid(
            key("backoff_max_ms"),
            "must be at least backoff_base_ms",
        ));
    }
    // A limit below a kilobyte would refuse ordinary error bodies and stream events.
    if raw.max_response_bytes < 1024 {
        return Err(invalid(key("max_response_bytes"), "must be at least 1024"));
    }
    if raw.breaker_failures == 0 {
        return Err(invalid(key("breaker_failures"), "must be at least 1"));
    }
    if raw.breaker_cooldown_ms == 0 {
        return Err(invalid(key("breaker_cooldown_ms"), "must be positive"));
    }
    Ok(RemoteConfig {
        name: raw.name.clone(),
        model: raw.model.clone().unwrap_or_else(|| raw.name.clone()),
        base_url: base_url.trim_end_matches('/').to_string(),
        api_key,
        auth,
        timeout: Duration::from_millis(raw.timeout_ms),
        max_retries: raw.max_retries,
        backoff_base: Duration::from_millis(raw.backoff_base_ms),
        backoff_max: Duration::from_millis(raw.backoff_max_ms),
        max_response_bytes: usize::try_from(raw.max_response_bytes).unwrap_or(usize::MAX),
        breaker_failures: raw.breaker_failures,
        breaker_cooldown: Duration::from_millis(raw.breaker_cooldown_ms),
    })
}

/// Reads every learned rule the configuration names from `<rules_dir>/<name>.json`.
fn load_learned_rules(
    confidence: &RawConfidence,
    policy: &RawPolicy,
    policies_config: &PoliciesConfig,
    base_dir: Option<&Path>,
) -> Result<BTreeMap<String, Arc<LearnedRule>>, ConfigError> {
    let mut names = policies::learned::learned_rule_names(policies_config);
    if policy.aggregate == "learned" {
        let name = policy.learned_rule.clone().ok_or_else(|| {
            invalid(
                "policy.learned_rule",
                "aggregate = \"learned\" needs the rule's name (its file is <confidence.rules_dir>/<name>.json)",
            )
        })?;
        names.insert(name);
    }
    let dir = match base_dir {
        Some(base) if Path::new(&confidence.rules_dir).is_relative() => {
            base.join(&confidence.rules_dir)
        }
        _ => PathBuf::from(&confidence.rules_dir),
    };
    let mut rules = BTreeMap::new();
    for name in names {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(invalid(
                "confidence.rules_dir",
                format!("`{name}` is not a rule name (a file name without folders)"),
            ));
        }
        let path = dir.join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path).map_err(|e| {
            invalid(
                "confidence.rules_dir",
                format!(
                    "cannot read learned rule `{name}` from {}: {e}",
                    path.display()
                ),
            )
        })?;
        let rule = LearnedRule::from_json(&text).map_err(|e| {
            invalid(
                "confidence.rules_dir",
                format!("learned rule {}: {e}", path.display()),
            )
        })?;
        rules.insert(name, Arc::new(rule));
    }
    Ok(rules)
}

fn validate_policy(
    raw: &RawPolicy,
    remotes: &[RemoteConfig],
    rules: &BTreeMap<String, Arc<LearnedRule>>,
) -> Result<(Policy, Vec<String>), ConfigError> {
    let aggregate = match raw.aggregate.as_str() {
        "mean_logprob" => Aggregate::MeanLogprob,
        "sum_logprob" => Aggregate::SumLogprob,
        "min_logprob" => Aggregate::MinLogprob,
        "mean_entropy" => Aggregate::MeanEntropy,
        "mean_margin" => Aggregate::MeanMargin,
        "quantile" => {
            if !(0.0..=1.0).contains(&raw.quantile) {
                return Err(invalid("policy.quantile", "must be within [0, 1]"));
            }
            Aggregate::Quantile { q: raw.quantile }
        }
        "fraction_above" => {
            if !raw.bound.is_finite() || raw.bound > 0.0 {
                return Err(invalid("policy.bound", "must be a log-prob: finite and at most 0"));
            }
            Aggregate::FractionAbove { bound: raw.bound }
        }
        "learned" => {
            // Loaded (or refused with the file's name) by `load_learned_rules`.
            let name = raw.learned_rule.clone().unwrap_or_default();
            let rule = rules.get(&name).cloned();
            Aggregate::Learned { name, rule }
        }
        other => {
            return Err(invalid(
                "policy.aggregate",
                format!("unknown aggregate `{other}` (choose sum_logprob, mean_logprob, min_logprob, quantile, fraction_above, mean_entropy, mean_margin, learned)"),
            ))
        }
    };
    if !raw.threshold.is_finite() {
        return Err(invalid("policy.threshold", "must be a finite number"));
    }
    let (lo, hi) = aggregate.score_range();
    if !(lo..=hi).contains(&raw.threshold) {
        return Err(invalid(
            "policy.threshold",
            format!(
                "{} is outside the range of {} scores [{lo}, {hi}]",
                raw.threshold,
                aggregate.name()
            ),
        ));
    }
    let on_budget_exhausted = match raw.on_budget_exhausted.as_str() {
        "serve_local" => ExhaustedAction::ServeLocal,
        "fallback" => ExhaustedAction::Fallback,
        "reject" => ExhaustedAction::Reject,
        other => {
            return Err(invalid(
                "policy.on_budget_exhausted",
                format!("unknown action `{other}` (choose serve_local, fallback or reject)"),
            ))
        }
    };
    let max_cost_per_request = raw
        .max_cost_per_request_usd
        .map(NanoUsd::from_usd)
        .transpose()
        .map_err(|e| invalid("policy.max_cost_per_request_usd", e.to_string()))?;
    let on_remote_failure = match raw.on_remote_failure.as_str() {
        "serve_local" => OnRemoteFailure::ServeLocal,
        "error" => OnRemoteFailure::Error,
        other => {
            return Err(invalid(
                "policy.on_remote_failure",
                format!("unknown action `{other}` (choose serve_local or error)"),
            ))
        }
    };
    let on_overload = match raw.on_overload.as_str() {
        "escalate" => OnOverload::Escalate,
        "reject" => OnOverload::Reject,
        other => {
            return Err(invalid(
                "policy.on_overload",
                format!("unknown action `{other}` (choose escalate or reject)"),
            ))
        }
    };
    let policy_remotes = if raw.remotes.is_empty() {
        remotes.iter().map(|r| r.name.clone()).collect()
    } else {
        for (i, name) in raw.remotes.iter().enumerate() {
            if !remotes.iter().any(|r| &r.name == name) {
                let known: Vec<&str> = remotes.iter().map(|r| r.name.as_str()).collect();
                return Err(invalid(
                    format!("policy.remotes[{i}]"),
                    format!("unknown remote `{name}` (configured: {})", known.join(", ")),
                ));
            }
        }
        raw.remotes.clone()
    };
    let optional_ms = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
    let policy = Policy {
        mode: crate::routing::Mode::Cascade,
        aggregate,
        threshold: raw.threshold,
        on_remote_failure,
        on_overload,
        max_local_time: optional_ms(raw.max_local_ms),
        max_queue_wait: optional_ms(raw.max_queue_wait_ms),
        allow_route_header: raw.allow_route_header,
        allow_direct_models: raw.allow_direct_models,
        on_budget_exhausted,
        max_cost_per_request,
        log_prompts: raw.log_prompts,
    };
    Ok((policy, policy_remotes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn parse(toml: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::string(toml))
            .extract()
            .map_err(|e| ConfigError::Read(e.to_string()))?;
        Config::validate(raw, None, &|name| match name {
            "KEY" => Some("sk-test".into()),
            "URL" => Some("http://127.0.0.1:9/v1/".into()),
            _ => None,
        })
    }

    const MINIMAL: &str = r#"
        [local]
        model = "models/m.gguf"
        [[remotes]]
        name = "big"
        base_url_env = "URL"
        api_key_env = "KEY"
    "#;

    #[test]
    fn minimal_config_gets_defaults_and_reads_secrets_from_the_environment() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.local.name, "m");
        assert_eq!(c.server.model_name, "cascade");
        assert_eq!(c.remotes[0].base_url, "http://127.0.0.1:9/v1");
        assert_eq!(c.remotes[0].api_key.as_deref(), Some("sk-test"));
        assert_eq!(c.remotes[0].model, "big");
        assert_eq!(c.policy_remotes, vec!["big".to_string()]);
        assert_eq!(c.policy.aggregate, Aggregate::SumLogprob);
        assert_eq!(c.policy.threshold, policies::confidence::DEFAULT_THRESHOLD);
    }

    #[test]
    fn debug_output_of_a_configuration_never_shows_a_remote_key() {
        let c = parse(MINIMAL).unwrap();
        let printed = format!("{c:?}");
        assert!(!printed.contains("sk-test"), "{printed}");
        assert!(printed.contains("<redacted>"));
    }

    #[test]
    fn limits_are_read_from_their_section_and_checked() {
        let c = parse(&format!(
            "{MINIMAL}\n[limits]\nmax_messages = 7\nrequest_timeout_ms = 1500"
        ))
        .unwrap();
        assert_eq!(c.limits.max_messages, 7);
        assert_eq!(c.limits.request_timeout, Duration::from_millis(1500));
        assert_eq!(c.limits.max_output_tokens, 32_768);
        let e = error_of(&format!("{MINIMAL}\n[limits]\nmax_prompt_chars = 0"));
        assert!(e.starts_with("limits.max_prompt_chars"), "{e}");
        let e = error_of(&format!("{MINIMAL}\n[limits]\nmax_mesages = 7"));
        assert!(e.contains("max_mesages"), "{e}");
    }

    fn error_of(toml: &str) -> String {
        parse(toml).unwrap_err().to_string()
    }

    #[test]
    fn invalid_values_name_their_key() {
        let e = error_of(&format!("{MINIMAL}\n[policy]\naggregate = \"median\""));
        assert!(e.starts_with("policy.aggregate:"), "{e}");
        let e = error_of(&format!(
            "{MINIMAL}\n[policy]\nremotes = [\"big\", \"nope\"]"
        ));
        assert!(e.starts_with("policy.remotes[1]:"), "{e}");
        let e = error_of(&format!("{MINIMAL}\n[server]\nlisten = \"localhost\""));
        assert!(e.starts_with("server.listen:"), "{e}");
        let e = error_of("[local]\nmodel = \"m.gguf\"\n[[remotes]]\nname = \"x\"\nbase_url = \"http://h\"\napi_key_env = \"MISSING\"");
        assert!(
            e.starts_with("remotes[0].api_key_env:") && e.contains("MISSING"),
            "{e}"
        );
        let e = error_of("[local]\nmodel = \"m.gguf\"\n[[remotes]]\nname = \"x\"");
        assert!(e.starts_with("remotes[0].base_url:"), "{e}");
        let e = error_of("[server]\nlisten = \"127.0.0.1:1\"");
        assert!(e.starts_with("local.model:"), "{e}");
    }

    #[test]
    fn storage_defaults_to_a_sqlite_file_next_to_the_config() {
        let raw: RawConfig = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::string(MINIMAL))
            .extract()
            .unwrap();
        let c = Config::validate(raw, Some(Path::new("/etc/cascade")), &|name| match name {
            "KEY" => Some("k".into()),
            "URL" => Some("http://h/v1".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.storage.url, "sqlite:///etc/cascade/cascade.db");
        assert_eq!(c.storage.reservation_ttl_secs, 300);
        assert!(c.policies.teams().is_empty());
        assert_eq!(c.admin, AdminConfig::default());
        assert_eq!(
            resolve_sqlite_path("sqlite::memory:", Some(Path::new("/x"))),
            "sqlite::memory:"
        );
        assert_eq!(
            resolve_sqlite_path("postgres://h/db", Some(Path::new("/x"))),
            "postgres://h/db"
        );
    }

    #[test]
    fn teams_prices_experiments_and_admin_are_read() {
        let hash = "ab".repeat(32);
        let c = parse(&format!(
            r#"{MINIMAL}
            [storage]
            url = "sqlite::memory:"
            [admin]
            api_key_hash = "{hash}"
            listen = "127.0.0.1:9091"
            [prices.big]
            input_usd_per_million = 1.0
            output_usd_per_million = 2.0
            [[teams]]
            name = "alpha"
            api_key_hashes = ["{}"]
            [teams.policy]
            threshold = -1.0
            remotes = ["big"]
            daily_budget_usd = 5.0
            [[experiments]]
            id = "exp"
            team = "alpha"
            subject = "key"
            variants = [{{ name = "a", weight = 1 }}, {{ name = "b", weight = 1, overrides = {{ threshold = -2.0 }} }}]
            "#,
            "cd".repeat(32)
        ))
        .unwrap();
        assert_eq!(c.admin.api_key_hash.as_deref(), Some(hash.as_str()));
        assert_eq!(c.admin.listen, Some("127.0.0.1:9091".parse().unwrap()));
        assert_eq!(c.storage.url, "sqlite::memory:");
        assert_eq!(c.policies.teams().len(), 1);
        let e = error_of(&format!(
            "{MINIMAL}\n[[teams]]\nname = \"t\"\n[teams.policy]\nthreshold = -1.0\nremotes = [\"nope\"]"
        ));
        assert!(e.starts_with("policies:") && e.contains("nope"), "{e}");
        let e = error_of(&format!("{MINIMAL}\n[admin]\napi_key_hash = \"xyz\""));
        assert!(e.starts_with("admin.api_key_hash:"), "{e}");
        let e = error_of(&format!("{MINIMAL}\n[storage]\nurl = \"mysql://x\""));
        assert!(e.starts_with("storage.url:"), "{e}");
    }

    #[test]
    fn reliability_settings_have_defaults_and_are_validated() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.remotes[0].max_response_bytes, 16 * 1024 * 1024);
        assert_eq!(c.remotes[0].breaker_failures, 5);
        assert_eq!(c.remotes[0].breaker_cooldown, Duration::from_secs(10));
        assert_eq!(c.ledger.on_failure, OnLedgerFailure::Spool);
        assert_eq!(
            c.ledger.spool_path,
            PathBuf::from("cascade-ledger-spool.jsonl")
        );
        let c = parse(&format!(
            "{MINIMAL}max_response_bytes = 4096\nbreaker_failures = 2\n[storage]\non_ledger_failure = \"fail_closed\""
        ))
        .unwrap();
        assert_eq!(c.remotes[0].max_response_bytes, 4096);
        assert_eq!(c.remotes[0].breaker_failures, 2);
        assert_eq!(c.ledger.on_failure, OnLedgerFailure::FailClosed);
        for (extra, key) in [
            ("max_response_bytes = 10", "remotes[0].max_response_bytes:"),
            ("breaker_failures = 0", "remotes[0].breaker_failures:"),
            ("breaker_cooldown_ms = 0", "remotes[0].breaker_cooldown_ms:"),
            (
                "[storage]\non_ledger_failure = \"drop\"",
                "storage.on_ledger_failure:",
            ),
            ("[storage]\nspool_path = \" \"", "storage.spool_path:"),
        ] {
            let e = error_of(&format!("{MINIMAL}{extra}"));
            assert!(e.starts_with(key), "{extra}: {e}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = error_of(&format!("{MINIMAL}\n[policy]\nthreshhold = -1.0"));
        assert!(e.contains("threshhold"), "{e}");
    }

    #[test]
    fn aggregate_parameters_are_read() {
        let c = parse(&format!(
            "{MINIMAL}\n[policy]\naggregate = \"quantile\"\nquantile = 0.25"
        ))
        .unwrap();
        assert_eq!(c.policy.aggregate, Aggregate::Quantile { q: 0.25 });
        let c = parse(&format!(
            "{MINIMAL}\n[policy]\naggregate = \"fraction_above\"\nbound = -1.5\nthreshold = 0.9"
        ))
        .unwrap();
        assert_eq!(c.policy.aggregate, Aggregate::FractionAbove { bound: -1.5 });
    }

    #[test]
    #[allow(
        clippy::result_large_err,
        reason = "figment's Jail API returns its own error type"
    )]
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "cascade.toml",
                "[local]\nmodel = \"a.gguf\"\n[policy]\nthreshold = -1.0",
            )?;
            jail.set_env("CASCADE_POLICY__THRESHOLD", "-0.25");
            jail.set_env("CASCADE_MODEL", "ignored: not a section key");
            let raw = RawConfig::load(Some(Path::new("cascade.toml"))).unwrap();
            assert_eq!(raw.policy.threshold, -0.25);
            assert_eq!(raw.local.model, "a.gguf");
            Ok(())
        });
    }

    fn with_rules_dir(dir: &Path, toml: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::string(toml))
            .extract()
            .map_err(|e| ConfigError::Read(e.to_string()))?;
        Config::validate(raw, Some(dir), &|name| match name {
            "KEY" => Some("sk-test".into()),
            "URL" => Some("http://127.0.0.1:9/v1/".into()),
            _ => None,
        })
    }

    #[test]
    fn learned_rules_are_loaded_by_name_from_the_rules_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        let rule =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/confidence/smollm2-135m-dev.json");
        std::fs::copy(&rule, dir.path().join("rules/dev.json")).unwrap();
        let team = format!(
            "{MINIMAL}\n[policy]\naggregate = \"learned\"\nlearned_rule = \"dev\"\nthreshold = 0.4\n\
             [prices.big]\ninput_usd_per_million = 1.0\noutput_usd_per_million = 1.0\n\
             [[teams]]\nname = \"a\"\napi_key_hashes = []\n\
             [teams.policy]\naggregate = {{ kind = \"learned\", name = \"dev\" }}\nthreshold = 0.3\nremotes = [\"big\"]\n"
        );
        let c = with_rules_dir(dir.path(), &team).unwrap();
        assert!(
            matches!(&c.policy.aggregate, Aggregate::Learned { name, rule: Some(_) } if name == "dev")
        );
        let team_policy = &c.policies.team("a").unwrap().policy;
        assert!(matches!(
            team_policy.aggregate(),
            Aggregate::Learned { rule: Some(_), .. }
        ));
        // A missing file is named, with the key to fix.
        let e = with_rules_dir(dir.path(), &team.replace("\"dev\"", "\"absent\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("confidence.rules_dir:") && e.contains("absent.json"),
            "{e}"
        );
        // A learned threshold is a probability.
        let e = with_rules_dir(
            dir.path(),
            &team.replace("threshold = 0.4", "threshold = -3.0"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("policy.threshold:"), "{e}");
    }

    #[test]
    fn the_example_configurations_are_valid() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for name in ["quickstart.toml", "multi-team.toml"] {
            let path = examples.join(name);
            let raw: RawConfig = Figment::from(Serialized::defaults(RawConfig::default()))
                .merge(Toml::file(&path))
                .extract()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let config = Config::validate(raw, Some(&examples), &|name| {
                (name == "OPENAI_API_KEY").then(|| "sk-test".to_string())
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            if name == "multi-team.toml" {
                assert_eq!(config.policies.teams().len(), 3);
                assert_eq!(config.policies.experiments().len(), 1);
                assert!(config.admin.listen.is_some());
                let key = config.policies.authenticate("sk-support-example").unwrap();
                assert_eq!(key.team, "support");
            }
        }
    }
}
