//! The contract between a paid call and the budget: before every attempt at a remote the
//! gate is asked to reserve the call's worst case for its payer ([`CallGate::reserve`]),
//! and told what the call cost once it is over ([`CallGate::settle`]). `crate::budget`
//! implements it over storage; [`OpenGate`] allows everything and records nothing.

use async_trait::async_trait;
use serde::Deserialize;

use crate::openai::CompletionRequest;
use policies::NanoUsd;

/// Token counts a remote reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct RemoteUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// Who pays for a request's remote calls, and the most one call may cost: carried with every
/// call to the budget gate (no lookup on the side).
#[derive(Debug, Clone, Copy)]
pub struct Payer<'a> {
    pub request_id: &'a str,
    /// The caller's team; empty for a gateway without teams (global scopes only).
    pub team: &'a str,
    /// The caller's key id; empty without teams.
    pub key_id: &'a str,
    /// The policy's `max_cost_per_request_usd`: a call whose worst-case cost exceeds it is
    /// refused, whichever remote of the chain and whichever attempt it is.
    pub max_cost: Option<NanoUsd>,
}

/// A paid call about to be made.
#[derive(Debug)]
pub struct PaidCall<'a> {
    pub request_id: &'a str,
    /// The caller's team and key id (empty without teams), for its budget scopes.
    pub team: &'a str,
    pub key_id: &'a str,
    /// The configured remote's name.
    pub upstream: &'a str,
    /// The model name sent upstream.
    pub model: &'a str,
    /// The request as it goes upstream (for a conservative cost estimate).
    pub request: &'a CompletionRequest,
    /// Estimated input tokens: what is reserved for the prompt, and what is charged for it
    /// when the remote reports no usage.
    pub input_tokens: u64,
    /// 0 for the first try at this upstream.
    pub attempt: u32,
    /// The policy's `max_cost_per_request_usd`: a call whose worst-case cost exceeds it is
    /// refused, whichever remote of the chain and whichever attempt it is.
    pub max_cost: Option<NanoUsd>,
}

/// A granted call, to be settled exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reservation(pub u64);

/// Why the gate refused a call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GateRefusal {
    /// A budget scope cannot hold the call's estimated cost.
    #[error("budget exhausted: {0}")]
    BudgetExhausted(String),
    /// The call's worst-case cost exceeds the policy's `max_cost_per_request_usd`.
    #[error("worst-case cost {estimate} exceeds max_cost_per_request {cap}")]
    OverRequestCap { estimate: NanoUsd, cap: NanoUsd },
    /// The budget store could not be asked; the gate fails closed.
    #[error("budget store unavailable: {0}")]
    Unavailable(String),
}

/// What a granted call turned out to cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The remote produced nothing billable (the attempt failed before an answer).
    Failed,
    /// The tokens to charge: the remote's reported usage, or the gateway's count when it
    /// reported none.
    Used(RemoteUsage),
}

/// Hook around every paid call: the place for budget reservation and
/// settlement. `reserve` runs before each attempt; `settle` runs exactly once
/// per granted reservation with what the call used.
#[async_trait]
pub trait CallGate: Send + Sync {
    async fn reserve(&self, call: &PaidCall<'_>) -> Result<Reservation, GateRefusal>;
    async fn settle(&self, reservation: Reservation, settlement: Settlement);
}

/// A gate that allows every call and records nothing (a gateway without storage, tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct OpenGate;

#[async_trait]
impl CallGate for OpenGate {
    async fn reserve(&self, _call: &PaidCall<'_>) -> Result<Reservation, GateRefusal> {
        Ok(Reservation::default())
    }
    async fn settle(&self, _reservation: Reservation, _settlement: Settlement) {}
}
