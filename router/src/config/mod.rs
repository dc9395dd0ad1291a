//! Configuration: `cascade.toml` overridden by `CASCADE_<SECTION>__<KEY>`
//! environment variables, read into plain serde structs and then validated
//! into typed values, so a bad value stops the process at start-up with the
//! name of its key instead of surfacing in the middle of a request.

mod admin;
mod limits;
mod local;
mod policy;
mod remotes;
mod rules;
mod server;
mod storage;

pub use admin::*;
pub use limits::*;
pub use local::*;
pub use policy::*;
pub use remotes::*;
pub use rules::*;
pub use server::*;
pub use storage::*;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use policies::{
    Aggregate, CalibratedRule, ExhaustedAction, ExperimentConfig, GlobalBudgetConfig, LearnedRule,
    OverloadAction, Policies, PoliciesConfig, Policy, PolicyConfig, PolicyError, PriceConfig,
    ProbeRule, RemoteFailureAction, SignalLog, TeamConfig,
};

use crate::limits::RequestLimits;
use crate::storage::{SqliteSync, StorageConfig};

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

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub local: LocalConfig,
    /// `[policy]`, validated like a team's.
    pub policy: Policy,
    /// `[policy].max_queue_wait_ms`: a local queue whose expected wait exceeds it counts as
    /// overloaded, for every request (the queue is the gateway's, not a team's).
    pub max_queue_wait: Option<Duration>,
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
    pub limits: RequestLimits,
}

