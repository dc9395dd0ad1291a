//! The routing decision, as pure functions of request facts, local signals, policy and budget.
//!
//! The gateway calls them in request order:
//! 1. [`pre_route`] before running the local model;
//! 2. [`post_local`] after it (only for [`PreRoute::Local`]);
//! 3. [`on_budget`] before any paid call, first try or fallback alike;
//! 4. [`on_remote_failure`] when every remote attempt failed.
//!
//! Every outcome carries a [`Reason`] whose `as_str()` goes into `x-cascade-reason`, metrics
//! and the ledger.

use serde::{Deserialize, Serialize};

use crate::confidence::TokenSignal;
use crate::money::NanoUsd;
use crate::policy::{ExhaustedAction, OverloadAction, Policy, RemoteFailureAction};

/// Why a request went where it went; stable snake_case names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Local score reached the threshold.
    Confident,
    /// Local score stayed below the threshold (or was NaN).
    LowConfidence,
    /// Generation stopped early because the threshold had become unreachable.
    EarlyExit,
    /// The local model ran past the policy's time cap.
    LocalTimeout,
    /// The request has image input, which the local model cannot read.
    ImageInput,
    /// The request offers tools, which the local model does not call.
    Tools,
    /// Prompt plus output does not fit the local context window.
    ContextTooLong,
    /// JSON mode was asked and the local output is not valid JSON.
    InvalidJson,
    /// The client chose the route with `x-cascade-route`.
    RouteHeader,
    /// The policy never calls remote models.
    LocalOnly,
    /// The policy never runs the local model.
    RemoteOnly,
    /// The local queue is full.
    Overloaded,
    /// The budget cannot cover the remote call.
    BudgetExhausted,
    /// The budget could not cover the preferred remote; a cheaper one is used.
    BudgetFallback,
    /// Every remote attempt failed.
    RemoteUnavailable,
    /// The client named a remote model directly.
    DirectModel,
    /// The client named a remote model directly, which the policy does not allow.
    DirectModelNotAllowed,
    /// The local model produced no tokens.
    NoTokens,
}

impl Reason {
    /// Every reason, for pre-registering metric labels.
    pub const ALL: [Self; 18] = [
        Self::Confident,
        Self::LowConfidence,
        Self::EarlyExit,
        Self::LocalTimeout,
        Self::ImageInput,
        Self::Tools,
        Self::ContextTooLong,
        Self::InvalidJson,
        Self::RouteHeader,
        Self::LocalOnly,
        Self::RemoteOnly,
        Self::Overloaded,
        Self::BudgetExhausted,
        Self::BudgetFallback,
        Self::RemoteUnavailable,
        Self::DirectModel,
        Self::DirectModelNotAllowed,
        Self::NoTokens,
    ];

    /// Stable snake_case name for headers, metrics and the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Confident => "confident",
            Self::LowConfidence => "low_confidence",
            Self::EarlyExit => "early_exit",
            Self::LocalTimeout => "local_timeout",
            Self::ImageInput => "image_input",
            Self::Tools => "tools",
            Self::ContextTooLong => "context_too_long",
            Self::InvalidJson => "invalid_json",
            Self::RouteHeader => "route_header",
            Self::LocalOnly => "local_only",
            Self::RemoteOnly => "remote_only",
            Self::Overloaded => "overloaded",
            Self::BudgetExhausted => "budget_exhausted",
            Self::BudgetFallback => "budget_fallback",
            Self::RemoteUnavailable => "remote_unavailable",
            Self::DirectModel => "direct_model",
            Self::DirectModelNotAllowed => "direct_model_not_allowed",
            Self::NoTokens => "no_tokens",
        }
    }

    /// A sentence for error bodies when a request is refused for this reason.
    pub fn message(self) -> &'static str {
        match self {
            Self::ImageInput => "the local model cannot read image input",
            Self::Tools => "the local model does not support tool calls",
            Self::ContextTooLong => {
                "prompt plus max_tokens exceeds the local model's context window"
            }
            Self::Overloaded => "the local model is overloaded; try again shortly",
            Self::BudgetExhausted => "the budget for this key or team is exhausted",
            Self::DirectModelNotAllowed => "this key may not name a remote model directly",
            Self::RemoteUnavailable => "the remote model is unavailable",
            Self::LocalOnly => "this policy serves only the local model",
            Self::RemoteOnly => "this policy serves only remote models",
            Self::RouteHeader => "the route was chosen by x-cascade-route",
            Self::Confident => "the local answer was confident",
            Self::LowConfidence => "the local answer was not confident enough",
            Self::EarlyExit => "the local answer could no longer become confident enough",
            Self::LocalTimeout => "the local model ran past its time cap",
            Self::InvalidJson => "the local answer was not valid JSON",
            Self::BudgetFallback => "a cheaper remote model was used to stay within budget",
            Self::DirectModel => "the client named a remote model",
            Self::NoTokens => "the local model produced no output",
        }
    }
}

