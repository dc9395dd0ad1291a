//! The budget gate: every paid call reserves its worst-case cost against its caller's budget
//! scopes (key, team, global; day and month) before it is made, and settles with the real
//! usage afterwards. It implements [`CallGate`], which every upstream attempt goes through
//! (first try, retry, fallback, streamed or not), so no paid path can skip it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use policies::{NanoUsd, Policies};

use crate::clock::now_unix_ms as now_ms;
use crate::reload::SharedPolicies;
use crate::storage::{ScopeLimit, Storage, StorageError};
use crate::upstream::{CallGate, GateRefusal, PaidCall, Reservation, Settlement};

use crate::openai::DEFAULT_MAX_OUTPUT_TOKENS;

/// Reserves and settles paid calls in [`Storage`].
pub struct BudgetGate {
    storage: Storage,
    policies: SharedPolicies,
    /// Granted reservations: gate id → (storage reservation id, remote name).
    held: Mutex<HashMap<u64, (String, String)>>,
    next: AtomicU64,
}

impl BudgetGate {
    pub fn new(storage: Storage, policies: SharedPolicies) -> Self {
        Self {
            storage,
            policies,
            held: Mutex::new(HashMap::new()),
            // 0 is `Reservation::default()`, the open gate's "nothing held".
            next: AtomicU64::new(1),
        }
    }

    /// The store reservations and spend are kept in.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Reservations granted and not yet settled (settling runs in its own task after a
    /// call); shutdown waits for this to reach zero.
    pub fn outstanding(&self) -> usize {
        self.held.lock().map_or(0, |h| h.len())
    }

    /// Worst-case cost of a call: the estimated input tokens and `max_tokens` of output.
    fn estimate(&self, call: &PaidCall<'_>) -> NanoUsd {
        estimate_cost(
            &self.policies.load(),
            call.upstream,
            call.input_tokens,
            call.request,
        )
    }
}

/// The worst-case cost of a call to `upstream`: `input_tokens` in, and out the most output
/// the upstream may produce for the request: its `max_tokens` (or
/// [`DEFAULT_MAX_OUTPUT_TOKENS`], which the gateway then sets on the upstream request) for
/// each of the choices it asks for ([`CompletionRequest::output_sequences`]: `n`, `best_of`,
/// every prompt of a multi-prompt completion). Start-up refuses a remote without a price
/// that a budget or a per-request cap could apply to, so the zero of an unpriced remote
/// never meets a limit.
///
/// [`CompletionRequest::output_sequences`]: crate::openai::CompletionRequest::output_sequences
pub fn estimate_cost(
    policies: &Policies,
    upstream: &str,
    input_tokens: u64,
    request: &crate::openai::CompletionRequest,
) -> NanoUsd {
    policies.remote_cost(upstream, input_tokens, max_output_tokens(request))
}

/// The most output tokens an upstream may bill for `request`: `max_tokens` (or
/// [`DEFAULT_MAX_OUTPUT_TOKENS`]) for every sequence it generates.
pub fn max_output_tokens(request: &crate::openai::CompletionRequest) -> u64 {
    let per_sequence = request
        .max_tokens
        .map_or(DEFAULT_MAX_OUTPUT_TOKENS, |n| n as u64);
    per_sequence.saturating_mul(request.output_sequences())
}

/// Input tokens to reserve for a request. The remote's tokenizer is not ours: the local
/// count of the prompt gets a 25% margin plus 16 tokens of chat-template overhead, plus one
/// token per byte of what goes upstream besides the messages (`schema_bytes`: tools,
/// functions, response format schemas), and is never more than the request body's byte
/// count, which no byte-level tokenizer exceeds (every token covers at least one byte; JSON
/// syntax outweighs template tokens). Without a local count (a prompt the local model never
/// saw) the byte count is used.
pub fn input_token_estimate(counted: Option<usize>, schema_bytes: usize, body_bytes: usize) -> u64 {
    let bytes = body_bytes as u64;
    match counted {
        Some(n) if n > 0 => (n as u64)
            .saturating_mul(5)
            .div_ceil(4)
            .saturating_add(16)
            .saturating_add(schema_bytes as u64)
            .min(bytes),
        _ => bytes,
    }
}