impl Config {
    /// Reads `path` (if given) and `CASCADE_*` variables, then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let raw = RawConfig::load(path)?;
        let base = path.and_then(Path::parent).map(Path::to_path_buf);
        Config::validate(raw, base.as_deref(), &|name| std::env::var(name).ok())
    }

    /// Whether every remote's key is at hand: what a command that calls remotes (`serve`)
    /// checks first. The error names the variable to set.
    pub fn check_secrets(&self) -> Result<(), ConfigError> {
        for (i, remote) in self.remotes.iter().enumerate() {
            if let (Some(var), None) = (&remote.api_key_env, &remote.api_key) {
                return Err(invalid(
                    format!("remotes[{i}].api_key_env"),
                    format!(
                        "the environment variable {var} is not set (remote `{}`)",
                        remote.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks every value; `env` reads the variables that hold secrets and
    /// URLs; relative model paths are tried against `base_dir` first. Secrets may be
    /// missing here (see [`Config::check_secrets`]).
    pub fn validate(
        raw: RawConfig,
        base_dir: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let server = validate_server(&raw.server)?;
        let limits = validate_limits(&raw.limits)?;
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
        let calibrated =
            load_calibrated_rules(&raw.confidence, &raw.policy, &policies_config, base_dir)?;
        policies::calibrated::resolve_calibrated(&mut policies_config, &calibrated)
            .map_err(|e| invalid("policies", e.to_string()))?;
        let probes = load_probe_rules(&raw.confidence, &raw.policy, &policies_config, base_dir)?;
        policies::probe::resolve_probe(&mut policies_config, &probes)
            .map_err(|e| invalid("policies", e.to_string()))?;
        let (policy, max_queue_wait, policy_remotes) =
            validate_policy(&raw.policy, &remotes, &rules, &calibrated, &probes)?;
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
            max_queue_wait,
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
        assert_eq!(*c.policy.aggregate(), Aggregate::SumLogprob);
        assert_eq!(
            c.policy.threshold(),
            Some(policies::confidence::DEFAULT_THRESHOLD)
        );
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
        // A missing key is refused where remotes are called (serve), not by every command.
        let c = parse("[local]\nmodel = \"m.gguf\"\n[[remotes]]\nname = \"x\"\nbase_url = \"http://h\"\napi_key_env = \"MISSING\"").unwrap();
        let e = c.check_secrets().unwrap_err().to_string();
        assert!(
            e.starts_with("remotes[0].api_key_env:") && e.contains("MISSING"),
            "{e}"
        );
        assert!(parse(MINIMAL).unwrap().check_secrets().is_ok());
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
    fn every_remote_a_budget_can_reach_is_priced_and_configured() {
        // No budget anywhere: an unpriced remote is accepted (its calls are recorded at $0).
        assert!(parse(MINIMAL).is_ok());
        // A [global] budget applies to every paid call: the remote needs a price.
        let e = error_of(&format!(
            "{MINIMAL}
[global]
daily_budget_usd = 5.0"
        ));
        assert!(
            e.starts_with("prices.big:") && e.contains("[global]"),
            "{e}"
        );
        let priced = format!(
            "{MINIMAL}
[global]
daily_budget_usd = 5.0
[prices.big]
             input_usd_per_million = 1.0
output_usd_per_million = 1.0"
        );
        assert!(parse(&priced).is_ok());
        // A variant may only name configured remotes (priced is not enough).
        let e = error_of(&format!(
            "{priced}
[prices.elsewhere]
input_usd_per_million = 1.0
output_usd_per_million = 1.0
             [[teams]]
name = \"t\"
[teams.policy]
threshold = -1.0
remotes = [\"big\"]
             [[experiments]]
id = \"x\"
team = \"t\"
subject = \"user\"
             variants = [{{ name = \"a\", weight = 1, overrides = {{ remotes = [\"elsewhere\"] }} }}]"
        ));
        assert!(
            e.starts_with("experiments.x.variants.a.remotes:") && e.contains("elsewhere"),
            "{e}"
        );
    }

    #[test]
    fn reliability_settings_have_defaults_and_are_validated() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.remotes[0].max_response_bytes, 16 * 1024 * 1024);
        assert_eq!(c.remotes[0].breaker_failures, 5);
        assert_eq!(c.remotes[0].breaker_cooldown, Duration::from_secs(10));
        assert_eq!(c.ledger.on_failure, OnLedgerFailure::Spool);
        assert_eq!(c.storage.sqlite_sync, SqliteSync::ProcessCrash);
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
        let c = parse(&format!("{MINIMAL}[storage]\nsqlite_sync = \"power_loss\"")).unwrap();
        assert_eq!(c.storage.sqlite_sync, SqliteSync::PowerLoss);
        // Kept signals: 90 days by default, 0 for ever.
        assert_eq!(
            parse(MINIMAL).unwrap().ledger.signals_retention,
            Some(Duration::from_secs(90 * 86_400))
        );
        let c = parse(&format!("{MINIMAL}[storage]\nsignals_retention_days = 0")).unwrap();
        assert_eq!(c.ledger.signals_retention, None);
        for (extra, key) in [
            ("max_response_bytes = 10", "remotes[0].max_response_bytes:"),
            ("breaker_failures = 0", "remotes[0].breaker_failures:"),
            ("breaker_cooldown_ms = 0", "remotes[0].breaker_cooldown_ms:"),
            (
                "[storage]\non_ledger_failure = \"drop\"",
                "storage.on_ledger_failure:",
            ),
            ("[storage]\nspool_path = \" \"", "storage.spool_path:"),
            ("[storage]\nsqlite_sync = \"full\"", "storage.sqlite_sync:"),
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
    fn the_policy_section_reads_the_team_syntax_and_the_older_one_alike() {
        let table = parse(&format!(
            "{MINIMAL}\n[policy]\naggregate = {{ kind = \"quantile\", q = 0.25 }}"
        ))
        .unwrap();
        let name = parse(&format!(
            "{MINIMAL}\n[policy]\naggregate = \"quantile\"\nquantile = 0.25"
        ))
        .unwrap();
        assert_eq!(table.policy, name.policy);
        // Validated by the team rules, errors naming `policy.<key>`.
        let e = error_of(&format!(
            "{MINIMAL}\n[policy]\naggregate = {{ kind = \"mean_logprob\" }}\nthreshold = 0.5"
        ));
        assert!(e.starts_with("policy.threshold:"), "{e}");
        let e = error_of(&format!(
            "{MINIMAL}\n[policy]\nlocal_only = true\nremote_only = true"
        ));
        assert!(e.starts_with("policy.remote_only:"), "{e}");
        // A gateway without remotes answers everything locally.
        let c = parse("[local]\nmodel = \"m.gguf\"").unwrap();
        assert!(c.policy.local_only());
    }

    #[test]
    fn aggregate_parameters_are_read() {
        let c = parse(&format!(
            "{MINIMAL}\n[policy]\naggregate = \"quantile\"\nquantile = 0.25"
        ))
        .unwrap();
        assert_eq!(*c.policy.aggregate(), Aggregate::Quantile { q: 0.25 });
        let c = parse(&format!(
            "{MINIMAL}\n[policy]\naggregate = \"fraction_above\"\nbound = -1.5\nthreshold = 0.9"
        ))
        .unwrap();
        assert_eq!(
            *c.policy.aggregate(),
            Aggregate::FractionAbove { bound: -1.5 }
        );
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
            assert_eq!(raw.policy.threshold, Some(-0.25));
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
            matches!(c.policy.aggregate(), Aggregate::Learned { name, rule: Some(_) } if name == "dev")
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
    fn probe_rules_are_loaded_by_name_for_the_policy_and_teams() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        let rule = ProbeRule {
            format: policies::probe::FORMAT.to_owned(),
            name: "hid".to_owned(),
            hidden: vec![policies::HiddenInput::MiddleMean],
            width: 2,
            hidden_weights: vec![0.5, -0.5],
            features: Vec::new(),
            center: Vec::new(),
            scale: Vec::new(),
            weights: Vec::new(),
            intercept: 0.0,
            fitted_on: serde_json::Value::Null,
        };
        std::fs::write(dir.path().join("rules/hid.json"), rule.to_json()).unwrap();
        let team = format!(
            "{MINIMAL}\n[policy]\naggregate = {{ kind = \"probe\", name = \"hid\" }}\nmin_p_correct = 0.8\n\
             [prices.big]\ninput_usd_per_million = 1.0\noutput_usd_per_million = 1.0\n\
             [[teams]]\nname = \"a\"\napi_key_hashes = []\n\
             [teams.policy]\naggregate = {{ kind = \"probe\", name = \"hid\" }}\nmin_p_correct = 0.9\nremotes = [\"big\"]\n"
        );
        let c = with_rules_dir(dir.path(), &team).unwrap();
        assert!(matches!(
            c.policy.aggregate(),
            Aggregate::Probe { name, rule: Some(r) } if name == "hid" && **r == rule
        ));
        assert!(matches!(
            c.policies.team("a").unwrap().policy.aggregate(),
            Aggregate::Probe { rule: Some(_), .. }
        ));
        let e = with_rules_dir(dir.path(), &team.replace("\"hid\"", "\"absent\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.json") && e.contains("probe rule"), "{e}");
    }

    #[test]
    fn calibrated_rules_are_loaded_by_name_and_min_p_correct_excludes_threshold() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        let map =
            policies::IsotonicMap::fit(&[(-5.0, false), (-3.0, false), (-1.0, true)]).unwrap();
        let rule = CalibratedRule {
            format: policies::calibrated::FORMAT.to_owned(),
            name: "cal".to_owned(),
            rule: "mean_logprob".to_owned(),
            map,
            fitted_on: serde_json::Value::Null,
        };
        std::fs::write(dir.path().join("rules/cal.json"), rule.to_json()).unwrap();
        let team = format!(
            "{MINIMAL}\n[policy]\naggregate = {{ kind = \"calibrated\", name = \"cal\" }}\nmin_p_correct = 0.8\n\
             [prices.big]\ninput_usd_per_million = 1.0\noutput_usd_per_million = 1.0\n\
             [[teams]]\nname = \"a\"\napi_key_hashes = []\n\
             [teams.policy]\naggregate = {{ kind = \"calibrated\", name = \"cal\" }}\nmin_p_correct = 0.9\nremotes = [\"big\"]\n"
        );
        let c = with_rules_dir(dir.path(), &team).unwrap();
        assert!(matches!(
            c.policy.aggregate(),
            Aggregate::Calibrated { name, rule: Some(_) } if name == "cal"
        ));
        assert_eq!(c.policy.threshold(), Some(0.8));
        let team_policy = &c.policies.team("a").unwrap().policy;
        assert_eq!(team_policy.threshold(), Some(0.9));
        // Both criteria in one policy: refused at the key.
        let e = with_rules_dir(
            dir.path(),
            &team.replace(
                "min_p_correct = 0.8",
                "min_p_correct = 0.8\nthreshold = 0.5",
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("policy.min_p_correct:"), "{e}");
        // A missing file is named.
        let e = with_rules_dir(dir.path(), &team.replace("\"cal\"", "\"absent\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("absent.json") && e.contains("calibrated rule"),
            "{e}"
        );
        // min_p_correct on a log-prob rule is refused rather than read as a log-prob.
        let e = with_rules_dir(
            dir.path(),
            &format!("{MINIMAL}\n[policy]\nmin_p_correct = 0.8\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("policy.min_p_correct:"), "{e}");
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
    #[test]
    fn a_zero_limit_stops_start_up_naming_its_key() {
        let raw = RawLimits {
            max_messages: 0,
            ..RawLimits::default()
        };
        let e = validate_limits(&raw).unwrap_err().to_string();
        assert!(e.starts_with("limits.max_messages"), "{e}");
        let raw = RawLimits {
            request_timeout_ms: 0,
            ..RawLimits::default()
        };
        assert!(validate_limits(&raw)
            .unwrap_err()
            .to_string()
            .starts_with("limits.request_timeout_ms"));
        let raw = RawLimits {
            max_header_bytes: 1 << 20,
            ..RawLimits::default()
        };
        assert!(validate_limits(&raw).is_err());
        assert_eq!(
            validate_limits(&RawLimits::default()).unwrap(),
            RequestLimits::default()
        );
    }
}
