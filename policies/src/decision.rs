//! The routing verdict, as pure functions of what the request asks for, the local model's
//! state and signals, the policy and the budget. The gateway asks, in request order:
//! 1. [`pre_route`] before anything runs: the cascade, the local model alone, the remotes
//!    alone, or a refusal;
//! 2. [`local_unsuitable`] and [`overloaded`] before the local model runs;
//! 3. [`post_local`] after it: serve the local answer or escalate, and why;
//! 4. [`on_budget`] before each paid call (first try or fallback alike);
//! 5. [`on_remote_failure`] when every remote failed.
//!
//! Every outcome carries a [`Reason`] whose [`Reason::as_str`] is the wire name of
//! `x-cascade-reason`, metric labels and the ledger (docs/api.md; stored ledgers hold them,
//! so they never change). docs/policies.md has the decision table these functions implement.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::money::NanoUsd;
use crate::policy::{ExhaustedAction, Policy, RemoteFailureAction};

/// Why a request went where it went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The local answer's confidence reached the threshold.
    Confident,
    /// The local answer's confidence stayed under the threshold (or was NaN).
    LowConfidence,
    /// Generation stopped early: the threshold could no longer be reached.
    EarlyExit,
    /// The local model ran out of its per-request time budget.
    LocalTimeBudget,
    /// The local model hit the gateway's token cap before the client's `max_tokens`.
    LocalTokenCap,
    /// The local model produced no tokens, so there is nothing to score.
    EmptyAnswer,
    /// `response_format: json_object` and the local answer is not a JSON object.
    InvalidJson,
    /// The request has image content parts; the local model reads text only.
    ImageContent,
    /// The request has audio or file content parts.
    UnsupportedContent,
    /// The request declares `tools` or `functions`, or carries tool messages.
    Tools,
    /// `response_format: json_schema`, which the local model cannot enforce.
    JsonSchema,
    /// More than one choice (`n > 1`, `best_of > 1`) or more than one prompt.
    MultipleChoices,
    /// The prompt does not fit the local context window.
    ContextTooLong,
    /// The local queue is full or its expected wait exceeds the bound.
    LocalOverloaded,
    /// The local model is still loading.
    LocalLoading,
    /// The local model failed to generate.
    LocalError,
    /// The client chose the route with the `x-cascade-route` header.
    RouteHeader,
    /// The client addressed the local or a remote model by name.
    ModelRequested,
    /// Every remote failed and the policy serves the local answer instead.
    RemoteUnavailable,
    /// No budget could pay for the remote call: the local answer is served, or the request
    /// is refused, as the policy says.
    BudgetExhausted,
    /// The preferred remote did not fit the budget; a cheaper one answered.
    BudgetFallback,
    /// The policy is `local_only`: the local model answers whatever its confidence, and no
    /// remote is ever called.
    LocalOnly,
    /// The policy is `remote_only`: the local model never runs.
    RemoteOnly,
}

impl Reason {
    /// Every reason, in the order docs/api.md lists them (for metric labels and the
    /// OpenAPI description).
    pub const ALL: [Reason; 23] = [
        Reason::Confident,
        Reason::LowConfidence,
        Reason::EarlyExit,
        Reason::LocalTimeBudget,
        Reason::LocalTokenCap,
        Reason::EmptyAnswer,
        Reason::InvalidJson,
        Reason::ImageContent,
        Reason::UnsupportedContent,
        Reason::Tools,
        Reason::JsonSchema,
        Reason::MultipleChoices,
        Reason::ContextTooLong,
        Reason::LocalOverloaded,
        Reason::LocalLoading,
        Reason::LocalError,
        Reason::RouteHeader,
        Reason::ModelRequested,
        Reason::RemoteUnavailable,
        Reason::BudgetExhausted,
        Reason::BudgetFallback,
        Reason::LocalOnly,
        Reason::RemoteOnly,
    ];

    /// The wire name: `x-cascade-reason`, metric labels, the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Confident => "confident",
            Reason::LowConfidence => "low_confidence",
            Reason::EarlyExit => "early_exit",
            Reason::LocalTimeBudget => "local_time_budget",
            Reason::LocalTokenCap => "local_token_cap",
            Reason::EmptyAnswer => "empty_answer",
            Reason::InvalidJson => "invalid_json",
            Reason::ImageContent => "image_content",
            Reason::UnsupportedContent => "unsupported_content",
            Reason::Tools => "tools",
            Reason::JsonSchema => "json_schema",
            Reason::MultipleChoices => "multiple_choices",
            Reason::ContextTooLong => "context_too_long",
            Reason::LocalOverloaded => "local_overloaded",
            Reason::LocalLoading => "local_loading",
            Reason::LocalError => "local_error",
            Reason::RouteHeader => "route_header",
            Reason::ModelRequested => "model_requested",
            Reason::RemoteUnavailable => "remote_unavailable",
            Reason::BudgetExhausted => "budget_exhausted",
            Reason::BudgetFallback => "budget_fallback",
            Reason::LocalOnly => "local_only",
            Reason::RemoteOnly => "remote_only",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a request is answered (also the value of `x-cascade-route`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    Local,
    Remote,
}

impl Route {
    /// The wire name: `x-cascade-route` and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Remote => "remote",
        }
    }

    /// Parses an `x-cascade-route` value (`local` or `remote`, any case, surrounding spaces
    /// ignored).
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

