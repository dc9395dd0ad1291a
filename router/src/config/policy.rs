//! `[policy]`: the gateway's own policy, validated as a team's is.

use super::*;

/// `[policy]` aggregate: `{ kind = "quantile", q = 0.1 }` as in `[teams.policy]`, or the
/// older name form (`"quantile"` with `quantile = 0.1`, `"learned"` with `learned_rule`), which
/// existing files and `CASCADE_POLICY__AGGREGATE` keep using.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawAggregate {
    Name(String),
    Table(Aggregate),
}

impl From<&str> for RawAggregate {
    fn from(name: &str) -> Self {
        RawAggregate::Name(name.to_string())
    }
}

/// `[policy]`: the gateway's policy when no `[[teams]]` are configured. The same keys as
/// `[teams.policy]` (except budgets, which are `[global]`'s), with defaults of its own, plus
/// `max_queue_wait_ms`, which is the gateway's whatever the teams say.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicy {
    /// `{ kind = "sum_logprob" }` (`mean_logprob`, `min_logprob`, `quantile`,
    /// `fraction_above`, `mean_entropy`, `mean_margin`, `learned`, `calibrated`), or the name
    /// alone.
    pub aggregate: RawAggregate,
    /// The rule file's name (`<rules_dir>/<name>.json`) for `aggregate = "learned"`.
    pub learned_rule: Option<String>,
    /// The quantile for `aggregate = "quantile"`.
    pub quantile: f64,
    /// The log-prob bound for `aggregate = "fraction_above"`.
    pub bound: f64,
    /// Serve locally when the score is at least this; the measured default
    /// (`policies::confidence::DEFAULT_THRESHOLD`) when neither it nor `min_p_correct` is set.
    pub threshold: Option<f64>,
    /// Serve locally when the calibrated probability of a right answer is at least this
    /// (a `calibrated` or `learned` aggregate); excludes `threshold`.
    pub min_p_correct: Option<f64>,
    /// Remote names in fallback order; empty means every remote, in file order.
    pub remotes: Vec<String>,
    /// Never call a remote (as in `[teams.policy]`); also what a gateway without
    /// `[[remotes]]` does.
    pub local_only: bool,
    /// Never run the local model.
    pub remote_only: bool,
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
    /// `none`, `tokens` or `hidden`: the confidence signals of local answers the ledger keeps.
    pub log_signals: SignalLog,
}

impl Default for RawPolicy {
    fn default() -> Self {
        Self {
            // The rule and threshold chosen by cross-validation (docs/confidence.md).
            aggregate: RawAggregate::Name("sum_logprob".into()),
            learned_rule: None,
            quantile: 0.1,
            bound: -2.0,
            threshold: None,
            min_p_correct: None,
            remotes: Vec::new(),
            local_only: false,
            remote_only: false,
            on_remote_failure: "serve_local".into(),
            on_overload: "escalate".into(),
            max_local_ms: 0,
            max_queue_wait_ms: 0,
            allow_route_header: false,
            allow_direct_models: true,
            on_budget_exhausted: "serve_local".into(),
            max_cost_per_request_usd: None,
            log_prompts: false,
            log_signals: SignalLog::None,
        }
    }
}

/// `[policy]` as a [`Policy`], validated as a team's is (errors name `policy.<key>`), its
/// queue bound, and its remotes in fallback order.
pub(super) fn validate_policy(
    raw: &RawPolicy,
    remotes: &[RemoteConfig],
    rules: &BTreeMap<String, Arc<LearnedRule>>,
    calibrated: &BTreeMap<String, Arc<CalibratedRule>>,
    probes: &BTreeMap<String, Arc<ProbeRule>>,
) -> Result<(Policy, Option<Duration>, Vec<String>), ConfigError> {
    let aggregate = match &raw.aggregate {
        RawAggregate::Table(Aggregate::Learned { name, .. }) => Aggregate::Learned {
            name: name.clone(),
            rule: rules.get(name).cloned(),
        },
        RawAggregate::Table(Aggregate::Calibrated { name, .. }) => Aggregate::Calibrated {
            name: name.clone(),
            rule: calibrated.get(name).cloned(),
        },
        RawAggregate::Table(Aggregate::Probe { name, .. }) => Aggregate::Probe {
            name: name.clone(),
            rule: probes.get(name).cloned(),
        },
        RawAggregate::Table(aggregate) => aggregate.clone(),
        RawAggregate::Name(name) => aggregate_by_name(name, raw, rules)?,
    };
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
    let on_remote_failure = match raw.on_remote_failure.as_str() {
        "serve_local" => RemoteFailureAction::ServeLocal,
        "error" => RemoteFailureAction::Error,
        other => {
            return Err(invalid(
                "policy.on_remote_failure",
                format!("unknown action `{other}` (choose serve_local or error)"),
            ))
        }
    };
    let on_overload = match raw.on_overload.as_str() {
        "escalate" => OverloadAction::Escalate,
        "reject" => OverloadAction::Reject,
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
    // A gateway without remotes has nothing to escalate to: every answer is local.
    let local_only = raw.local_only || policy_remotes.is_empty();
    let config = PolicyConfig {
        aggregate,
        // The measured default applies only when the policy names no criterion at all, so
        // that `min_p_correct` with an explicit `threshold` is refused, not silently merged.
        threshold: match raw.min_p_correct {
            Some(_) => raw.threshold,
            None => Some(
                raw.threshold
                    .unwrap_or(policies::confidence::DEFAULT_THRESHOLD),
            ),
        },
        min_p_correct: raw.min_p_correct,
        remotes: policy_remotes.clone(),
        local_only,
        remote_only: raw.remote_only,
        max_cost_per_request_usd: raw.max_cost_per_request_usd,
        daily_budget_usd: None,
        monthly_budget_usd: None,
        on_budget_exhausted,
        on_remote_failure,
        on_overload,
        // 0 means no cap here (a team policy refuses 0).
        max_local_ms: (raw.max_local_ms > 0).then_some(raw.max_local_ms),
        allow_route_header: raw.allow_route_header,
        allow_direct_models: raw.allow_direct_models,
        log_prompts: raw.log_prompts,
        log_signals: raw.log_signals,
    };
    let policy = Policy::try_from(config).map_err(|e| match e {
        PolicyError::Invalid { key, reason } => invalid(format!("policy.{key}"), reason),
        other => invalid("policy", other.to_string()),
    })?;
    let max_queue_wait =
        (raw.max_queue_wait_ms > 0).then(|| Duration::from_millis(raw.max_queue_wait_ms));
    Ok((policy, max_queue_wait, policy_remotes))
}

/// The older `[policy] aggregate = "<name>"` form, with its parameters in sibling keys.
pub(super) fn aggregate_by_name(
    name: &str,
    raw: &RawPolicy,
    rules: &BTreeMap<String, Arc<LearnedRule>>,
) -> Result<Aggregate, ConfigError> {
    Ok(match name {
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
        other => match Aggregate::from_name(other) {
            Some(aggregate) => aggregate,
            None => return Err(invalid(
                "policy.aggregate",
                format!("unknown aggregate `{other}` (choose sum_logprob, mean_logprob, min_logprob, quantile, fraction_above, mean_entropy, mean_margin, learned)"),
            )),
        },
    })
}
