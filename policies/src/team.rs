//! Teams, API keys, and authentication by key hash.
//!
//! The gateway never stores API keys, only their SHA-256; the ledger uses a short key id
//! derived from the hash so that no secret ends up in a database row or a log line.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::budget::Limits;
use crate::error::{check_name, PolicyError};
use crate::money::opt_usd_at;
use crate::policy::{Policy, PolicyConfig, PolicyOverride};

/// Hex characters of the hash that form a key id (48 bits: collisions are checked anyway).
const KEY_ID_LEN: usize = 12;

/// A team as written in configuration (`[[teams]]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamConfig {
    /// Team name: 1..=64 of `[A-Za-z0-9_.-]`; used in metrics, the ledger and budget scopes.
    pub name: String,
    /// Hex SHA-256 of each API key of the team (see [`hash_api_key`]).
    #[serde(default)]
    pub api_key_hashes: Vec<String>,
    /// The team's policy; its budgets are the team's budgets.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Per-key overrides keyed by key id; budgets set here are that key's own budgets.
    #[serde(default)]
    pub keys: BTreeMap<String, PolicyOverride>,
}

/// A validated team: its policy, budgets, and each key's effective policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Team {
    /// Team name.
    pub name: String,
    /// The team policy (used for keys without an override).
    pub policy: Policy,
    /// The team's own budgets.
    pub limits: Limits,
    /// Ids of the team's keys, in configuration order.
    pub key_ids: Vec<String>,
    /// Keys with an override: their effective policy and their own budgets.
    pub keys: BTreeMap<String, KeySettings>,
}

/// What an overridden key gets: team policy ⊕ its override, plus the key's own budgets.
#[derive(Clone, Debug, PartialEq)]
pub struct KeySettings {
    /// Team policy with the key's override applied.
    pub policy: Policy,
    /// Budgets of this key alone (from the override's `*_budget_usd`), on top of the team's.
    pub limits: Limits,
}

impl TryFrom<TeamConfig> for Team {
    type Error = PolicyError;

    /// Validates names, hashes and policies; error keys are relative to the team
    /// (`policy.threshold`, `keys.0123456789ab.remotes`).
    fn try_from(c: TeamConfig) -> Result<Self, PolicyError> {
        check_name("name", &c.name)?;
        let policy = Policy::try_from(c.policy).map_err(|e| e.within("policy"))?;
        let limits = Limits {
            daily: policy.daily_budget(),
            monthly: policy.monthly_budget(),
        };
        let mut key_ids = Vec::with_capacity(c.api_key_hashes.len());
        for (i, hash) in c.api_key_hashes.iter().enumerate() {
            parse_hash(hash).map_err(|e| e.within(&format!("api_key_hashes[{i}]")))?;
            key_ids.push(key_id(hash));
        }
        let mut keys = BTreeMap::new();
        for (id, o) in c.keys {
            let at = format!("keys.{id}");
            if !key_ids.contains(&id) {
                return Err(PolicyError::Unknown {
                    key: at,
                    what: "key id",
                    name: id,
                });
            }
            let key_policy = policy.with_override(&o).map_err(|e| e.within(&at))?;
            let key_limits = Limits {
                daily: opt_usd_at("daily_budget_usd", o.daily_budget_usd)
                    .map_err(|e| e.within(&at))?,
                monthly: opt_usd_at("monthly_budget_usd", o.monthly_budget_usd)
                    .map_err(|e| e.within(&at))?,
            };
            keys.insert(
                id,
                KeySettings {
                    policy: key_policy,
                    limits: key_limits,
                },
            );
        }
        Ok(Self {
            name: c.name,
            policy,
            limits,
            key_ids,
            keys,
        })
    }
}

impl Team {
    /// The effective policy of one of the team's keys (the team policy unless overridden).
    pub fn policy_for(&self, key_id: &str) -> &Policy {
        self.keys.get(key_id).map_or(&self.policy, |k| &k.policy)
    }

    /// The key's own budgets (none unless its override sets them).
    pub fn key_limits(&self, key_id: &str) -> Limits {
        self.keys
            .get(key_id)
            .map_or_else(Limits::default, |k| k.limits)
    }
}