/// What the request asks for, as far as the local model's abilities are concerned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestFeatures {
    pub has_images: bool,
    pub has_other_media: bool,
    pub has_tools: bool,
    pub wants_json_schema: bool,
    pub multiple_choices: bool,
}

/// A reason the local model cannot serve the request at all, if any.
pub fn local_unsuitable(features: &RequestFeatures) -> Option<Reason> {
    if features.has_images {
        Some(Reason::ImageContent)
    } else if features.has_other_media {
        Some(Reason::UnsupportedContent)
    } else if features.has_tools {
        Some(Reason::Tools)
    } else if features.wants_json_schema {
        Some(Reason::JsonSchema)
    } else if features.multiple_choices {
        Some(Reason::MultipleChoices)
    } else {
        None
    }
}

/// What a request's `model` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressed {
    /// The cascade's own name.
    Cascade,
    /// The local model by its name.
    LocalModel,
    /// A configured remote by its name; `in_policy` when the policy's `remotes` list it.
    Remote { in_policy: bool },
}

/// Where a request goes before any model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreRoute {
    /// Run the local model, judge its answer with [`post_local`], escalate when unsure.
    Cascade,
    /// The local model answers in full, whatever its confidence; nothing is escalated.
    Local(Reason),
    /// Straight to the remotes (the named one, or the policy's chain).
    Remote(Reason),
    /// Refused with 403 `not_allowed_by_policy`.
    Refuse(Refusal),
}

/// Why a request is not allowed by its policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    RouteHeaderNotAllowed,
    DirectModelNotAllowed,
    RemoteNotInPolicy,
    LocalModelUnderRemoteOnly,
    RemoteUnderLocalOnly,
}

impl Refusal {
    /// The error message the client gets.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::RouteHeaderNotAllowed => {
                "The x-cascade-route header is not allowed by your policy."
            }
            Refusal::DirectModelNotAllowed => {
                "Naming a model directly is not allowed by your policy; use the cascade's model name."
            }
            Refusal::RemoteNotInPolicy => "Your policy's `remotes` do not include this model.",
            Refusal::LocalModelUnderRemoteOnly => {
                "Your policy is remote_only: the local model does not answer its requests."
            }
            Refusal::RemoteUnderLocalOnly => {
                "Your policy is local_only: no remote model answers its requests."
            }
        }
    }
}

/// Decides where a request goes before anything runs.
///
/// Precedence: a directly named model (allowed by `allow_direct_models`, and by the mode);
/// a route header that the policy does not allow is refused; then the mode: `local_only`
/// serves the local model whatever the header says, `remote_only` goes to the remotes
/// whatever the header says; a cascading policy follows an allowed header, else cascades.
pub fn pre_route(policy: &Policy, addressed: Addressed, header: Option<Route>) -> PreRoute {
    match addressed {
        Addressed::LocalModel => {
            return if !policy.allow_direct_models() {
                PreRoute::Refuse(Refusal::DirectModelNotAllowed)
            } else if policy.remote_only() {
                PreRoute::Refuse(Refusal::LocalModelUnderRemoteOnly)
            } else {
                PreRoute::Local(Reason::ModelRequested)
            };
        }
        Addressed::Remote { in_policy } => {
            return if !policy.allow_direct_models() {
                PreRoute::Refuse(Refusal::DirectModelNotAllowed)
            } else if policy.local_only() {
                PreRoute::Refuse(Refusal::RemoteUnderLocalOnly)
            } else if !in_policy {
                PreRoute::Refuse(Refusal::RemoteNotInPolicy)
            } else {
                PreRoute::Remote(Reason::ModelRequested)
            };
        }
        Addressed::Cascade => {}
    }
    if header.is_some() && !policy.allow_route_header() {
        return PreRoute::Refuse(Refusal::RouteHeaderNotAllowed);
    }
    if policy.local_only() {
        return PreRoute::Local(Reason::LocalOnly);
    }
    if policy.remote_only() {
        return PreRoute::Remote(Reason::RemoteOnly);
    }
    match header {
        Some(Route::Local) => PreRoute::Local(Reason::RouteHeader),
        Some(Route::Remote) => PreRoute::Remote(Reason::RouteHeader),
        None => PreRoute::Cascade,
    }
}

