//! A hidden-state probe: logistic regression over the local model's own residual stream (the
//! per-answer features the engine returns, see `local_model::probe`) and a few log-prob
//! features, giving the probability that the local answer is correct. `cascade calibrate
//! --probe` fits it and saves it as a JSON file; a policy names it with
//! `aggregate = { kind = "probe", name = "..." }`.
//!
//! The fit standardises the hidden features and projects them to a few dozen dimensions; both
//! steps are linear, so the file keeps one weight per hidden value with them folded in, and
//! scoring an answer is one dot product (1,152 multiply-adds for SmolLM2's two vectors).
//!
//! Like [`crate::learned`], this module only scores: the gateway reads the file, parses it with
//! [`ProbeRule::from_json`] and attaches it with [`resolve_probe`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::confidence::{Aggregate, TokenSignal};
use crate::config::PoliciesConfig;
use crate::error::PolicyError;
use crate::learned::{sigmoid, Feature};

/// The format tag written into every probe rule file.
pub const FORMAT: &str = "cascade-probe-rule/1";

/// Standardized log-prob features are clipped to this many standard deviations, as in a
/// learned rule.
const Z_CLIP: f64 = 8.0;

/// One hidden vector the engine returns per answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenInput {
    /// Mean final hidden state (after the final norm) over the positions that picked the answer.
    FinalMean,
    /// Final hidden state of the last of those positions.
    FinalLast,
    /// Mean residual stream after the first half of the blocks.
    MiddleMean,
    /// Residual stream after the first half of the blocks, at the last position.
    MiddleLast,
}

impl HiddenInput {
    /// Every input, in the order of [`HiddenState`]'s fields.
    pub const ALL: [HiddenInput; 4] = [
        HiddenInput::FinalMean,
        HiddenInput::FinalLast,
        HiddenInput::MiddleMean,
        HiddenInput::MiddleLast,
    ];

    /// The name used in rule files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HiddenInput::FinalMean => "final_mean",
            HiddenInput::FinalLast => "final_last",
            HiddenInput::MiddleMean => "middle_mean",
            HiddenInput::MiddleLast => "middle_last",
        }
    }

    /// The input called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|i| i.name() == name)
    }
}

/// One answer's hidden vectors, borrowed from wherever the engine's output lives.
#[derive(Clone, Copy, Debug)]
pub struct HiddenState<'a> {
    /// See [`HiddenInput::FinalMean`].
    pub final_mean: &'a [f32],
    /// See [`HiddenInput::FinalLast`].
    pub final_last: &'a [f32],
    /// See [`HiddenInput::MiddleMean`].
    pub middle_mean: &'a [f32],
    /// See [`HiddenInput::MiddleLast`].
    pub middle_last: &'a [f32],
}

impl<'a> HiddenState<'a> {
    /// The vector of one input.
    pub fn get(&self, input: HiddenInput) -> &'a [f32] {
        match input {
            HiddenInput::FinalMean => self.final_mean,
            HiddenInput::FinalLast => self.final_last,
            HiddenInput::MiddleMean => self.middle_mean,
            HiddenInput::MiddleLast => self.middle_last,
        }
    }
}

/// A fitted probe: `P(correct) = sigmoid(intercept + sum_i weight_i * z_i + sum_j
/// hidden_weight_j * h_j)`, with `z_i = clip((feature_i - center_i) / scale_i)` the log-prob
/// features and `h` the concatenation of the `hidden` vectors as the engine returns them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeRule {
    /// Always [`FORMAT`].
    pub format: String,
    /// The name policies refer to.
    pub name: String,
    /// The hidden vectors the probe reads, in order.
    pub hidden: Vec<HiddenInput>,
    /// The width of each hidden vector (the model's width); answers from another model are
    /// refused (NaN) rather than scored.
    pub width: usize,
    /// One weight per value of the concatenated hidden vectors (`hidden.len() * width`), with
    /// the fit's standardisation and projection folded in.
    pub hidden_weights: Vec<f64>,
    /// The log-prob features, in order (may be empty).
    #[serde(default)]
    pub features: Vec<Feature>,
    /// Per-feature mean on the training data.
    #[serde(default)]
    pub center: Vec<f64>,
    /// Per-feature standard deviation on the training data (> 0).
    #[serde(default)]
    pub scale: Vec<f64>,
    /// Per-feature coefficient on the standardized feature.
    #[serde(default)]
    pub weights: Vec<f64>,
    /// The constant term of the log-odds.
    pub intercept: f64,
    /// How the rule was fitted (data, inputs, regularisation, cross-validated quality);
    /// informational.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub fitted_on: serde_json::Value,
}

