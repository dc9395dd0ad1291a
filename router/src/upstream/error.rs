//! Why a remote call failed, and how each failure is classed (retryable, a failure of the
//! upstream for its breaker, a timeout for the status code).

use std::time::Duration;

use crate::upstream::gate::GateRefusal;

/// Why a remote call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("{upstream}: timed out")]
    Timeout { upstream: String },
    #[error("{upstream}: cannot connect: {detail}")]
    Connect { upstream: String, detail: String },
    #[error("{upstream}: connection failed: {detail}")]
    Network { upstream: String, detail: String },
    #[error("{upstream}: HTTP {status}: {detail}")]
    Status {
        upstream: String,
        status: u16,
        detail: String,
    },
    #[error("{upstream}: malformed response: {detail}")]
    Malformed { upstream: String, detail: String },
    #[error("{upstream}: the response is larger than the limit of {limit} bytes")]
    TooLarge { upstream: String, limit: usize },
    #[error("{upstream}: circuit open after repeated failures; not called")]
    CircuitOpen {
        upstream: String,
        /// Until the breaker lets a probe through.
        retry_in: Duration,
    },
    #[error("{upstream}: call refused: {refusal}")]
    Refused {
        upstream: String,
        refusal: GateRefusal,
    },
    #[error("no remote model is configured")]
    NoRemote,
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl UpstreamError {
    /// The remote timed out (504 rather than 502).
    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::Timeout { .. })
    }

    /// The budget gate refused the call because a budget is full.
    pub fn is_budget_exhausted(&self) -> bool {
        matches!(
            self,
            UpstreamError::Refused {
                refusal: GateRefusal::BudgetExhausted(_) | GateRefusal::OverRequestCap { .. },
                ..
            }
        )
    }

    /// Worth another try at the same upstream: transient by nature.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Connect { .. } => true,
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// Says something about the upstream's health, for its circuit breaker: an answer that
    /// is a client error (400, 401, …) came from a working upstream, and a refused or
    /// skipped call never reached it.
    pub(crate) fn is_upstream_failure(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::Timeout { .. }
            | UpstreamError::Connect { .. }
            | UpstreamError::Network { .. }
            | UpstreamError::Malformed { .. }
            | UpstreamError::TooLarge { .. } => true,
            UpstreamError::Refused { .. }
            | UpstreamError::CircuitOpen { .. }
            | UpstreamError::NoRemote
            | UpstreamError::Client(_) => false,
        }
    }

    /// Metric label and, in stream error events, the error's code.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Network { .. } => "network",
            UpstreamError::Status { status: 429, .. } => "status_429",
            UpstreamError::Status { status, .. } if *status >= 500 => "status_5xx",
            UpstreamError::Status { .. } => "status_4xx",
            UpstreamError::Malformed { .. } => "malformed",
            UpstreamError::TooLarge { .. } => "too_large",
            UpstreamError::CircuitOpen { .. } => "circuit_open",
            UpstreamError::Refused { .. } => "refused",
            UpstreamError::NoRemote | UpstreamError::Client(_) => "config",
        }
    }
}
