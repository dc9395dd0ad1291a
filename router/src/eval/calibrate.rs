//! Choosing thresholds from a run, and checking the choice by cross-validation.
//!
//! A threshold can be asked for in three ways: the escalation rate it should give (works on
//! unlabeled traffic too), the quality it should reach at the least escalation, or the "knee"
//! of the deferral curve: the threshold whose quality gain over random escalation at the same
//! rate is largest (no price needed; it is the point that best uses the rule's ranking).

use policies::{Aggregate, TokenSignal};
use serde::Serialize;

use super::logistic::stratified_folds;
use super::metrics::{apgr, apply_threshold, realizable_thresholds, DeferralCurve, OperatingPoint};
use super::record::EvalRecord;
use super::scoring::{aggregate_scores, fit_default_learned_on, LEARNED};

/// What the threshold should achieve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "target", content = "value", rename_all = "snake_case")]
pub enum Target {
    /// This share of requests escalated.
    Rate(f64),
    /// This quality (share correct, escalated items at the remote accuracy), least escalation.
    Quality(f64),
    /// The largest gain over random escalation at the same rate.
    Knee,
}

/// The threshold nearest to escalating `target` of the items (ties prefer escalating less).
pub fn threshold_for_rate(scores: &[f64], target: f64) -> Option<OperatingPoint> {
    let n = scores.len().max(1) as f64;
    realizable_thresholds(scores)
        .into_iter()
        .min_by(|a, b| {
            let da = (a.0 as f64 / n - target).abs();
            let db = (b.0 as f64 / n - target).abs();
            da.total_cmp(&db).then(a.0.cmp(&b.0))
        })
        .map(|(k, threshold)| OperatingPoint {
            threshold,
            rate: k as f64 / n,
            quality: None,
        })
}

/// The threshold that reaches `target` quality with the fewest escalations; `None` when no
/// threshold does.
pub fn threshold_for_quality(
    scores: &[f64],
    correct: &[bool],
    remote_accuracy: f64,
    target: f64,
) -> Option<OperatingPoint> {
    let curve = curve_without_costs(scores, correct, remote_accuracy);
    realizable_thresholds(scores)
        .into_iter()
        .find(|&(k, _)| curve.quality[k] >= target - 1e-12)
        .map(|(k, threshold)| OperatingPoint {
            threshold,
            rate: curve.rate(k),
            quality: Some(curve.quality[k]),
        })
}

/// The threshold with the largest quality gain over random escalation at the same rate.
pub fn knee(scores: &[f64], correct: &[bool], remote_accuracy: f64) -> Option<OperatingPoint> {
    let curve = curve_without_costs(scores, correct, remote_accuracy);
    let random = DeferralCurve::random(correct, &vec![0.0; correct.len()], remote_accuracy);
    realizable_thresholds(scores)
        .into_iter()
        .max_by(|a, b| {
            let gain = |k: usize| curve.quality[k] - random.quality[k];
            // Equal gains: prefer escalating less.
            gain(a.0).total_cmp(&gain(b.0)).then(b.0.cmp(&a.0))
        })
        .map(|(k, threshold)| OperatingPoint {
            threshold,
            rate: curve.rate(k),
            quality: Some(curve.quality[k]),
        })
}

/// The operating point for a target on labeled data (rate targets need no labels).
pub fn choose(
    scores: &[f64],
    correct: Option<&[bool]>,
    remote_accuracy: f64,
    target: Target,
) -> Option<OperatingPoint> {
    match (target, correct) {
        (Target::Rate(r), None) => threshold_for_rate(scores, r),
        (Target::Rate(r), Some(c)) => threshold_for_rate(scores, r).map(|p| OperatingPoint {
            quality: Some(apply_threshold(scores, c, p.threshold, remote_accuracy).1),
            ..p
        }),
        (Target::Quality(q), Some(c)) => threshold_for_quality(scores, c, remote_accuracy, q),
        (Target::Knee, Some(c)) => knee(scores, c, remote_accuracy),
        (_, None) => None,
    }
}

fn curve_without_costs(scores: &[f64], correct: &[bool], remote_accuracy: f64) -> DeferralCurve {
    DeferralCurve::from_scores(scores, correct, &vec![0.0; scores.len()], remote_accuracy)
}

/// What one threshold does on labeled data, next to the baselines at the same rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ThresholdReport {
    /// Serve locally when `score >= threshold`.
    pub threshold: f64,
    /// Share of items escalated.
    pub rate: f64,
    /// Quality with escalated items at the remote accuracy.
    pub quality: f64,
    /// Quality of mean log-prob escalating the same share of items.
    pub mean_logprob_quality: f64,
    /// Quality of random escalation at the same rate.
    pub random_quality: f64,
    /// Share correct among the answers served locally (`None` when none is).
    pub served_accuracy: Option<f64>,
    /// Share of generated tokens that early exit would not have generated.
    pub early_exit_saving: f64,
}

