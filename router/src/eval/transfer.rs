//! Leave-one-dataset-out: does a rule chosen without a kind of traffic work on it?
//!
//! In-set cross-validation answers "how good is the best rule for this set"; a default has to
//! answer "how good is the rule we would have picked without ever seeing this set". For each
//! dataset X, the rule with the best mean APGR over the other datasets is chosen (the learned
//! rule is refitted on the other datasets only), and its AUROC and APGR on X are reported next
//! to each fixed rule's, with the share of the random-to-oracle APGR headroom it recovers.

use policies::{Aggregate, TokenSignal};
use serde::Serialize;

use policies::isotonic::IsotonicMap;

use super::metrics::{apgr, auroc, calibration, DeferralCurve};
use super::record::EvalRecord;
use super::scoring::{aggregate_scores, fit_default_learned_on};

/// One rule's figures on one dataset.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Figures {
    /// AUROC for predicting correctness; `None` when the set is all right or all wrong.
    pub auroc: Option<f64>,
    /// APGR (random 0.5); `None` when the remote is no better than local.
    pub apgr: Option<f64>,
    /// `(apgr - 0.5) / (oracle_apgr - 0.5)`: the share of the headroom over random recovered.
    pub headroom: Option<f64>,
}

/// What happened to one held-out dataset.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeldOut {
    /// The dataset left out.
    pub dataset: String,
    /// Its items.
    pub items: usize,
    /// Its local accuracy.
    pub local_accuracy: f64,
    /// APGR of the oracle on it.
    pub oracle_apgr: Option<f64>,
    /// The fixed rule with the best mean APGR on the other datasets.
    pub chosen: String,
    /// The chosen rule's figures on the held-out dataset.
    pub chosen_figures: Figures,
    /// Expected calibration error (10 bins) on the held-out dataset of the chosen rule's
    /// isotonic map fitted on the other datasets: does `min_p_correct` mean the same on
    /// traffic the map never saw?
    pub chosen_cross_set_ece: Option<f64>,
    /// Every fixed rule's figures on it (in the report's `rules` order), for comparison.
    pub fixed: Vec<Figures>,
    /// The learned rule fitted on the other datasets only, scored on this one (cross-set).
    pub learned_cross_set: Option<Figures>,
}

/// The whole leave-one-dataset-out comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TransferReport {
    /// The fixed rules compared, in order.
    pub rules: Vec<String>,
    /// One entry per dataset.
    pub held_out: Vec<HeldOut>,
}

/// A rule's figures on labeled scores.
pub fn figures(scores: &[f64], correct: &[bool], remote_accuracy: f64) -> Figures {
    let n = correct.len().max(1) as f64;
    let local = correct.iter().filter(|c| **c).count() as f64 / n;
    let zero = vec![0.0; correct.len()];
    let area = DeferralCurve::from_scores(scores, correct, &zero, remote_accuracy).area();
    let oracle = DeferralCurve::oracle(correct, &zero, remote_accuracy).area();
    let rule_apgr = apgr(area, local, remote_accuracy);
    let oracle_apgr = apgr(oracle, local, remote_accuracy);
    Figures {
        auroc: auroc(scores, correct),
        apgr: rule_apgr,
        headroom: match (rule_apgr, oracle_apgr) {
            (Some(a), Some(o)) if o - 0.5 > 1e-12 => Some((a - 0.5) / (o - 0.5)),
            _ => None,
        },
    }
}

