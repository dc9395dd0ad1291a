//! A learned confidence rule: logistic regression over a few per-answer features (log-prob
//! quantiles, minimum, mean entropy, length), giving a calibrated probability that the local
//! answer is correct. `cascade calibrate` fits it on labeled data and saves it as a small JSON
//! file; a policy names it with `aggregate = { kind = "learned", name = "..." }`.
//!
//! This module only scores: the gateway reads the file (`<name>.json`), parses it with
//! [`LearnedRule::from_json`] and attaches it with [`resolve_learned`] before validating the
//! configuration, so that a policy never meets a rule that is not loaded.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::confidence::{Aggregate, TokenSignal};
use crate::config::PoliciesConfig;
use crate::error::PolicyError;

/// The format tag written into every rule file, so that a future layout is rejected loudly.
pub const FORMAT: &str = "cascade-learned-rule/1";

/// Standardized features are clipped to this many standard deviations: an infinite
/// log-probability, or an answer far outside the training data, stays a finite, extreme
/// input instead of turning the probability into NaN.
const Z_CLIP: f64 = 8.0;

/// One input of a learned rule, computed from an answer's token signals.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Feature {
    /// Mean token log-probability.
    MeanLogprob,
    /// Sum of token log-probabilities (the default rule's score: what a ledger records when a
    /// learned rule is fitted from the gateway's own traffic).
    SumLogprob,
    /// Sum of token log-probabilities divided by `n^alpha`.
    NormalizedLogprob(f64),
    /// Lowest token log-probability.
    MinLogprob,
    /// Nearest-rank `q`-quantile of the token log-probabilities.
    Quantile(f64),
    /// Fraction of tokens with log-probability `>= bound`.
    FractionAbove(f64),
    /// Negated mean entropy (higher = more confident, as for the aggregate).
    MeanEntropy,
    /// Mean top-1 minus top-2 margin.
    MeanMargin,
    /// Natural log of the number of tokens.
    LogLength,
}

impl Feature {
    /// The aggregate that computes this feature, if it is one.
    fn aggregate(self) -> Option<Aggregate> {
        Some(match self {
            Self::MeanLogprob => Aggregate::MeanLogprob,
            Self::SumLogprob => Aggregate::SumLogprob,
            Self::NormalizedLogprob(alpha) => Aggregate::NormalizedLogprob { alpha },
            Self::MinLogprob => Aggregate::MinLogprob,
            Self::Quantile(q) => Aggregate::Quantile { q },
            Self::FractionAbove(bound) => Aggregate::FractionAbove { bound },
            Self::MeanEntropy => Aggregate::MeanEntropy,
            Self::MeanMargin => Aggregate::MeanMargin,
            Self::LogLength => return None,
        })
    }

    /// The feature's value for an answer; `None` without tokens.
    pub fn value(self, tokens: &[TokenSignal]) -> Option<f64> {
        match self.aggregate() {
            Some(aggregate) => aggregate.score(tokens),
            None if tokens.is_empty() => None,
            None => Some((tokens.len() as f64).ln()),
        }
    }

    /// The name used in rule files: the aggregate's name (`quantile_0.1`) or `log_length`.
    pub fn name(self) -> String {
        self.aggregate()
            .map_or_else(|| "log_length".to_owned(), |a| a.name())
    }
}

impl From<Feature> for String {
    fn from(f: Feature) -> Self {
        f.name()
    }
}

impl TryFrom<String> for Feature {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        let number = |rest: &str| {
            rest.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("bad number in feature `{name}`"))
        };
        Ok(match name.as_str() {
            "mean_logprob" => Self::MeanLogprob,
            "sum_logprob" => Self::SumLogprob,
            "min_logprob" => Self::MinLogprob,
            "mean_entropy" => Self::MeanEntropy,
            "mean_margin" => Self::MeanMargin,
            "log_length" => Self::LogLength,
            other => {
                if let Some(q) = other.strip_prefix("quantile_") {
                    let q = number(q)?;
                    if !(0.0..=1.0).contains(&q) {
                        return Err(format!("quantile out of [0, 1] in feature `{name}`"));
                    }
                    Self::Quantile(q)
                } else if let Some(alpha) = other.strip_prefix("normalized_logprob_") {
                    let alpha = number(alpha)?;
                    if !(0.0..=1.0).contains(&alpha) {
                        return Err(format!("alpha out of [0, 1] in feature `{name}`"));
                    }
                    Self::NormalizedLogprob(alpha)
                } else if let Some(bound) = other.strip_prefix("fraction_above_") {
                    Self::FractionAbove(number(bound)?)
                } else {
                    return Err(format!("unknown feature `{name}`"));
                }
            }
        })
    }
}