/// Applies `threshold` of `aggregate` to labeled answers (`signals[i]` graded `correct[i]`).
pub fn at_threshold(
    aggregate: &Aggregate,
    signals: &[Vec<TokenSignal>],
    correct: &[bool],
    threshold: f64,
    remote_accuracy: f64,
) -> ThresholdReport {
    let scores = aggregate_scores(aggregate, signals);
    let (rate, quality) = apply_threshold(&scores, correct, threshold, remote_accuracy);
    let n = correct.len().max(1) as f64;
    let local = correct.iter().filter(|c| **c).count() as f64 / n;
    let mean = aggregate_scores(&Aggregate::MeanLogprob, signals);
    let served: Vec<bool> = scores
        .iter()
        .zip(correct)
        .filter(|(s, _)| **s >= threshold)
        .map(|(_, c)| *c)
        .collect();
    // Tokens up to and including the one after which the verdict is certain.
    let (mut used, mut total) = (0usize, 0usize);
    for t in signals {
        total += t.len();
        used += (1..=t.len())
            .find(|&m| aggregate.settled_below(&t[..m], threshold))
            .unwrap_or(t.len());
    }
    ThresholdReport {
        threshold,
        rate,
        quality,
        mean_logprob_quality: curve_without_costs(&mean, correct, remote_accuracy).quality_at(rate),
        random_quality: local + (remote_accuracy - local) * rate,
        served_accuracy: (!served.is_empty())
            .then(|| served.iter().filter(|c| **c).count() as f64 / served.len() as f64),
        early_exit_saving: if total == 0 {
            0.0
        } else {
            1.0 - used as f64 / total as f64
        },
    }
}

/// Held-out figures of one rule under cross-validation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CvRule {
    /// The rule.
    pub name: String,
    /// Held-out APGR, averaged over datasets (each dataset's out-of-fold scores pooled).
    pub apgr: f64,
    /// Held-out APGR per dataset, in `CvReport::datasets` order.
    pub apgr_by_dataset: Vec<Option<f64>>,
    /// Mean threshold chosen on the training folds.
    pub threshold: f64,
    /// Held-out escalation rate of the thresholds chosen on the training folds.
    pub rate: f64,
    /// Held-out quality at those thresholds.
    pub quality: f64,
    /// Quality of random escalation at the same held-out rate.
    pub random_quality: f64,
    /// Quality of mean log-prob escalating the same share of the held-out items.
    pub mean_logprob_quality: f64,
    /// How many folds picked this rule as the best (by training APGR).
    pub selected_in_folds: usize,
}

/// Cross-validated comparison of rules and the threshold each would get.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CvReport {
    /// Datasets pooled.
    pub datasets: Vec<String>,
    /// Items.
    pub items: usize,
    /// Folds.
    pub folds: usize,
    /// How thresholds were chosen on the training folds.
    pub target: Target,
    /// Per rule, sorted by held-out APGR (best first).
    pub rules: Vec<CvRule>,
}

