//! Pure routing, pricing, budget and experiment logic for Cascade: no I/O, no async, no clock.
//!
//! Every function here is deterministic in its arguments (time is passed in as Unix seconds), so
//! the gateway and the storage layer can share one definition of "what should happen" and tests
//! can pin it down without a model or a network.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod budget;
pub mod calibrated;
pub mod confidence;
pub mod config;
pub mod decision;
pub mod error;
pub mod experiment;
pub mod isotonic;
pub mod learned;
pub mod money;
pub mod policy;
pub mod probe;
pub mod team;

pub use budget::{BudgetState, Limits, Scope, ScopeKind, Tz, Window};
pub use calibrated::{CalibratedRule, CalibratedRuleError};
pub use confidence::{Aggregate, AggregateError, TokenSignal};
pub use config::{GlobalBudgetConfig, Policies, PoliciesConfig};
pub use decision::{
    Addressed, BudgetDecision, BudgetView, LocalLoad, LocalOutcome, PreRoute, Reason, Refusal,
    RemoteCandidate, RemoteFailureDecision, RequestFeatures, Route,
};
pub use error::PolicyError;
pub use experiment::{Experiment, ExperimentConfig, Subject, Variant, VariantConfig};
pub use isotonic::{IsotonicError, IsotonicMap};
pub use learned::{Feature, LearnedRule, LearnedRuleError};
pub use money::{MoneyError, NanoUsd, PriceConfig, PriceTable};
pub use policy::{
    ExhaustedAction, OverloadAction, Policy, PolicyConfig, PolicyOverride, RemoteFailureAction,
    SignalLog,
};
pub use probe::{HiddenInput, HiddenState, ProbeRule, ProbeRuleError};
pub use team::{KeyDirectory, KeyMatch, KeySettings, Team, TeamConfig};
