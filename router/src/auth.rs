//! Who is calling: the API key of a team (and the experiment variant it falls in), or nobody
//! when no teams are configured, so the quickstart needs no key.

use axum::http::{header, HeaderMap};
use policies::Policies;

use crate::error::ApiError;

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub team: String,
    /// Key id (first hex digits of the key's hash): never the key itself.
    pub key_id: String,
    /// The experiment the request takes part in, and its variant.
    pub experiment: Option<(String, String)>,
}

/// The key of `Authorization: Bearer <key>`, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

/// The team and key behind the request's bearer key; `None` when no teams are configured
/// (every request is then anonymous and uses the default `[policy]`).
///
/// The key directory compares hashes in constant time, so response timing does not reveal
/// how much of a guessed key was right.
pub fn authenticate(policies: &Policies, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
    if policies.teams().is_empty() {
        return Ok(None);
    }
    let key = bearer(headers).ok_or(ApiError::Unauthorized)?;
    let found = policies.authenticate(key).ok_or(ApiError::Unauthorized)?;
    Ok(Some(Caller {
        team: found.team.to_string(),
        key_id: found.key_id.to_string(),
        experiment: None,
    }))
}

/// Checks the admin key of an admin API request. Without a configured admin key the admin
/// API is off (404, as if it did not exist). A team key is not an admin key: 403, so a
/// team learns it has no access rather than that its key is wrong.
pub fn authenticate_admin(
    admin_key_hash: Option<&str>,
    policies: &Policies,
    headers: &HeaderMap,
    path: &str,
) -> Result<(), ApiError> {
    let Some(expected) = admin_key_hash else {
        return Err(ApiError::NotFound(path.to_string()));
    };
    let key = bearer(headers).ok_or(ApiError::Unauthorized)?;
    let hash = policies::team::hash_api_key(key);
    if policies::team::constant_time_eq(hash.as_bytes(), expected.as_bytes()) {
        return Ok(());
    }
    if policies.authenticate(key).is_some() {
        return Err(ApiError::NotAllowed(
            "A team key cannot use the admin API.".into(),
        ));
    }
    Err(ApiError::Unauthorized)
}

/// Puts the caller in its team's experiment, if any: the variant is a pure function of the
/// experiment id and the subject (user, header or key), so a subject always sees one variant.
/// A request without a subject (no `user`, no header) is not enrolled.
pub fn assign_variant(
    policies: &Policies,
    caller: &mut Caller,
    user: Option<&str>,
    headers: &HeaderMap,
) {
    let Some(experiment) = policies.experiment_for(&caller.team) else {
        return;
    };
    let subject = experiment.subject().value(
        user,
        |name| headers.get(name).and_then(|v| v.to_str().ok()),
        &caller.key_id,
    );
    if let Some(subject) = subject {
        let variant = experiment.pick_variant(subject);
        caller.experiment = Some((experiment.id().to_string(), variant.name.clone()));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use axum::http::HeaderValue;
    use policies::team::hash_api_key;
    use policies::{PoliciesConfig, TeamConfig};

    use super::*;

    fn policies(teams: &[(&str, &str)]) -> Policies {
        let config = PoliciesConfig {
            teams: teams
                .iter()
                .map(|(name, key)| TeamConfig {
                    name: (*name).to_string(),
                    api_key_hashes: vec![hash_api_key(key)],
                    policy: toml_policy(),
                    ..TeamConfig::default()
                })
                .collect(),
            ..PoliciesConfig::default()
        };
        Policies::try_from(config).unwrap()
    }

    fn toml_policy() -> policies::PolicyConfig {
        serde_json::from_value(serde_json::json!({"local_only": true})).unwrap()
    }

    fn with_key(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
        h
    }

    #[test]
    fn only_the_admin_key_opens_the_admin_api() {
        let p = policies(&[("alpha", "sk-a")]);
        let admin = hash_api_key("sk-admin");
        assert!(
            authenticate_admin(Some(&admin), &p, &with_key("sk-admin"), "/admin/spend").is_ok()
        );
        assert!(matches!(
            authenticate_admin(Some(&admin), &p, &with_key("sk-a"), "/admin/spend"),
            Err(ApiError::NotAllowed(_))
        ));
        assert!(matches!(
            authenticate_admin(Some(&admin), &p, &with_key("sk-x"), "/admin/spend"),
            Err(ApiError::Unauthorized)
        ));
        assert!(matches!(
            authenticate_admin(Some(&admin), &p, &HeaderMap::new(), "/admin/spend"),
            Err(ApiError::Unauthorized)
        ));
        assert!(matches!(
            authenticate_admin(None, &p, &with_key("sk-admin"), "/admin/spend"),
            Err(ApiError::NotFound(_))
        ));
    }

    #[test]
    fn without_teams_nobody_needs_a_key() {
        assert_eq!(
            authenticate(&policies(&[]), &HeaderMap::new()).unwrap(),
            None
        );
    }

    #[test]
    fn with_teams_a_known_key_names_its_team_and_others_are_refused() {
        let p = policies(&[("alpha", "sk-a"), ("beta", "sk-b")]);
        let caller = authenticate(&p, &with_key("sk-b")).unwrap().unwrap();
        assert_eq!(caller.team, "beta");
        assert!(hash_api_key("sk-b").starts_with(&caller.key_id));
        assert!(matches!(
            authenticate(&p, &with_key("sk-c")),
            Err(ApiError::Unauthorized)
        ));
        assert!(matches!(
            authenticate(&p, &HeaderMap::new()),
            Err(ApiError::Unauthorized)
        ));
    }
}
