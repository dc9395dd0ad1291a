//! A calibrated confidence rule: a fixed aggregate (`sum_logprob`, `mean_logprob`, ...) whose
//! score goes through an isotonic map ([`crate::isotonic`]) to the probability that the local
//! answer is correct. `cascade calibrate` fits it from labeled data and saves it as a small JSON
//! file; a policy names it with `aggregate = { kind = "calibrated", name = "..." }` and sets
//! `min_p_correct` instead of a raw threshold, which then means the same for every rule and
//! every model.
//!
//! Like [`crate::learned`], this module only scores: the gateway reads the file, parses it with
//! [`CalibratedRule::from_json`] and attaches it with [`resolve_calibrated`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::confidence::{Aggregate, TokenSignal};
use crate::config::PoliciesConfig;
use crate::error::PolicyError;
use crate::isotonic::{IsotonicError, IsotonicMap};

/// The format tag written into every calibrated rule file.
pub const FORMAT: &str = "cascade-calibrated-rule/1";

/// A fixed aggregate and its isotonic calibration map.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibratedRule {
    /// Always [`FORMAT`].
    pub format: String,
    /// The name policies refer to.
    pub name: String,
    /// The calibrated aggregate, by its [`Aggregate::name`] (`mean_logprob`, `quantile_0.1`).
    pub rule: String,
    /// Score to probability.
    pub map: IsotonicMap,
    /// How the map was fitted (data, items, calibration error); informational.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub fitted_on: serde_json::Value,
}

/// Why a calibrated rule file was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibratedRuleError {
    /// Not JSON of the expected shape.
    #[error("calibrated rule is not valid JSON of the expected shape: {0}")]
    Json(String),
    /// A different file format or version.
    #[error("calibrated rule format `{0}` is not `{FORMAT}`")]
    Format(String),
    /// `rule` is not the name of a fixed aggregate.
    #[error("calibrated rule `{name}`: `{rule}` is not a fixed aggregate's name")]
    UnknownRule {
        /// The file's name.
        name: String,
        /// The rule it names.
        rule: String,
    },
    /// The map breaks an invariant.
    #[error("calibrated rule `{name}`: {source}")]
    Map {
        /// The file's name.
        name: String,
        /// What is wrong.
        source: IsotonicError,
    },
}

impl CalibratedRule {
    /// Parses and checks a rule file's contents.
    pub fn from_json(text: &str) -> Result<Self, CalibratedRuleError> {
        let rule: Self =
            serde_json::from_str(text).map_err(|e| CalibratedRuleError::Json(e.to_string()))?;
        rule.validate()?;
        Ok(rule)
    }