/// Cross-validates rule and threshold choice on labeled records (several datasets may be
/// pooled): folds are stratified by dataset and correctness; on each split, every rule gets
/// a threshold from the training items (one threshold across datasets, as a default would
/// be) and is measured on the held-out items. The learned rule is refitted on every split.
pub fn cross_validate(
    records: &[EvalRecord],
    rules: &[Aggregate],
    target: Target,
    folds: usize,
    seed: u64,
    remote_accuracy: f64,
) -> CvReport {
    let labeled: Vec<&EvalRecord> = records.iter().filter(|r| r.correct.is_some()).collect();
    let correct: Vec<bool> = labeled.iter().map(|r| r.correct == Some(true)).collect();
    let signals: Vec<Vec<TokenSignal>> = labeled.iter().map(|r| r.signals()).collect();
    let mut datasets: Vec<String> = labeled.iter().map(|r| r.dataset.clone()).collect();
    datasets.sort();
    datasets.dedup();
    let dataset_of: Vec<usize> = labeled
        .iter()
        .map(|r| datasets.iter().position(|d| *d == r.dataset).unwrap_or(0))
        .collect();
    // Stratify by (dataset, correct): fold sizes stay balanced within each dataset.
    let strata: Vec<usize> = dataset_of
        .iter()
        .zip(&correct)
        .map(|(d, c)| 2 * d + usize::from(*c))
        .collect();
    let mut fold_of = vec![0; labeled.len()];
    for s in 0..2 * datasets.len() {
        let members: Vec<usize> = (0..labeled.len()).filter(|&i| strata[i] == s).collect();
        let assigned = stratified_folds(
            &vec![true; members.len()],
            folds,
            seed.wrapping_add(s as u64),
        );
        for (&i, f) in members.iter().zip(assigned) {
            fold_of[i] = f;
        }
    }
    let names: Vec<String> = rules
        .iter()
        .map(Aggregate::name)
        .chain([LEARNED.to_owned()])
        .collect();
    let fixed_scores: Vec<Vec<f64>> = rules
        .iter()
        .map(|a| aggregate_scores(a, &signals))
        .collect();
    let mean_index = rules.iter().position(|a| *a == Aggregate::MeanLogprob);
    // Out-of-fold scores per rule (the learned rule's from models fitted without the fold).
    let mut oof: Vec<Vec<f64>> = fixed_scores.clone();
    oof.push(vec![f64::NEG_INFINITY; labeled.len()]);
    let mut thresholds = vec![Vec::new(); names.len()];
    let mut held_out = vec![(0.0, 0.0, 0.0, 0.0); names.len()];
    let mut selected = vec![0usize; names.len()];
    for fold in 0..folds {
        let train: Vec<usize> = (0..labeled.len()).filter(|&i| fold_of[i] != fold).collect();
        let test: Vec<usize> = (0..labeled.len()).filter(|&i| fold_of[i] == fold).collect();
        if train.is_empty() || test.is_empty() {
            continue;
        }
        let pick = |v: &[f64], idx: &[usize]| idx.iter().map(|&i| v[i]).collect::<Vec<f64>>();
        let pick_b = |idx: &[usize]| idx.iter().map(|&i| correct[i]).collect::<Vec<bool>>();
        let learned = fit_default_learned_on(&signals, &correct, &train, folds, seed);
        // (train scores, test scores) per rule.
        let mut per_rule: Vec<(Vec<f64>, Vec<f64>)> = fixed_scores
            .iter()
            .map(|s| (pick(s, &train), pick(s, &test)))
            .collect();
        let learned_scores = |idx: &[usize]| -> Vec<f64> {
            idx.iter()
                .map(|&i| {
                    learned
                        .as_ref()
                        .and_then(|l| l.rule.probability(&signals[i]))
                        .filter(|p| !p.is_nan())
                        .unwrap_or(f64::NEG_INFINITY)
                })
                .collect()
        };
        // Training scores of the learned rule are its own out-of-fold ones: in-sample
        // probabilities would flatter it when its threshold and APGR are chosen.
        let learned_train = learned.as_ref().map_or_else(
            || vec![f64::NEG_INFINITY; train.len()],
            |l| l.out_of_fold.clone(),
        );
        per_rule.push((learned_train, learned_scores(&test)));
        for (&i, s) in test.iter().zip(&per_rule[names.len() - 1].1) {
            oof[names.len() - 1][i] = *s;
        }
        let (train_correct, test_correct) = (pick_b(&train), pick_b(&test));
        let train_datasets: Vec<usize> = train.iter().map(|&i| dataset_of[i]).collect();
        let mut best = (f64::NEG_INFINITY, 0);
        for (r, (train_scores, test_scores)) in per_rule.iter().enumerate() {
            let train_apgr = mean_apgr(
                train_scores,
                &train_correct,
                &train_datasets,
                datasets.len(),
                remote_accuracy,
            );
            if train_apgr > best.0 {
                best = (train_apgr, r);
            }
            let Some(point) = choose(train_scores, Some(&train_correct), remote_accuracy, target)
            else {
                continue;
            };
            thresholds[r].push(point.threshold);
            let (rate, quality) =
                apply_threshold(test_scores, &test_correct, point.threshold, remote_accuracy);
            let m = test.len() as f64;
            let local = test_correct.iter().filter(|c| **c).count() as f64 / m;
            let random_quality = local + (remote_accuracy - local) * rate;
            let mean_quality = mean_index.map_or(f64::NAN, |mi| {
                curve_without_costs(&per_rule[mi].1, &test_correct, remote_accuracy)
                    .quality_at(rate)
            });
            let h = &mut held_out[r];
            h.0 += rate * m;
            h.1 += quality * m;
            h.2 += random_quality * m;
            h.3 += mean_quality * m;
        }
        selected[best.1] += 1;
    }
    let n = labeled.len().max(1) as f64;
    let mut out: Vec<CvRule> = names
        .iter()
        .enumerate()
        .map(|(r, name)| {
            let by_dataset: Vec<Option<f64>> = (0..datasets.len())
                .map(|d| {
                    let idx: Vec<usize> =
                        (0..labeled.len()).filter(|&i| dataset_of[i] == d).collect();
                    let s: Vec<f64> = idx.iter().map(|&i| oof[r][i]).collect();
                    let c: Vec<bool> = idx.iter().map(|&i| correct[i]).collect();
                    dataset_apgr(&s, &c, remote_accuracy)
                })
                .collect();
            let valid: Vec<f64> = by_dataset.iter().flatten().copied().collect();
            CvRule {
                name: name.clone(),
                apgr: valid.iter().sum::<f64>() / valid.len().max(1) as f64,
                apgr_by_dataset: by_dataset,
                threshold: thresholds[r].iter().sum::<f64>() / thresholds[r].len().max(1) as f64,
                rate: held_out[r].0 / n,
                quality: held_out[r].1 / n,
                random_quality: held_out[r].2 / n,
                mean_logprob_quality: held_out[r].3 / n,
                selected_in_folds: selected[r],
            }
        })
        .collect();
    out.sort_by(|a, b| b.apgr.total_cmp(&a.apgr));
    CvReport {
        datasets,
        items: labeled.len(),
        folds,
        target,
        rules: out,
    }
}

