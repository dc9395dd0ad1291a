//! Spend, budgets, feedback and experiment results as the usage, feedback and admin
//! endpoints and `cascade report` see them: reads and writes over the ledger and the budget
//! counters, with no HTTP, so every surface shows the same numbers.

use policies::{NanoUsd, Policies, ScopeKind, Window};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::reporting::{variant_stats, VariantStats};
use crate::storage::{Storage, StorageError, UsageSummary};

/// Usage of one team (or the whole gateway) over one budget window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowUsage {
    /// `day` or `month`.
    pub window: &'static str,
    /// The window's start and end, Unix seconds, in the configured time zone's calendar.
    pub start_unix: i64,
    pub end_unix: i64,
    /// Requests recorded in the ledger since the window began.
    pub requests: u64,
    /// Of those, answered by a remote model.
    pub escalated: u64,
    /// `escalated / requests`; none without requests.
    pub escalation_rate: Option<f64>,
    /// Recorded cost (remote calls plus the local compute price), USD.
    pub cost_usd: f64,
    /// The window's budget, USD; none when unlimited.
    pub budget_usd: Option<f64>,
    /// Remote spend counted against the budget, and what in-flight calls hold, USD.
    pub budget_spent_usd: f64,
    pub budget_reserved_usd: f64,
    /// What is left of the budget, USD; none when unlimited.
    pub budget_remaining_usd: Option<f64>,
}

/// `GET /v1/usage`: one team's own usage, today and this month.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TeamUsage {
    pub object: &'static str,
    /// The team; none for a gateway without teams (usage of every request then).
    pub team: Option<String>,
    pub timezone: String,
    pub day: WindowUsage,
    pub month: WindowUsage,
}

/// One team's line of the spend report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TeamSpend {
    /// The team; empty for requests without one.
    pub team: String,
    #[serde(flatten)]
    pub usage: WindowUsage,
}

/// `GET /admin/spend`: every team over one window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpendReport {
    pub object: &'static str,
    pub window: &'static str,
    pub timezone: String,
    pub teams: Vec<TeamSpend>,
}

/// `GET /admin/experiments/{id}`: per-variant results with 95% intervals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExperimentReport {
    pub object: &'static str,
    pub experiment: String,
    /// The team the experiment is scoped to, if any.
    pub team: Option<String>,
    /// Configured variants and their weights (a variant without traffic has no stats).
    pub weights: Vec<(String, f64)>,
    pub variants: Vec<VariantStats>,
}

fn usd(n: u64) -> f64 {
    NanoUsd(n).usd()
}

/// The usage of `team` (every request when `None`) over the window containing `now`.
async fn window_usage(
    storage: &Storage,
    policies: &Policies,
    team: Option<&str>,
    window: Window,
    now_unix_ms: i64,
) -> Result<WindowUsage, StorageError> {
    let now = now_unix_ms.div_euclid(1000);
    let tz = policies.timezone();
    let start = policies::budget::window_start(now, tz, window);
    let end = policies::budget::window_end(now, tz, window);
    let (since, until) = (start.saturating_mul(1000), end.saturating_mul(1000));
    let summary = match team {
        Some(team) => storage.team_usage(team, since, until).await?,
        None => sum(storage
            .spend_by_team(since, until)
            .await?
            .iter()
            .map(|(_, u)| u)),
    };
    // The team's (or, without teams, the global) budget counter of this window.
    let (kind, id) = match team {
        Some(team) => (ScopeKind::Team, team),
        None => (ScopeKind::Global, policies::budget::GLOBAL_ID),
    };
    let scope = policies
        .scopes_for(team.unwrap_or_default(), "", now)
        .into_iter()
        .find(|(s, _)| s.kind == kind && s.id == id && s.window == window);
    let (budget, state) = match scope {
        Some((scope, limit)) => (
            Some(limit),
            storage.scope_state(&scope.storage_key()).await?,
        ),
        None => (None, Default::default()),
    };
    let used = state.spent_nanos.saturating_add(state.reserved_nanos);
    Ok(WindowUsage {
        window: window.as_str(),
        start_unix: start,
        end_unix: end,
        requests: summary.requests,
        escalated: summary.escalated,
        escalation_rate: (summary.requests > 0)
            .then(|| summary.escalated as f64 / summary.requests as f64),
        cost_usd: usd(summary.cost_nanos),
        budget_usd: budget.map(NanoUsd::usd),
        budget_spent_usd: usd(state.spent_nanos),
        budget_reserved_usd: usd(state.reserved_nanos),
        budget_remaining_usd: budget.map(|b| usd(b.0.saturating_sub(used))),
    })
}

