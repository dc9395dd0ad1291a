//! Correctness labels from client feedback, for calibrating on a team's own traffic
//! (`cascade calibrate --ledger`).
//!
//! `POST /v1/feedback` takes a score in [0, 1] (thumbs up is 1, down 0; docs/api.md), higher
//! meaning a better answer. A request served locally whose score is at least the cutoff counts
//! as a right local answer, below it as a wrong one. Only locally served requests count: an
//! escalated request's feedback judges the remote model's answer, not the local one its
//! confidence value scored.

use std::collections::HashMap;

use local_model::ProbeFeatures;

use super::record::{EvalRecord, SavedToken};
use crate::storage::SignalRecord;

/// Fewest labeled requests a calibration from feedback is fitted on.
pub const MIN_LABELED: usize = 30;

/// Fewest right and fewest wrong answers among them: a map or a logistic fit from a handful
/// of one class says nothing about it.
pub const MIN_PER_CLASS: usize = 5;

/// Default `--feedback-cutoff`: the middle of the score range, so thumbs up is right and
/// thumbs down wrong, and a graded score counts as right when it is at least half marks.
pub const DEFAULT_CUTOFF: f64 = 0.5;

/// The scored, labeled requests of one rule.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeedbackLabels {
    /// The rule's recorded score per request (higher = more confident).
    pub scores: Vec<f64>,
    /// Whether the client judged the local answer right.
    pub correct: Vec<bool>,
}

impl FeedbackLabels {
    /// How many labels say right.
    pub fn right(&self) -> usize {
        self.correct.iter().filter(|c| **c).count()
    }

    /// How many labels say wrong.
    pub fn wrong(&self) -> usize {
        self.correct.len() - self.right()
    }
}

/// Why feedback labels cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LabelError {
    /// The cutoff is not a score the feedback API accepts.
    #[error("--feedback-cutoff must be within [0, 1], not {0}")]
    Cutoff(f64),
    /// Fewer labels than a fit needs.
    #[error(
        "{labeled} requests served locally with feedback ({right} right, {wrong} wrong); \
         a calibration from feedback needs at least {MIN_LABELED}, with at least \
         {MIN_PER_CLASS} right and {MIN_PER_CLASS} wrong"
    )]
    TooFew {
        /// Labeled requests found.
        labeled: usize,
        /// Of which right.
        right: usize,
        /// Of which wrong.
        wrong: usize,
    },
}

/// Whether a feedback score counts as a right answer at `cutoff`.
pub fn is_right(score: f64, cutoff: f64) -> bool {
    score >= cutoff
}

/// The labels of the requests scored by `rule` (its `Aggregate::name`) that were served
/// locally and have feedback; other records are skipped.
pub fn labels(
    records: &[SignalRecord],
    rule: &str,
    cutoff: f64,
) -> Result<FeedbackLabels, LabelError> {
    if !(0.0..=1.0).contains(&cutoff) {
        return Err(LabelError::Cutoff(cutoff));
    }
    let mut labels = FeedbackLabels::default();
    for r in records {
        let Some(score) = r.feedback else { continue };
        if r.route != "local" || r.confidence_aggregate.as_deref() != Some(rule) {
            continue;
        }
        labels.scores.push(if r.confidence.is_nan() {
            f64::NEG_INFINITY
        } else {
            r.confidence
        });
        labels.correct.push(is_right(score, cutoff));
    }
    Ok(labels)
}

/// The requests whose signals the ledger kept (`log_signals`), as eval items: labeled (the
/// feedback on a locally served answer) or not (no feedback, or escalated), so that every rule,
/// the learned rule and the probe are fitted and judged as on a labeled eval run.
#[derive(Clone, Debug, Default)]
pub struct KeptItems {
    /// One item per request with kept tokens; the dataset is the request's team (`no team`
    /// without one), so several teams are judged per team and across teams.
    pub records: Vec<EvalRecord>,
    /// The hidden-state features of the items that have them, keyed like `run.probe.jsonl`'s.
    pub probes: HashMap<(String, String), ProbeFeatures>,
    /// Requests whose kept bytes could not be decoded (skipped).
    pub undecodable: usize,
}

