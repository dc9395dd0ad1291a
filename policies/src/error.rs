//! The one validation error of this crate: configuration that cannot be used, with its key.

use crate::confidence::AggregateError;
use crate::money::MoneyError;

/// Why a configuration, override or experiment was rejected; always names the offending key
/// as a dotted path (e.g. `teams.alpha.policy.threshold`) so start-up errors are actionable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// A value is out of range or combined with others in a way that cannot work.
    #[error("{key}: {reason}")]
    Invalid {
        /// Dotted path of the offending key.
        key: String,
        /// What is wrong, in words.
        reason: String,
    },
    /// A name refers to something that is not configured (a remote model, team, key id).
    #[error("{key}: unknown {what} `{name}`")]
    Unknown {
        /// Dotted path of the offending key.
        key: String,
        /// What kind of thing the name should refer to.
        what: &'static str,
        /// The name that matched nothing.
        name: String,
    },
    /// A money amount in USD could not be converted.
    #[error("{key}: {source}")]
    Money {
        /// Dotted path of the offending key.
        key: String,
        /// The conversion failure.
        source: MoneyError,
    },
    /// Aggregate parameters are invalid.
    #[error("{key}: {source}")]
    Aggregate {
        /// Dotted path of the offending key.
        key: String,
        /// The parameter failure.
        source: AggregateError,
    },
}

impl PolicyError {
    /// An `Invalid` error at `key`.
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The dotted path of the offending key.
    pub fn key(&self) -> &str {
        match self {
            Self::Invalid { key, .. }
            | Self::Unknown { key, .. }
            | Self::Money { key, .. }
            | Self::Aggregate { key, .. } => key,
        }
    }

    /// The same error located under `prefix` (`threshold` becomes `teams.alpha.policy.threshold`),
    /// so nested validators can name keys relative to themselves.
    #[must_use]
    pub fn within(mut self, prefix: &str) -> Self {
        let key = match &mut self {
            Self::Invalid { key, .. }
            | Self::Unknown { key, .. }
            | Self::Money { key, .. }
            | Self::Aggregate { key, .. } => key,
        };
        *key = if key.is_empty() {
            prefix.to_owned()
        } else {
            format!("{prefix}.{key}")
        };
        self
    }
}

/// Checks that a configured name (team, experiment, variant) is safe to put in metrics labels,
/// headers and ledger rows: 1..=64 characters of `[A-Za-z0-9_.-]`.
pub(crate) fn check_name(key: &str, name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PolicyError::invalid(
            key,
            format!("`{name}` must be 1 to 64 characters of A-Z, a-z, 0-9, `_`, `.`, `-`"),
        ))
    }
}