#[async_trait]
impl CallGate for BudgetGate {
    async fn reserve(&self, call: &PaidCall<'_>) -> Result<Reservation, GateRefusal> {
        let now = now_ms();
        // An anonymous request (no teams) is charged to the global scopes only.
        let scopes: Vec<ScopeLimit> = self
            .policies
            .load()
            .scopes_for(call.team, call.key_id, now / 1000)
            .into_iter()
            .map(|(scope, limit)| ScopeLimit {
                scope: scope.storage_key(),
                limit_nanos: limit.0,
            })
            .collect();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let amount = self.estimate(call);
        // The per-request cap is checked here, where every attempt at every remote passes,
        // not only where the route is decided.
        if let Some(cap) = call.max_cost.filter(|cap| amount > *cap) {
            return Err(GateRefusal::OverRequestCap {
                estimate: amount,
                cap,
            });
        }
        if scopes.is_empty() {
            // No budget applies (no teams, no global limit): nothing to hold, and no
            // database write on the request path.
            return Ok(Reservation(id));
        }
        let reservation = self
            .storage
            .reserve(call.request_id, &scopes, amount.0, now)
            .await
            .map_err(|e| match e {
                StorageError::BudgetExhausted { scope } => GateRefusal::BudgetExhausted(scope),
                // Fail closed: a paid call without a reservation could overspend.
                other => GateRefusal::Unavailable(other.to_string()),
            })?;
        if let Ok(mut held) = self.held.lock() {
            held.insert(id, (reservation.id, call.upstream.to_string()));
        }
        Ok(Reservation(id))
    }

