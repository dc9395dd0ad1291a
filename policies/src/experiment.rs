//! Experiments: sticky, deterministic assignment of subjects to policy variants.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{check_name, PolicyError};
use crate::policy::PolicyOverride;

/// What identifies the subject whose requests stay in one variant.
///
/// In configuration: `subject = "user"`, `subject = "key"`, or
/// `subject = { header = "x-end-user" }`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    /// The OpenAI request's `user` field.
    User,
    /// A request header (name stored lowercase).
    Header(String),
    /// The API key id.
    Key,
}

impl Subject {
    /// The subject of one request, given its `user` field, a header getter and its key id;
    /// `None` (user or header absent or empty) means the request is not enrolled and uses the
    /// base policy.
    pub fn value<'a>(
        &self,
        user: Option<&'a str>,
        header: impl FnOnce(&str) -> Option<&'a str>,
        key_id: &'a str,
    ) -> Option<&'a str> {
        match self {
            Self::User => user,
            Self::Header(name) => header(name),
            Self::Key => Some(key_id),
        }
        .filter(|s| !s.is_empty())
    }
}

/// A variant as written in configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantConfig {
    /// Variant name for `x-cascade-variant`, metrics and the ledger.
    pub name: String,
    /// Relative share of traffic (> 0, finite; need not sum to 1).
    pub weight: f64,
    /// Policy changes for this variant, applied on top of the team's (or key's) policy.
    #[serde(default)]
    pub overrides: PolicyOverride,
}

/// An experiment as written in configuration (`[[experiments]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Experiment id: 1..=64 of `[A-Za-z0-9_.-]`; part of the assignment hash.
    pub id: String,
    /// Team the experiment is limited to; every team when absent.
    #[serde(default)]
    pub team: Option<String>,
    /// What keeps a subject in one variant.
    pub subject: Subject,
    /// At least one variant.
    pub variants: Vec<VariantConfig>,
}

/// A validated variant.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// Variant name.
    pub name: String,
    /// Configured relative weight.
    pub weight: f64,
    /// Normalised share of traffic in `(0, 1]`.
    pub share: f64,
    /// Policy changes for this variant.
    pub overrides: PolicyOverride,
}

/// A validated experiment.
#[derive(Clone, Debug, PartialEq)]
pub struct Experiment {
    id: String,
    team: Option<String>,
    subject: Subject,
    variants: Vec<Variant>,
    /// Upper end of each variant's slice of [0, 1); the last is exactly 1.
    cumulative: Vec<f64>,
}

impl TryFrom<ExperimentConfig> for Experiment {
    type Error = PolicyError;

    /// Validates ids, names and weights; keys are relative to the experiment
    /// (`variants[1].weight`). Overrides are checked against policies in [`crate::config`].
    fn try_from(c: ExperimentConfig) -> Result<Self, PolicyError> {
        check_name("id", &c.id)?;
        if let Some(team) = &c.team {
            check_name("team", team)?;
        }
        let subject = match c.subject {
            Subject::Header(name) => {
                let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
                if name.is_empty() || !name.bytes().all(tchar) {
                    return Err(PolicyError::invalid(
                        "subject.header",
                        format!("`{name}` is not an HTTP header name"),
                    ));
                }
                Subject::Header(name.to_ascii_lowercase())
            }
            other => other,
        };
        if c.variants.is_empty() {
            return Err(PolicyError::invalid(
                "variants",
                "needs at least one variant",
            ));
        }
        let mut total = 0.0;
        for (i, v) in c.variants.iter().enumerate() {
            let at = format!("variants[{i}]");
            check_name(&format!("{at}.name"), &v.name)?;
            if c.variants[..i].iter().any(|w| w.name == v.name) {
                return Err(PolicyError::invalid(
                    format!("{at}.name"),
                    format!("`{}` is used by an earlier variant", v.name),
                ));
            }
            if !(v.weight.is_finite() && v.weight > 0.0) {
                return Err(PolicyError::invalid(
                    format!("{at}.weight"),
                    format!("must be finite and > 0, got {}", v.weight),
                ));
            }
            if v.overrides.sets_budget() {
                return Err(PolicyError::invalid(
                    format!("{at}.overrides"),
                    "budgets cannot vary by experiment variant",
                ));
            }
            if let Some(field) = v.overrides.sets_guarded_field() {
                return Err(PolicyError::invalid(
                    format!("{at}.overrides.{field}"),
                    "spend limits and what the ledger stores (prompts, signals) cannot vary by experiment variant",
                ));
            }
            total += v.weight;
        }
        if !total.is_finite() {
            return Err(PolicyError::invalid("variants", "weights sum to infinity"));
        }
        let mut cumulative = Vec::with_capacity(c.variants.len());
        let mut running = 0.0;
        let variants: Vec<Variant> = c
            .variants
            .into_iter()
            .map(|v| {
                running += v.weight;
                cumulative.push(running / total);
                Variant {
                    share: v.weight / total,
                    name: v.name,
                    weight: v.weight,
                    overrides: v.overrides,
                }
            })
            .collect();
        // Rounding must not leave a sliver of [0, 1) unassigned.
        if let Some(last) = cumulative.last_mut() {
            *last = 1.0;
        }
        Ok(Self {
            id: c.id,
            team: c.team,
            subject,
            variants,
            cumulative,
        })
    }
}