/// Why a probe rule file was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProbeRuleError {
    /// Not JSON of the expected shape.
    #[error("probe rule is not valid JSON of the expected shape: {0}")]
    Json(String),
    /// A different file format or version.
    #[error("probe rule format `{0}` is not `{FORMAT}`")]
    Format(String),
    /// Inconsistent lengths, a non-finite number or a non-positive scale.
    #[error("probe rule `{name}`: {reason}")]
    Invalid {
        /// The rule's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

impl ProbeRule {
    /// Parses and checks a rule file's contents.
    pub fn from_json(text: &str) -> Result<Self, ProbeRuleError> {
        let rule: Self =
            serde_json::from_str(text).map_err(|e| ProbeRuleError::Json(e.to_string()))?;
        rule.validate()?;
        Ok(rule)
    }

    /// The rule as JSON, the form `cascade calibrate` saves.
    pub fn to_json(&self) -> String {
        // Serializing plain numbers, strings and a JSON value cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the invariants `probability` relies on.
    pub fn validate(&self) -> Result<(), ProbeRuleError> {
        let invalid = |reason: String| ProbeRuleError::Invalid {
            name: self.name.clone(),
            reason,
        };
        if self.format != FORMAT {
            return Err(ProbeRuleError::Format(self.format.clone()));
        }
        if self.hidden.is_empty() || self.width == 0 {
            return Err(invalid("no hidden inputs".to_owned()));
        }
        let values = self.hidden.len() * self.width;
        if self.hidden_weights.len() != values {
            return Err(invalid(format!(
                "hidden_weights has {} values for {} inputs of width {}",
                self.hidden_weights.len(),
                self.hidden.len(),
                self.width
            )));
        }
        let n = self.features.len();
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
        }
        let all = [
            &self.hidden_weights,
            &self.center,
            &self.scale,
            &self.weights,
        ];
        if all.iter().any(|v| v.iter().any(|x| !x.is_finite())) || !self.intercept.is_finite() {
            return Err(invalid("a coefficient is not finite".to_owned()));
        }
        if self.scale.iter().any(|s| *s <= 0.0) {
            return Err(invalid("scale must be > 0".to_owned()));
        }
        Ok(())
    }

    /// The log-odds of a correct answer; `None` without tokens, NaN when a hidden vector has
    /// another width than the rule's (another model) or a signal is NaN.
    pub fn log_odds(&self, tokens: &[TokenSignal], hidden: &HiddenState<'_>) -> Option<f64> {
        if tokens.is_empty() {
            return None;
        }
        let mut sum = self.intercept;
        for ((feature, w), (c, s)) in self
            .features
            .iter()
            .zip(&self.weights)
            .zip(self.center.iter().zip(&self.scale))
        {
            let v = feature.value(tokens)?;
            sum += w * ((v - c) / s).clamp(-Z_CLIP, Z_CLIP);
        }
        for (input, weights) in self
            .hidden
            .iter()
            .zip(self.hidden_weights.chunks(self.width))
        {
            let values = hidden.get(*input);
            if values.len() != self.width {
                return Some(f64::NAN);
            }
            sum += weights
                .iter()
                .zip(values)
                .map(|(w, &h)| w * f64::from(h))
                .sum::<f64>();
        }
        Some(sum)
    }

    /// The probability that an answer with these tokens and hidden vectors is correct; `None`
    /// without tokens.
    pub fn probability(&self, tokens: &[TokenSignal], hidden: &HiddenState<'_>) -> Option<f64> {
        self.log_odds(tokens, hidden).map(sigmoid)
    }
}

/// Names of every probe rule the configuration refers to, so the gateway knows which files to
/// read.
pub fn probe_rule_names(config: &PoliciesConfig) -> BTreeSet<String> {
    crate::learned::rule_names(config, |a| match a {
        Aggregate::Probe { name, .. } => Some(name),
        _ => None,
    })
}

/// Attaches the loaded rules to every `probe` aggregate of the configuration; an unknown name
/// is an error at its key.
pub fn resolve_probe(
    config: &mut PoliciesConfig,
    rules: &BTreeMap<String, Arc<ProbeRule>>,
) -> Result<(), PolicyError> {
    crate::learned::attach_rules(config, rules, "probe rule", |a| match a {
        Aggregate::Probe { name, rule } => Some((&*name, rule)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> ProbeRule {
        ProbeRule {
            format: FORMAT.to_owned(),
            name: "demo".to_owned(),
            hidden: vec![HiddenInput::FinalMean, HiddenInput::MiddleLast],
            width: 2,
            hidden_weights: vec![1.0, -0.5, 0.25, 2.0],
            features: vec![Feature::MeanLogprob],
            center: vec![-1.0],
            scale: vec![0.5],
            weights: vec![0.75],
            intercept: -0.125,
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

    const STATE: HiddenState<'static> = HiddenState {
        final_mean: &[2.0, 4.0],
        final_last: &[100.0, 100.0],
        middle_mean: &[100.0, 100.0],
        middle_last: &[-1.0, 0.5],
    };

    #[test]
    fn log_odds_match_hand_computation() {
        // mean log-prob -0.5 -> z = (-0.5 + 1) / 0.5 = 1; hidden: 1*2 - 0.5*4 + 0.25*-1 + 2*0.5.
        let want = -0.125 + 0.75 * 1.0 + (2.0 - 2.0 - 0.25 + 1.0);
        let got = rule().log_odds(&tokens(&[-0.25, -0.75]), &STATE).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} against {want}");
        let p = rule()
            .probability(&tokens(&[-0.25, -0.75]), &STATE)
            .unwrap();
        assert!((p - sigmoid(want)).abs() < 1e-12);
        assert_eq!(rule().probability(&[], &STATE), None);
    }

    #[test]
    fn a_probe_aggregate_scores_with_hidden_states_and_escalates_without() {
        let t = tokens(&[-0.25, -0.75]);
        let attached = Aggregate::Probe {
            name: "demo".into(),
            rule: Some(Arc::new(rule())),
        };
        assert!(attached.validate().is_ok() && attached.is_probability());
        assert_eq!(
            attached.score_with(&t, Some(&STATE)),
            rule().probability(&t, &STATE)
        );
        assert!(attached.score_with(&t, None).unwrap().is_nan());
        assert!(attached.score(&t).unwrap().is_nan());
        assert_eq!(attached.score_with(&[], Some(&STATE)), None);
        assert!(!attached.settled_below(&t, 0.99));
        let unattached = Aggregate::Probe {
            name: "demo".into(),
            rule: None,
        };
        assert!(unattached.validate().is_err());
        assert!(unattached.score_with(&t, Some(&STATE)).unwrap().is_nan());
        // Other aggregates ignore hidden states.
        assert_eq!(
            Aggregate::SumLogprob.score_with(&t, Some(&STATE)),
            Aggregate::SumLogprob.score(&t)
        );
    }

    #[test]
    fn hidden_vectors_of_another_width_give_nan() {
        let other = HiddenState {
            final_mean: &[1.0, 2.0, 3.0],
            ..STATE
        };
        assert!(rule()
            .probability(&tokens(&[-1.0]), &other)
            .unwrap()
            .is_nan());
    }

    #[test]
    fn json_round_trip_scores_the_same() {
        let json = rule().to_json();
        assert!(json.contains("\"final_mean\"") && json.contains("\"middle_last\""));
        let back = ProbeRule::from_json(&json).unwrap();
        assert_eq!(back, rule());
        let t = tokens(&[-0.3, -2.0, -0.01]);
        assert_eq!(back.log_odds(&t, &STATE), rule().log_odds(&t, &STATE));
    }

    #[test]
    fn the_documented_probe_file_loads_and_scores_a_probability() {
        let text = include_str!("../../docs/confidence/smollm2-135m-dev5-probe.json");
        let rule = ProbeRule::from_json(text).unwrap();
        assert_eq!(
            rule.hidden,
            [HiddenInput::MiddleMean, HiddenInput::MiddleLast]
        );
        assert_eq!(rule.width, 576);
        let zeros = [0.0f32; 576];
        let state = HiddenState {
            final_mean: &zeros,
            final_last: &zeros,
            middle_mean: &zeros,
            middle_last: &zeros,
        };
        let p = rule.probability(&tokens(&[-0.1, -0.2]), &state).unwrap();
        assert!((0.0..=1.0).contains(&p), "{p}");
    }

    #[test]
    fn inconsistent_files_are_rejected() {
        let mut r = rule();
        r.hidden_weights.pop();
        assert!(matches!(
            ProbeRule::from_json(&r.to_json()),
            Err(ProbeRuleError::Invalid { .. })
        ));
        let mut r = rule();
        r.scale[0] = 0.0;
        assert!(ProbeRule::from_json(&r.to_json()).is_err());
        let mut r = rule();
        r.format = "cascade-probe-rule/0".to_owned();
        assert!(matches!(
            ProbeRule::from_json(&r.to_json()),
            Err(ProbeRuleError::Format(_))
        ));
    }
}