/// A client's per-request route choice from `x-cascade-route`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteOverride {
    /// Serve from the local model, never escalate.
    Local,
    /// Skip the local model.
    Remote,
}

impl RouteOverride {
    /// Parses a header value (`local` or `remote`, any case, surrounding spaces ignored).
    pub fn parse(value: &str) -> Option<Self> {
        let v = value.trim();
        if v.eq_ignore_ascii_case("local") {
            Some(Self::Local)
        } else if v.eq_ignore_ascii_case("remote") {
            Some(Self::Remote)
        } else {
            None
        }
    }
}

/// What the gateway knows about a request before running any model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// Any message has image content.
    pub has_images: bool,
    /// The request offers tools.
    pub has_tools: bool,
    /// `response_format` asks for JSON.
    pub json_mode: bool,
    /// Prompt length in local-model tokens (after the chat template).
    pub prompt_tokens: u64,
    /// Most tokens the local model would generate (the request's `max_tokens`, or the
    /// gateway's local default).
    pub max_output_tokens: u64,
    /// The local model's context window; prompt plus output must fit in it.
    pub context_window: u64,
    /// Parsed `x-cascade-route`, if sent.
    pub route_header: Option<RouteOverride>,
    /// The client named a remote model instead of the cascade.
    pub direct_model: bool,
}

/// Where a request goes before the local model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "route", rename_all = "snake_case")]
pub enum PreRoute {
    /// Run the local model (with early exit), then call [`post_local`].
    Local,
    /// Run the local model and serve its answer whatever its confidence: no early exit, no
    /// escalation (local_only policy, or `x-cascade-route: local`).
    LocalForced {
        /// `local_only` or `route_header`.
        reason: Reason,
    },
    /// Go to the remote model without running local (through [`on_budget`]).
    Remote {
        /// Why local was skipped.
        reason: Reason,
    },
    /// Refuse the request.
    Reject {
        /// The cause; see [`Reason::message`]. `overloaded` maps to 503, the rest to 400.
        reason: Reason,
    },
}

/// Whether the local model can take the request at all, and if not, why.
fn local_obstacle(facts: &RequestFacts) -> Option<Reason> {
    if facts.has_images {
        Some(Reason::ImageInput)
    } else if facts.has_tools {
        Some(Reason::Tools)
    } else if facts.prompt_tokens.saturating_add(facts.max_output_tokens) > facts.context_window {
        Some(Reason::ContextTooLong)
    } else {
        None
    }
}

/// Local without escalation: refused when the local model cannot take the request or its
/// queue is full, because the alternative would be a paid call nobody allowed.
fn forced_local(facts: &RequestFacts, overloaded: bool, reason: Reason) -> PreRoute {
    match (local_obstacle(facts), overloaded) {
        (Some(obstacle), _) => PreRoute::Reject { reason: obstacle },
        (None, true) => PreRoute::Reject {
            reason: Reason::Overloaded,
        },
        (None, false) => PreRoute::LocalForced { reason },
    }
}

