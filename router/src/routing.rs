//! The routing decision as pure functions: confidence aggregates, the
//! pre-routing of requests the local model cannot serve, and the verdict on a
//! finished local generation.
//!
//! No I/O, no clock, no async: everything the decision depends on is passed
//! in. Confidence scores come from `policies::Aggregate`, the one definition of
//! every rule (including learned ones).

use std::fmt;
use std::time::Duration;

use local_model::TokenRecord;

pub use policies::Aggregate;
use policies::{ExhaustedAction, NanoUsd, TokenSignal};

/// The confidence signals of generated tokens, as the `policies` crate scores them.
pub fn signals(tokens: &[TokenRecord]) -> Vec<TokenSignal> {
    tokens
        .iter()
        .map(|t| TokenSignal {
            logprob: t.logprob,
            entropy: t.entropy,
            margin: t.margin,
        })
        .collect()
}

/// The score of a generation under `aggregate`, or `None` when it has no tokens.
pub fn score(aggregate: &Aggregate, tokens: &[TokenRecord]) -> Option<f64> {
    aggregate.score(&signals(tokens))
}

/// Where a request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Local,
    Remote,
}

impl Route {
    /// The value of the `x-cascade-route` header and of metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Remote => "remote",
        }
    }
}

/// Why a request was routed the way it was (`x-cascade-reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The local answer's confidence reached the threshold.
    Confident,
    /// The local answer's confidence stayed under the threshold.
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
    /// More than one choice (`n > 1`) or more than one prompt.
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
    /// No budget could pay for the remote call: the local answer is served, or the
    /// request is refused, as the policy says.
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
    /// Every reason, in the order docs/api.md lists them.
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

    /// The value of the `x-cascade-reason` header and of metric labels.
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

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do when every remote failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRemoteFailure {
    /// Serve the local answer, marked `x-cascade-degraded: remote-unavailable`.
    ServeLocal,
    /// Return the upstream error (502, or 504 on a timeout).
    Error,
}

/// What to do when the local model is overloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOverload {
    /// Send the request to the remote at once.
    Escalate,
    /// Answer 429 with `Retry-After`.
    Reject,
}

/// Which models a policy lets a request reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Local first, a remote when unsure.
    #[default]
    Cascade,
    /// Never call a remote: every answer is the local model's.
    LocalOnly,
    /// Never run the local model.
    RemoteOnly,
}

/// The routing policy of one request (a team's, a key's, a variant's, or `[policy]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Which models requests may reach; the thresholds below apply to `Cascade` only.
    pub mode: Mode,
    pub aggregate: Aggregate,
    /// Scores at or above this are served locally.
    pub threshold: f64,
    pub on_remote_failure: OnRemoteFailure,
    pub on_overload: OnOverload,
    /// Cap on the local model's run time per request.
    pub max_local_time: Option<Duration>,
    /// A local queue whose expected wait exceeds this counts as overloaded.
    pub max_queue_wait: Option<Duration>,
    /// Clients may pick the route with `x-cascade-route`.
    pub allow_route_header: bool,
    /// Clients may address the local or a remote model by name.
    pub allow_direct_models: bool,
    /// What happens when no budget can pay for the remote call.
    pub on_budget_exhausted: ExhaustedAction,
    /// The largest estimated cost one remote call may have.
    pub max_cost_per_request: Option<NanoUsd>,
    /// Whether the ledger may keep the prompt's text.
    pub log_prompts: bool,
}