/// APGR of scores on one dataset's items.
fn dataset_apgr(scores: &[f64], correct: &[bool], remote_accuracy: f64) -> Option<f64> {
    if scores.is_empty() {
        return None;
    }
    let local = correct.iter().filter(|c| **c).count() as f64 / correct.len() as f64;
    apgr(
        curve_without_costs(scores, correct, remote_accuracy).area(),
        local,
        remote_accuracy,
    )
}

/// APGR averaged over datasets, so that a large set does not outvote a small one.
fn mean_apgr(
    scores: &[f64],
    correct: &[bool],
    dataset_of: &[usize],
    datasets: usize,
    remote_accuracy: f64,
) -> f64 {
    let values: Vec<f64> = (0..datasets)
        .filter_map(|d| {
            let idx: Vec<usize> = (0..scores.len()).filter(|&i| dataset_of[i] == d).collect();
            let s: Vec<f64> = idx.iter().map(|&i| scores[i]).collect();
            let c: Vec<bool> = idx.iter().map(|&i| correct[i]).collect();
            dataset_apgr(&s, &c, remote_accuracy)
        })
        .collect();
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_target_picks_the_nearest_realizable_threshold() {
        let scores = [-3.0, -2.0, -1.0, -0.5];
        let p = threshold_for_rate(&scores, 0.5).unwrap();
        assert_eq!((p.threshold, p.rate), (-1.5, 0.5));
        // Ties cannot be split: 0.25 is not realizable with three equal scores.
        let p = threshold_for_rate(&[-1.0, -1.0, -1.0, -0.5], 0.25).unwrap();
        assert_eq!(p.rate, 0.0);
    }

    #[test]
    fn quality_target_escalates_as_little_as_possible() {
        let scores = [-3.0, -2.0, -1.0, -0.5];
        let correct = [false, true, false, true];
        // Quality by k: 0.5, 0.75, 0.75, 1.0, 1.0.
        let p = threshold_for_quality(&scores, &correct, 1.0, 0.75).unwrap();
        assert_eq!((p.threshold, p.rate, p.quality), (-2.5, 0.25, Some(0.75)));
        let p = threshold_for_quality(&scores, &correct, 1.0, 0.9).unwrap();
        assert_eq!((p.threshold, p.rate), (-0.75, 0.75));
        assert!(threshold_for_quality(&scores, &correct, 0.5, 0.9).is_none());
    }

    #[test]
    fn a_fixed_threshold_is_compared_at_the_same_rate_and_exits_early() {
        let answer = |lp: &[f32]| -> Vec<TokenSignal> {
            lp.iter()
                .map(|&logprob| TokenSignal {
                    logprob,
                    entropy: 0.0,
                    margin: 1.0,
                })
                .collect()
        };
        // Sums -0.5 (right), -3 (wrong, settled after its 2nd token), -4 (right, 4th token).
        let signals = vec![
            answer(&[-0.25, -0.25]),
            answer(&[-1.0, -2.0, -0.5]),
            answer(&[-1.0; 4]),
        ];
        let correct = [true, false, true];
        let r = at_threshold(&Aggregate::SumLogprob, &signals, &correct, -2.5, 1.0);
        assert!((r.rate - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.quality - 1.0).abs() < 1e-12);
        assert_eq!(r.served_accuracy, Some(1.0));
        assert!((r.random_quality - (2.0 / 3.0 + 1.0 / 3.0 * 2.0 / 3.0)).abs() < 1e-12);
        // Tokens generated: 2 + 2 + 3 of 9.
        assert!((r.early_exit_saving - 2.0 / 9.0).abs() < 1e-12);
    }

    #[test]
    fn knee_is_the_largest_gain_over_random() {
        let scores = [-3.0, -2.0, -1.0, -0.5];
        let correct = [false, true, false, true];
        // Gains over random (0.5 + 0.125 k): 0, 0.125, 0, 0.125, 0 -> the smaller k wins.
        let p = knee(&scores, &correct, 1.0).unwrap();
        assert_eq!(p.rate, 0.25);
    }
}
