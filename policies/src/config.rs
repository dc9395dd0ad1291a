//! The whole policies section of `cascade.toml`, validated at start-up with cross references.
//!
//! Everything a request needs is resolved here once (each key's policy, each variant's
//! policy), so that at request time lookups cannot fail on configuration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::budget::{parse_time_zone, scopes_for, Limits, Scope, Tz};
use crate::error::{check_name, PolicyError};
use crate::experiment::{Experiment, ExperimentConfig};
use crate::money::{opt_usd_at, NanoUsd, PriceConfig, PriceTable};
use crate::policy::{Policy, PolicyOverride};
use crate::team::{KeyDirectory, KeyMatch, Team, TeamConfig};

/// Gateway-wide budgets as written in configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GlobalBudgetConfig {
    /// Spend limit of the whole gateway per calendar day, in USD.
    pub daily_budget_usd: Option<f64>,
    /// Spend limit of the whole gateway per calendar month, in USD.
    pub monthly_budget_usd: Option<f64>,
}

/// The policies configuration as written (`[prices.*]`, `[[teams]]`, `[[experiments]]`, ...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoliciesConfig {
    /// IANA time zone of budget days and months; `UTC` when absent.
    pub timezone: Option<String>,
    /// Price of each remote model, by the name policies use in `remotes`.
    pub prices: BTreeMap<String, PriceConfig>,
    /// Notional compute price of the local model, so reports can show savings.
    pub local_price: PriceConfig,
    /// Gateway-wide budgets.
    pub global: GlobalBudgetConfig,
    /// Teams and their keys.
    pub teams: Vec<TeamConfig>,
    /// Experiments; at most one applies to any team.
    pub experiments: Vec<ExperimentConfig>,
}

/// The validated policies configuration: teams, keys, prices, budgets, experiments.
#[derive(Clone, Debug, PartialEq)]
pub struct Policies {
    tz: Tz,
    prices: BTreeMap<String, PriceTable>,
    local_price: PriceTable,
    global: Limits,
    teams: BTreeMap<String, Team>,
    keys: KeyDirectory,
    experiments: Vec<Experiment>,
    /// Effective policy per (team, key id or None for the team policy, variant name).
    variant_policies: BTreeMap<(String, Option<String>, String), Policy>,
}

/// Errors for a remote model name that has no price.
fn check_remotes(
    key: &str,
    remotes: &[String],
    prices: &BTreeMap<String, PriceTable>,
) -> Result<(), PolicyError> {
    match remotes
        .iter()
        .enumerate()
        .find(|(_, r)| !prices.contains_key(*r))
    {
        Some((i, r)) => Err(PolicyError::Unknown {
            key: format!("{key}[{i}]"),
            what: "remote model (no entry in `prices`)",
            name: r.clone(),
        }),
        None => Ok(()),
    }
}

impl TryFrom<PoliciesConfig> for Policies {
    type Error = PolicyError;

    fn try_from(c: PoliciesConfig) -> Result<Self, PolicyError> {
        let tz = c.timezone.as_deref().map_or(Ok(Tz::UTC), parse_time_zone)?;

        let mut prices = BTreeMap::new();
        for (name, price) in c.prices {
            let at = format!("prices.{name}");
            if name.is_empty() || name.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
                return Err(PolicyError::invalid(at, "is not a model name"));
            }
            prices.insert(
                name,
                PriceTable::try_from(price).map_err(|e| e.within(&at))?,
            );
        }
        let local_price =
            PriceTable::try_from(c.local_price).map_err(|e| e.within("local_price"))?;
        let global = Limits {
            daily: opt_usd_at("daily_budget_usd", c.global.daily_budget_usd)
                .map_err(|e| e.within("global"))?,
            monthly: opt_usd_at("monthly_budget_usd", c.global.monthly_budget_usd)
                .map_err(|e| e.within("global"))?,
        };

        let mut teams = BTreeMap::new();
        for (i, tc) in c.teams.iter().enumerate() {
            check_name(&format!("teams[{i}].name"), &tc.name)?;
            let at = format!("teams.{}", tc.name);
            if teams.contains_key(&tc.name) {
                return Err(PolicyError::invalid(at, "team is defined twice"));
            }
            let team = Team::try_from(tc.clone()).map_err(|e| e.within(&at))?;
            check_remotes(
                &format!("{at}.policy.remotes"),
                team.policy.remotes(),
                &prices,
            )?;
            for (id, o) in &tc.keys {
                if let Some(remotes) = &o.remotes {
                    check_remotes(&format!("{at}.keys.{id}.remotes"), remotes, &prices)?;
                }
            }
            teams.insert(tc.name.clone(), team);
        }
        let keys = KeyDirectory::new(&c.teams)?;