/// What the request asks for, as far as routing is concerned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
    /// Run the local model, judge its answer, escalate when unsure.
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
            Refusal::RemoteNotInPolicy => {
                "Your policy's `remotes` do not include this model."
            }
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
            return if !policy.allow_direct_models {
                PreRoute::Refuse(Refusal::DirectModelNotAllowed)
            } else if policy.mode == Mode::RemoteOnly {
                PreRoute::Refuse(Refusal::LocalModelUnderRemoteOnly)
            } else {
                PreRoute::Local(Reason::ModelRequested)
            };
        }
        Addressed::Remote { in_policy } => {
            return if !policy.allow_direct_models {
                PreRoute::Refuse(Refusal::DirectModelNotAllowed)
            } else if policy.mode == Mode::LocalOnly {
                PreRoute::Refuse(Refusal::RemoteUnderLocalOnly)
            } else if !in_policy {
                PreRoute::Refuse(Refusal::RemoteNotInPolicy)
            } else {
                PreRoute::Remote(Reason::ModelRequested)
            };
        }
        Addressed::Cascade => {}
    }
    if header.is_some() && !policy.allow_route_header {
        return PreRoute::Refuse(Refusal::RouteHeaderNotAllowed);
    }
    match (policy.mode, header) {
        (Mode::LocalOnly, _) => PreRoute::Local(Reason::LocalOnly),
        (Mode::RemoteOnly, _) => PreRoute::Remote(Reason::RemoteOnly),
        (Mode::Cascade, Some(Route::Local)) => PreRoute::Local(Reason::RouteHeader),
        (Mode::Cascade, Some(Route::Remote)) => PreRoute::Remote(Reason::RouteHeader),
        (Mode::Cascade, None) => PreRoute::Cascade,
    }
}

/// The local queue as seen just before a request is sent to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalLoad {
    /// Requests waiting or running.
    pub in_flight: usize,
    /// How many may wait while one runs.
    pub queue_capacity: usize,
    /// Rough wait before a new request would start.
    pub expected_wait: Duration,
}

/// Whether the local model should be considered overloaded.
pub fn overloaded(load: &LocalLoad, policy: &Policy) -> bool {
    // One runs and `queue_capacity` wait: any more would be refused anyway.
    let full = load.in_flight > load.queue_capacity;
    let too_slow = policy
        .max_queue_wait
        .is_some_and(|bound| load.expected_wait > bound);
    full || too_slow
}

/// How a local generation ended, as far as routing is concerned.
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