    async fn settle(&self, reservation: Reservation, settlement: Settlement) {
        // Looked up, not removed: the entry stays until the write below is done, so that
        // `outstanding` (what shutdown waits for) still counts a settlement in progress.
        let Some((id, upstream)) = self
            .held
            .lock()
            .ok()
            .and_then(|h| h.get(&reservation.0).cloned())
        else {
            return;
        };
        let result = match settlement {
            Settlement::Used(u) => {
                let cost = self.policies.load().remote_cost(
                    &upstream,
                    u.prompt_tokens,
                    u.completion_tokens,
                );
                self.storage.settle(&id, cost.0).await
            }
            // A failed attempt gives its hold back.
            Settlement::Failed => self.storage.release(&id).await,
        };
        if let Err(e) = result {
            // The reservation then expires after the TTL, releasing its hold.
            tracing::warn!(reservation = %id, error = %e, "cannot settle a reservation");
        }
        if let Ok(mut held) = self.held.lock() {
            held.remove(&reservation.0);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use policies::team::hash_api_key;
    use policies::PoliciesConfig;
    use serde_json::json;

    use super::*;
    use crate::openai::{parse_request, Endpoint};

    /// A gate over a private in-memory database, and that database.
    async fn gate_over_memory(policies: &Policies) -> (BudgetGate, Storage) {
        let storage = crate::storage::in_memory().await;
        let live = std::sync::Arc::new(crate::reload::Live::new(policies.clone()));
        (BudgetGate::new(storage.clone(), live), storage)
    }

    #[tokio::test]
    async fn calls_reserve_until_the_team_budget_is_full_and_settle_the_real_cost() {
        let config: PoliciesConfig = serde_json::from_value(json!({
            "prices": {"big": {"input_usd_per_million": 1000.0, "output_usd_per_million": 1000.0}},
            "teams": [{"name": "alpha", "api_key_hashes": [hash_api_key("k")],
                       "policy": {"threshold": -1.0, "remotes": ["big"], "daily_budget_usd": 1.0}}],
        }))
        .unwrap();
        let policies = Policies::try_from(config).unwrap();
        let (gate, storage) = gate_over_memory(&policies).await;
        let key_id = policies.authenticate("k").unwrap().key_id.to_string();
        let request = parse_request(
            Endpoint::Chat,
            br#"{"model":"big","messages":[{"role":"user","content":"hi"}],"max_tokens":100}"#,
        )
        .unwrap();
        let mut granted = Vec::new();
        for i in 0..10 {
            let id = format!("r{i}");
            let call = PaidCall {
                request_id: &id,
                team: "alpha",
                key_id: &key_id,
                upstream: "big",
                model: "m",
                request: &request,
                input_tokens: 100,
                attempt: 0,
                max_cost: None,
            };
            match gate.reserve(&call).await {
                Ok(r) => granted.push(r),
                Err(refusal) => assert!(
                    matches!(refusal, GateRefusal::BudgetExhausted(_)),
                    "{refusal}"
                ),
            }
        }
        // Each call holds 100 input + 100 output tokens at $1000/M, $0.20: five fit in $1.
        assert_eq!(granted.len(), 5);
        let n = granted.len() as u64;
        let usage = crate::upstream::RemoteUsage {
            prompt_tokens: 10,
            completion_tokens: 10,
        };
        for r in granted {
            gate.settle(r, Settlement::Used(usage)).await;
        }
        let scope = policies
            .scopes_for("alpha", &key_id, now_ms() / 1000)
            .into_iter()
            .map(|(s, _)| s.storage_key())
            .find(|s| s.starts_with("team"))
            .unwrap();
        let state = storage.scope_state(&scope).await.unwrap();
        assert_eq!(state.reserved_nanos, 0);
        assert_eq!(state.spent_nanos, n * 20_000_000);
    }

    #[tokio::test]
    async fn the_gate_refuses_a_call_over_the_per_request_cap_on_any_remote_and_attempt() {
        let config: PoliciesConfig = serde_json::from_value(json!({
            "prices": {"big": {"input_usd_per_million": 1000.0, "output_usd_per_million": 1000.0}},
        }))
        .unwrap();
        let policies = Policies::try_from(config).unwrap();
        let (gate, _) = gate_over_memory(&policies).await;
        // 100 in + 8 × 100 out at $1000/M: $0.90 in the worst case, n counted.
        let request = parse_request(
            Endpoint::Chat,
            br#"{"model":"big","messages":[{"role":"user","content":"hi"}],"max_tokens":100,"n":8}"#,
        )
        .unwrap();
        let call = |attempt, cap: f64| PaidCall {
            request_id: "r",
            team: "",
            key_id: "",
            upstream: "big",
            model: "m",
            request: &request,
            input_tokens: 100,
            attempt,
            max_cost: Some(NanoUsd::from_usd(cap).unwrap()),
        };
        for attempt in [0, 2] {
            match gate.reserve(&call(attempt, 0.5)).await {
                Err(GateRefusal::OverRequestCap { estimate, .. }) => {
                    assert_eq!(estimate, NanoUsd::from_usd(0.9).unwrap());
                }
                other => panic!("{other:?}"),
            }
        }
        // No budget scope applies here: within the cap, nothing is held.
        assert!(gate.reserve(&call(0, 1.0)).await.is_ok());
    }

    #[test]
    fn input_estimates_add_a_margin_to_the_local_count_and_never_exceed_the_body() {
        assert_eq!(input_token_estimate(Some(100), 0, 10_000), 141);
        assert_eq!(input_token_estimate(Some(100), 0, 120), 120);
        assert_eq!(input_token_estimate(None, 0, 500), 500);
        assert_eq!(input_token_estimate(Some(0), 0, 500), 500);
        // Tool schemas are billed as input: their bytes are added to the prompt's count.
        assert_eq!(input_token_estimate(Some(100), 300, 10_000), 441);
    }
}