/// A fitted rule: `P(correct) = sigmoid(intercept + sum_i weight_i * z_i)` with
/// `z_i = clip((feature_i - center_i) / scale_i)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnedRule {
    /// Always [`FORMAT`].
    pub format: String,
    /// The name policies refer to.
    pub name: String,
    /// The inputs, in order.
    pub features: Vec<Feature>,
    /// Per-feature mean on the training data.
    pub center: Vec<f64>,
    /// Per-feature standard deviation on the training data (> 0).
    pub scale: Vec<f64>,
    /// Per-feature coefficient on the standardized feature.
    pub weights: Vec<f64>,
    /// Log-odds of a correct answer at the training mean.
    pub intercept: f64,
    /// How the rule was fitted (data, folds, cross-validated quality); informational.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub fitted_on: serde_json::Value,
}

/// Why a rule file was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LearnedRuleError {
    /// Not JSON of the expected shape.
    #[error("learned rule is not valid JSON of the expected shape: {0}")]
    Json(String),
    /// A different file format or version.
    #[error("learned rule format `{0}` is not `{FORMAT}`")]
    Format(String),
    /// Inconsistent lengths, a non-finite number or a non-positive scale.
    #[error("learned rule `{name}`: {reason}")]
    Invalid {
        /// The rule's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

impl LearnedRule {
    /// Parses and checks a rule file's contents.
    pub fn from_json(text: &str) -> Result<Self, LearnedRuleError> {
        let rule: Self =
            serde_json::from_str(text).map_err(|e| LearnedRuleError::Json(e.to_string()))?;
        rule.validate()?;
        Ok(rule)
    }

    /// The rule as pretty JSON, the form `cascade calibrate` saves.
    pub fn to_json(&self) -> String {
        // Serializing plain numbers, strings and a JSON value cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the invariants `probability` relies on.
    pub fn validate(&self) -> Result<(), LearnedRuleError> {
        let invalid = |reason: String| LearnedRuleError::Invalid {
            name: self.name.clone(),
            reason,
        };
        if self.format != FORMAT {
            return Err(LearnedRuleError::Format(self.format.clone()));
        }
        let n = self.features.len();
        if n == 0 {
            return Err(invalid("no features".to_owned()));
        }
        for (what, v) in [
            ("center", &self.center),
            ("scale", &self.scale),
            ("weights", &self.weights),
        ] {
            if v.len() != n {
                return Err(invalid(format!(
                    "{what} has {} values for {n} features",
                    v.len()
                )));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(invalid(format!("{what} has a non-finite value")));
            }
        }
        if self.scale.iter().any(|s| *s <= 0.0) {
            return Err(invalid("scale must be > 0".to_owned()));
        }
        if !self.intercept.is_finite() {
            return Err(invalid("intercept is not finite".to_owned()));
        }
        Ok(())
    }

    /// The standardized, clipped feature vector of an answer; `None` without tokens. A NaN
    /// feature stays NaN, so that a broken signal escalates.
    pub fn standardized(&self, tokens: &[TokenSignal]) -> Option<Vec<f64>> {
        let values: Option<Vec<f64>> = self.features.iter().map(|f| f.value(tokens)).collect();
        Some(self.standardize(&values?))
    }

    /// Standardizes and clips raw feature values, in the rule's feature order: the same
    /// transformation `standardized` applies to tokens, for callers that hold the feature
    /// values already (a fit from a ledger, which records scores, not tokens).
    pub fn standardize(&self, values: &[f64]) -> Vec<f64> {
        values
            .iter()
            .zip(self.center.iter().zip(&self.scale))
            .map(|(v, (c, s))| ((v - c) / s).clamp(-Z_CLIP, Z_CLIP))
            .collect()
    }

    /// The probability that an answer with these tokens is correct; `None` without tokens.
    pub fn probability(&self, tokens: &[TokenSignal]) -> Option<f64> {
        let z = self.standardized(tokens)?;
        Some(sigmoid(self.log_odds(&z)))
    }

    /// Log-odds of a correct answer for a standardized feature vector.
    pub fn log_odds(&self, z: &[f64]) -> f64 {
        self.intercept + self.weights.iter().zip(z).map(|(w, x)| w * x).sum::<f64>()
    }
}

/// The logistic function, stable for large negative inputs.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Names of every learned rule the configuration refers to, so the gateway knows which
/// files to read.
pub fn learned_rule_names(config: &PoliciesConfig) -> BTreeSet<String> {
    rule_names(config, |a| match a {
        Aggregate::Learned { name, .. } => Some(name),
        _ => None,
    })
}

/// Attaches the loaded rules to every `learned` aggregate of the configuration (team
/// policies, key overrides, experiment variants); an unknown name is an error at its key.
pub fn resolve_learned(
    config: &mut PoliciesConfig,
    rules: &BTreeMap<String, Arc<LearnedRule>>,
) -> Result<(), PolicyError> {
    attach_rules(config, rules, "learned rule", |a| match a {
        Aggregate::Learned { name, rule } => Some((&*name, rule)),
        _ => None,
    })
}

/// The names `pick` finds in the configuration's aggregates (shared by every kind of rule
/// file: learned and calibrated).
pub(crate) fn rule_names(
    config: &PoliciesConfig,
    pick: impl Fn(&Aggregate) -> Option<&String>,
) -> BTreeSet<String> {
    let mut config = config.clone();
    aggregates_mut(&mut config)
        .into_iter()
        .filter_map(|(_, a)| pick(a).cloned())
        .collect()
}

/// Attaches `rules` by name to the slot `slot` finds in each aggregate; an unknown name is an
/// error at `<key>.name`, naming `what` it was looking for.
pub(crate) fn attach_rules<T>(
    config: &mut PoliciesConfig,
    rules: &BTreeMap<String, Arc<T>>,
    what: &'static str,
    slot: impl Fn(&mut Aggregate) -> Option<(&String, &mut Option<Arc<T>>)>,
) -> Result<(), PolicyError> {
    for (key, aggregate) in aggregates_mut(config) {
        if let Some((name, rule)) = slot(aggregate) {
            let found = rules
                .get(name.as_str())
                .ok_or_else(|| PolicyError::Unknown {
                    key: format!("{key}.name"),
                    what,
                    name: name.clone(),
                })?;
            *rule = Some(Arc::clone(found));
        }
    }
    Ok(())
}

/// Every aggregate written in the configuration, with its dotted key.
fn aggregates_mut(config: &mut PoliciesConfig) -> Vec<(String, &mut Aggregate)> {
    let mut found = Vec::new();
    for team in &mut config.teams {
        let prefix = format!("teams.{}", team.name);
        found.push((
            format!("{prefix}.policy.aggregate"),
            &mut team.policy.aggregate,
        ));
        for (key_id, o) in &mut team.keys {
            if let Some(a) = &mut o.aggregate {
                found.push((format!("{prefix}.keys.{key_id}.aggregate"), a));
            }
        }
    }
    for experiment in &mut config.experiments {
        for variant in &mut experiment.variants {
            if let Some(a) = &mut variant.overrides.aggregate {
                let key = format!(
                    "experiments.{}.variants.{}.overrides.aggregate",
                    experiment.id, variant.name
                );
                found.push((key, a));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> LearnedRule {
        LearnedRule {
            format: FORMAT.to_owned(),
            name: "demo".to_owned(),
            features: vec![
                Feature::Quantile(0.1),
                Feature::MeanEntropy,
                Feature::LogLength,
            ],
            center: vec![-1.0, -1.0, 1.0],
            scale: vec![0.5, 1.0, 1.0],
            weights: vec![2.0, 0.5, -0.25],
            intercept: 0.3,
            fitted_on: serde_json::Value::Null,
        }
    }

    fn tokens(logprobs: &[f32]) -> Vec<TokenSignal> {
        logprobs
            .iter()
            .map(|&logprob| TokenSignal {
                logprob,
                entropy: 1.0,
                margin: 0.5,
            })
            .collect()
    }

    #[test]
    fn probability_matches_hand_computation() {
        let t = tokens(&[-0.5, -2.0]);
        // q0.1 = -2.0 -> z = (-2 + 1) / 0.5 = -2; -entropy = -1 -> z = 0; ln 2 -> z = ln2 - 1.
        let log_odds = 0.3 + 2.0 * -2.0 + 0.5 * 0.0 - 0.25 * (2f64.ln() - 1.0);
        let p = rule().probability(&t).unwrap();
        assert!((p - sigmoid(log_odds)).abs() < 1e-12);
        assert_eq!(rule().probability(&[]), None);
    }

    #[test]
    fn infinite_logprob_gives_a_finite_probability_and_nan_stays_nan() {
        let p = rule().probability(&tokens(&[f32::NEG_INFINITY])).unwrap();
        assert!((0.0..1e-3).contains(&p));
        assert!(rule().probability(&tokens(&[f32::NAN])).unwrap().is_nan());
    }

    #[test]
    fn json_round_trip_and_feature_names() {
        let json = rule().to_json();
        assert!(json.contains("\"quantile_0.1\""));
        assert!(json.contains("\"log_length\""));
        assert_eq!(LearnedRule::from_json(&json).unwrap(), rule());
        for name in [
            "mean_logprob",
            "min_logprob",
            "fraction_above_-1",
            "mean_margin",
            "sum_logprob",
            "normalized_logprob_0.5",
        ] {
            assert_eq!(Feature::try_from(name.to_owned()).unwrap().name(), name);
        }
        assert!(Feature::try_from("quantile_2".to_owned()).is_err());
        assert!(Feature::try_from("median".to_owned()).is_err());
        assert!(Feature::try_from("normalized_logprob_1.5".to_owned()).is_err());
    }

    #[test]
    fn standardizing_feature_values_matches_standardizing_the_tokens_they_come_from() {
        let r = rule();
        let t = tokens(&[-0.5, -2.0, f32::NEG_INFINITY]);
        let values: Vec<f64> = r.features.iter().map(|f| f.value(&t).unwrap()).collect();
        assert_eq!(r.standardize(&values), r.standardized(&t).unwrap());
        // The infinite minimum is clipped, not passed on.
        assert!(r.standardize(&values).iter().all(|z| z.is_finite()));
    }

    #[test]
    fn the_sum_feature_scores_what_the_sum_rule_scores() {
        let t = tokens(&[-0.5, -2.0]);
        assert_eq!(Feature::SumLogprob.value(&t), Some(-2.5));
        assert_eq!(
            Feature::NormalizedLogprob(1.0).value(&t),
            Aggregate::MeanLogprob.score(&t)
        );
    }

    #[test]
    fn malformed_rules_are_rejected() {
        let mut r = rule();
        r.scale[1] = 0.0;
        assert!(LearnedRule::from_json(&r.to_json()).is_err());
        let mut r = rule();
        r.weights.pop();
        assert!(LearnedRule::from_json(&r.to_json()).is_err());
        let mut r = rule();
        r.format = "cascade-learned-rule/0".to_owned();
        assert!(matches!(
            LearnedRule::from_json(&r.to_json()),
            Err(LearnedRuleError::Format(_))
        ));
        assert!(LearnedRule::from_json("{}").is_err());
    }

    #[test]
    fn config_names_are_resolved_and_unknown_names_rejected() {
        let toml_like = serde_json::json!({
            "prices": {"m": {"input_usd_per_million": 1.0, "output_usd_per_million": 1.0}},
            "teams": [{
                "name": "alpha",
                "api_key_hashes": [],
                "policy": {"aggregate": {"kind": "learned", "name": "demo"}, "threshold": 0.5, "remotes": ["m"]}
            }]
        });
        let mut config: PoliciesConfig = serde_json::from_value(toml_like).unwrap();
        assert_eq!(
            learned_rule_names(&config).into_iter().collect::<Vec<_>>(),
            ["demo"]
        );
        // Not resolved: validation refuses the policy.
        assert!(crate::Policies::try_from(config.clone()).is_err());
        let err = resolve_learned(&mut config.clone(), &BTreeMap::new()).unwrap_err();
        assert_eq!(err.key(), "teams.alpha.policy.aggregate.name");
        let rules = BTreeMap::from([("demo".to_owned(), Arc::new(rule()))]);
        resolve_learned(&mut config, &rules).unwrap();
        let policies = crate::Policies::try_from(config).unwrap();
        let policy = policies.policy("alpha", "", None).unwrap();
        let score = policy.aggregate().score(&tokens(&[-0.5, -2.0])).unwrap();
        assert!((score - rule().probability(&tokens(&[-0.5, -2.0])).unwrap()).abs() < 1e-12);
        assert_eq!(policy.aggregate().name(), "learned_demo");
    }
}