/// Lowercase hex SHA-256 of an API key: what configuration and storage keep instead of it.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The stable, non-secret id of a key: the first 12 hex characters of its hash, lowercased.
pub fn key_id(hash: &str) -> String {
    hash.chars()
        .take(KEY_ID_LEN)
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Formats caller-supplied randomness as an API key: `csk-` and 64 lowercase hex characters.
/// Taking the bytes as an argument keeps this crate free of a random source.
pub fn generate_api_key(random_bytes: [u8; 32]) -> String {
    format!("csk-{}", hex::encode(random_bytes))
}

/// Byte equality whose running time depends only on the lengths, never on where the inputs
/// first differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// Parses a hex SHA-256 (either case) into bytes, naming the problem.
fn parse_hash(hash: &str) -> Result<[u8; 32], PolicyError> {
    let mut bytes = [0u8; 32];
    match hex::decode_to_slice(hash, &mut bytes) {
        Ok(()) => Ok(bytes),
        Err(_) => Err(PolicyError::invalid(
            "",
            "must be 64 hex characters: the SHA-256 of the API key (see `cascade keys`)",
        )),
    }
}

/// Who a presented API key belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyMatch<'a> {
    /// Team name.
    pub team: &'a str,
    /// Key id for the ledger and key-scope budgets.
    pub key_id: &'a str,
}

/// One known key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct KeyEntry {
    hash: [u8; 32],
    team: String,
    key_id: String,
}

/// Every configured key hash, for authenticating requests.
///
/// Lookups scan all entries with a constant-time comparison and no early return, so the
/// time taken does not reveal which key (or which hash prefix) matched; O(keys) is fine for
/// the thousands of keys one gateway holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyDirectory {
    entries: Vec<KeyEntry>,
}

impl KeyDirectory {
    /// Builds the directory, rejecting malformed hashes, a hash used twice and key-id
    /// collisions; error keys look like `teams.alpha.api_key_hashes[0]`.
    pub fn new(teams: &[TeamConfig]) -> Result<Self, PolicyError> {
        let mut entries: Vec<KeyEntry> = Vec::new();
        for team in teams {
            for (i, hash_hex) in team.api_key_hashes.iter().enumerate() {
                let at = format!("teams.{}.api_key_hashes[{i}]", team.name);
                let hash = parse_hash(hash_hex).map_err(|e| e.within(&at))?;
                let id = key_id(hash_hex);
                if let Some(other) = entries.iter().find(|e| e.key_id == id) {
                    let what = if other.hash == hash {
                        "the same key"
                    } else {
                        "a key id"
                    };
                    return Err(PolicyError::invalid(
                        at,
                        format!("shares {what} with a key of team `{}`", other.team),
                    ));
                }
                entries.push(KeyEntry {
                    hash,
                    team: team.name.clone(),
                    key_id: id,
                });
            }
        }
        Ok(Self { entries })
    }