/// Decides, before running the local model, whether to run it.
///
/// Precedence: a directly named model; local_only (which neither header nor overload can
/// turn into a paid call); remote_only; an allowed route header (ignored when not allowed);
/// what the local model cannot take; overload; otherwise local.
pub fn pre_route(facts: &RequestFacts, policy: &Policy, overloaded: bool) -> PreRoute {
    if facts.direct_model {
        return if policy.allow_direct_models() {
            PreRoute::Remote {
                reason: Reason::DirectModel,
            }
        } else {
            PreRoute::Reject {
                reason: Reason::DirectModelNotAllowed,
            }
        };
    }
    if policy.local_only() {
        return forced_local(facts, overloaded, Reason::LocalOnly);
    }
    if policy.remote_only() {
        return PreRoute::Remote {
            reason: Reason::RemoteOnly,
        };
    }
    let header = facts.route_header.filter(|_| policy.allow_route_header());
    match header {
        Some(RouteOverride::Remote) => {
            return PreRoute::Remote {
                reason: Reason::RouteHeader,
            }
        }
        Some(RouteOverride::Local) => {
            return forced_local(facts, overloaded, Reason::RouteHeader);
        }
        None => {}
    }
    if let Some(reason) = local_obstacle(facts) {
        return PreRoute::Remote { reason };
    }
    if overloaded {
        return match policy.on_overload() {
            OverloadAction::Escalate => PreRoute::Remote {
                reason: Reason::Overloaded,
            },
            OverloadAction::Reject => PreRoute::Reject {
                reason: Reason::Overloaded,
            },
        };
    }
    PreRoute::Local
}

/// What the local model produced.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LocalOutcome<'a> {
    /// Signals of every generated token.
    pub tokens: &'a [TokenSignal],
    /// Generation was stopped by early exit ([`Policy::should_stop_early`] returned true).
    pub finished_early: bool,
    /// Generation was stopped at the time cap.
    pub timed_out: bool,
    /// Whether the output parses as JSON; `None` when JSON mode was not asked.
    pub json_valid: Option<bool>,
    /// Wall time the local generation took, in milliseconds.
    pub elapsed_ms: u64,
}

/// Where a request goes after the local model ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "route", rename_all = "snake_case")]
pub enum Route {
    /// Serve the local answer.
    ServeLocal {
        /// `confident` or `local_only`.
        reason: Reason,
    },
    /// Call a remote model (through [`on_budget`]).
    Escalate {
        /// Why the local answer was not good enough.
        reason: Reason,
    },
}

/// The local answer's confidence score as the policy computes it (for
/// `x-cascade-confidence` and the ledger); `None` without tokens.
pub fn confidence(outcome: &LocalOutcome<'_>, policy: &Policy) -> Option<f64> {
    policy.aggregate().score(outcome.tokens)
}

/// Decides whether to serve the local answer or escalate.
///
/// Precedence of escalation reasons: time cap, early exit, no tokens, invalid JSON, low
/// confidence. A local_only policy always serves; a NaN score escalates.
pub fn post_local(outcome: &LocalOutcome<'_>, policy: &Policy) -> Route {
    if policy.local_only() {
        return Route::ServeLocal {
            reason: Reason::LocalOnly,
        };
    }
    if policy.remote_only() {
        return Route::Escalate {
            reason: Reason::RemoteOnly,
        };
    }
    let over_cap = policy
        .max_local_ms()
        .is_some_and(|cap| outcome.elapsed_ms > cap);
    let reason = if outcome.timed_out || over_cap {
        Reason::LocalTimeout
    } else if outcome.finished_early {
        Reason::EarlyExit
    } else if outcome.tokens.is_empty() {
        Reason::NoTokens
    } else if outcome.json_valid == Some(false) {
        Reason::InvalidJson
    } else {
        match (confidence(outcome, policy), policy.threshold()) {
            (Some(score), Some(threshold)) if score >= threshold => {
                return Route::ServeLocal {
                    reason: Reason::Confident,
                };
            }
            _ => Reason::LowConfidence,
        }
    };
    Route::Escalate { reason }
}

/// One remote model the gateway could call, with its estimate and whether it fits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteCandidate {
    /// Remote model name.
    pub remote: String,
    /// [`crate::budget::estimate_cost`] for this request on this model.
    pub estimated_cost: NanoUsd,
    /// Whether the estimate fits every budget scope (a reservation succeeded, or a read of
    /// the counters says it would).
    pub fits: bool,
}

/// The budget situation for one paid call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BudgetView {
    /// Candidates in preference order: the policy's `remotes`, or just the model a client
    /// named directly. The first is preferred.
    pub candidates: Vec<RemoteCandidate>,
    /// Whether a local answer exists to serve instead.
    pub local_available: bool,
}