/// The local queue as seen just before a request is sent to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalLoad {
    /// Requests waiting or running.
    pub in_flight: usize,
    /// How many may run together (the engine's batch; 1 for a one-at-a-time model).
    pub batch_capacity: usize,
    /// How many may wait while the batch runs.
    pub queue_capacity: usize,
    /// Rough wait before a new request would start.
    pub expected_wait: Duration,
}

/// Whether the local model should be considered overloaded: its queue is full, or the
/// expected wait exceeds `max_queue_wait` (the gateway's `[policy].max_queue_wait_ms`).
pub fn overloaded(load: &LocalLoad, max_queue_wait: Option<Duration>) -> bool {
    // `batch_capacity` run and `queue_capacity` wait: any more would be refused anyway.
    let full = load.in_flight >= load.batch_capacity.max(1) + load.queue_capacity;
    let too_slow = max_queue_wait.is_some_and(|bound| load.expected_wait > bound);
    full || too_slow
}

/// How a local generation ended, as far as the verdict is concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalOutcome {
    /// The aggregate score, `None` for an empty generation.
    pub score: Option<f64>,
    /// Stopped because the score was settled under the threshold.
    pub early_exit: bool,
    /// Stopped by the time budget.
    pub timed_out: bool,
    /// Stopped by the gateway's own token cap, not the client's `max_tokens`.
    pub hit_token_cap: bool,
    /// `Some(valid)` when the client asked for a JSON object.
    pub json_valid: Option<bool>,
}

