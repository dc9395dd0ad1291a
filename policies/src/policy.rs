//! A team's routing policy: the raw configuration, its validated form, and overrides.

use serde::{Deserialize, Serialize};

use crate::confidence::{Aggregate, TokenSignal};
use crate::error::PolicyError;
use crate::money::{opt_usd_at, NanoUsd};

/// What to do when the budget cannot cover a remote call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExhaustedAction {
    /// Serve the local answer, marked as such (rejects when there is no local answer).
    #[default]
    ServeLocal,
    /// Use the cheapest remote in `remotes` whose estimate fits (rejects when none fits).
    Fallback,
    /// Refuse with 429.
    Reject,
}

/// What to do when every remote attempt failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteFailureAction {
    /// Serve the local answer when there is one, marked as such.
    #[default]
    ServeLocal,
    /// Return the upstream error.
    Error,
}

/// What to do when the local model's queue is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverloadAction {
    /// Send the request to the remote model without running local.
    #[default]
    Escalate,
    /// Refuse: 429 `local_queue_full` (503 `local_model_loading` while the model loads).
    Reject,
}

/// Which of a request's confidence signals the ledger keeps beside its record
/// (`log_signals`), so that `cascade calibrate --ledger` can fit any rule, the learned rule
/// and the hidden-state probe to the team's own traffic, not only the routing rule's curve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalLog {
    /// Only the routing rule's score (always kept).
    #[default]
    None,
    /// Every generated token's log-prob, entropy and top-1/top-2 margin (12 bytes a token).
    Tokens,
    /// The tokens and the engine's hidden-state features (four vectors of the model's width
    /// in half precision: 4.5 KiB a request for SmolLM2-135M).
    Hidden,
}

impl SignalLog {
    /// Whether the tokens are kept.
    pub fn tokens(self) -> bool {
        !matches!(self, Self::None)
    }

    /// Whether the hidden-state features are kept.
    pub fn hidden(self) -> bool {
        matches!(self, Self::Hidden)
    }
}

/// A policy as written in configuration (money in USD); becomes a [`Policy`] via `TryFrom`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// How token signals become one score; `{ kind = "sum_logprob" }` by default.
    pub aggregate: Aggregate,
    /// Serve locally when the score is `>= threshold`; required unless local_only/remote_only
    /// or `min_p_correct` is set.
    pub threshold: Option<f64>,
    /// Serve locally when the probability that the local answer is right is at least this,
    /// in `[0, 1]`: the threshold of an aggregate whose score is that probability
    /// (`calibrated` or `learned`), written so that it reads the same for every rule and
    /// model. Mutually exclusive with `threshold`.
    pub min_p_correct: Option<f64>,
    /// Remote model names in order of preference; the first is used when budget allows.
    pub remotes: Vec<String>,
    /// Never call a remote model.
    pub local_only: bool,
    /// Never run the local model.
    pub remote_only: bool,
    /// Largest estimated cost of one remote call, in USD.
    pub max_cost_per_request_usd: Option<f64>,
    /// Spend limit per calendar day, in USD.
    pub daily_budget_usd: Option<f64>,
    /// Spend limit per calendar month, in USD.
    pub monthly_budget_usd: Option<f64>,
    /// What happens when the budget cannot cover a remote call.
    pub on_budget_exhausted: ExhaustedAction,
    /// What happens when the remote calls fail.
    pub on_remote_failure: RemoteFailureAction,
    /// What happens when the local queue is full.
    pub on_overload: OverloadAction,
    /// Local generation time cap in milliseconds; past it the request escalates.
    pub max_local_ms: Option<u64>,
    /// Whether clients may send `x-cascade-route: local|remote`.
    pub allow_route_header: bool,
    /// Whether clients may name a model directly and skip the cascade (under local_only,
    /// only the local model: a remote named is refused).
    pub allow_direct_models: bool,
    /// Whether prompt text may be stored in the ledger.
    pub log_prompts: bool,
    /// Which confidence signals of a locally generated answer the ledger keeps.
    pub log_signals: SignalLog,
}

