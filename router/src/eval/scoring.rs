//! Every confidence rule's score for every item of a run, the learned rule included (scored
//! out of fold, so that its figures are as honest as the fixed rules').

use policies::learned::{Feature, LearnedRule, FORMAT};
use policies::{Aggregate, TokenSignal};

use super::logistic;

/// The `fraction_above` bound evaluated: tokens with probability >= 1/e count as sure.
pub const FRACTION_BOUND: f64 = -1.0;

/// The fixed rules every evaluation reports, mean log-prob (the plain baseline) first.
pub fn standard_aggregates() -> Vec<Aggregate> {
    vec![
        Aggregate::MeanLogprob,
        Aggregate::SumLogprob,
        // Between the sum (alpha 0) and the mean (alpha 1): the length-robust candidates.
        Aggregate::NormalizedLogprob { alpha: 0.25 },
        Aggregate::NormalizedLogprob { alpha: 0.5 },
        Aggregate::NormalizedLogprob { alpha: 0.75 },
        Aggregate::MinLogprob,
        Aggregate::Quantile { q: 0.05 },
        Aggregate::Quantile { q: 0.1 },
        Aggregate::Quantile { q: 0.25 },
        Aggregate::Quantile { q: 0.5 },
        Aggregate::FractionAbove {
            bound: FRACTION_BOUND,
        },
        Aggregate::MeanEntropy,
        Aggregate::MeanMargin,
    ]
}

/// Inputs of the learned rule: log-prob quantiles, minimum and mean, mean entropy, length.
pub fn default_features() -> Vec<Feature> {
    vec![
        Feature::MinLogprob,
        Feature::Quantile(0.1),
        Feature::Quantile(0.25),
        Feature::Quantile(0.5),
        Feature::MeanLogprob,
        Feature::MeanEntropy,
        Feature::LogLength,
    ]
}

/// A fixed rule by its stable name (`mean_logprob`, `quantile_0.1`, `fraction_above_-1`, ...).
pub fn parse_rule(name: &str) -> Option<Aggregate> {
    Aggregate::from_name(name)
}

/// The name reports use for the out-of-fold learned rule.
pub const LEARNED: &str = "learned";

/// One rule's scores, item by item (`-inf` where there is no score: no tokens, or NaN).
#[derive(Clone, Debug, PartialEq)]
pub struct RuleScores {
    /// The rule's stable name (`mean_logprob`, `quantile_0.1`, `learned`).
    pub name: String,
    /// Higher = more confident.
    pub scores: Vec<f64>,
}

/// An aggregate's score per item; a missing or NaN score is `-inf` (it always escalates).
pub fn aggregate_scores(aggregate: &Aggregate, signals: &[Vec<TokenSignal>]) -> Vec<f64> {
    signals
        .iter()
        .map(|t| {
            aggregate
                .score(t)
                .filter(|s| !s.is_nan())
                .unwrap_or(f64::NEG_INFINITY)
        })
        .collect()
}

/// The learned rule fitted with cross-validation.
#[derive(Clone, Debug)]
pub struct LearnedFit {
    /// The rule fitted on every item, ready to save.
    pub rule: LearnedRule,
    /// Out-of-fold probability of each item (`-inf` for items without tokens).
    pub out_of_fold: Vec<f64>,
    /// The L2 penalty chosen by cross-validated log-loss.
    pub l2: f64,
    /// Cross-validated log-loss at that penalty.
    pub log_loss: f64,
}

/// Fits the learned rule: features standardized over the run, the penalty chosen by k-fold
/// log-loss, out-of-fold probabilities for reporting, and a final fit on every item. `None`
/// when fewer than `folds` items have tokens or one class is missing.
pub fn fit_learned(
    name: &str,
    features: &[Feature],
    signals: &[Vec<TokenSignal>],
    correct: &[bool],
    folds: usize,
    seed: u64,
) -> Option<LearnedFit> {
    let values: Vec<Option<Vec<f64>>> = signals
        .iter()
        .map(|t| features.iter().map(|f| f.value(t)).collect())
        .collect();
    fit_learned_on_values(name, features, &values, correct, folds, seed)
}

/// The default learned rule (`LEARNED`, [`default_features`]) fitted on the items `train` of
/// `signals` and `correct` only: the training side of a fold or of a held-out dataset.
pub fn fit_default_learned_on(
    signals: &[Vec<TokenSignal>],
    correct: &[bool],
    train: &[usize],
    folds: usize,
    seed: u64,
) -> Option<LearnedFit> {
    let train_signals: Vec<Vec<TokenSignal>> = train.iter().map(|&i| signals[i].clone()).collect();
    let train_correct: Vec<bool> = train.iter().map(|&i| correct[i]).collect();
    fit_learned(
        LEARNED,
        &default_features(),
        &train_signals,
        &train_correct,
        folds,
        seed,
    )
}