fn sum<'a>(rows: impl Iterator<Item = &'a UsageSummary>) -> UsageSummary {
    rows.fold(UsageSummary::default(), |a, u| UsageSummary {
        requests: a.requests + u.requests,
        escalated: a.escalated + u.escalated,
        cost_nanos: a.cost_nanos.saturating_add(u.cost_nanos),
        local_tokens: a.local_tokens + u.local_tokens,
        remote_input_tokens: a.remote_input_tokens + u.remote_input_tokens,
        remote_output_tokens: a.remote_output_tokens + u.remote_output_tokens,
    })
}

/// A team's usage today and this month.
pub async fn team_usage(
    storage: &Storage,
    policies: &Policies,
    team: Option<&str>,
    now_unix_ms: i64,
) -> Result<TeamUsage, StorageError> {
    Ok(TeamUsage {
        object: "usage",
        team: team.map(str::to_string),
        timezone: policies.timezone().to_string(),
        day: window_usage(storage, policies, team, Window::Day, now_unix_ms).await?,
        month: window_usage(storage, policies, team, Window::Month, now_unix_ms).await?,
    })
}

/// Every configured team, and any other team name found in the ledger, over one window.
pub async fn spend(
    storage: &Storage,
    policies: &Policies,
    window: Window,
    now_unix_ms: i64,
) -> Result<SpendReport, StorageError> {
    let now = now_unix_ms.div_euclid(1000);
    let tz = policies.timezone();
    let since = policies::budget::window_start(now, tz, window).saturating_mul(1000);
    let until = policies::budget::window_end(now, tz, window).saturating_mul(1000);
    let mut names: Vec<String> = policies.teams().keys().cloned().collect();
    for (team, _) in storage.spend_by_team(since, until).await? {
        if !team.is_empty() && !names.contains(&team) {
            names.push(team);
        }
    }
    names.sort();
    let mut teams = Vec::with_capacity(names.len());
    for team in names {
        let usage = window_usage(storage, policies, Some(&team), window, now_unix_ms).await?;
        teams.push(TeamSpend { team, usage });
    }
    Ok(SpendReport {
        object: "spend",
        window: window.as_str(),
        timezone: tz.to_string(),
        teams,
    })
}

/// An experiment's per-variant results; `None` when it is neither configured nor in the
/// ledger.
pub async fn experiment(
    storage: &Storage,
    policies: &Policies,
    id: &str,
) -> Result<Option<ExperimentReport>, StorageError> {
    let configured = policies.experiments().iter().find(|e| e.id() == id);
    let samples = storage.variant_samples(id).await?;
    if configured.is_none() && samples.is_empty() {
        return Ok(None);
    }
    Ok(Some(ExperimentReport {
        object: "experiment",
        experiment: id.to_string(),
        team: configured.and_then(|e| e.team().map(str::to_string)),
        weights: configured.map_or_else(Vec::new, |e| {
            e.variants()
                .iter()
                .map(|v| (v.name.clone(), v.weight))
                .collect()
        }),
        variants: variant_stats(&samples),
    }))
}