    /// The rule as pretty JSON, the form `cascade calibrate` saves.
    pub fn to_json(&self) -> String {
        // Plain numbers (all finite after validation), strings and a JSON value: cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the format, the aggregate's name and the map.
    pub fn validate(&self) -> Result<(), CalibratedRuleError> {
        if self.format != FORMAT {
            return Err(CalibratedRuleError::Format(self.format.clone()));
        }
        self.base()?;
        self.map
            .validate()
            .map_err(|source| CalibratedRuleError::Map {
                name: self.name.clone(),
                source,
            })
    }

    /// The aggregate whose score the map calibrates.
    pub fn base(&self) -> Result<Aggregate, CalibratedRuleError> {
        Aggregate::from_name(&self.rule).ok_or_else(|| CalibratedRuleError::UnknownRule {
            name: self.name.clone(),
            rule: self.rule.clone(),
        })
    }

    /// The probability that an answer with these tokens is correct; `None` without tokens,
    /// NaN when a signal is NaN or the rule is invalid.
    pub fn probability(&self, tokens: &[TokenSignal]) -> Option<f64> {
        let Ok(base) = self.base() else {
            return Some(f64::NAN);
        };
        base.score(tokens).map(|s| self.map.probability(s))
    }

    /// Early exit for `probability >= min_p`: the map is non-decreasing, so that is exactly
    /// `base score >= lowest_score_reaching(min_p)`, and the base aggregate's own exact test
    /// applies. When no score reaches `min_p`, every answer escalates: settled at once.
    pub fn settled_below_within(
        &self,
        tokens_so_far: &[TokenSignal],
        min_p: f64,
        max_more_tokens: usize,
    ) -> bool {
        let Ok(base) = self.base() else {
            return false;
        };
        match self.map.lowest_score_reaching(min_p) {
            None => true,
            Some(t) => base.settled_below_within(tokens_so_far, t, max_more_tokens),
        }
    }
}

/// Names of every calibrated rule the configuration refers to, so the gateway knows which
/// files to read.
pub fn calibrated_rule_names(config: &PoliciesConfig) -> BTreeSet<String> {
    crate::learned::rule_names(config, |a| match a {
        Aggregate::Calibrated { name, .. } => Some(name),
        _ => None,
    })
}

/// Attaches the loaded rules to every `calibrated` aggregate of the configuration; an unknown
/// name is an error at its key.
pub fn resolve_calibrated(
    config: &mut PoliciesConfig,
    rules: &BTreeMap<String, Arc<CalibratedRule>>,
) -> Result<(), PolicyError> {
    crate::learned::attach_rules(config, rules, "calibrated rule", |a| match a {
        Aggregate::Calibrated { name, rule } => Some((&*name, rule)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// `sum_logprob` calibrated on six hand-made answers: below -4 never right, -4 to -1 half,
    /// from -1 always.
    fn rule() -> CalibratedRule {
        let map = IsotonicMap::fit(&[
            (-6.0, false),
            (-5.0, false),
            (-4.0, true),
            (-3.0, false),
            (-1.0, true),
            (-0.5, true),
        ])
        .unwrap();
        CalibratedRule {
            format: FORMAT.to_owned(),
            name: "demo".to_owned(),
            rule: "sum_logprob".to_owned(),
            map,
            fitted_on: serde_json::Value::Null,
        }
    }

    #[test]
    fn probability_is_the_map_of_the_base_score() {
        let r = rule();
        assert_eq!(r.map.p, [0.0, 0.5, 1.0]);
        assert_eq!(r.probability(&tokens(&[-2.0, -3.0])), Some(0.0));
        assert_eq!(r.probability(&tokens(&[-2.0, -1.0])), Some(0.5));
        assert_eq!(r.probability(&tokens(&[-0.25, -0.25])), Some(1.0));
        assert_eq!(r.probability(&[]), None);
        assert!(r.probability(&tokens(&[f32::NAN])).unwrap().is_nan());
    }

    #[test]
    fn early_exit_follows_the_base_threshold() {
        let r = rule();
        // p >= 0.5 needs a sum >= -4: a sum already at -4.5 can only fall.
        assert!(r.settled_below_within(&tokens(&[-4.5]), 0.5, 10));
        assert!(!r.settled_below_within(&tokens(&[-3.5]), 0.5, 10));
        // Nothing reaches p = 1.01: escalate at once.
        assert!(r.settled_below_within(&[], 1.01, 10));
        // Every score reaches p = 0: never settled.
        assert!(!r.settled_below_within(&tokens(&[-100.0]), 0.0, 10));
    }

    #[test]
    fn the_documented_example_file_loads_and_is_monotone() {
        let text = include_str!("../../docs/confidence/smollm2-135m-dev6-sum_logprob.json");
        let r = CalibratedRule::from_json(text).unwrap();
        assert_eq!(r.base().unwrap(), Aggregate::SumLogprob);
        let p: Vec<f64> = [-80.0, -20.0, -5.0, -3.4, -1.0]
            .iter()
            .map(|&s| r.map.probability(s))
            .collect();
        assert!(p.windows(2).all(|w| w[0] <= w[1]), "{p:?}");
    }

    #[test]
    fn a_rule_file_round_trips_and_bad_files_are_rejected() {
        let json = rule().to_json();
        assert_eq!(CalibratedRule::from_json(&json).unwrap(), rule());
        let mut r = rule();
        r.rule = "learned_x".to_owned();
        assert!(matches!(
            CalibratedRule::from_json(&r.to_json()),
            Err(CalibratedRuleError::UnknownRule { .. })
        ));
        let mut r = rule();
        r.format = "cascade-calibrated-rule/0".to_owned();
        assert!(matches!(
            CalibratedRule::from_json(&r.to_json()),
            Err(CalibratedRuleError::Format(_))
        ));
        let mut r = rule();
        r.map.p.reverse();
        assert!(matches!(
            CalibratedRule::from_json(&r.to_json()),
            Err(CalibratedRuleError::Map { .. })
        ));
        assert!(CalibratedRule::from_json("{}").is_err());
    }

    #[test]
    fn config_names_are_resolved_and_min_p_correct_reads_as_a_probability() {
        let config_json = serde_json::json!({
            "prices": {"m": {"input_usd_per_million": 1.0, "output_usd_per_million": 1.0}},
            "teams": [{
                "name": "alpha",
                "api_key_hashes": [],
                "policy": {"aggregate": {"kind": "calibrated", "name": "demo"},
                           "min_p_correct": 0.5, "remotes": ["m"]}
            }]
        });
        let mut config: PoliciesConfig = serde_json::from_value(config_json).unwrap();
        assert_eq!(
            calibrated_rule_names(&config)
                .into_iter()
                .collect::<Vec<_>>(),
            ["demo"]
        );
        // Not resolved: validation refuses the policy.
        assert!(crate::Policies::try_from(config.clone()).is_err());
        let err = resolve_calibrated(&mut config.clone(), &BTreeMap::new()).unwrap_err();
        assert_eq!(err.key(), "teams.alpha.policy.aggregate.name");
        let rules = BTreeMap::from([("demo".to_owned(), Arc::new(rule()))]);
        resolve_calibrated(&mut config, &rules).unwrap();
        let policies = crate::Policies::try_from(config).unwrap();
        let policy = policies.policy("alpha", "", None).unwrap();
        assert_eq!(policy.threshold(), Some(0.5));
        assert_eq!(policy.aggregate().name(), "calibrated_demo");
        let score = policy.aggregate().score(&tokens(&[-2.0, -1.0])).unwrap();
        assert_eq!(score, 0.5);
        assert!(policy.should_stop_early(&tokens(&[-4.5]), 10));
    }
}
