//! What every handler shares: the cascade, the live policies, the ledger and budget store,
//! the metrics and limits; and applying a reloaded configuration to them.

use std::sync::Arc;

use crate::budget::BudgetGate;
use crate::cascade::Gateway;
use crate::config::Config;
use crate::ledger::Ledger;
use crate::limits::RequestLimits;
use crate::metrics::Metrics;
use crate::reload::SharedPolicies;
use crate::storage::Storage;
use crate::upstream::CallGate;

/// State shared by every handler.
pub struct AppState {
    pub gateway: Gateway,
    /// Teams, keys, prices, budgets and experiments; replaced on reload.
    pub policies: SharedPolicies,
    /// The budget gate every paid call goes through, when the server keeps budgets.
    pub budget: Option<Arc<BudgetGate>>,
    /// The ledger and budget store, when the server keeps one.
    pub storage: Option<Storage>,
    /// Writes one record per request, when the server keeps a ledger.
    pub ledger: Option<Arc<Ledger>>,
    /// Hex SHA-256 of the admin key; the admin API is off without one.
    pub admin_key_hash: Option<String>,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: usize,
    /// The remotes the gateway runs with; a reload may not change them.
    remotes: Vec<crate::config::RemoteConfig>,
    /// Hard limits on one request.
    pub limits: RequestLimits,
}

/// Why the handlers' state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A remote's key is missing from the environment.
    #[error(transparent)]
    Secrets(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
}

impl AppState {
    /// Builds the state from a validated configuration; `policies` is the handle the call
    /// gate reads too, so that a reload reaches both.
    pub fn new(
        config: &Config,
        policies: SharedPolicies,
        gate: Arc<dyn CallGate>,
    ) -> Result<Self, StateError> {
        // Remotes are called from here on: their keys must be at hand.
        config.check_secrets()?;
        let metrics = Arc::new(Metrics::new()?);
        let gateway = Gateway::new(config, Arc::clone(&policies), gate, Arc::clone(&metrics))?;
        Ok(Self {
            gateway,
            policies,
            budget: None,
            storage: None,
            ledger: None,
            admin_key_hash: config.admin.api_key_hash.clone(),
            metrics,
            max_body_bytes: config.server.max_body_bytes,
            remotes: config.remotes.clone(),
            limits: config.limits.clone(),
        })
    }

    /// Applies the policy and price sections of a new, already validated configuration:
    /// `[policy]`, `timezone`, `[prices.*]`, `[local_price]`, `[global]`, `[[teams]]`,
    /// `[[experiments]]` (and the learned rules they name). Requests in flight finish under
    /// the policy they started with. Refused, with nothing changed, when `[[remotes]]`
    /// differ from the running ones (those need a restart); other sections are not
    /// reloaded.
    pub fn reload(&self, config: &Config) -> Result<(), ReloadError> {
        if config.remotes != self.remotes {
            return Err(ReloadError::RemotesChanged);
        }
        self.policies.store(config.policies.clone());
        self.gateway.reload(config);
        Ok(())
    }
}

/// Why a reload was refused; the running configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "[[remotes]] changed: restart the gateway to apply remote changes (nothing was reloaded)"
    )]
    RemotesChanged,
}
