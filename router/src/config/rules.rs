//! `[confidence]`: where learned, calibrated and probe rules are read from, and reading them.

use super::*;

/// `[confidence]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfidence {
    /// Where learned and calibrated rules (`<name>.json`, written by `cascade calibrate`) are
    /// read from; relative to the configuration file's folder.
    pub rules_dir: String,
}

impl Default for RawConfidence {
    fn default() -> Self {
        Self {
            rules_dir: "rules".into(),
        }
    }
}

/// Reads every learned rule the configuration names from `<rules_dir>/<name>.json`.
pub(super) fn load_learned_rules(
    confidence: &RawConfidence,
    policy: &RawPolicy,
    policies_config: &PoliciesConfig,
    base_dir: Option<&Path>,
) -> Result<BTreeMap<String, Arc<LearnedRule>>, ConfigError> {
    let mut names = policies::learned::learned_rule_names(policies_config);
    if policy.aggregate == RawAggregate::Name("learned".into()) {
        let name = policy.learned_rule.clone().ok_or_else(|| {
            invalid(
                "policy.learned_rule",
                "aggregate = \"learned\" needs the rule's name (its file is <confidence.rules_dir>/<name>.json)",
            )
        })?;
        names.insert(name);
    }
    if let RawAggregate::Table(Aggregate::Learned { name, .. }) = &policy.aggregate {
        names.insert(name.clone());
    }
    read_rules(confidence, base_dir, names, "learned", |text| {
        LearnedRule::from_json(text).map_err(|e| e.to_string())
    })
}

/// Reads every calibrated rule the configuration names from `<rules_dir>/<name>.json`.
pub(super) fn load_calibrated_rules(
    confidence: &RawConfidence,
    policy: &RawPolicy,
    policies_config: &PoliciesConfig,
    base_dir: Option<&Path>,
) -> Result<BTreeMap<String, Arc<CalibratedRule>>, ConfigError> {
    let mut names = policies::calibrated::calibrated_rule_names(policies_config);
    if let RawAggregate::Table(Aggregate::Calibrated { name, .. }) = &policy.aggregate {
        names.insert(name.clone());
    }
    read_rules(confidence, base_dir, names, "calibrated", |text| {
        CalibratedRule::from_json(text).map_err(|e| e.to_string())
    })
}

/// Reads every probe rule the configuration names from `<rules_dir>/<name>.json`.
pub(super) fn load_probe_rules(
    confidence: &RawConfidence,
    policy: &RawPolicy,
    policies_config: &PoliciesConfig,
    base_dir: Option<&Path>,
) -> Result<BTreeMap<String, Arc<ProbeRule>>, ConfigError> {
    let mut names = policies::probe::probe_rule_names(policies_config);
    if let RawAggregate::Table(Aggregate::Probe { name, .. }) = &policy.aggregate {
        names.insert(name.clone());
    }
    read_rules(confidence, base_dir, names, "probe", |text| {
        ProbeRule::from_json(text).map_err(|e| e.to_string())
    })
}

/// Reads and parses `<rules_dir>/<name>.json` for every name; errors name the file.
fn read_rules<T>(
    confidence: &RawConfidence,
    base_dir: Option<&Path>,
    names: BTreeSet<String>,
    kind: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<BTreeMap<String, Arc<T>>, ConfigError> {
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
                    "cannot read {kind} rule `{name}` from {}: {e}",
                    path.display()
                ),
            )
        })?;
        let rule = parse(&text).map_err(|e| {
            invalid(
                "confidence.rules_dir",
                format!("{kind} rule {}: {e}", path.display()),
            )
        })?;
        rules.insert(name, Arc::new(rule));
    }
    Ok(rules)
}
