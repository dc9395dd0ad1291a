//! Correctness labels from client feedback, for calibrating on a team's own traffic
//! (`cascade calibrate --ledger`).
//!
//! `POST /v1/feedback` takes a score in [0, 1] (thumbs up is 1, down 0; docs/api.md), higher
//! meaning a better answer. A request served locally whose score is at least the cutoff counts
//! as a right local answer, below it as a wrong one. Only locally served requests count: an
//! escalated request's feedback judges the remote model's answer, not the local one its
//! confidence value scored.

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
