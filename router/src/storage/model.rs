//! The values the storage API takes and returns, and the checked conversions between the
//! API's unsigned amounts and the databases' signed BIGINT columns.

use super::{EncodedSignals, StorageError};

/// A budget scope a request draws from, with the limit that applies to it now.
///
/// Scope names encode their period, e.g. `key:abc123:day:2026-11-28`,
/// `team:alpha:month:2026-11`, `global:day:2026-11-28`; a new period is simply a new scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeLimit {
    /// The scope's name.
    pub scope: String,
    /// The most this scope may spend plus hold in reservations, in nano-USD.
    pub limit_nanos: u64,
}

/// Money held against every scope of one request until it is settled, released or expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The id to pass to `settle` or `release`.
    pub id: String,
    /// How much was reserved against each scope, in nano-USD.
    pub amount_nanos: u64,
}

/// A scope's committed spend and outstanding reservations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScopeState {
    /// Settled spend, in nano-USD.
    pub spent_nanos: u64,
    /// Reserved but not yet settled, released or expired, in nano-USD.
    pub reserved_nanos: u64,
}

/// One request as the ledger keeps it (and, while the database is unavailable, as the spool
/// file keeps it: one JSON object per line).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LedgerRecord {
    /// The request id (also returned to the client as `x-request-id`).
    pub id: String,
    /// When the request arrived, in milliseconds since the Unix epoch.
    pub created_unix_ms: i64,
    /// The team the API key belongs to.
    pub team: Option<String>,
    /// The API key's id (never the secret).
    pub key_id: Option<String>,
    /// The experiment the request took part in.
    pub experiment: Option<String>,
    /// The experiment variant it was assigned to.
    pub variant: Option<String>,
    /// Where it was answered: `local`, `remote` or `rejected`.
    pub route: String,
    /// Why it was routed that way.
    pub reason: String,
    /// The confidence value the routing decision looked at (non-finite values are stored as none).
    pub confidence: Option<f64>,
    /// Which confidence aggregate produced `confidence` (e.g. `mean_logprob`), for calibration.
    pub confidence_aggregate: Option<String>,
    /// Tokens the local model processed (prompt and generated).
    pub local_tokens: u64,
    /// The paid model that answered, if any.
    pub remote_model: Option<String>,
    /// Input tokens billed by the remote model.
    pub remote_input_tokens: u64,
    /// Output tokens billed by the remote model.
    pub remote_output_tokens: u64,
    /// What the request cost, in nano-USD.
    pub cost_nanos: u64,
    /// End-to-end latency in milliseconds.
    pub latency_ms: u64,
    /// The HTTP status returned to the client.
    pub status: u16,
    /// The prompt, only when the team's policy turns storing it on.
    pub prompt_text: Option<String>,
    /// What the remote billed beyond the worst case reserved for the call, in nano-USD: 0
    /// unless an upstream produced more than the request allowed (docs/api.md). Spooled
    /// records written before the field existed read as 0.
    #[serde(default)]
    pub overrun_nanos: u64,
    /// The local answer's confidence signals, when the policy's `log_signals` keeps them
    /// (stored in `request_signals`, in the same transaction as the record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals: Option<EncodedSignals>,
}

/// Totals over a set of ledger records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageSummary {
    /// Number of requests.
    pub requests: u64,
    /// Requests answered by a remote model.
    pub escalated: u64,
    /// Total cost, in nano-USD.
    pub cost_nanos: u64,
    /// Tokens processed by the local model.
    pub local_tokens: u64,
    /// Input tokens billed by remote models.
    pub remote_input_tokens: u64,
    /// Output tokens billed by remote models.
    pub remote_output_tokens: u64,
}

/// One request of an experiment, raw, for per-variant statistics computed elsewhere.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantSample {
    /// The variant the request was assigned to.
    pub variant: String,
    /// Where it was answered: `local`, `remote` or `rejected`.
    pub route: String,
    /// What it cost, in nano-USD.
    pub cost_nanos: u64,
    /// End-to-end latency in milliseconds.
    pub latency_ms: u64,
    /// The client's feedback score in [0, 1], if any was given.
    pub feedback: Option<f64>,
    /// The HTTP status returned to the client.
    pub status: u16,
}

/// A request that carried a confidence value, for calibrating thresholds on real traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalRecord {
    /// The request id.
    pub id: String,
    /// When the request arrived, in milliseconds since the Unix epoch.
    pub created_unix_ms: i64,
    /// The team the API key belongs to.
    pub team: Option<String>,
    /// The experiment variant it was assigned to.
    pub variant: Option<String>,
    /// Where it was answered: `local`, `remote` or `rejected`.
    pub route: String,
    /// The confidence value the routing decision looked at.
    pub confidence: f64,
    /// Which confidence aggregate produced it.
    pub confidence_aggregate: Option<String>,
    /// The client's feedback score in [0, 1], if any was given.
    pub feedback: Option<f64>,
    /// The HTTP status returned to the client.
    pub status: u16,
    /// The local answer's confidence signals, when they were kept.
    pub signals: Option<EncodedSignals>,
}

