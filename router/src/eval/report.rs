//! What an evaluation reports: per rule AUROC, area under the deferral curve, APGR, the
//! escalation rates that reach 80% and 95% of remote quality and their cost, against random
//! and oracle escalation; as a terminal table and a JSON summary.

use std::io::Write;

use policies::TokenSignal;
use serde::Serialize;

use super::metrics::{apgr, auroc, calibration, DeferralCurve};
use super::record::EvalRecord;
use super::scoring::{default_features, fit_learned, score_rules, LearnedFit, RuleScores};
use super::EvalError;

/// How escalation is valued.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// Share of escalated items the remote model answers correctly.
    pub remote_accuracy: f64,
    /// Remote price per million input tokens, USD.
    pub price_input_per_million: f64,
    /// Remote price per million output tokens, USD.
    pub price_output_per_million: f64,
    /// Folds for the learned rule's cross-validation.
    pub folds: usize,
    /// Seed of the fold assignment.
    pub seed: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            remote_accuracy: 1.0,
            // gpt-4o-mini list prices: a cheap remote, so the savings shown are conservative.
            price_input_per_million: 0.15,
            price_output_per_million: 0.60,
            folds: 5,
            seed: 1,
        }
    }
}

/// Quality targets, as shares of the remote model's quality, whose escalation rates are reported.
pub const TARGETS: [f64; 2] = [0.80, 0.95];

/// One rule's (or baseline's) figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleSummary {
    /// Stable rule name, or `random` / `oracle`.
    pub name: String,
    /// AUROC for predicting correctness; `None` for baselines or one-class data.
    pub auroc: Option<f64>,
    /// Area under the deferral curve (mean quality over escalation rates 0..1).
    pub area: f64,
    /// Share of the local-to-remote gap recovered, averaged over rates (random = 0.5).
    pub apgr: Option<f64>,
    /// Escalation rate needed to reach 80% of remote quality.
    pub rate_for_80: Option<f64>,
    /// Escalation rate needed to reach 95% of remote quality.
    pub rate_for_95: Option<f64>,
    /// Remote spend per 1,000 requests at `rate_for_95`, USD.
    pub cost_per_1k_for_95: Option<f64>,
    /// Quality at escalation rates 0, 0.01, ..., 1 (for plots and comparisons).
    pub curve: Vec<f64>,
}

/// The learned rule's cross-validated calibration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LearnedSummary {
    /// Chosen L2 penalty.
    pub l2: f64,
    /// Cross-validated log-loss.
    pub log_loss: f64,
    /// Expected calibration error of the out-of-fold probabilities (10 bins).
    pub ece: f64,
    /// Reliability table: (mean predicted probability, observed accuracy, items) per bin.
    pub reliability: Vec<(f64, f64, usize)>,
    /// The rule fitted on every item.
    pub rule: policies::LearnedRule,
}

/// The JSON summary of one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Dataset name(s) of the records.
    pub dataset: String,
    /// Labeled items scored.
    pub items: usize,
    /// Share answered correctly by the local model.
    pub local_accuracy: f64,
    /// Mean generated tokens per item.
    pub mean_tokens: f64,
    /// How escalation was valued.
    pub settings: Settings,
    /// Every rule, in report order.
    pub rules: Vec<RuleSummary>,
    /// Random escalation at the same rates.
    pub random: RuleSummary,
    /// Wrong answers escalated first.
    pub oracle: RuleSummary,
    /// The learned rule, when it could be fitted.
    pub learned: Option<LearnedSummary>,
}

/// Everything computed from a run: the summary and the inputs of the plots.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// The figures.
    pub summary: Summary,
    /// Each rule's scores, in `summary.rules` order.
    pub scores: Vec<RuleScores>,
    /// Each rule's full deferral curve, in `summary.rules` order.
    pub curves: Vec<DeferralCurve>,
    /// Correctness per item.
    pub correct: Vec<bool>,
    /// The learned fit with its out-of-fold probabilities.
    pub learned: Option<LearnedFit>,
}

/// The remote cost of escalating each item: its prompt and (as an estimate of the remote
/// answer's length) the local answer's length, at the configured prices.
pub fn escalation_costs(records: &[&EvalRecord], settings: &Settings) -> Vec<f64> {
    records
        .iter()
        .map(|r| {
            (r.prompt_tokens as f64 * settings.price_input_per_million
                + r.tokens.len() as f64 * settings.price_output_per_million)
                / 1e6
        })
        .collect()
}