/// What to do about money before a paid call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum BudgetDecision {
    /// Call the preferred remote.
    Proceed {
        /// Remote model name.
        remote: String,
    },
    /// Serve the local answer instead (reason `budget_exhausted`).
    ServeLocal,
    /// Call this cheaper remote instead (reason `budget_fallback`).
    Fallback {
        /// Remote model name.
        remote: String,
    },
    /// Refuse with 429 (reason `budget_exhausted`).
    Reject,
}

impl BudgetDecision {
    /// The reason to record, when the budget changed the route.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Self::Proceed { .. } => None,
            Self::Fallback { .. } => Some(Reason::BudgetFallback),
            Self::ServeLocal | Self::Reject => Some(Reason::BudgetExhausted),
        }
    }
}

/// Decides which remote to pay for, if any.
///
/// A candidate is affordable when it fits and its estimate is within
/// `max_cost_per_request`. If the preferred one is not, the policy's `on_budget_exhausted`
/// applies: `serve_local` (reject when there is no local answer), `fallback` to the
/// cheapest affordable candidate (earliest on ties; reject when none), or `reject`.
/// If a reservation for the chosen remote then fails, call again with `fits: false` for it.
pub fn on_budget(policy: &Policy, view: &BudgetView) -> BudgetDecision {
    decide_budget(
        policy.on_budget_exhausted(),
        policy.max_cost_per_request(),
        view,
    )
}

/// [`on_budget`] from the two policy fields it reads, for callers that hold them apart from a
/// [`Policy`] (the gateway's default policy).
pub fn decide_budget(
    on_exhausted: ExhaustedAction,
    max_cost_per_request: Option<NanoUsd>,
    view: &BudgetView,
) -> BudgetDecision {
    let affordable = |c: &&RemoteCandidate| {
        c.fits && max_cost_per_request.is_none_or(|max| c.estimated_cost <= max)
    };
    if let Some(first) = view.candidates.first().filter(affordable) {
        return BudgetDecision::Proceed {
            remote: first.remote.clone(),
        };
    }
    match on_exhausted {
        ExhaustedAction::ServeLocal if view.local_available => BudgetDecision::ServeLocal,
        ExhaustedAction::ServeLocal | ExhaustedAction::Reject => BudgetDecision::Reject,
        ExhaustedAction::Fallback => view
            .candidates
            .iter()
            .filter(affordable)
            .min_by_key(|c| c.estimated_cost)
            .map_or(BudgetDecision::Reject, |c| BudgetDecision::Fallback {
                remote: c.remote.clone(),
            }),
    }
}

/// What to do when every remote attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteFailureDecision {
    /// Serve the local answer, marked with reason `remote_unavailable`.
    ServeLocal,
    /// Return the upstream error (502/504).
    Error,
}