/// The verdict on a local generation: serve it, or escalate and why.
pub fn judge_local(outcome: &LocalOutcome, policy: &Policy) -> (Route, Reason) {
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
    if score >= policy.threshold {
        (Route::Local, Reason::Confident)
    } else {
        escalate(Reason::LowConfidence)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tokens(logprobs: &[f32]) -> Vec<TokenRecord> {
        logprobs
            .iter()
            .map(|&logprob| TokenRecord {
                id: 0,
                text: "x".into(),
                logprob,
                entropy: 0.0,
                margin: 0.0,
            })
            .collect()
    }

    fn policy(aggregate: Aggregate, threshold: f64) -> Policy {
        Policy {
            mode: Mode::Cascade,
            on_budget_exhausted: ExhaustedAction::ServeLocal,
            max_cost_per_request: None,
            log_prompts: false,
            aggregate,
            threshold,
            on_remote_failure: OnRemoteFailure::ServeLocal,
            on_overload: OnOverload::Escalate,
            max_local_time: None,
            max_queue_wait: Some(Duration::from_secs(2)),
            allow_route_header: true,
            allow_direct_models: true,
        }
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
    fn scores_come_from_the_policies_aggregates() {
        let t = tokens(&[-0.5, -1.0, -0.1, -2.0]);
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-6;
        assert!(close(score(&Aggregate::MeanLogprob, &t), -0.9));
        assert!(close(score(&Aggregate::SumLogprob, &t), -3.6));
        assert!(close(score(&Aggregate::MinLogprob, &t), -2.0));
        assert!(close(
            score(&Aggregate::FractionAbove { bound: -0.75 }, &t),
            0.5
        ));
        assert_eq!(score(&Aggregate::MeanLogprob, &[]), None);
    }

    #[test]
    fn threshold_is_inclusive() {
        let p = policy(Aggregate::MeanLogprob, -1.0);
        assert_eq!(
            judge_local(&outcome(Some(-1.0)), &p),
            (Route::Local, Reason::Confident)
        );
        assert_eq!(
            judge_local(&outcome(Some(-1.0001)), &p),
            (Route::Remote, Reason::LowConfidence)
        );
    }

    #[test]
    fn cut_short_generations_escalate_with_their_own_reason() {
        let p = policy(Aggregate::MinLogprob, -1.0);
        let early = LocalOutcome {
            early_exit: true,
            ..outcome(Some(-5.0))
        };
        let timed = LocalOutcome {
            timed_out: true,
            ..outcome(Some(-0.1))
        };
        let capped = LocalOutcome {
            hit_token_cap: true,
            ..outcome(Some(-0.1))
        };
        assert_eq!(judge_local(&early, &p).1, Reason::EarlyExit);
        assert_eq!(judge_local(&timed, &p).1, Reason::LocalTimeBudget);
        assert_eq!(judge_local(&capped, &p).1, Reason::LocalTokenCap);
        assert_eq!(judge_local(&outcome(None), &p).1, Reason::EmptyAnswer);
    }

    #[test]
    fn confident_but_invalid_json_escalates() {
        let p = policy(Aggregate::MeanLogprob, -1.0);
        let o = LocalOutcome {
            json_valid: Some(false),
            ..outcome(Some(-0.1))
        };
        assert_eq!(judge_local(&o, &p), (Route::Remote, Reason::InvalidJson));
    }

    #[test]
    fn unsuitable_requests_name_their_reason() {
        let f = RequestFeatures {
            has_images: true,
            has_tools: true,
            ..Default::default()
        };
        assert_eq!(local_unsuitable(&f), Some(Reason::ImageContent));
        let f = RequestFeatures {
            has_tools: true,
            ..Default::default()
        };
        assert_eq!(local_unsuitable(&f), Some(Reason::Tools));
        assert_eq!(local_unsuitable(&RequestFeatures::default()), None);
    }

    #[test]
    fn local_only_never_reaches_a_remote_and_remote_only_never_the_local_model() {
        let mut p = policy(Aggregate::MeanLogprob, -1.0);
        p.mode = Mode::LocalOnly;
        for header in [None, Some(Route::Local), Some(Route::Remote)] {
            assert_eq!(
                pre_route(&p, Addressed::Cascade, header),
                PreRoute::Local(Reason::LocalOnly)
            );
        }
        assert_eq!(
            pre_route(&p, Addressed::Remote { in_policy: true }, None),
            PreRoute::Refuse(Refusal::RemoteUnderLocalOnly)
        );
        p.mode = Mode::RemoteOnly;
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
    }

    #[test]
    fn headers_and_direct_models_need_the_policy_s_permission() {
        let mut p = policy(Aggregate::MeanLogprob, -1.0);
        assert_eq!(pre_route(&p, Addressed::Cascade, None), PreRoute::Cascade);
        assert_eq!(
            pre_route(&p, Addressed::Cascade, Some(Route::Remote)),
            PreRoute::Remote(Reason::RouteHeader)
        );
        assert_eq!(
            pre_route(&p, Addressed::Remote { in_policy: false }, None),
            PreRoute::Refuse(Refusal::RemoteNotInPolicy)
        );
        p.allow_route_header = false;
        p.allow_direct_models = false;
        p.mode = Mode::LocalOnly;
        assert_eq!(
            pre_route(&p, Addressed::Cascade, Some(Route::Local)),
            PreRoute::Refuse(Refusal::RouteHeaderNotAllowed)
        );
        assert_eq!(
            pre_route(&p, Addressed::LocalModel, None),
            PreRoute::Refuse(Refusal::DirectModelNotAllowed)
        );
    }

    #[test]
    fn the_openapi_description_and_docs_list_every_reason() {
        let spec: serde_json::Value = serde_json::from_str(crate::server::OPENAPI).unwrap();
        let path = "/paths/~1v1~1chat~1completions/post/responses/200/headers/x-cascade-reason/schema/enum";
        let listed: Vec<&str> = spec
            .pointer(path)
            .and_then(|v| v.as_array())
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let mut names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.push("none");
        assert_eq!(listed, names);
        let api = include_str!("../../docs/api.md");
        for reason in Reason::ALL {
            assert!(
                api.contains(&format!("| `{}` |", reason.as_str())),
                "docs/api.md does not list `{reason}`"
            );
        }
    }

    #[test]
    fn overload_is_a_full_queue_or_a_long_expected_wait() {
        let p = policy(Aggregate::MeanLogprob, -1.0);
        let load = |in_flight, wait_ms| LocalLoad {
            in_flight,
            queue_capacity: 2,
            expected_wait: Duration::from_millis(wait_ms),
        };
        assert!(!overloaded(&load(2, 100), &p));
        assert!(overloaded(&load(3, 100), &p));
        assert!(overloaded(&load(1, 2001), &p));
    }
}