/// Scores every rule on the labeled records of a run.
pub fn evaluate(
    records: &[EvalRecord],
    settings: &Settings,
    learned_name: &str,
) -> Result<Evaluation, EvalError> {
    let labeled: Vec<&EvalRecord> = records.iter().filter(|r| r.correct.is_some()).collect();
    if labeled.is_empty() {
        return Err(EvalError::Invalid(
            "the run has no labeled items".to_owned(),
        ));
    }
    let correct: Vec<bool> = labeled.iter().map(|r| r.correct == Some(true)).collect();
    let signals: Vec<Vec<TokenSignal>> = labeled.iter().map(|r| r.signals()).collect();
    let cost = escalation_costs(&labeled, settings);
    let n = labeled.len();
    let local_accuracy = correct.iter().filter(|c| **c).count() as f64 / n as f64;
    let ra = settings.remote_accuracy;

    let learned = fit_learned(
        learned_name,
        &default_features(),
        &signals,
        &correct,
        settings.folds,
        settings.seed,
    );
    let scores = score_rules(&signals, learned.as_ref());
    let curves: Vec<DeferralCurve> = scores
        .iter()
        .map(|r| DeferralCurve::from_scores(&r.scores, &correct, &cost, ra))
        .collect();
    let summarize = |name: &str, scores: Option<&[f64]>, curve: &DeferralCurve| {
        let area = curve.area();
        let rate_for = |share: f64| curve.rate_to_reach(share * ra - 1e-12);
        let rate_for_95 = rate_for(TARGETS[1]);
        RuleSummary {
            name: name.to_owned(),
            auroc: scores.and_then(|s| auroc(s, &correct)),
            area,
            apgr: apgr(area, local_accuracy, ra),
            rate_for_80: rate_for(TARGETS[0]),
            rate_for_95,
            cost_per_1k_for_95: rate_for_95.map(|r| curve.cost_at(r) * 1000.0 / n as f64),
            curve: (0..=100)
                .map(|i| curve.quality_at(f64::from(i) / 100.0))
                .collect(),
        }
    };
    let rules = scores
        .iter()
        .zip(&curves)
        .map(|(r, c)| summarize(&r.name, Some(&r.scores), c))
        .collect();
    let random = summarize("random", None, &DeferralCurve::random(&correct, &cost, ra));
    let oracle = summarize("oracle", None, &DeferralCurve::oracle(&correct, &cost, ra));
    let learned_summary = learned.as_ref().map(|fit| {
        let (ece, reliability) = calibration(&fit.out_of_fold, &correct, 10);
        LearnedSummary {
            l2: fit.l2,
            log_loss: fit.log_loss,
            ece,
            reliability,
            rule: fit.rule.clone(),
        }
    });
    let mut datasets: Vec<&str> = labeled.iter().map(|r| r.dataset.as_str()).collect();
    datasets.sort_unstable();
    datasets.dedup();
    let summary = Summary {
        dataset: datasets.join("+"),
        items: n,
        local_accuracy,
        mean_tokens: signals.iter().map(Vec::len).sum::<usize>() as f64 / n as f64,
        settings: *settings,
        rules,
        random,
        oracle,
        learned: learned_summary,
    };
    Ok(Evaluation {
        summary,
        scores,
        curves,
        correct,
        learned,
    })
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

/// Writes the summary as a table: one row per rule, then the baselines.
pub fn write_table(out: &mut impl Write, s: &Summary) -> std::io::Result<()> {
    writeln!(
        out,
        "{}: {} items, local accuracy {:.1}%, remote accuracy {:.0}%, {:.1} tokens per answer",
        s.dataset,
        s.items,
        100.0 * s.local_accuracy,
        100.0 * s.settings.remote_accuracy,
        s.mean_tokens
    )?;
    writeln!(
        out,
        "{:<24} {:>6} {:>6} {:>6} {:>9} {:>9} {:>10}",
        "rule", "AUROC", "AUDC", "APGR", "rate@80%", "rate@95%", "$/1k@95%"
    )?;
    for r in s.rules.iter().chain([&s.random, &s.oracle]) {
        writeln!(
            out,
            "{:<24} {:>6} {:>6.3} {:>6} {:>9} {:>9} {:>10}",
            r.name,
            opt(r.auroc, 3),
            r.area,
            opt(r.apgr, 3),
            opt(r.rate_for_80, 3),
            opt(r.rate_for_95, 3),
            opt(r.cost_per_1k_for_95, 4)
        )?;
    }
    if let Some(l) = &s.learned {
        writeln!(
            out,
            "learned rule: {}-fold CV, L2 {}, log-loss {:.3}, ECE {:.3}",
            s.settings.folds, l.l2, l.log_loss, l.ece
        )?;
    }
    writeln!(
        out,
        "AUDC = mean quality over escalation rates; APGR = share of the local-to-remote gap recovered (random 0.5); \
         rate@X = escalation rate reaching X of remote quality"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::record::SavedToken;

    fn record(i: usize, logprob: f32, correct: bool) -> EvalRecord {
        EvalRecord {
            id: i.to_string(),
            dataset: "toy".into(),
            prompt: String::new(),
            output: String::new(),
            correct: Some(correct),
            grader: None,
            tokens: vec![SavedToken {
                id: 0,
                text: String::new(),
                logprob,
                entropy: -logprob,
                margin: 0.5,
            }],
            prompt_tokens: 100,
            finish_reason: "stop".into(),
            elapsed_ms: 0.0,
        }
    }

    #[test]
    fn summary_has_baselines_and_a_readable_table() {
        let records: Vec<EvalRecord> = (0..40)
            .map(|i| record(i, -(i as f32) / 10.0, i % 3 != 0 && i < 25))
            .collect();
        let e = evaluate(&records, &Settings::default(), "toy").unwrap();
        assert_eq!(e.summary.items, 40);
        assert!((e.summary.random.apgr.unwrap() - 0.5).abs() < 1e-9);
        assert!(e.summary.oracle.apgr.unwrap() > e.summary.rules[0].apgr.unwrap());
        assert_eq!(e.summary.rules[0].name, "mean_logprob");
        assert!(e.summary.rules.iter().any(|r| r.name == "learned"));
        // 1,000 requests at 100 prompt tokens and 1 output token, all escalated at most.
        let all = 1000.0 * (100.0 * 0.15 + 0.6) / 1e6;
        assert!(e.summary.random.cost_per_1k_for_95.unwrap() <= all + 1e-12);
        let mut table = Vec::new();
        write_table(&mut table, &e.summary).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert!(table.contains("mean_logprob") && table.contains("oracle"));
    }
}