    /// Authenticates a presented API key.
    pub fn lookup_key(&self, api_key: &str) -> Option<KeyMatch<'_>> {
        let hash: [u8; 32] = Sha256::digest(api_key.as_bytes()).into();
        self.lookup_hash(&hash)
    }

    /// Finds the key with this SHA-256, comparing against every entry.
    pub fn lookup_hash(&self, hash: &[u8; 32]) -> Option<KeyMatch<'_>> {
        let mut found: Option<&KeyEntry> = None;
        for entry in &self.entries {
            // No early return: every entry is compared whatever matched before.
            if constant_time_eq(&entry.hash, hash) {
                found = Some(entry);
            }
        }
        found.map(|e| KeyMatch {
            team: &e.team,
            key_id: &e.key_id,
        })
    }

    /// Finds the key with this hex SHA-256 (either case); `None` for malformed input.
    pub fn lookup_hash_hex(&self, hash_hex: &str) -> Option<KeyMatch<'_>> {
        parse_hash(hash_hex).ok().and_then(|h| self.lookup_hash(&h))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn team(name: &str, keys: &[&str]) -> TeamConfig {
        serde_json::from_value(json!({
            "name": name,
            "api_key_hashes": keys.iter().map(|k| hash_api_key(k)).collect::<Vec<_>>(),
            "policy": {"threshold": -1.0, "remotes": ["m"]}
        }))
        .unwrap()
    }

    #[test]
    fn hash_is_lowercase_hex_sha256() {
        assert_eq!(
            hash_api_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(key_id(&hash_api_key("abc")), "ba7816bf8f01");
        assert_eq!(key_id("BA7816BF8F01CFEA"), "ba7816bf8f01");
    }

    #[test]
    fn generated_keys_are_prefixed_hex_of_the_given_bytes() {
        let key = generate_api_key([0xab; 32]);
        assert_eq!(key.len(), 4 + 64);
        assert!(key.starts_with("csk-abab"));
        assert_ne!(generate_api_key([1; 32]), generate_api_key([2; 32]));
    }

    #[test]
    fn constant_time_eq_is_plain_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"same bytes", b"same bytes"));
        assert!(!constant_time_eq(b"same bytes", b"same bytez"));
        assert!(!constant_time_eq(b"xame bytes", b"same bytes"));
        assert!(!constant_time_eq(b"short", b"longer"));
        let a = [7u8; 32];
        for i in 0..32 {
            let mut b = a;
            b[i] ^= 0x80;
            assert!(!constant_time_eq(&a, &b), "difference at byte {i}");
        }
    }

    #[test]
    fn directory_finds_the_team_and_key_id_of_a_presented_key() {
        let dir = KeyDirectory::new(&[
            team("alpha", &["csk-a1", "csk-a2"]),
            team("beta", &["csk-b1"]),
        ])
        .unwrap();
        assert_eq!(dir.len(), 3);
        let m = dir.lookup_key("csk-a2").unwrap();
        assert_eq!(m.team, "alpha");
        assert_eq!(m.key_id, key_id(&hash_api_key("csk-a2")));
        assert_eq!(dir.lookup_key("csk-b1").unwrap().team, "beta");
        assert_eq!(dir.lookup_key("csk-nope"), None);
        assert_eq!(dir.lookup_key(""), None);
        let upper = hash_api_key("csk-b1").to_uppercase();
        assert_eq!(dir.lookup_hash_hex(&upper).unwrap().team, "beta");
        assert_eq!(dir.lookup_hash_hex("zz"), None);
    }

    #[test]
    fn directory_rejects_malformed_and_duplicate_hashes_naming_the_key() {
        let mut bad = team("alpha", &["csk-a"]);
        bad.api_key_hashes.push("not-hex".into());
        let err = KeyDirectory::new(&[bad]).unwrap_err();
        assert_eq!(err.key(), "teams.alpha.api_key_hashes[1]");

        let err =
            KeyDirectory::new(&[team("alpha", &["k"]), team("beta", &["x", "k"])]).unwrap_err();
        assert_eq!(err.key(), "teams.beta.api_key_hashes[1]");
        assert!(err.to_string().contains("same key"), "{err}");
    }

    #[test]
    fn team_validates_policy_and_key_overrides_with_relative_keys() {
        let mut c = team("alpha", &["csk-a"]);
        let id = key_id(&hash_api_key("csk-a"));
        c.keys.insert(
            id.clone(),
            serde_json::from_value(json!({"threshold": -3.0, "daily_budget_usd": 1.5})).unwrap(),
        );
        let t = Team::try_from(c.clone()).unwrap();
        assert_eq!(t.policy_for(&id).threshold(), Some(-3.0));
        assert_eq!(t.policy_for("other").threshold(), Some(-1.0));
        assert_eq!(
            t.key_limits(&id).daily,
            Some(crate::money::NanoUsd(1_500_000_000))
        );
        assert_eq!(t.key_limits(&id).monthly, None);
        assert_eq!(t.limits, Limits::default());

        let mut unknown = c.clone();
        unknown
            .keys
            .insert("ffffffffffff".into(), PolicyOverride::default());
        assert_eq!(
            Team::try_from(unknown).unwrap_err().key(),
            "keys.ffffffffffff"
        );

        let mut bad = c.clone();
        bad.keys.insert(
            id.clone(),
            PolicyOverride {
                threshold: Some(f64::INFINITY),
                ..Default::default()
            },
        );
        assert_eq!(
            Team::try_from(bad).unwrap_err().key(),
            format!("keys.{id}.threshold")
        );

        let mut bad_policy = c;
        bad_policy.policy.threshold = None;
        assert_eq!(
            Team::try_from(bad_policy).unwrap_err().key(),
            "policy.threshold"
        );

        assert_eq!(
            Team::try_from(team("al pha", &[])).unwrap_err().key(),
            "name"
        );
    }
}
