//! The budget gate: every paid call reserves its worst-case cost against its caller's budget
//! scopes (key, team, global; day and month) before it is made, and settles with the real
//! usage afterwards. It implements [`CallGate`], which every upstream attempt goes through
//! (first try, retry, fallback, streamed or not), so no paid path can skip it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use policies::{NanoUsd, Policies};

use crate::storage::{ScopeLimit, Storage, StorageError};
use crate::upstream::{CallGate, GateRefusal, PaidCall, RemoteUsage, Reservation};

/// Output tokens assumed when a request sets no `max_tokens`.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4096;

/// Reserves and settles paid calls in [`Storage`].
pub struct BudgetGate {
    storage: Storage,
    policies: Policies,
    /// The caller of each request in flight (team, key id), registered once it is known.
    accounts: Mutex<HashMap<String, (String, String)>>,
    /// Granted reservations: gate id → (storage reservation id, remote name).
    held: Mutex<HashMap<u64, (String, String)>>,
    next: AtomicU64,
}

impl BudgetGate {
    pub fn new(storage: Storage, policies: Policies) -> Self {
        Self {
            storage,
            policies,
            accounts: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            // 0 is `Reservation::default()`, the open gate's "nothing held".
            next: AtomicU64::new(1),
        }
    }

    /// The store reservations and spend are kept in.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Charges the paid calls of `request_id` to this team and key from now on.
    pub fn open(&self, request_id: &str, team: &str, key_id: &str) {
        if let Ok(mut accounts) = self.accounts.lock() {
            accounts.insert(
                request_id.to_string(),
                (team.to_string(), key_id.to_string()),
            );
        }
    }

    /// Forgets the caller of a finished request (its calls were reserved already).
    pub fn close(&self, request_id: &str) {
        if let Ok(mut accounts) = self.accounts.lock() {
            accounts.remove(request_id);
        }
    }

    /// Worst-case cost of a call. Input tokens are over-estimated by the request body's byte
    /// count (every token of every tokenizer covers at least one byte), output tokens by
    /// `max_tokens`, so a reservation never undercounts.
    fn estimate(&self, call: &PaidCall<'_>) -> NanoUsd {
        let Some(price) = self.policies.price(call.upstream) else {
            return NanoUsd::ZERO;
        };
        let input = serde_json::to_vec(&call.request.body).map_or(0, |b| b.len() as u64);
        let output = call
            .request
            .max_tokens
            .map_or(DEFAULT_MAX_OUTPUT_TOKENS, |n| n as u64);
        price.cost(input, output)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[async_trait]
impl CallGate for BudgetGate {
    async fn reserve(&self, call: &PaidCall<'_>) -> Result<Reservation, GateRefusal> {
        let now = now_ms();
        let account = self
            .accounts
            .lock()
            .ok()
            .and_then(|a| a.get(call.request_id).cloned());
        // An anonymous request (no teams) is charged to the global scopes only.
        let (team, key_id) = account.unwrap_or_default();
        let scopes: Vec<ScopeLimit> = self
            .policies
            .scopes_for(&team, &key_id, now / 1000)
            .into_iter()
            .map(|(scope, limit)| ScopeLimit {
                scope: scope.storage_key(),
                limit_nanos: limit.0,
            })
            .collect();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if scopes.is_empty() {
            // No budget applies (no teams, no global limit): nothing to hold, and no
            // database write on the request path.
            return Ok(Reservation(id));
        }
        let amount = self.estimate(call);
        let reservation = self
            .storage
            .reserve(call.request_id, &scopes, amount.0, now)
            .await
            .map_err(|e| match e {
                StorageError::BudgetExhausted { scope } => {
                    GateRefusal(format!("budget exhausted: {scope}"))
                }
                // Fail closed: a paid call without a reservation could overspend.
                other => GateRefusal(format!("budget store unavailable: {other}")),
            })?;
        if let Ok(mut held) = self.held.lock() {
            held.insert(id, (reservation.id, call.upstream.to_string()));
        }
        Ok(Reservation(id))
    }

    async fn settle(&self, reservation: Reservation, usage: Option<RemoteUsage>) {
        let Some((id, upstream)) = self
            .held
            .lock()
            .ok()
            .and_then(|mut h| h.remove(&reservation.0))
        else {
            return;
        };
        let result = match usage {
            Some(u) => {
                let cost = self.policies.price(&upstream).map_or(NanoUsd::ZERO, |p| {
                    p.cost(u.prompt_tokens, u.completion_tokens)
                });
                self.storage.settle(&id, cost.0).await
            }
            // A failed attempt (or one that reported no usage) gives its hold back.
            None => self.storage.release(&id).await,
        };
        if let Err(e) = result {
            // The reservation then expires after the TTL, releasing its hold.
            tracing::warn!(reservation = %id, error = %e, "cannot settle a reservation");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use policies::team::hash_api_key;
    use policies::PoliciesConfig;
    use serde_json::json;

    use super::*;
    use crate::openai::{parse_request, Endpoint};
    use crate::storage::{connect, StorageConfig};

    #[tokio::test]
    async fn calls_reserve_until_the_team_budget_is_full_and_settle_the_real_cost() {
        let config: PoliciesConfig = serde_json::from_value(json!({
            "prices": {"big": {"input_usd_per_million": 1000.0, "output_usd_per_million": 1000.0}},
            "teams": [{"name": "alpha", "api_key_hashes": [hash_api_key("k")],
                       "policy": {"threshold": -1.0, "remotes": ["big"], "daily_budget_usd": 1.0}}],
        }))
        .unwrap();
        let policies = Policies::try_from(config).unwrap();
        let storage = connect(&StorageConfig {
            url: "sqlite::memory:".into(),
            max_connections: 1,
            reservation_ttl_secs: 60,
        })
        .await
        .unwrap();
        let gate = BudgetGate::new(storage.clone(), policies.clone());
        let key_id = policies.authenticate("k").unwrap().key_id.to_string();
        let request = parse_request(
            Endpoint::Chat,
            br#"{"model":"big","messages":[{"role":"user","content":"hi"}],"max_tokens":100}"#,
        )
        .unwrap();
        let mut granted = Vec::new();
        for i in 0..10 {
            let id = format!("r{i}");
            gate.open(&id, "alpha", &key_id);
            let call = PaidCall {
                request_id: &id,
                upstream: "big",
                model: "m",
                request: &request,
                attempt: 0,
            };
            match gate.reserve(&call).await {
                Ok(r) => granted.push(r),
                Err(refusal) => assert!(refusal.0.contains("budget exhausted"), "{}", refusal.0),
            }
        }
        // Each call holds (body bytes + 100) tokens at $1000/M, about $0.18: only some fit in $1.
        assert!(
            !granted.is_empty() && granted.len() < 10,
            "{}",
            granted.len()
        );
        let n = granted.len() as u64;
        let usage = RemoteUsage {
            prompt_tokens: 10,
            completion_tokens: 10,
        };
        for r in granted {
            gate.settle(r, Some(usage)).await;
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
}