impl Experiment {
    /// Experiment id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Team the experiment is limited to, if any.
    pub fn team(&self) -> Option<&str> {
        self.team.as_deref()
    }
    /// What keeps a subject in one variant.
    pub fn subject(&self) -> &Subject {
        &self.subject
    }
    /// The variants, in configuration order (never empty).
    pub fn variants(&self) -> &[Variant] {
        &self.variants
    }
    /// Whether requests of `team` take part.
    pub fn applies_to(&self, team: &str) -> bool {
        self.team.as_deref().is_none_or(|t| t == team)
    }

    /// The subject's variant: the first whose cumulative share exceeds
    /// [`assign`]`(id, subject)`. Same inputs, same variant, on every replica.
    pub fn pick_variant(&self, subject: &str) -> &Variant {
        let u = assign(&self.id, subject);
        let i = self
            .cumulative
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.variants.len() - 1);
        &self.variants[i]
    }
}

/// Where a subject falls in `[0, 1)` for an experiment: SHA-256 of the experiment id, a 0x00
/// separator and the subject; the first 8 bytes as a big-endian u64 over 2^64, keeping the
/// top 53 bits so the f64 is exact and strictly below 1.
///
/// The separator keeps (`ab`, `c`) and (`a`, `bc`) apart; ids cannot contain NUL.
pub fn assign(experiment_id: &str, subject: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(experiment_id.as_bytes());
    h.update([0u8]);
    h.update(subject.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn experiment(v: serde_json::Value) -> Result<Experiment, PolicyError> {
        Experiment::try_from(serde_json::from_value::<ExperimentConfig>(v).unwrap())
    }

    fn split(a: f64, b: f64) -> Experiment {
        experiment(json!({
            "id": "thr-test", "subject": "user",
            "variants": [
                {"name": "control", "weight": a},
                {"name": "strict", "weight": b, "overrides": {"threshold": -0.2}}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn assignment_is_deterministic_in_unit_interval_and_depends_on_both_inputs() {
        let u = assign("exp", "user-1");
        assert_eq!(u, assign("exp", "user-1"));
        assert!((0.0..1.0).contains(&u));
        assert_ne!(u, assign("exp", "user-2"));
        assert_ne!(u, assign("exp2", "user-1"));
        assert_ne!(
            assign("ab", "c"),
            assign("a", "bc"),
            "separator keeps fields apart"
        );
    }

    #[test]
    fn assignment_matches_the_documented_construction() {
        // SHA-256("exp\0user-1"), first 8 bytes big-endian, top 53 bits / 2^53.
        let digest = Sha256::digest(b"exp\0user-1");
        let x = u64::from_be_bytes(digest[..8].try_into().unwrap());
        assert_eq!(
            assign("exp", "user-1"),
            (x >> 11) as f64 / 9_007_199_254_740_992.0
        );
    }

    #[test]
    fn picks_are_sticky_and_proportional_to_weights() {
        let e = split(1.0, 4.0); // 0.2 / 0.8
        assert!((e.variants()[0].share - 0.2).abs() < 1e-12);
        let n = 20_000;
        let strict = (0..n)
            .filter(|i| e.pick_variant(&format!("user-{i}")).name == "strict")
            .count();
        let share = strict as f64 / n as f64;
        assert!((share - 0.8).abs() < 0.02, "strict share {share}");
        for i in 0..100 {
            let s = format!("user-{i}");
            assert_eq!(e.pick_variant(&s).name, e.pick_variant(&s).name);
        }
    }

    #[test]
    fn single_variant_takes_everyone() {
        let e = experiment(json!({"id": "solo", "subject": "key", "variants": [{"name": "only", "weight": 0.001}]}))
            .unwrap();
        assert!((0..1000).all(|i| e.pick_variant(&i.to_string()).name == "only"));
    }

    #[test]
    fn subject_reads_user_header_or_key_and_skips_empty() {
        let headers = |name: &str| (name == "x-end-user").then_some("u-from-header");
        assert_eq!(Subject::User.value(Some("u1"), headers, "k1"), Some("u1"));
        assert_eq!(Subject::User.value(Some(""), headers, "k1"), None);
        assert_eq!(Subject::User.value(None, headers, "k1"), None);
        assert_eq!(Subject::Key.value(None, headers, "k1"), Some("k1"));
        let e = experiment(json!({"id": "h", "subject": {"header": "X-End-User"}, "variants": [{"name": "a", "weight": 1}]}))
            .unwrap();
        assert_eq!(e.subject(), &Subject::Header("x-end-user".into()));
        assert_eq!(
            e.subject().value(None, headers, "k1"),
            Some("u-from-header")
        );
    }

    #[test]
    fn scope_limits_experiment_to_its_team() {
        let mut e = split(1.0, 1.0);
        assert!(e.applies_to("anyone"));
        e.team = Some("alpha".into());
        assert!(e.applies_to("alpha") && !e.applies_to("beta"));
    }

    #[test]
    fn invalid_experiments_name_the_key() {
        let v = |name: &str, weight: f64| json!({"name": name, "weight": weight});
        let cases = [
            (
                json!({"id": "e", "subject": "user", "variants": []}),
                "variants",
            ),
            (
                json!({"id": "e", "subject": "user", "variants": [v("a", 1.0), v("a", 1.0)]}),
                "variants[1].name",
            ),
            (
                json!({"id": "e", "subject": "user", "variants": [v("a", 1.0), v("b", 0.0)]}),
                "variants[1].weight",
            ),
            (
                json!({"id": "e", "subject": "user", "variants": [v("a", -1.0)]}),
                "variants[0].weight",
            ),
            (
                json!({"id": "e", "subject": "user", "variants": [v("a b", 1.0)]}),
                "variants[0].name",
            ),
            (
                json!({"id": "", "subject": "user", "variants": [v("a", 1.0)]}),
                "id",
            ),
            (
                json!({"id": "e", "subject": {"header": "bad header"}, "variants": [v("a", 1.0)]}),
                "subject.header",
            ),
            (
                json!({"id": "e", "subject": "user", "variants": [v("a", 1e308), v("b", 1e308)]}),
                "variants",
            ),
            (
                json!({"id": "e", "subject": "user", "variants": [
                    {"name": "a", "weight": 1.0, "overrides": {"daily_budget_usd": 5.0}}
                ]}),
                "variants[0].overrides",
            ),
            (
                json!({"id": "e", "subject": "user", "variants": [
                    {"name": "a", "weight": 1.0, "overrides": {"max_cost_per_request_usd": 5.0}}
                ]}),
                "variants[0].overrides.max_cost_per_request_usd",
            ),
            (
                json!({"id": "e", "subject": "user", "variants": [
                    {"name": "a", "weight": 1.0, "overrides": {"on_budget_exhausted": "fallback"}}
                ]}),
                "variants[0].overrides.on_budget_exhausted",
            ),
            (
                json!({"id": "e", "subject": "user", "variants": [
                    {"name": "a", "weight": 1.0, "overrides": {"log_prompts": true}}
                ]}),
                "variants[0].overrides.log_prompts",
            ),
            (
                json!({"id": "e", "subject": "user", "variants": [
                    {"name": "a", "weight": 1.0, "overrides": {"log_signals": "hidden"}}
                ]}),
                "variants[0].overrides.log_signals",
            ),
        ];
        for (config, key) in cases {
            let err = experiment(config.clone()).unwrap_err();
            assert_eq!(err.key(), key, "{config} -> {err}");
        }
    }
}