impl KeptItems {
    /// The labels among the items.
    pub fn labels(&self) -> FeedbackLabels {
        let correct: Vec<bool> = self.records.iter().filter_map(|r| r.correct).collect();
        FeedbackLabels {
            scores: vec![0.0; correct.len()],
            correct,
        }
    }
}

/// Dataset name of requests without a team.
pub const NO_TEAM: &str = "no team";

/// The requests of `team` (every team when `None`) with kept signals, as items labeled at
/// `cutoff` where they were served locally and have feedback.
pub fn kept_items(
    records: &[SignalRecord],
    team: Option<&str>,
    cutoff: f64,
) -> Result<KeptItems, LabelError> {
    if !(0.0..=1.0).contains(&cutoff) {
        return Err(LabelError::Cutoff(cutoff));
    }
    let mut kept = KeptItems::default();
    for r in records {
        if team.is_some() && r.team.as_deref() != team {
            continue;
        }
        let Some(encoded) = &r.signals else { continue };
        let Ok(signals) = encoded.decode() else {
            kept.undecodable += 1;
            continue;
        };
        let dataset = r.team.clone().unwrap_or_else(|| NO_TEAM.to_owned());
        let correct = match (r.route.as_str(), r.feedback) {
            ("local", Some(score)) => Some(is_right(score, cutoff)),
            _ => None,
        };
        if let Some(hidden) = signals.hidden {
            kept.probes.insert((dataset.clone(), r.id.clone()), hidden);
        }
        kept.records.push(EvalRecord {
            id: r.id.clone(),
            dataset,
            prompt: String::new(),
            output: String::new(),
            correct,
            grader: None,
            tokens: signals
                .tokens
                .iter()
                .map(|t| SavedToken {
                    id: 0,
                    text: String::new(),
                    logprob: t.logprob,
                    entropy: t.entropy,
                    margin: t.margin,
                })
                .collect(),
            prompt_tokens: 0,
            finish_reason: String::new(),
            elapsed_ms: 0.0,
        });
    }
    Ok(kept)
}