/// Changes to a policy for one key or one experiment variant; absent fields keep the base.
///
/// Optional limits can be set or changed here but not removed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyOverride {
    /// See [`PolicyConfig::aggregate`].
    pub aggregate: Option<Aggregate>,
    /// See [`PolicyConfig::threshold`]; replaces a base `min_p_correct`.
    pub threshold: Option<f64>,
    /// See [`PolicyConfig::min_p_correct`]; replaces a base `threshold`.
    pub min_p_correct: Option<f64>,
    /// See [`PolicyConfig::remotes`].
    pub remotes: Option<Vec<String>>,
    /// See [`PolicyConfig::local_only`].
    pub local_only: Option<bool>,
    /// See [`PolicyConfig::remote_only`].
    pub remote_only: Option<bool>,
    /// See [`PolicyConfig::max_cost_per_request_usd`].
    pub max_cost_per_request_usd: Option<f64>,
    /// See [`PolicyConfig::daily_budget_usd`].
    pub daily_budget_usd: Option<f64>,
    /// See [`PolicyConfig::monthly_budget_usd`].
    pub monthly_budget_usd: Option<f64>,
    /// See [`PolicyConfig::on_budget_exhausted`].
    pub on_budget_exhausted: Option<ExhaustedAction>,
    /// See [`PolicyConfig::on_remote_failure`].
    pub on_remote_failure: Option<RemoteFailureAction>,
    /// See [`PolicyConfig::on_overload`].
    pub on_overload: Option<OverloadAction>,
    /// See [`PolicyConfig::max_local_ms`].
    pub max_local_ms: Option<u64>,
    /// See [`PolicyConfig::allow_route_header`].
    pub allow_route_header: Option<bool>,
    /// See [`PolicyConfig::allow_direct_models`].
    pub allow_direct_models: Option<bool>,
    /// See [`PolicyConfig::log_prompts`].
    pub log_prompts: Option<bool>,
    /// See [`PolicyConfig::log_signals`].
    pub log_signals: Option<SignalLog>,
}

impl PolicyOverride {
    /// Whether the override sets a budget (experiments may not: spend limits are not a
    /// treatment to randomise).
    pub fn sets_budget(&self) -> bool {
        self.daily_budget_usd.is_some() || self.monthly_budget_usd.is_some()
    }

    /// The first field set here that an experiment variant may not change, if any: the
    /// per-request cap and what happens when a budget runs out are spend limits too, and
    /// storing prompts or signals is a data-retention promise of the team's own policy
    /// (docs/security.md), not a treatment to randomise.
    pub fn sets_guarded_field(&self) -> Option<&'static str> {
        if self.max_cost_per_request_usd.is_some() {
            Some("max_cost_per_request_usd")
        } else if self.on_budget_exhausted.is_some() {
            Some("on_budget_exhausted")
        } else if self.log_prompts.is_some() {
            Some("log_prompts")
        } else if self.log_signals.is_some() {
            Some("log_signals")
        } else {
            None
        }
    }
}

/// A validated policy. Fields are private so that every `Policy` in existence passed
/// validation; read them through the accessors.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Policy {
    aggregate: Aggregate,
    threshold: Option<f64>,
    remotes: Vec<String>,
    local_only: bool,
    remote_only: bool,
    max_cost_per_request: Option<NanoUsd>,
    daily_budget: Option<NanoUsd>,
    monthly_budget: Option<NanoUsd>,
    on_budget_exhausted: ExhaustedAction,
    on_remote_failure: RemoteFailureAction,
    on_overload: OverloadAction,
    max_local_ms: Option<u64>,
    allow_route_header: bool,
    allow_direct_models: bool,
    log_prompts: bool,
    log_signals: SignalLog,
}

impl TryFrom<PolicyConfig> for Policy {
    type Error = PolicyError;