        let mut experiments: Vec<Experiment> = Vec::new();
        let mut variant_policies = BTreeMap::new();
        for (i, ec) in c.experiments.into_iter().enumerate() {
            check_name(&format!("experiments[{i}].id"), &ec.id)?;
            let at = format!("experiments.{}", ec.id);
            if experiments.iter().any(|e| e.id() == ec.id) {
                return Err(PolicyError::invalid(at, "experiment id is used twice"));
            }
            let exp = Experiment::try_from(ec).map_err(|e| e.within(&at))?;
            if let Some(team) = exp.team() {
                if !teams.contains_key(team) {
                    return Err(PolicyError::Unknown {
                        key: format!("{at}.team"),
                        what: "team",
                        name: team.to_owned(),
                    });
                }
            }
            for team in teams.values().filter(|t| exp.applies_to(&t.name)) {
                if let Some(other) = experiments.iter().find(|e| e.applies_to(&team.name)) {
                    return Err(PolicyError::invalid(
                        at,
                        format!(
                            "team `{}` is already in experiment `{}`",
                            team.name,
                            other.id()
                        ),
                    ));
                }
                for (j, variant) in exp.variants().iter().enumerate() {
                    let vat = format!("{at}.variants[{j}].overrides");
                    if let Some(remotes) = &variant.overrides.remotes {
                        check_remotes(&format!("{vat}.remotes"), remotes, &prices)?;
                    }
                    let bases = std::iter::once((None, &team.policy)).chain(
                        team.keys
                            .iter()
                            .map(|(id, k)| (Some(id.clone()), &k.policy)),
                    );
                    for (key_id, base) in bases {
                        let policy = apply(base, &variant.overrides, &vat, &team.name)?;
                        variant_policies
                            .insert((team.name.clone(), key_id, variant.name.clone()), policy);
                    }
                }
            }
            experiments.push(exp);
        }

        Ok(Self {
            tz,
            prices,
            local_price,
            global,
            teams,
            keys,
            experiments,
            variant_policies,
        })
    }
}

/// Applies a variant's override to one base policy, saying which team it failed for.
fn apply(base: &Policy, o: &PolicyOverride, at: &str, team: &str) -> Result<Policy, PolicyError> {
    let policy = base.with_override(o).map_err(|e| match e.within(at) {
        PolicyError::Invalid { key, reason } => PolicyError::Invalid {
            key,
            reason: format!("{reason} (applied to team `{team}`)"),
        },
        other => other,
    })?;
    // An experiment (one without `team` applies to every team) must not send a local_only
    // team's prompts out: its promise is the team's, not a treatment.
    if base.local_only() && !policy.local_only() {
        return Err(PolicyError::invalid(
            format!("{at}.local_only"),
            format!("team `{team}` is local_only; an experiment variant cannot turn that off"),
        ));
    }
    Ok(policy)
}