/// Checks there are enough labels of each class to fit on.
pub fn check_enough(labels: &FeedbackLabels) -> Result<(), LabelError> {
    let (right, wrong) = (labels.right(), labels.wrong());
    if labels.correct.len() < MIN_LABELED || right < MIN_PER_CLASS || wrong < MIN_PER_CLASS {
        return Err(LabelError::TooFew {
            labeled: labels.correct.len(),
            right,
            wrong,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(route: &str, rule: &str, confidence: f64, feedback: Option<f64>) -> SignalRecord {
        SignalRecord {
            id: "r".to_owned(),
            created_unix_ms: 0,
            team: Some("alpha".to_owned()),
            variant: None,
            route: route.to_owned(),
            confidence,
            confidence_aggregate: Some(rule.to_owned()),
            feedback,
            status: 200,
            signals: None,
        }
    }

    #[test]
    fn scores_at_or_above_the_cutoff_are_right_and_thumbs_map_to_the_ends() {
        assert!(is_right(1.0, DEFAULT_CUTOFF));
        assert!(!is_right(0.0, DEFAULT_CUTOFF));
        assert!(is_right(0.5, 0.5));
        assert!(!is_right(0.6, 0.7));
    }

    #[test]
    fn only_local_requests_of_the_rule_with_feedback_become_labels() {
        let records = [
            record("local", "sum_logprob", -1.0, Some(1.0)),
            record("local", "sum_logprob", -4.0, Some(0.2)),
            record("local", "sum_logprob", -2.0, None),
            record("remote", "sum_logprob", -9.0, Some(1.0)),
            record("local", "mean_logprob", -0.1, Some(1.0)),
            record("local", "sum_logprob", f64::NAN, Some(0.0)),
        ];
        let l = labels(&records, "sum_logprob", 0.5).unwrap();
        assert_eq!(l.scores[..2], [-1.0, -4.0]);
        assert_eq!(l.scores[2], f64::NEG_INFINITY);
        assert_eq!(l.correct, [true, false, false]);
        assert_eq!((l.right(), l.wrong()), (1, 2));
        // A lenient cutoff turns the 0.2 into a right answer; a score of 0 stays wrong.
        let lenient = labels(&records, "sum_logprob", 0.1).unwrap();
        assert_eq!(lenient.correct, [true, true, false]);
        assert_eq!(
            labels(&records, "sum_logprob", 1.5),
            Err(LabelError::Cutoff(1.5))
        );
    }

    #[test]
    fn kept_signals_become_items_labeled_only_where_served_locally_with_feedback() {
        use crate::storage::EncodedSignals;
        let token = policies::TokenSignal {
            logprob: -0.5,
            entropy: 1.0,
            margin: 0.25,
        };
        let hidden = ProbeFeatures {
            final_mean: vec![1.0],
            final_last: vec![2.0],
            middle_mean: vec![3.0],
            middle_last: vec![4.0],
        };
        let kept = |mut r: SignalRecord, team: Option<&str>, with_hidden: bool| {
            r.team = team.map(str::to_owned);
            r.signals = Some(EncodedSignals::encode(
                &[token, token],
                with_hidden.then_some(&hidden),
            ));
            r
        };
        let mut records = vec![
            kept(
                record("local", "sum_logprob", -1.0, Some(1.0)),
                Some("alpha"),
                true,
            ),
            kept(
                record("local", "mean_logprob", -1.0, Some(0.0)),
                Some("alpha"),
                false,
            ),
            kept(
                record("local", "sum_logprob", -1.0, None),
                Some("alpha"),
                false,
            ),
            kept(
                record("remote", "sum_logprob", -9.0, Some(1.0)),
                Some("alpha"),
                false,
            ),
            kept(record("local", "sum_logprob", -1.0, Some(1.0)), None, true),
            record("local", "sum_logprob", -1.0, Some(1.0)),
        ];
        for (i, r) in records.iter_mut().enumerate() {
            r.id = format!("r{i}");
        }
        records.push(SignalRecord {
            signals: Some(EncodedSignals {
                tokens: vec![0; 5],
                hidden: None,
            }),
            ..record("local", "sum_logprob", -1.0, Some(1.0))
        });
        let all = kept_items(&records, None, 0.5).unwrap();
        assert_eq!(all.undecodable, 1);
        // Labels come from the feedback, whatever rule routed the request.
        let labels: Vec<Option<bool>> = all.records.iter().map(|r| r.correct).collect();
        assert_eq!(labels, [Some(true), Some(false), None, None, Some(true)]);
        assert_eq!(all.records[0].signals(), [token, token]);
        assert_eq!(all.records[4].dataset, NO_TEAM);
        assert_eq!(all.probes.len(), 2);
        assert_eq!(all.probes[&("alpha".to_owned(), "r0".to_owned())], hidden);
        assert_eq!((all.labels().right(), all.labels().wrong()), (2, 1));
        let alpha = kept_items(&records, Some("alpha"), 0.5).unwrap();
        assert_eq!(alpha.records.len(), 4);
        assert!(alpha.records.iter().all(|r| r.dataset == "alpha"));
        assert_eq!(
            kept_items(&records, None, -0.1).map(|k| k.records.len()),
            Err(LabelError::Cutoff(-0.1))
        );
    }

    #[test]
    fn too_few_labels_or_too_few_of_one_class_are_refused() {
        let make = |right: usize, wrong: usize| FeedbackLabels {
            scores: vec![0.0; right + wrong],
            correct: (0..right + wrong).map(|i| i < right).collect(),
        };
        assert!(check_enough(&make(25, 5)).is_ok());
        assert_eq!(
            check_enough(&make(20, 9)),
            Err(LabelError::TooFew {
                labeled: 29,
                right: 20,
                wrong: 9
            })
        );
        assert!(check_enough(&make(36, 4)).is_err());
        assert!(check_enough(&make(4, 36)).is_err());
    }
}
