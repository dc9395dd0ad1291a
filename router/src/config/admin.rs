//! `[admin]`: the admin API's key and listener.

use super::*;

/// `[admin]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// Hex SHA-256 of the admin key; no admin API without it.
    pub api_key_hash: Option<String>,
    /// A separate address for the admin API; the main listener when absent.
    pub listen: Option<String>,
}

/// Validated `[admin]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminConfig {
    /// Lower-case hex SHA-256 of the admin key.
    pub api_key_hash: Option<String>,
    pub listen: Option<SocketAddr>,
}

pub(super) fn validate_admin(raw: &RawAdmin) -> Result<AdminConfig, ConfigError> {
    let api_key_hash = match &raw.api_key_hash {
        None => None,
        Some(h) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
            Some(h.to_ascii_lowercase())
        }
        Some(_) => {
            return Err(invalid(
                "admin.api_key_hash",
                "must be the hex SHA-256 of the admin key (64 hex digits)",
            ))
        }
    };
    let listen = match &raw.listen {
        None => None,
        Some(l) => Some(l.parse().map_err(|e| {
            invalid(
                "admin.listen",
                format!("`{l}` is not an address:port ({e})"),
            )
        })?),
    };
    Ok(AdminConfig {
        api_key_hash,
        listen,
    })
}