impl Policies {
    /// Authenticates an API key: its team and key id, or `None` (401).
    pub fn authenticate(&self, api_key: &str) -> Option<KeyMatch<'_>> {
        self.keys.lookup_key(api_key)
    }

    /// The key directory, for lookups by hash.
    pub fn keys(&self) -> &KeyDirectory {
        &self.keys
    }

    /// A team by name.
    pub fn team(&self, name: &str) -> Option<&Team> {
        self.teams.get(name)
    }

    /// All teams by name.
    pub fn teams(&self) -> &BTreeMap<String, Team> {
        &self.teams
    }

    /// The experiment a team's requests take part in, if any.
    pub fn experiment_for(&self, team: &str) -> Option<&Experiment> {
        self.experiments.iter().find(|e| e.applies_to(team))
    }

    /// All experiments.
    pub fn experiments(&self) -> &[Experiment] {
        &self.experiments
    }

    /// The effective policy for a request: team policy ⊕ key override ⊕ variant override.
    /// `None` only for an unknown team or a variant not of the team's experiment.
    pub fn policy(&self, team: &str, key_id: &str, variant: Option<&str>) -> Option<&Policy> {
        let t = self.teams.get(team)?;
        match variant {
            None => Some(t.policy_for(key_id)),
            Some(v) => {
                let key = t.keys.contains_key(key_id).then(|| key_id.to_owned());
                self.variant_policies
                    .get(&(team.to_owned(), key, v.to_owned()))
            }
        }
    }

    /// Price of a remote model.
    pub fn price(&self, remote: &str) -> Option<&PriceTable> {
        self.prices.get(remote)
    }

    /// Notional price of the local model.
    pub fn local_price(&self) -> &PriceTable {
        &self.local_price
    }

    /// What a remote call cost: its tokens at `[prices.<remote>]`. The one place a call's
    /// cost is computed (budget settlement and the ledger both ask here). Zero for an
    /// unpriced remote, which start-up keeps out of reach of every budget.
    pub fn remote_cost(&self, remote: &str, input_tokens: u64, output_tokens: u64) -> NanoUsd {
        self.price(remote)
            .map_or(NanoUsd::ZERO, |p| p.cost(input_tokens, output_tokens))
    }

    /// The notional cost of a local generation at `[local_price]`.
    pub fn local_cost(&self, input_tokens: u64, output_tokens: u64) -> NanoUsd {
        self.local_price.cost(input_tokens, output_tokens)
    }

    /// Time zone of budget windows.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// Gateway-wide budgets.
    pub fn global_limits(&self) -> Limits {
        self.global
    }

    /// Every limited budget scope a paid call by this key is charged to, with limits
    /// (see [`crate::budget::scopes_for`]); an unknown team gets only the global scopes.
    pub fn scopes_for(
        &self,
        team: &str,
        key_id: &str,
        now_unix_secs: i64,
    ) -> Vec<(Scope, NanoUsd)> {
        let (team_limits, key_limits) = self
            .teams
            .get(team)
            .map_or((Limits::default(), Limits::default()), |t| {
                (t.limits, t.key_limits(key_id))
            });
        scopes_for(
            team,
            team_limits,
            key_id,
            key_limits,
            self.global,
            now_unix_secs,
            self.tz,
        )
    }

    /// Conservative cost estimate of this request on each of the policy's remotes, in
    /// preference order, for building a [`crate::decision::BudgetView`].
    pub fn estimates(
        &self,
        policy: &Policy,
        input_tokens: u64,
        max_output_tokens: u64,
    ) -> Vec<(String, NanoUsd)> {
        policy
            .remotes()
            .iter()
            .filter_map(|r| {
                self.prices
                    .get(r)
                    .map(|p| (r.clone(), p.cost(input_tokens, max_output_tokens)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::ScopeKind;
    use crate::team::{hash_api_key, key_id};
    use serde_json::{json, Value};

    fn sample() -> Value {
        json!({
            "timezone": "Europe/Berlin",
            "prices": {
                "gpt-4o": {"input_usd_per_million": 2.5, "output_usd_per_million": 10.0},
                "gpt-4o-mini": {"input_usd_per_million": 0.15, "output_usd_per_million": 0.6}
            },
            "local_price": {"input_usd_per_million": 0.01, "output_usd_per_million": 0.02},
            "global": {"monthly_budget_usd": 1000.0},
            "teams": [
                {
                    "name": "alpha",
                    "api_key_hashes": [hash_api_key("csk-alpha-1"), hash_api_key("csk-alpha-2")],
                    "policy": {"threshold": -0.8, "remotes": ["gpt-4o", "gpt-4o-mini"], "daily_budget_usd": 5.0},
                    "keys": {
                        key_id(&hash_api_key("csk-alpha-2")): {"threshold": -2.0, "monthly_budget_usd": 20.0}
                    }
                },
                {
                    "name": "beta",
                    "api_key_hashes": [hash_api_key("csk-beta")],
                    "policy": {"local_only": true}
                }
            ],
            "experiments": [{
                "id": "alpha-threshold",
                "team": "alpha",
                "subject": "user",
                "variants": [
                    {"name": "control", "weight": 1},
                    {"name": "lenient", "weight": 1, "overrides": {"threshold": -1.5}}
                ]
            }]
        })
    }

    fn load(v: Value) -> Result<Policies, PolicyError> {
        Policies::try_from(serde_json::from_value::<PoliciesConfig>(v).unwrap())
    }

    fn err_of(v: Value) -> PolicyError {
        load(v).unwrap_err()
    }

    #[test]
    fn sample_config_loads_and_resolves_policies() {
        let p = load(sample()).unwrap();
        assert_eq!(p.timezone().name(), "Europe/Berlin");
        assert_eq!(
            p.price("gpt-4o-mini").unwrap().input_per_million,
            NanoUsd(150_000_000)
        );
        assert_eq!(p.local_price().output_per_million, NanoUsd(20_000_000));

        let m = p.authenticate("csk-alpha-2").unwrap();
        assert_eq!(m.team, "alpha");
        assert_eq!(p.authenticate("csk-unknown"), None);
        assert_eq!(p.authenticate("csk-beta").unwrap().team, "beta");

        let k1 = key_id(&hash_api_key("csk-alpha-1"));
        let k2 = m.key_id;
        assert_eq!(
            p.policy("alpha", &k1, None).unwrap().threshold(),
            Some(-0.8)
        );
        assert_eq!(p.policy("alpha", k2, None).unwrap().threshold(), Some(-2.0));
        // The variant override wins over the key override: variants are the experiment.
        assert_eq!(
            p.policy("alpha", &k1, Some("lenient")).unwrap().threshold(),
            Some(-1.5)
        );
        assert_eq!(
            p.policy("alpha", k2, Some("lenient")).unwrap().threshold(),
            Some(-1.5)
        );
        assert_eq!(
            p.policy("alpha", k2, Some("control")).unwrap().threshold(),
            Some(-2.0)
        );
        assert_eq!(p.policy("alpha", &k1, Some("nope")), None);
        assert_eq!(p.policy("gamma", &k1, None), None);

        assert_eq!(p.experiment_for("alpha").unwrap().id(), "alpha-threshold");
        assert!(p.experiment_for("beta").is_none());
        assert!(p.policy("beta", "x", None).unwrap().local_only());
    }

    #[test]
    fn scopes_combine_key_team_and_global_limits_in_the_configured_zone() {
        let p = load(sample()).unwrap();
        let k2 = key_id(&hash_api_key("csk-alpha-2"));
        // 2026-11-28T23:30Z is 2026-11-29 in Berlin.
        let scopes = p.scopes_for("alpha", &k2, 1_795_908_600);
        let got: Vec<String> = scopes
            .iter()
            .map(|(s, l)| format!("{} {}", s.storage_key(), l.0))
            .collect();
        assert_eq!(
            got,
            [
                format!("key/{k2}/month/2026-11 20000000000"),
                "team/alpha/day/2026-11-29 5000000000".to_owned(),
                "global/global/month/2026-11 1000000000000".to_owned(),
            ]
        );
        let beta = p.scopes_for("beta", "whatever", 0);
        assert_eq!(beta.len(), 1);
        assert_eq!(beta[0].0.kind, ScopeKind::Global);
    }

    #[test]
    fn estimates_follow_the_policy_remote_order() {
        let p = load(sample()).unwrap();
        let policy = p.policy("alpha", "none", None).unwrap();
        let est = p.estimates(policy, 1000, 100);
        assert_eq!(
            est,
            [
                ("gpt-4o".to_owned(), NanoUsd(2_500_000 + 1_000_000)),
                ("gpt-4o-mini".to_owned(), NanoUsd(150_000 + 60_000))
            ]
        );
    }

    #[test]
    fn an_experiment_cannot_turn_a_local_only_team_s_local_only_off() {
        let mut v = sample();
        // No `team`: the experiment applies to every team, legal-style beta included.
        v["experiments"] = json!([{
            "id": "everyone",
            "subject": "user",
            "variants": [{"name": "out", "weight": 1, "overrides": {"local_only": false, "threshold": -1.0, "remotes": ["gpt-4o"]}}]
        }]);
        let err = err_of(v).to_string();
        assert!(err.contains("local_only") && err.contains("beta"), "{err}");
        // Remotes added to a local_only team stay unused: accepted, and it stays local_only.
        let mut v = sample();
        v["experiments"] = json!([{
            "id": "everyone",
            "subject": "user",
            "variants": [{"name": "more", "weight": 1, "overrides": {"remotes": ["gpt-4o"]}}]
        }]);
        let p = load(v).unwrap();
        assert!(p.policy("beta", "x", Some("more")).unwrap().local_only());
    }

    #[test]
    fn empty_config_is_valid_with_utc() {
        let p = load(json!({})).unwrap();
        assert_eq!(p.timezone(), Tz::UTC);
        assert!(p.keys().is_empty());
    }

    #[test]
    fn threshold_error_names_team_policy_key() {
        let mut c: PoliciesConfig = serde_json::from_value(sample()).unwrap();
        c.teams[0].policy.threshold = Some(f64::INFINITY);
        let err = Policies::try_from(c).unwrap_err();
        assert_eq!(
            err.to_string(),
            "teams.alpha.policy.threshold: must be finite, got inf"
        );
    }

    #[test]
    fn config_errors_name_the_offending_key() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["timezone"] = json!("Nowhere/Else")),
                "timezone",
            ),
            (
                Box::new(|v| v["prices"]["gpt-4o"]["output_usd_per_million"] = json!(-1)),
                "prices.gpt-4o.output_usd_per_million",
            ),
            (
                Box::new(|v| v["local_price"]["input_usd_per_million"] = json!(-1)),
                "local_price.input_usd_per_million",
            ),
            (
                Box::new(|v| v["global"]["daily_budget_usd"] = json!(-5)),
                "global.daily_budget_usd",
            ),
            (
                Box::new(|v| v["teams"][0]["policy"]["remotes"] = json!(["gpt-4o", "claude"])),
                "teams.alpha.policy.remotes[1]",
            ),
            (
                Box::new(|v| v["teams"][1]["name"] = json!("alpha")),
                "teams.alpha",
            ),
            (
                Box::new(|v| v["teams"][1]["name"] = json!("be ta")),
                "teams[1].name",
            ),
            (
                Box::new(|v| v["teams"][1]["api_key_hashes"][0] = json!("abc")),
                "teams.beta.api_key_hashes[0]",
            ),
            (
                Box::new(|v| {
                    v["teams"][1]["api_key_hashes"] = v["teams"][0]["api_key_hashes"].clone()
                }),
                "teams.beta.api_key_hashes[0]",
            ),
            (
                Box::new(|v| v["teams"][1]["keys"] = json!({"0123456789ab": {}})),
                "teams.beta.keys.0123456789ab",
            ),
            (
                Box::new(|v| {
                    let id = key_id(&hash_api_key("csk-alpha-1"));
                    v["teams"][0]["keys"][id] = json!({"remotes": ["nope"]});
                }),
                "teams.alpha.keys.REPLACED.remotes[0]",
            ),
            (
                Box::new(|v| v["experiments"][0]["team"] = json!("gamma")),
                "experiments.alpha-threshold.team",
            ),
            (
                Box::new(|v| v["experiments"][0]["variants"][1]["weight"] = json!(0)),
                "experiments.alpha-threshold.variants[1].weight",
            ),
            (
                Box::new(|v| {
                    v["experiments"][0]["variants"][1]["overrides"]["remotes"] = json!(["nope"])
                }),
                "experiments.alpha-threshold.variants[1].overrides.remotes[0]",
            ),
            (
                Box::new(|v| {
                    v["experiments"][0]["variants"][1]["overrides"]["threshold"] = json!(3.0)
                }),
                "experiments.alpha-threshold.variants[1].overrides.threshold",
            ),
            (
                Box::new(|v| {
                    let e = v["experiments"][0].clone();
                    v["experiments"].as_array_mut().unwrap().push(e);
                }),
                "experiments.alpha-threshold",
            ),
            (
                Box::new(|v| {
                    let mut e = v["experiments"][0].clone();
                    e["id"] = json!("global-exp");
                    e.as_object_mut().unwrap().remove("team");
                    v["experiments"].as_array_mut().unwrap().push(e);
                }),
                "experiments.global-exp",
            ),
        ];
        let alpha1 = key_id(&hash_api_key("csk-alpha-1"));
        for (edit, key) in cases {
            let mut v = sample();
            edit(&mut v);
            let err = err_of(v);
            assert_eq!(err.key(), key.replace("REPLACED", &alpha1), "{err}");
        }
    }

    #[test]
    fn variant_override_failing_for_a_team_says_which_team() {
        let mut v = sample();
        // local_only for beta is fine, but a global experiment turning off local_only for beta
        // needs a threshold beta does not have.
        v["experiments"] = json!([{
            "id": "everyone", "subject": "key",
            "variants": [{"name": "a", "weight": 1, "overrides": {"local_only": false}}]
        }]);
        let err = err_of(v);
        assert_eq!(
            err.key(),
            "experiments.everyone.variants[0].overrides.threshold"
        );
        assert!(err.to_string().contains("team `beta`"), "{err}");
    }
}