/// Runs the comparison over the labeled records of at least two datasets; `None` otherwise.
pub fn leave_one_dataset_out(
    records: &[EvalRecord],
    rules: &[Aggregate],
    folds: usize,
    seed: u64,
    remote_accuracy: f64,
) -> Option<TransferReport> {
    let labeled: Vec<&EvalRecord> = records.iter().filter(|r| r.correct.is_some()).collect();
    let mut datasets: Vec<String> = labeled.iter().map(|r| r.dataset.clone()).collect();
    datasets.sort();
    datasets.dedup();
    if datasets.len() < 2 {
        return None;
    }
    let signals: Vec<Vec<TokenSignal>> = labeled.iter().map(|r| r.signals()).collect();
    let correct: Vec<bool> = labeled.iter().map(|r| r.correct == Some(true)).collect();
    let members: Vec<Vec<usize>> = datasets
        .iter()
        .map(|d| {
            (0..labeled.len())
                .filter(|&i| labeled[i].dataset == *d)
                .collect()
        })
        .collect();
    let scores: Vec<Vec<f64>> = rules
        .iter()
        .map(|a| aggregate_scores(a, &signals))
        .collect();
    let pick = |v: &[f64], idx: &[usize]| idx.iter().map(|&i| v[i]).collect::<Vec<f64>>();
    let pick_b = |idx: &[usize]| idx.iter().map(|&i| correct[i]).collect::<Vec<bool>>();
    // figures_by[r][d]: fixed rules need no fitting, so their figures per set are computed once.
    let figures_by: Vec<Vec<Figures>> = scores
        .iter()
        .map(|s| {
            members
                .iter()
                .map(|idx| figures(&pick(s, idx), &pick_b(idx), remote_accuracy))
                .collect()
        })
        .collect();
    let mut held_out = Vec::with_capacity(datasets.len());
    for (d, name) in datasets.iter().enumerate() {
        let others: Vec<usize> = (0..datasets.len()).filter(|&o| o != d).collect();
        // Mean APGR over the other sets; sets without a gap (all right) do not vote.
        let mean_other_apgr = |r: usize| {
            let v: Vec<f64> = others
                .iter()
                .filter_map(|&o| figures_by[r][o].apgr)
                .collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        let chosen = (0..rules.len())
            .max_by(|&a, &b| mean_other_apgr(a).total_cmp(&mean_other_apgr(b)))
            .unwrap_or(0);
        let train: Vec<usize> = others.iter().flat_map(|&o| members[o].clone()).collect();
        let learned = fit_default_learned_on(&signals, &correct, &train, folds, seed);
        let idx = &members[d];
        let test_correct = pick_b(idx);
        let learned_cross_set = learned.map(|fit| {
            let s: Vec<f64> = idx
                .iter()
                .map(|&i| {
                    fit.rule
                        .probability(&signals[i])
                        .filter(|p| !p.is_nan())
                        .unwrap_or(f64::NEG_INFINITY)
                })
                .collect();
            figures(&s, &test_correct, remote_accuracy)
        });
        let train_pairs: Vec<(f64, bool)> = train
            .iter()
            .map(|&i| (scores[chosen][i], correct[i]))
            .collect();
        let chosen_cross_set_ece = IsotonicMap::fit(&train_pairs).ok().map(|map| {
            let p: Vec<f64> = idx
                .iter()
                .map(|&i| map.probability(scores[chosen][i]))
                .collect();
            calibration(&p, &test_correct, 10).0
        });
        let n = idx.len().max(1) as f64;
        let local = test_correct.iter().filter(|c| **c).count() as f64 / n;
        let zero = vec![0.0; idx.len()];
        let oracle = DeferralCurve::oracle(&test_correct, &zero, remote_accuracy).area();
        held_out.push(HeldOut {
            dataset: name.clone(),
            items: idx.len(),
            local_accuracy: local,
            oracle_apgr: apgr(oracle, local, remote_accuracy),
            chosen: rules.get(chosen).map(Aggregate::name).unwrap_or_default(),
            chosen_figures: figures_by[chosen][d],
            chosen_cross_set_ece,
            fixed: figures_by.iter().map(|f| f[d]).collect(),
            learned_cross_set,
        });
    }
    Some(TransferReport {
        rules: rules.iter().map(Aggregate::name).collect(),
        held_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dataset: &str, logprobs: &[f32], correct: bool) -> EvalRecord {
        let tokens = logprobs
            .iter()
            .map(|&lp| super::super::record::SavedToken {
                id: 0,
                text: String::new(),
                logprob: lp,
                entropy: 0.5,
                margin: 0.5,
            })
            .collect();
        EvalRecord {
            id: String::new(),
            dataset: dataset.to_owned(),
            prompt: String::new(),
            output: String::new(),
            correct: Some(correct),
            grader: None,
            tokens,
            prompt_tokens: 0,
            finish_reason: "stop".to_owned(),
            elapsed_ms: 0.0,
        }
    }

    #[test]
    fn a_rule_chosen_without_a_set_is_judged_on_it() {
        // Sets "a" and "b": right answers are short and sure, so the sum ranks perfectly and
        // the mean does too. Set "long": right answers are long and sure, wrong ones short
        // and unsure in total but sure per token at first: the sum ranks them backwards.
        let mut records = Vec::new();
        for set in ["a", "b"] {
            records.push(record(set, &[-0.1], true));
            records.push(record(set, &[-0.2], true));
            records.push(record(set, &[-1.0, -2.0, -1.5], false));
            records.push(record(set, &[-0.9, -2.5], false));
        }
        records.push(record("long", &[-0.3; 12], true));
        records.push(record("long", &[-0.15; 10], true));
        records.push(record("long", &[-0.8], false));
        records.push(record("long", &[-1.0], false));
        let rules = [Aggregate::SumLogprob, Aggregate::MeanLogprob];
        let report = leave_one_dataset_out(&records, &rules, 2, 1, 1.0).unwrap();
        let long = report
            .held_out
            .iter()
            .find(|h| h.dataset == "long")
            .unwrap();
        // The sum: sums -3.6 and -1.5 for the right answers, -0.8 and -1 for the wrong: AUROC 0.
        assert_eq!(long.fixed[0].auroc, Some(0.0));
        assert_eq!(long.fixed[1].auroc, Some(1.0));
        // Both rank "a" and "b" perfectly, so the tie goes to the later rule in `rules`
        // (max_by keeps the last maximum): the mean, which transfers.
        assert_eq!(long.chosen, "mean_logprob");
        assert!((long.chosen_figures.headroom.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(long.local_accuracy, 0.5);
        assert!(long.learned_cross_set.is_some());
        // The mean's map fitted on "a" and "b" (right at -0.2 and above, wrong at -1.5 and
        // below) reads "long"'s right answers (means -0.3, -0.15) as p 0 and 1 and its wrong
        // ones as 0: the bin at p 0 holds three items, one right, so ECE 3/4 * 1/3 = 0.25.
        assert!((long.chosen_cross_set_ece.unwrap() - 0.25).abs() < 1e-12);
        // Fewer than two sets: nothing to leave out.
        assert!(leave_one_dataset_out(&records[..4], &rules, 2, 1, 1.0).is_none());
    }
}