    fn try_from(c: PolicyConfig) -> Result<Self, PolicyError> {
        let threshold = serve_threshold(c.threshold, c.min_p_correct, &c.aggregate)?;
        let policy = Self {
            aggregate: c.aggregate,
            threshold,
            remotes: c.remotes,
            local_only: c.local_only,
            remote_only: c.remote_only,
            max_cost_per_request: opt_usd_at(
                "max_cost_per_request_usd",
                c.max_cost_per_request_usd,
            )?,
            daily_budget: opt_usd_at("daily_budget_usd", c.daily_budget_usd)?,
            monthly_budget: opt_usd_at("monthly_budget_usd", c.monthly_budget_usd)?,
            on_budget_exhausted: c.on_budget_exhausted,
            on_remote_failure: c.on_remote_failure,
            on_overload: c.on_overload,
            max_local_ms: c.max_local_ms,
            allow_route_header: c.allow_route_header,
            allow_direct_models: c.allow_direct_models,
            log_prompts: c.log_prompts,
            log_signals: c.log_signals,
        };
        policy.check()?;
        Ok(policy)
    }
}

/// The serve-local threshold from `threshold` or `min_p_correct` (at most one of them): a
/// `min_p_correct` is the threshold of a probability-valued aggregate, checked here so that
/// its errors name the key the user wrote.
fn serve_threshold(
    threshold: Option<f64>,
    min_p_correct: Option<f64>,
    aggregate: &Aggregate,
) -> Result<Option<f64>, PolicyError> {
    match (threshold, min_p_correct) {
        (Some(_), Some(_)) => Err(PolicyError::invalid(
            "min_p_correct",
            "set either threshold or min_p_correct, not both",
        )),
        (threshold, None) => Ok(threshold),
        (None, Some(p)) if !(0.0..=1.0).contains(&p) => Err(PolicyError::invalid(
            "min_p_correct",
            format!("must be within [0, 1], got {p}"),
        )),
        (None, Some(_)) if !aggregate.is_probability() => Err(PolicyError::invalid(
            "min_p_correct",
            format!(
                "needs an aggregate whose score is a probability (`calibrated` or `learned`), \
                 not {}; fit one with `cascade calibrate`",
                aggregate.name()
            ),
        )),
        (None, Some(p)) => Ok(Some(p)),
    }
}

impl Policy {
    /// This policy with `o` applied on top, validated as a whole (errors name the key as
    /// written in the override).
    pub fn with_override(&self, o: &PolicyOverride) -> Result<Self, PolicyError> {
        let mut p = self.clone();
        if let Some(v) = &o.aggregate {
            p.aggregate = v.clone();
        }
        if o.threshold.is_some() || o.min_p_correct.is_some() {
            p.threshold = serve_threshold(o.threshold, o.min_p_correct, &p.aggregate)?;
        }
        if let Some(v) = &o.remotes {
            p.remotes.clone_from(v);
        }
        if let Some(v) = o.local_only {
            p.local_only = v;
        }
        if let Some(v) = o.remote_only {
            p.remote_only = v;
        }
        if let Some(v) = opt_usd_at("max_cost_per_request_usd", o.max_cost_per_request_usd)? {
            p.max_cost_per_request = Some(v);
        }
        if let Some(v) = opt_usd_at("daily_budget_usd", o.daily_budget_usd)? {
            p.daily_budget = Some(v);
        }
        if let Some(v) = opt_usd_at("monthly_budget_usd", o.monthly_budget_usd)? {
            p.monthly_budget = Some(v);
        }
        if let Some(v) = o.on_budget_exhausted {
            p.on_budget_exhausted = v;
        }
        if let Some(v) = o.on_remote_failure {
            p.on_remote_failure = v;
        }
        if let Some(v) = o.on_overload {
            p.on_overload = v;
        }
        if let Some(v) = o.max_local_ms {
            p.max_local_ms = Some(v);
        }
        if let Some(v) = o.allow_route_header {
            p.allow_route_header = v;
        }
        if let Some(v) = o.allow_direct_models {
            p.allow_direct_models = v;
        }
        if let Some(v) = o.log_prompts {
            p.log_prompts = v;
        }
        if let Some(v) = o.log_signals {
            p.log_signals = v;
        }
        p.check()?;
        Ok(p)
    }