/// Decides between the local answer and an error after remote failure.
pub fn on_remote_failure(policy: &Policy, local_available: bool) -> RemoteFailureDecision {
    match policy.on_remote_failure() {
        RemoteFailureAction::ServeLocal if local_available => RemoteFailureDecision::ServeLocal,
        _ => RemoteFailureDecision::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyConfig;
    use serde_json::json;

    fn policy(v: serde_json::Value) -> Policy {
        // Explicit mean: these thresholds were written for it, whatever the default is.
        let mut base = json!({"aggregate": {"kind": "mean_logprob"}, "threshold": -1.0, "remotes": ["big", "small"]});
        if let (Some(b), Some(o)) = (base.as_object_mut(), v.as_object()) {
            for (k, val) in o {
                b.insert(k.clone(), val.clone());
            }
        }
        Policy::try_from(serde_json::from_value::<PolicyConfig>(base).unwrap()).unwrap()
    }

    fn facts() -> RequestFacts {
        RequestFacts {
            prompt_tokens: 100,
            max_output_tokens: 200,
            context_window: 2048,
            ..Default::default()
        }
    }

    fn tokens(lp: &[f32]) -> Vec<TokenSignal> {
        lp.iter()
            .map(|&logprob| TokenSignal {
                logprob,
                entropy: 0.0,
                margin: 1.0,
            })
            .collect()
    }

    const REMOTE: fn(Reason) -> PreRoute = |reason| PreRoute::Remote { reason };
    const REJECT: fn(Reason) -> PreRoute = |reason| PreRoute::Reject { reason };

    #[test]
    fn reason_names_are_stable_unique_snake_case_and_match_serde() {
        let names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        for r in Reason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), json!(r.as_str()));
            assert!(r
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert!(!r.message().is_empty());
        }
        assert_eq!(Reason::LowConfidence.as_str(), "low_confidence");
    }

    #[test]
    fn route_header_parses_local_and_remote_only() {
        assert_eq!(RouteOverride::parse(" Local "), Some(RouteOverride::Local));
        assert_eq!(RouteOverride::parse("REMOTE"), Some(RouteOverride::Remote));
        assert_eq!(RouteOverride::parse("cheap"), None);
    }

    #[test]
    fn plain_request_runs_local() {
        assert_eq!(
            pre_route(&facts(), &policy(json!({})), false),
            PreRoute::Local
        );
    }

    #[test]
    fn what_local_cannot_take_escalates_without_running_it() {
        let p = policy(json!({}));
        let images = RequestFacts {
            has_images: true,
            ..facts()
        };
        assert_eq!(pre_route(&images, &p, false), REMOTE(Reason::ImageInput));
        let tools = RequestFacts {
            has_tools: true,
            ..facts()
        };
        assert_eq!(pre_route(&tools, &p, false), REMOTE(Reason::Tools));
        let long = RequestFacts {
            prompt_tokens: 1900,
            ..facts()
        };
        assert_eq!(pre_route(&long, &p, false), REMOTE(Reason::ContextTooLong));
        let exact_fit = RequestFacts {
            prompt_tokens: 1848,
            ..facts()
        };
        assert_eq!(pre_route(&exact_fit, &p, false), PreRoute::Local);
    }

    #[test]
    fn overload_escalates_or_rejects_per_policy() {
        assert_eq!(
            pre_route(&facts(), &policy(json!({})), true),
            REMOTE(Reason::Overloaded)
        );
        let strict = policy(json!({"on_overload": "reject"}));
        assert_eq!(
            pre_route(&facts(), &strict, true),
            REJECT(Reason::Overloaded)
        );
    }

    #[test]
    fn local_only_serves_local_or_rejects_with_the_cause() {
        let p = policy(json!({"local_only": true}));
        assert_eq!(
            pre_route(&facts(), &p, false),
            PreRoute::LocalForced {
                reason: Reason::LocalOnly
            }
        );
        let images = RequestFacts {
            has_images: true,
            ..facts()
        };
        assert_eq!(pre_route(&images, &p, false), REJECT(Reason::ImageInput));
        let long = RequestFacts {
            prompt_tokens: 5000,
            ..facts()
        };
        assert_eq!(pre_route(&long, &p, false), REJECT(Reason::ContextTooLong));
        assert_eq!(pre_route(&facts(), &p, true), REJECT(Reason::Overloaded));
        // Not even an allowed route header makes a local-only team pay.
        let p = policy(json!({"local_only": true, "allow_route_header": true}));
        let remote = RequestFacts {
            route_header: Some(RouteOverride::Remote),
            ..facts()
        };
        assert_eq!(
            pre_route(&remote, &p, false),
            PreRoute::LocalForced {
                reason: Reason::LocalOnly
            }
        );
        let direct = RequestFacts {
            direct_model: true,
            ..facts()
        };
        assert_eq!(
            pre_route(&direct, &p, false),
            REJECT(Reason::DirectModelNotAllowed)
        );
    }

    #[test]
    fn remote_only_skips_local_even_when_overloaded() {
        let p = policy(json!({"remote_only": true}));
        assert_eq!(pre_route(&facts(), &p, true), REMOTE(Reason::RemoteOnly));
    }

    #[test]
    fn route_header_is_honoured_only_when_allowed() {
        let local = RequestFacts {
            route_header: Some(RouteOverride::Local),
            ..facts()
        };
        let remote = RequestFacts {
            route_header: Some(RouteOverride::Remote),
            ..facts()
        };
        let closed = policy(json!({}));
        assert_eq!(pre_route(&local, &closed, false), PreRoute::Local);
        assert_eq!(pre_route(&remote, &closed, false), PreRoute::Local);
        let open = policy(json!({"allow_route_header": true}));
        assert_eq!(
            pre_route(&remote, &open, false),
            REMOTE(Reason::RouteHeader)
        );
        assert_eq!(
            pre_route(&local, &open, false),
            PreRoute::LocalForced {
                reason: Reason::RouteHeader
            }
        );
        // Asked for local but local cannot do it: refuse rather than pay.
        let local_tools = RequestFacts {
            has_tools: true,
            ..local
        };
        assert_eq!(pre_route(&local_tools, &open, false), REJECT(Reason::Tools));
        assert_eq!(pre_route(&local, &open, true), REJECT(Reason::Overloaded));
    }

    #[test]
    fn direct_model_goes_remote_only_when_allowed() {
        let direct = RequestFacts {
            direct_model: true,
            has_images: true,
            ..facts()
        };
        assert_eq!(
            pre_route(&direct, &policy(json!({})), false),
            REJECT(Reason::DirectModelNotAllowed)
        );
        let open = policy(json!({"allow_direct_models": true}));
        assert_eq!(pre_route(&direct, &open, true), REMOTE(Reason::DirectModel));
    }

    #[test]
    fn confident_answer_is_served_and_threshold_is_inclusive() {
        let p = policy(json!({}));
        let t = tokens(&[-0.5, -1.5]); // mean -1.0 == threshold
        let outcome = LocalOutcome {
            tokens: &t,
            ..Default::default()
        };
        assert_eq!(
            post_local(&outcome, &p),
            Route::ServeLocal {
                reason: Reason::Confident
            }
        );
        assert_eq!(confidence(&outcome, &p), Some(-1.0));
    }

    #[test]
    fn low_confidence_escalates() {
        let t = tokens(&[-0.5, -1.6]);
        let outcome = LocalOutcome {
            tokens: &t,
            ..Default::default()
        };
        assert_eq!(
            post_local(&outcome, &policy(json!({}))),
            Route::Escalate {
                reason: Reason::LowConfidence
            }
        );
        let nan = tokens(&[f32::NAN]);
        let outcome = LocalOutcome {
            tokens: &nan,
            ..Default::default()
        };
        assert_eq!(
            post_local(&outcome, &policy(json!({}))),
            Route::Escalate {
                reason: Reason::LowConfidence
            }
        );
    }

    #[test]
    fn escalation_reasons_in_precedence_order() {
        let p = policy(json!({"max_local_ms": 1000}));
        let good = tokens(&[-0.1]);
        let base = LocalOutcome {
            tokens: &good,
            ..Default::default()
        };
        let esc = |reason| Route::Escalate { reason };
        let timed_out = LocalOutcome {
            timed_out: true,
            finished_early: true,
            ..base
        };
        assert_eq!(post_local(&timed_out, &p), esc(Reason::LocalTimeout));
        let slow = LocalOutcome {
            elapsed_ms: 1001,
            ..base
        };
        assert_eq!(post_local(&slow, &p), esc(Reason::LocalTimeout));
        let at_cap = LocalOutcome {
            elapsed_ms: 1000,
            ..base
        };
        assert_eq!(
            post_local(&at_cap, &p),
            Route::ServeLocal {
                reason: Reason::Confident
            }
        );
        let early = LocalOutcome {
            finished_early: true,
            ..base
        };
        assert_eq!(post_local(&early, &p), esc(Reason::EarlyExit));
        let empty = LocalOutcome {
            tokens: &[],
            json_valid: Some(false),
            ..base
        };
        assert_eq!(post_local(&empty, &p), esc(Reason::NoTokens));
        let bad_json = LocalOutcome {
            json_valid: Some(false),
            ..base
        };
        assert_eq!(post_local(&bad_json, &p), esc(Reason::InvalidJson));
        let good_json = LocalOutcome {
            json_valid: Some(true),
            ..base
        };
        assert_eq!(
            post_local(&good_json, &p),
            Route::ServeLocal {
                reason: Reason::Confident
            }
        );
    }

    #[test]
    fn local_only_always_serves_and_remote_only_never_does() {
        let t = tokens(&[-9.0]);
        let outcome = LocalOutcome {
            tokens: &t,
            timed_out: true,
            ..Default::default()
        };
        let local = policy(json!({"local_only": true}));
        assert_eq!(
            post_local(&outcome, &local),
            Route::ServeLocal {
                reason: Reason::LocalOnly
            }
        );
        let remote = policy(json!({"remote_only": true}));
        let good = tokens(&[0.0]);
        let outcome = LocalOutcome {
            tokens: &good,
            ..Default::default()
        };
        assert_eq!(
            post_local(&outcome, &remote),
            Route::Escalate {
                reason: Reason::RemoteOnly
            }
        );
    }

    fn view(fits: &[(&str, u64, bool)], local_available: bool) -> BudgetView {
        BudgetView {
            candidates: fits
                .iter()
                .map(|&(r, c, f)| RemoteCandidate {
                    remote: r.into(),
                    estimated_cost: NanoUsd(c),
                    fits: f,
                })
                .collect(),
            local_available,
        }
    }

    #[test]
    fn budget_proceeds_with_preferred_remote_when_it_fits() {
        let v = view(&[("big", 100, true), ("small", 10, true)], true);
        for action in ["serve_local", "fallback", "reject"] {
            let p = policy(json!({"on_budget_exhausted": action}));
            let d = on_budget(&p, &v);
            assert_eq!(
                d,
                BudgetDecision::Proceed {
                    remote: "big".into()
                }
            );
            assert_eq!(d.reason(), None);
        }
    }

    #[test]
    fn exhausted_budget_serves_local_when_there_is_a_local_answer() {
        let p = policy(json!({"on_budget_exhausted": "serve_local"}));
        let d = on_budget(&p, &view(&[("big", 100, false), ("small", 10, true)], true));
        assert_eq!(d, BudgetDecision::ServeLocal);
        assert_eq!(d.reason(), Some(Reason::BudgetExhausted));
        assert_eq!(
            on_budget(&p, &view(&[("big", 100, false)], false)),
            BudgetDecision::Reject
        );
    }

    #[test]
    fn exhausted_budget_falls_back_to_cheapest_fitting_remote_or_rejects() {
        let p = policy(json!({"on_budget_exhausted": "fallback"}));
        let v = view(
            &[
                ("big", 100, false),
                ("mid", 50, true),
                ("small", 10, true),
                ("tiny", 5, false),
            ],
            false,
        );
        let d = on_budget(&p, &v);
        assert_eq!(
            d,
            BudgetDecision::Fallback {
                remote: "small".into()
            }
        );
        assert_eq!(d.reason(), Some(Reason::BudgetFallback));
        let ties = view(
            &[("big", 100, false), ("a", 10, true), ("b", 10, true)],
            false,
        );
        assert_eq!(
            on_budget(&p, &ties),
            BudgetDecision::Fallback { remote: "a".into() }
        );
        let none = view(&[("big", 100, false), ("small", 10, false)], true);
        assert_eq!(on_budget(&p, &none), BudgetDecision::Reject);
        assert_eq!(
            on_budget(&p, &BudgetView::default()),
            BudgetDecision::Reject
        );
    }

    #[test]
    fn exhausted_budget_rejects_when_policy_says_reject() {
        let p = policy(json!({"on_budget_exhausted": "reject"}));
        let d = on_budget(&p, &view(&[("big", 100, false), ("small", 10, true)], true));
        assert_eq!(d, BudgetDecision::Reject);
        assert_eq!(d.reason(), Some(Reason::BudgetExhausted));
    }

    #[test]
    fn max_cost_per_request_makes_a_fitting_candidate_unaffordable() {
        let p = policy(
            json!({"on_budget_exhausted": "fallback", "max_cost_per_request_usd": 0.00000005}),
        );
        let v = view(&[("big", 100, true), ("small", 50, true)], false);
        assert_eq!(
            on_budget(&p, &v),
            BudgetDecision::Fallback {
                remote: "small".into()
            }
        );
        let p = policy(
            json!({"on_budget_exhausted": "reject", "max_cost_per_request_usd": 0.00000001}),
        );
        assert_eq!(on_budget(&p, &v), BudgetDecision::Reject);
    }

    #[test]
    fn remote_failure_serves_local_only_when_policy_and_answer_allow() {
        let p = policy(json!({}));
        assert_eq!(
            on_remote_failure(&p, true),
            RemoteFailureDecision::ServeLocal
        );
        assert_eq!(on_remote_failure(&p, false), RemoteFailureDecision::Error);
        let strict = policy(json!({"on_remote_failure": "error"}));
        assert_eq!(
            on_remote_failure(&strict, true),
            RemoteFailureDecision::Error
        );
    }
}