/// The verdict on a cascading policy's local generation: serve it, or escalate and why.
///
/// Precedence of escalation reasons: early exit, time budget, token cap, no tokens, invalid
/// JSON, low confidence. The threshold is inclusive; a NaN score escalates. A policy without
/// a threshold (local_only, remote_only) never gets here: [`pre_route`] sends it elsewhere.
pub fn post_local(outcome: &LocalOutcome, policy: &Policy) -> (Route, Reason) {
    let escalate = |reason| (Route::Remote, reason);
    if outcome.early_exit {
        return escalate(Reason::EarlyExit);
    }
    if outcome.timed_out {
        return escalate(Reason::LocalTimeBudget);
    }
    if outcome.hit_token_cap {
        return escalate(Reason::LocalTokenCap);
    }
    let Some(score) = outcome.score else {
        return escalate(Reason::EmptyAnswer);
    };
    if outcome.json_valid == Some(false) {
        return escalate(Reason::InvalidJson);
    }
    match policy.threshold() {
        Some(threshold) if score >= threshold => (Route::Local, Reason::Confident),
        _ => escalate(Reason::LowConfidence),
    }
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

    fn mode(local_only: bool, remote_only: bool) -> Policy {
        let mut v = json!({"allow_route_header": true, "allow_direct_models": !local_only});
        if local_only {
            v = json!({"local_only": true, "allow_route_header": true, "threshold": null, "remotes": []});
        }
        if remote_only {
            v = json!({"remote_only": true, "allow_route_header": true, "allow_direct_models": true, "threshold": null});
        }
        policy(v)
    }

    #[test]
    fn reason_names_are_the_wire_names_unique_snake_case_and_match_serde() {
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
        }
        // Stored ledgers hold these: a rename would split every report in two.
        assert_eq!(Reason::LocalTimeBudget.as_str(), "local_time_budget");
        assert_eq!(Reason::ModelRequested.as_str(), "model_requested");
    }

    #[test]
    fn route_header_parses_local_and_remote_only() {
        assert_eq!(Route::parse(" Local "), Some(Route::Local));
        assert_eq!(Route::parse("REMOTE"), Some(Route::Remote));
        assert_eq!(Route::parse("cheap"), None);
    }

    #[test]
    fn local_only_never_reaches_a_remote_and_remote_only_never_the_local_model() {
        let p = mode(true, false);
        for header in [None, Some(Route::Local), Some(Route::Remote)] {
            assert_eq!(
                pre_route(&p, Addressed::Cascade, header),
                PreRoute::Local(Reason::LocalOnly)
            );
        }
        let p = mode(false, true);
        for header in [None, Some(Route::Local), Some(Route::Remote)] {
            assert_eq!(
                pre_route(&p, Addressed::Cascade, header),
                PreRoute::Remote(Reason::RemoteOnly)
            );
        }
        assert_eq!(
            pre_route(&p, Addressed::LocalModel, None),
            PreRoute::Refuse(Refusal::LocalModelUnderRemoteOnly)
        );
        // A threshold beside remote_only does not bring the cascade back.
        let p = policy(json!({"remote_only": true}));
        assert_eq!(
            pre_route(&p, Addressed::Cascade, None),
            PreRoute::Remote(Reason::RemoteOnly)
        );
    }

    #[test]
    fn headers_and_direct_models_need_the_policy_s_permission() {
        let p = policy(json!({"allow_route_header": true, "allow_direct_models": true}));
        assert_eq!(pre_route(&p, Addressed::Cascade, None), PreRoute::Cascade);
        assert_eq!(
            pre_route(&p, Addressed::Cascade, Some(Route::Remote)),
            PreRoute::Remote(Reason::RouteHeader)
        );
        assert_eq!(
            pre_route(&p, Addressed::Cascade, Some(Route::Local)),
            PreRoute::Local(Reason::RouteHeader)
        );
        assert_eq!(
            pre_route(&p, Addressed::Remote { in_policy: true }, None),
            PreRoute::Remote(Reason::ModelRequested)
        );
        assert_eq!(
            pre_route(&p, Addressed::Remote { in_policy: false }, None),
            PreRoute::Refuse(Refusal::RemoteNotInPolicy)
        );
        let strict = policy(json!({}));
        assert_eq!(
            pre_route(&strict, Addressed::Cascade, Some(Route::Local)),
            PreRoute::Refuse(Refusal::RouteHeaderNotAllowed)
        );
        assert_eq!(
            pre_route(&strict, Addressed::LocalModel, None),
            PreRoute::Refuse(Refusal::DirectModelNotAllowed)
        );
        assert_eq!(
            pre_route(&strict, Addressed::Remote { in_policy: true }, None),
            PreRoute::Refuse(Refusal::DirectModelNotAllowed)
        );
    }

    #[test]
    fn unsuitable_requests_name_their_reason_in_order() {
        let f = RequestFeatures {
            has_images: true,
            has_tools: true,
            ..Default::default()
        };
        assert_eq!(local_unsuitable(&f), Some(Reason::ImageContent));
        let f = RequestFeatures {
            has_tools: true,
            multiple_choices: true,
            ..Default::default()
        };
        assert_eq!(local_unsuitable(&f), Some(Reason::Tools));
        let f = RequestFeatures {
            multiple_choices: true,
            ..Default::default()
        };
        assert_eq!(local_unsuitable(&f), Some(Reason::MultipleChoices));
        assert_eq!(local_unsuitable(&RequestFeatures::default()), None);
    }

    #[test]
    fn overload_is_a_full_queue_or_a_long_expected_wait() {
        let load = |in_flight, wait_ms| LocalLoad {
            in_flight,
            batch_capacity: 1,
            queue_capacity: 2,
            expected_wait: Duration::from_millis(wait_ms),
        };
        let bound = Some(Duration::from_secs(2));
        assert!(!overloaded(&load(2, 100), bound));
        assert!(overloaded(&load(3, 100), bound));
        assert!(overloaded(&load(1, 2001), bound));
        assert!(!overloaded(&load(1, 2001), None));
        // A batching engine runs eight together: eight running and two waiting is full, not
        // nine (the cascade must not escalate what the batch can still take).
        let batched = |in_flight| LocalLoad {
            batch_capacity: 8,
            ..load(in_flight, 100)
        };
        assert!(!overloaded(&batched(9), bound));
        assert!(overloaded(&batched(10), bound));
    }

    fn outcome(score: Option<f64>) -> LocalOutcome {
        LocalOutcome {
            score,
            early_exit: false,
            timed_out: false,
            hit_token_cap: false,
            json_valid: None,
        }
    }

    #[test]
    fn the_threshold_is_inclusive_and_nan_escalates() {
        let p = policy(json!({}));
        assert_eq!(
            post_local(&outcome(Some(-1.0)), &p),
            (Route::Local, Reason::Confident)
        );
        assert_eq!(
            post_local(&outcome(Some(-1.0001)), &p),
            (Route::Remote, Reason::LowConfidence)
        );
        assert_eq!(
            post_local(&outcome(Some(f64::NAN)), &p),
            (Route::Remote, Reason::LowConfidence)
        );
    }

    #[test]
    fn cut_short_generations_escalate_with_their_own_reason_in_order() {
        let p = policy(json!({}));
        let all = LocalOutcome {
            early_exit: true,
            timed_out: true,
            hit_token_cap: true,
            json_valid: Some(false),
            ..outcome(Some(-0.1))
        };
        assert_eq!(post_local(&all, &p).1, Reason::EarlyExit);
        let timed = LocalOutcome {
            early_exit: false,
            ..all
        };
        assert_eq!(post_local(&timed, &p).1, Reason::LocalTimeBudget);
        let capped = LocalOutcome {
            timed_out: false,
            ..timed
        };
        assert_eq!(post_local(&capped, &p).1, Reason::LocalTokenCap);
        let json = LocalOutcome {
            hit_token_cap: false,
            ..capped
        };
        assert_eq!(post_local(&json, &p).1, Reason::InvalidJson);
        assert_eq!(post_local(&outcome(None), &p).1, Reason::EmptyAnswer);
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