    /// Cross-field validation shared by `TryFrom` and `with_override`.
    fn check(&self) -> Result<(), PolicyError> {
        self.aggregate
            .validate()
            .map_err(|source| PolicyError::Aggregate {
                key: "aggregate".to_owned(),
                source,
            })?;
        if self.local_only && self.remote_only {
            return Err(PolicyError::invalid(
                "remote_only",
                "local_only and remote_only cannot both be true",
            ));
        }
        match self.threshold {
            None if self.cascades() => {
                return Err(PolicyError::invalid(
                    "threshold",
                    "required (or min_p_correct) unless local_only or remote_only is true",
                ));
            }
            None => {}
            Some(t) if !t.is_finite() => {
                return Err(PolicyError::invalid(
                    "threshold",
                    format!("must be finite, got {t}"),
                ));
            }
            Some(t) => {
                let (lo, hi) = self.aggregate.score_range();
                if !(lo..=hi).contains(&t) {
                    return Err(PolicyError::invalid(
                        "threshold",
                        format!(
                            "{t} is outside the range of {} scores [{lo}, {hi}] \
                             (scores are higher = more confident; entropy is negated)",
                            self.aggregate.name()
                        ),
                    ));
                }
            }
        }
        if self.remotes.is_empty() && !self.local_only {
            return Err(PolicyError::invalid(
                "remotes",
                "must name at least one remote model unless local_only is true",
            ));
        }
        for (i, name) in self.remotes.iter().enumerate() {
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(PolicyError::invalid(
                    format!("remotes[{i}]"),
                    format!("`{name}` is not a model name"),
                ));
            }
            if self.remotes[..i].contains(name) {
                return Err(PolicyError::invalid(
                    format!("remotes[{i}]"),
                    format!("`{name}` is listed twice"),
                ));
            }
        }
        if self.max_local_ms == Some(0) {
            return Err(PolicyError::invalid("max_local_ms", "must be > 0 when set"));
        }
        Ok(())
    }

    /// Whether requests may go local first and escalate (neither local_only nor remote_only).
    pub fn cascades(&self) -> bool {
        !self.local_only && !self.remote_only
    }

    /// Early-exit check for the local generation loop: true when the policy can escalate and
    /// no continuation of at most `max_more_tokens` tokens can reach the threshold.
    pub fn should_stop_early(&self, tokens_so_far: &[TokenSignal], max_more_tokens: usize) -> bool {
        match self.threshold {
            Some(t) if self.cascades() => {
                self.aggregate
                    .settled_below_within(tokens_so_far, t, max_more_tokens)
            }
            _ => false,
        }
    }

    /// How token signals become one score.
    pub fn aggregate(&self) -> &Aggregate {
        &self.aggregate
    }
    /// Serve-local threshold; `None` only for local_only or remote_only policies.
    pub fn threshold(&self) -> Option<f64> {
        self.threshold
    }
    /// Remote model names in order of preference.
    pub fn remotes(&self) -> &[String] {
        &self.remotes
    }
    /// Never call a remote model.
    pub fn local_only(&self) -> bool {
        self.local_only
    }
    /// Never run the local model.
    pub fn remote_only(&self) -> bool {
        self.remote_only
    }
    /// Largest estimated cost of one remote call.
    pub fn max_cost_per_request(&self) -> Option<NanoUsd> {
        self.max_cost_per_request
    }
    /// Spend limit per calendar day for the scope this policy belongs to.
    pub fn daily_budget(&self) -> Option<NanoUsd> {
        self.daily_budget
    }
    /// Spend limit per calendar month for the scope this policy belongs to.
    pub fn monthly_budget(&self) -> Option<NanoUsd> {
        self.monthly_budget
    }
    /// What happens when the budget cannot cover a remote call.
    pub fn on_budget_exhausted(&self) -> ExhaustedAction {
        self.on_budget_exhausted
    }
    /// What happens when the remote calls fail.
    pub fn on_remote_failure(&self) -> RemoteFailureAction {
        self.on_remote_failure
    }
    /// What happens when the local queue is full.
    pub fn on_overload(&self) -> OverloadAction {
        self.on_overload
    }
    /// Local generation time cap in milliseconds.
    pub fn max_local_ms(&self) -> Option<u64> {
        self.max_local_ms
    }
    /// Whether `x-cascade-route` is honoured.
    pub fn allow_route_header(&self) -> bool {
        self.allow_route_header
    }
    /// Whether clients may name a remote model directly.
    pub fn allow_direct_models(&self) -> bool {
        self.allow_direct_models
    }
    /// Whether prompt text may be stored.
    pub fn log_prompts(&self) -> bool {
        self.log_prompts
    }
    /// Which confidence signals of a local answer the ledger keeps.
    pub fn log_signals(&self) -> SignalLog {
        self.log_signals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<Policy, PolicyError> {
        Policy::try_from(serde_json::from_value::<PolicyConfig>(v).unwrap())
    }

    fn cascade() -> Policy {
        parse(json!({"threshold": -0.5, "remotes": ["gpt-4o-mini", "gpt-4o"]})).unwrap()
    }

    #[test]
    fn minimal_cascade_policy_gets_documented_defaults() {
        let p = cascade();
        assert_eq!(p.aggregate(), &Aggregate::SumLogprob);
        assert_eq!(p.threshold(), Some(-0.5));
        assert_eq!(p.remotes(), ["gpt-4o-mini", "gpt-4o"]);
        assert!(p.cascades());
        assert_eq!(p.on_budget_exhausted(), ExhaustedAction::ServeLocal);
        assert_eq!(p.on_remote_failure(), RemoteFailureAction::ServeLocal);
        assert_eq!(p.on_overload(), OverloadAction::Escalate);
        assert!(!p.allow_route_header() && !p.allow_direct_models() && !p.log_prompts());
        assert_eq!(p.log_signals(), SignalLog::None);
        assert_eq!(p.max_cost_per_request(), None);
    }

    #[test]
    fn full_config_parses_money_in_usd_to_nanos() {
        let p = parse(json!({
            "aggregate": {"kind": "quantile", "q": 0.1},
            "threshold": -2.0,
            "remotes": ["m"],
            "max_cost_per_request_usd": 0.05,
            "daily_budget_usd": 10.0,
            "monthly_budget_usd": 200,
            "on_budget_exhausted": "fallback",
            "on_remote_failure": "error",
            "on_overload": "reject",
            "max_local_ms": 1500,
            "allow_route_header": true,
            "allow_direct_models": true,
            "log_prompts": true,
            "log_signals": "hidden"
        }))
        .unwrap();
        assert_eq!(p.log_signals(), SignalLog::Hidden);
        assert!(p.log_signals().tokens() && p.log_signals().hidden());
        assert!(SignalLog::Tokens.tokens() && !SignalLog::Tokens.hidden());
        assert!(!SignalLog::None.tokens());
        let key = p
            .with_override(&PolicyOverride {
                log_signals: Some(SignalLog::Tokens),
                ..PolicyOverride::default()
            })
            .unwrap();
        assert_eq!(key.log_signals(), SignalLog::Tokens);
        assert!(serde_json::from_value::<PolicyConfig>(json!({"log_signals": "all"})).is_err());
        assert_eq!(p.max_cost_per_request(), Some(NanoUsd(50_000_000)));
        assert_eq!(p.daily_budget(), Some(NanoUsd(10_000_000_000)));
        assert_eq!(p.monthly_budget(), Some(NanoUsd(200_000_000_000)));
        assert_eq!(p.on_budget_exhausted(), ExhaustedAction::Fallback);
        assert_eq!(p.on_remote_failure(), RemoteFailureAction::Error);
        assert_eq!(p.on_overload(), OverloadAction::Reject);
        assert_eq!(p.max_local_ms(), Some(1500));
    }

    #[test]
    fn unknown_keys_are_rejected_so_typos_do_not_pass_silently() {
        let err = serde_json::from_value::<PolicyConfig>(json!({"treshold": -1.0})).unwrap_err();
        assert!(err.to_string().contains("treshold"), "{err}");
    }

    #[test]
    fn validation_errors_name_the_offending_key() {
        let cases = [
            (
                json!({"threshold": -1.0, "remotes": ["m"], "local_only": true, "remote_only": true}),
                "remote_only",
            ),
            (json!({"remotes": ["m"]}), "threshold"),
            (
                json!({"threshold": f64::NAN, "remotes": ["m"]}),
                "threshold",
            ),
            (json!({"threshold": 0.5, "remotes": ["m"]}), "threshold"),
            (
                json!({"aggregate": {"kind": "mean_margin"}, "threshold": -0.5, "remotes": ["m"]}),
                "threshold",
            ),
            (
                json!({"aggregate": {"kind": "quantile", "q": 2.0}, "threshold": -1.0, "remotes": ["m"]}),
                "aggregate",
            ),
            (json!({"threshold": -1.0}), "remotes"),
            (
                json!({"threshold": -1.0, "remotes": ["m", "m"]}),
                "remotes[1]",
            ),
            (json!({"threshold": -1.0, "remotes": [""]}), "remotes[0]"),
            (
                json!({"threshold": -1.0, "remotes": ["m"], "daily_budget_usd": -3.0}),
                "daily_budget_usd",
            ),
            (
                json!({"threshold": -1.0, "remotes": ["m"], "max_cost_per_request_usd": 1e300}),
                "max_cost_per_request_usd",
            ),
            (
                json!({"threshold": -1.0, "remotes": ["m"], "max_local_ms": 0}),
                "max_local_ms",
            ),
        ];
        for (config, key) in cases {
            let config: PolicyConfig = match serde_json::from_value(config.clone()) {
                Ok(c) => c,
                // serde_json turns NaN into null; build that one by hand.
                Err(_) => PolicyConfig {
                    threshold: Some(f64::NAN),
                    remotes: vec!["m".into()],
                    ..Default::default()
                },
            };
            let err = Policy::try_from(config.clone()).unwrap_err();
            assert_eq!(err.key(), key, "{config:?} -> {err}");
        }
    }

    #[test]
    fn a_local_only_policy_may_let_clients_name_the_local_model() {
        // pre_route refuses a remote named under local_only; the local model's name is fine.
        let p = parse(json!({"local_only": true, "allow_direct_models": true})).unwrap();
        assert!(p.local_only() && p.allow_direct_models());
    }

    #[test]
    fn local_only_and_remote_only_need_no_threshold() {
        let local = parse(json!({"local_only": true})).unwrap();
        assert!(local.local_only() && !local.cascades() && local.threshold().is_none());
        let remote = parse(json!({"remote_only": true, "remotes": ["m"]})).unwrap();
        assert!(remote.remote_only() && !remote.cascades());
    }

    #[test]
    fn override_changes_only_what_it_names_and_revalidates() {
        let base = cascade();
        let o: PolicyOverride = serde_json::from_value(json!({
            "threshold": -1.5, "daily_budget_usd": 2.0, "remotes": ["gpt-4o"]
        }))
        .unwrap();
        let p = base.with_override(&o).unwrap();
        assert_eq!(p.threshold(), Some(-1.5));
        assert_eq!(p.daily_budget(), Some(NanoUsd(2_000_000_000)));
        assert_eq!(p.remotes(), ["gpt-4o"]);
        assert_eq!(p.aggregate(), base.aggregate());
        assert_eq!(
            base.with_override(&PolicyOverride::default()).unwrap(),
            base
        );

        let both = PolicyOverride {
            local_only: Some(true),
            remote_only: Some(true),
            ..Default::default()
        };
        assert_eq!(base.with_override(&both).unwrap_err().key(), "remote_only");
        let nan = PolicyOverride {
            max_cost_per_request_usd: Some(f64::NAN),
            ..Default::default()
        };
        assert_eq!(
            base.with_override(&nan).unwrap_err().key(),
            "max_cost_per_request_usd"
        );
        // Switching the aggregate without a fitting threshold is caught.
        let margin = PolicyOverride {
            aggregate: Some(Aggregate::MeanMargin),
            ..Default::default()
        };
        assert_eq!(base.with_override(&margin).unwrap_err().key(), "threshold");
    }

    #[test]
    fn turning_a_local_only_policy_into_a_cascade_requires_a_threshold() {
        let local = parse(json!({"local_only": true, "remotes": ["m"]})).unwrap();
        let o = PolicyOverride {
            local_only: Some(false),
            ..Default::default()
        };
        assert_eq!(local.with_override(&o).unwrap_err().key(), "threshold");
        let o = PolicyOverride {
            local_only: Some(false),
            threshold: Some(-1.0),
            ..Default::default()
        };
        assert!(local.with_override(&o).unwrap().cascades());
    }

    /// A `calibrated` aggregate with its rule attached: `sum_logprob` >= -2 has p = 1.
    fn calibrated() -> Aggregate {
        let map = crate::IsotonicMap::fit(&[(-5.0, false), (-2.0, true)]).unwrap();
        Aggregate::Calibrated {
            name: "c".to_owned(),
            rule: Some(std::sync::Arc::new(crate::CalibratedRule {
                format: crate::calibrated::FORMAT.to_owned(),
                name: "c".to_owned(),
                rule: "sum_logprob".to_owned(),
                map,
                fitted_on: serde_json::Value::Null,
            })),
        }
    }

    #[test]
    fn min_p_correct_is_a_probability_threshold_and_excludes_threshold() {
        let config = |threshold, min_p_correct, aggregate| PolicyConfig {
            aggregate,
            threshold,
            min_p_correct,
            remotes: vec!["m".into()],
            ..Default::default()
        };
        let p = Policy::try_from(config(None, Some(0.8), calibrated())).unwrap();
        assert_eq!(p.threshold(), Some(0.8));
        let key = |c: PolicyConfig| Policy::try_from(c).unwrap_err().key().to_owned();
        assert_eq!(
            key(config(Some(0.8), Some(0.8), calibrated())),
            "min_p_correct"
        );
        assert_eq!(key(config(None, Some(1.5), calibrated())), "min_p_correct");
        assert_eq!(
            key(config(None, Some(f64::NAN), calibrated())),
            "min_p_correct"
        );
        // A log-prob is not a probability: min_p_correct on it is refused, not reinterpreted.
        assert_eq!(
            key(config(None, Some(0.8), Aggregate::SumLogprob)),
            "min_p_correct"
        );
        // An override replaces whichever criterion the base had.
        let base = Policy::try_from(config(None, Some(0.8), calibrated())).unwrap();
        let raw = PolicyOverride {
            aggregate: Some(Aggregate::MeanLogprob),
            threshold: Some(-1.0),
            ..Default::default()
        };
        assert_eq!(base.with_override(&raw).unwrap().threshold(), Some(-1.0));
        let stricter = PolicyOverride {
            min_p_correct: Some(0.95),
            ..Default::default()
        };
        assert_eq!(
            base.with_override(&stricter).unwrap().threshold(),
            Some(0.95)
        );
        let both = PolicyOverride {
            threshold: Some(0.5),
            min_p_correct: Some(0.5),
            ..Default::default()
        };
        assert_eq!(
            base.with_override(&both).unwrap_err().key(),
            "min_p_correct"
        );
        let on_log_prob = PolicyOverride {
            aggregate: Some(Aggregate::SumLogprob),
            min_p_correct: Some(0.5),
            ..Default::default()
        };
        assert_eq!(
            base.with_override(&on_log_prob).unwrap_err().key(),
            "min_p_correct"
        );
    }

    #[test]
    fn early_exit_only_for_policies_that_can_escalate() {
        let bad = [TokenSignal {
            logprob: -9.0,
            entropy: 0.0,
            margin: 0.0,
        }];
        assert!(cascade().should_stop_early(&bad, 1));
        let local = parse(json!({"local_only": true, "threshold": -0.5})).unwrap();
        assert!(!local.should_stop_early(&bad, 1));
    }
}