/// Converts an API amount to a BIGINT column value, refusing what BIGINT cannot hold.
pub(crate) fn to_db(value: u64, what: &str) -> Result<i64, StorageError> {
    i64::try_from(value)
        .map_err(|_| StorageError::InvalidInput(format!("{what} = {value} exceeds i64::MAX")))
}

/// Converts a BIGINT column value back to an API amount; a negative value means corruption.
pub(crate) fn from_db(value: i64, what: &str) -> Result<u64, StorageError> {
    u64::try_from(value).map_err(|_| StorageError::Corrupt(format!("{what} = {value} is negative")))
}

/// Converts a stored HTTP status back to `u16`.
pub(crate) fn status_from_db(value: i32) -> Result<u16, StorageError> {
    u16::try_from(value)
        .map_err(|_| StorageError::Corrupt(format!("status = {value} is not a u16")))
}

/// SQLite cannot store NaN (it becomes NULL) and infinities mean "no usable signal", so both
/// backends store non-finite confidences as NULL to behave the same.
pub(crate) fn finite(value: Option<f64>) -> Option<f64> {
    value.filter(|v| v.is_finite())
}

/// Where a reservation is in its life; stored as text in `reservations.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReservationState {
    /// Counted in the scopes' `reserved_nanos`.
    Held,
    /// Its real cost was added to the scopes' `spent_nanos`.
    Settled,
    /// Given back by the caller without spend.
    Released,
    /// Given back because it outlived the TTL.
    Expired,
}

impl ReservationState {
    /// The value stored in the `state` column.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Settled => "settled",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }

    /// Reads the `state` column back.
    pub(crate) fn parse(value: &str) -> Result<Self, StorageError> {
        match value {
            "held" => Ok(Self::Held),
            "settled" => Ok(Self::Settled),
            "released" => Ok(Self::Released),
            "expired" => Ok(Self::Expired),
            other => Err(StorageError::Corrupt(format!(
                "reservation state `{other}`"
            ))),
        }
    }
}

/// A scope as `reserve` processes it: limit converted, position in the caller's list kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PlannedScope {
    /// The scope's name.
    pub(crate) scope: String,
    /// The limit as a BIGINT.
    pub(crate) limit: i64,
    /// Where the caller listed it, so an overflow is reported as the caller would expect.
    pub(crate) caller_index: usize,
}

/// Sorts scopes into the one global order in which every transaction locks scope rows (byte
/// order of the name, which no database collation can change), so concurrent reservations and
/// settlements never deadlock. A scope listed twice keeps its smaller limit.
pub(crate) fn lock_order(scopes: &[ScopeLimit]) -> Result<Vec<PlannedScope>, StorageError> {
    let mut planned: Vec<PlannedScope> = Vec::with_capacity(scopes.len());
    for (caller_index, s) in scopes.iter().enumerate() {
        let limit = to_db(s.limit_nanos, "limit_nanos")?;
        match planned.iter_mut().find(|p| p.scope == s.scope) {
            Some(existing) => existing.limit = existing.limit.min(limit),
            None => planned.push(PlannedScope {
                scope: s.scope.clone(),
                limit,
                caller_index,
            }),
        }
    }
    planned.sort_by(|a, b| a.scope.cmp(&b.scope));
    Ok(planned)
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn lock_order_sorts_by_name_and_keeps_the_smaller_limit_of_a_repeated_scope() {
        let scopes = [
            ScopeLimit {
                scope: "team:a".into(),
                limit_nanos: 10,
            },
            ScopeLimit {
                scope: "global".into(),
                limit_nanos: 30,
            },
            ScopeLimit {
                scope: "team:a".into(),
                limit_nanos: 5,
            },
        ];
        let planned = lock_order(&scopes);
        assert!(matches!(
            planned.as_deref(),
            Ok([
                PlannedScope { scope: g, limit: 30, caller_index: 1 },
                PlannedScope { scope: t, limit: 5, caller_index: 0 },
            ]) if g == "global" && t == "team:a"
        ));
    }

    #[test]
    fn amounts_above_i64_max_are_rejected_rather_than_wrapped() {
        assert!(matches!(
            to_db(u64::MAX, "x"),
            Err(StorageError::InvalidInput(_))
        ));
        assert!(matches!(to_db(i64::MAX as u64, "x"), Ok(i64::MAX)));
        assert!(matches!(from_db(-1, "x"), Err(StorageError::Corrupt(_))));
    }

    #[test]
    fn reservation_states_round_trip_through_their_column_value() {
        for state in [
            ReservationState::Held,
            ReservationState::Settled,
            ReservationState::Released,
            ReservationState::Expired,
        ] {
            assert!(matches!(ReservationState::parse(state.as_str()), Ok(s) if s == state));
        }
    }
}