/// `fit_learned` on feature values computed already: `values[i]` holds item `i`'s value of
/// each feature, in order, or `None` for an item without a score (it gets no probability).
/// A ledger records one score per request, not its tokens, so a fit from traffic starts here.
pub fn fit_learned_on_values(
    name: &str,
    features: &[Feature],
    values: &[Option<Vec<f64>>],
    correct: &[bool],
    folds: usize,
    seed: u64,
) -> Option<LearnedFit> {
    let usable: Vec<usize> = (0..values.len()).filter(|&i| values[i].is_some()).collect();
    let y: Vec<bool> = usable.iter().map(|&i| correct[i]).collect();
    let positives = y.iter().filter(|c| **c).count();
    if usable.len() < folds.max(2) || positives == 0 || positives == y.len() {
        return None;
    }
    let rows_raw: Vec<&[f64]> = usable
        .iter()
        .filter_map(|&i| values[i].as_deref())
        .collect();
    let (center, scale) = standardization(features.len(), &rows_raw);
    let mut rule = LearnedRule {
        format: FORMAT.to_owned(),
        name: name.to_owned(),
        features: features.to_vec(),
        center,
        scale,
        weights: vec![0.0; features.len()],
        intercept: 0.0,
        fitted_on: serde_json::Value::Null,
    };
    // Standardized through the rule itself, so training sees exactly what the policy sees.
    let rows: Vec<Vec<f64>> = rows_raw
        .iter()
        .map(|v| {
            rule.standardize(v)
                .into_iter()
                .map(|z| if z.is_nan() { 0.0 } else { z })
                .collect()
        })
        .collect();
    let fold_of = logistic::stratified_folds(&y, folds, seed);
    let (l2, log_loss) = logistic::choose_l2(&rows, &y, &fold_of);
    let oof = logistic::cross_validated_probabilities(&rows, &y, &fold_of, l2);
    let fit = logistic::fit(&rows, &y, l2);
    rule.weights = fit.weights;
    rule.intercept = fit.intercept;
    let mut out_of_fold = vec![f64::NEG_INFINITY; values.len()];
    for (&i, p) in usable.iter().zip(oof) {
        out_of_fold[i] = p;
    }
    Some(LearnedFit {
        rule,
        out_of_fold,
        l2,
        log_loss,
    })
}

/// Mean and standard deviation of each of `n` features over the finite values (an infinite
/// log-probability would make both infinite); a constant feature gets scale 1.
fn standardization(n: usize, rows: &[&[f64]]) -> (Vec<f64>, Vec<f64>) {
    (0..n)
        .map(|j| {
            let values: Vec<f64> = rows
                .iter()
                .filter_map(|r| r.get(j).copied())
                .filter(|v| v.is_finite())
                .collect();
            let n = values.len().max(1) as f64;
            let mean = values.iter().sum::<f64>() / n;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let sd = var.sqrt();
            (mean, if sd > 1e-12 { sd } else { 1.0 })
        })
        .unzip()
}

/// Every fixed rule's scores, then the learned rule's out-of-fold scores when it could be fitted.
pub fn score_rules(signals: &[Vec<TokenSignal>], learned: Option<&LearnedFit>) -> Vec<RuleScores> {
    let mut rules: Vec<RuleScores> = standard_aggregates()
        .iter()
        .map(|a| RuleScores {
            name: a.name(),
            scores: aggregate_scores(a, signals),
        })
        .collect();
    if let Some(fit) = learned {
        rules.push(RuleScores {
            name: LEARNED.to_owned(),
            scores: fit.out_of_fold.clone(),
        });
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(logprobs: &[f32]) -> Vec<TokenSignal> {
        logprobs
            .iter()
            .map(|&logprob| TokenSignal {
                logprob,
                entropy: -logprob,
                margin: 0.5,
            })
            .collect()
    }

    #[test]
    fn missing_scores_escalate_first() {
        let scores = aggregate_scores(&Aggregate::MeanLogprob, &[answer(&[-1.0]), vec![]]);
        assert_eq!(scores, vec![-1.0, f64::NEG_INFINITY]);
    }

    #[test]
    fn learned_rule_separates_sure_from_unsure_answers_out_of_fold() {
        let mut signals = Vec::new();
        let mut correct = Vec::new();
        for i in 0..60 {
            let sure = i % 2 == 0;
            let lp = if sure {
                -0.05 - 0.01 * (i % 7) as f32
            } else {
                -2.0 - 0.1 * (i % 5) as f32
            };
            signals.push(answer(&[lp, lp / 2.0, -0.01]));
            // One label in ten disagrees with the signal, so the data are not separable.
            correct.push(sure != (i % 10 == 3));
        }
        let fit = fit_learned("t", &default_features(), &signals, &correct, 5, 1).unwrap();
        let auroc = crate::eval::metrics::auroc(&fit.out_of_fold, &correct).unwrap();
        assert!(auroc > 0.8, "{auroc}");
        let saved = LearnedRule::from_json(&fit.rule.to_json()).unwrap();
        let p_sure = saved.probability(&answer(&[-0.05, -0.03, -0.01])).unwrap();
        let p_unsure = saved.probability(&answer(&[-2.2, -1.1, -0.01])).unwrap();
        assert!(p_sure > 0.7 && p_unsure < 0.3, "{p_sure} {p_unsure}");
    }
}