/// `POST /v1/feedback` as sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackBody {
    request_id: String,
    #[serde(default)]
    score: Option<f64>,
    #[serde(default)]
    thumbs: Option<String>,
    #[serde(default)]
    comment: Option<String>,
}

/// Validated feedback on one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    pub request_id: String,
    /// In [0, 1]; thumbs up is 1, down 0.
    pub score: f64,
    pub comment: Option<String>,
}

/// Longest comment kept, in bytes.
pub const MAX_COMMENT_BYTES: usize = 4096;

fn bad(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param.to_string()),
    }
}

/// Parses and checks a feedback body.
pub fn parse_feedback(body: &[u8]) -> Result<Feedback, ApiError> {
    let body: FeedbackBody =
        serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    if body.request_id.is_empty() || body.request_id.len() > 128 {
        return Err(bad(
            "`request_id` must be a request id from x-request-id",
            "request_id",
        ));
    }
    let score = match (body.score, body.thumbs.as_deref()) {
        (Some(s), None) if (0.0..=1.0).contains(&s) => s,
        (Some(_), None) => return Err(bad("`score` must be a number in [0, 1]", "score")),
        (None, Some("up")) => 1.0,
        (None, Some("down")) => 0.0,
        (None, Some(_)) => return Err(bad("`thumbs` must be \"up\" or \"down\"", "thumbs")),
        (Some(_), Some(_)) => return Err(bad("send `score` or `thumbs`, not both", "score")),
        (None, None) => return Err(bad("`score` (in [0, 1]) or `thumbs` is required", "score")),
    };
    if body
        .comment
        .as_ref()
        .is_some_and(|c| c.len() > MAX_COMMENT_BYTES)
    {
        return Err(bad(
            format!("`comment` is longer than {MAX_COMMENT_BYTES} bytes"),
            "comment",
        ));
    }
    Ok(Feedback {
        request_id: body.request_id,
        score,
        comment: body.comment,
    })
}

/// Attaches feedback to a request of the caller's team. A request of another team is
/// reported as unknown, exactly like one that does not exist, so ids cannot be probed.
pub async fn record_feedback(
    storage: &Storage,
    team: Option<&str>,
    feedback: &Feedback,
    now_unix_ms: i64,
) -> Result<(), ApiError> {
    let internal = |e: StorageError| ApiError::Internal(e.to_string());
    let record = storage
        .get_record(&feedback.request_id)
        .await
        .map_err(internal)?;
    let owned = record.is_some_and(|r| team.is_none() || r.team.as_deref() == team);
    if !owned {
        return Err(ApiError::NotFound(format!(
            "request `{}`",
            feedback.request_id
        )));
    }
    storage
        .record_feedback(
            &feedback.request_id,
            feedback.score,
            feedback.comment.as_deref(),
            now_unix_ms,
        )
        .await
        .map_err(internal)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn feedback_takes_a_score_or_thumbs_and_nothing_else() {
        let ok =
            parse_feedback(br#"{"request_id": "r1", "thumbs": "up", "comment": "good"}"#).unwrap();
        assert_eq!(ok.score, 1.0);
        assert_eq!(ok.comment.as_deref(), Some("good"));
        assert_eq!(
            parse_feedback(br#"{"request_id": "r1", "score": 0.25}"#)
                .unwrap()
                .score,
            0.25
        );
        for bad in [
            &br#"{"request_id": "r1", "score": 1.5}"#[..],
            br#"{"request_id": "r1", "thumbs": "sideways"}"#,
            br#"{"request_id": "r1"}"#,
            br#"{"request_id": "r1", "score": 1, "thumbs": "up"}"#,
            br#"{"request_id": "", "score": 1}"#,
            br#"{"request_id": "r1", "score": 1, "extra": true}"#,
        ] {
            assert!(
                matches!(
                    parse_feedback(bad),
                    Err(ApiError::InvalidRequest { .. } | ApiError::MalformedJson(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
