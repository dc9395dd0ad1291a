//! `cascade calibrate`: from saved runs, a cross-validated comparison of the rules, the
//! threshold of one rule for a target, the learned rule file with its calibration, and a
//! config snippet to paste into a policy.

use std::collections::HashMap;
use std::io::Write;

use anyhow::Context;
use local_model::ProbeFeatures;
use policies::{Aggregate, TokenSignal};

use crate::cli::CalibrateArgs;
use crate::eval::calibrate::{at_threshold, choose, cross_validate, CvReport, Target};
use crate::eval::feedback;
use crate::eval::isotonic::fit_isotonic;
use crate::eval::metrics::calibration;
use crate::eval::plot::{write_chart, Chart, Line, LineKind, PALETTE};
use crate::eval::probe::{
    fit_probe, probe_report, read_probes, ProbeData, ProbeReport, ProbeSettings,
};
use crate::eval::record::{read_records, EvalRecord};
use crate::eval::scoring::{
    aggregate_scores, default_features, fit_learned, fit_learned_on_values, parse_rule,
    standard_aggregates, LearnedFit, LEARNED,
};
use crate::eval::transfer::{leave_one_dataset_out, Figures, TransferReport};

/// Runs the command, printing the report and the snippet to stdout.
pub fn run(args: &CalibrateArgs) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    execute(args, &mut stdout)
}

/// Does the work, writing the human-readable report to `out`.
pub fn execute(args: &CalibrateArgs, out: &mut impl Write) -> anyhow::Result<()> {
    if let Some(url) = &args.ledger {
        return from_ledger(args, url, out);
    }
    let mut records: Vec<EvalRecord> = Vec::new();
    let mut probes = HashMap::new();
    for path in &args.run {
        records.extend(read_records(path)?);
        if args.probe {
            probes.extend(read_probes(path)?);
        }
    }
    anyhow::ensure!(!records.is_empty(), "the runs hold no items");
    calibrate_items(args, &records, &probes, &runs_source(args), out)
}

/// The labeled-run calibration, on items from saved runs or from the ledger's kept signals:
/// the cross-validated comparison of every rule, the learned rule, the calibrated rule of
/// `--rule`, the probe with `--probe`, and the threshold for the target. `source` says where
/// the items came from (saved in each rule file's `fitted_on`).
fn calibrate_items(
    args: &CalibrateArgs,
    records: &[EvalRecord],
    probes: &HashMap<(String, String), ProbeFeatures>,
    source: &serde_json::Value,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let e = &args.escalation;
    let target = match (args.target_rate, args.target_quality) {
        (Some(r), _) => Target::Rate(r),
        (None, Some(q)) => Target::Quality(q),
        (None, None) => Target::Knee,
    };
    let labeled: Vec<&EvalRecord> = records.iter().filter(|r| r.correct.is_some()).collect();
    let correct: Vec<bool> = labeled.iter().map(|r| r.correct == Some(true)).collect();
    let mut report = serde_json::Map::new();

    // Cross-validated comparison (labeled data only).
    let cv = (labeled.len() >= 2 * e.folds).then(|| {
        cross_validate(
            records,
            &standard_aggregates(),
            target,
            e.folds,
            e.seed,
            e.remote_accuracy,
        )
    });
    if let Some(cv) = &cv {
        write_cv(out, cv)?;
        report.insert("cross_validation".into(), serde_json::to_value(cv)?);
    }

    if args.leave_one_dataset_out {
        let transfer = leave_one_dataset_out(
            records,
            &standard_aggregates(),
            e.folds,
            e.seed,
            e.remote_accuracy,
        )
        .context("--leave-one-dataset-out needs labeled runs of at least two datasets")?;
        write_transfer(out, &transfer)?;
        report.insert(
            "leave_one_dataset_out".into(),
            serde_json::to_value(&transfer)?,
        );
    }

    if args.probe {
        let entry = probe_section(args, records, probes, source, out)?;
        report.insert("probe".into(), entry);
    }

    // The learned rule, fitted on every labeled item.
    let signals: Vec<Vec<TokenSignal>> = labeled.iter().map(|r| r.signals()).collect();
    let learned = fit_learned(
        &args.name,
        &default_features(),
        &signals,
        &correct,
        e.folds,
        e.seed,
    );
    if let Some(fit) = &learned {
        let entry = save_learned(args, fit, &correct, source, out)?;
        report.insert("learned".into(), entry);
    }

    // The threshold of the chosen rule on all the data.
    let aggregate = if args.rule == LEARNED {
        let fit = learned
            .as_ref()
            .context("the learned rule needs labeled data with both right and wrong answers")?;
        Aggregate::Learned {
            name: args.name.clone(),
            rule: Some(std::sync::Arc::new(fit.rule.clone())),
        }
    } else {
        parse_rule(&args.rule).with_context(|| format!("unknown rule `{}`", args.rule))?
    };
    let labeled_scores = aggregate_scores(&aggregate, &signals);
    let calibrated = calibrate_isotonic(args, &aggregate, &labeled_scores, &correct, source, out)?;
    if let Some(calibrated) = calibrated {
        report.insert("calibrated".into(), calibrated.entry);
        if let Some(threshold) = calibrated.threshold {
            let r = at_threshold(&aggregate, &signals, &correct, threshold, e.remote_accuracy);
            report.insert("at_min_p_correct".into(), serde_json::to_value(r)?);
        }
    }
    if let Some(threshold) = args.threshold {
        anyhow::ensure!(!labeled.is_empty(), "--threshold needs labeled items");
        let r = at_threshold(&aggregate, &signals, &correct, threshold, e.remote_accuracy);
        writeln!(
            out,
            "{} >= {threshold} on {} items: escalates {:.1}%, quality {:.1}% (mean_logprob at the same rate {:.1}%, random {:.1}%), served answers {} correct, early exit saves {:.0}% of local tokens",
            aggregate.name(),
            labeled.len(),
            100.0 * r.rate,
            100.0 * r.quality,
            100.0 * r.mean_logprob_quality,
            100.0 * r.random_quality,
            r.served_accuracy.map_or_else(|| "-".to_owned(), |a| format!("{:.1}%", 100.0 * a)),
            100.0 * r.early_exit_saving
        )?;
        report.insert("at_threshold".into(), serde_json::to_value(r)?);
        let path = args.out.join("calibration.json");
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        return Ok(());
    }
    let all_signals: Vec<Vec<TokenSignal>> = records.iter().map(EvalRecord::signals).collect();
    let scores = aggregate_scores(&aggregate, &all_signals);
    // Quality needs labels; a rate target uses every item, labeled or not.
    let point = if matches!(target, Target::Rate(_)) && labeled.len() < records.len() {
        choose(&scores, None, e.remote_accuracy, target)
    } else {
        let labeled_scores: Vec<f64> = records
            .iter()
            .zip(&scores)
            .filter(|(r, _)| r.correct.is_some())
            .map(|(_, s)| *s)
            .collect();
        choose(&labeled_scores, Some(&correct), e.remote_accuracy, target)
    }
    .context(
        "no threshold reaches the target on this data (unlabeled runs support --target-rate only)",
    )?;
    writeln!(
        out,
        "\n{} at {}: threshold {:.4} escalates {:.1}% of these items{}",
        aggregate.name(),
        match target {
            Target::Rate(r) => format!("target rate {r}"),
            Target::Quality(q) => format!("target quality {q}"),
            Target::Knee => "the knee (largest gain over random escalation)".to_owned(),
        },
        point.threshold,
        100.0 * point.rate,
        point
            .quality
            .map(|q| format!(", quality {:.1}%", 100.0 * q))
            .unwrap_or_default()
    )?;
    write_snippet(out, &aggregate, point.threshold)?;
    report.insert("rule".into(), serde_json::Value::String(aggregate.name()));
    report.insert("target".into(), serde_json::to_value(target)?);
    report.insert("operating_point".into(), serde_json::to_value(point)?);
    let path = args.out.join("calibration.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(out, "report: {}", path.display())?;
    Ok(())
}

/// The calibrated rule: `aggregate`'s score through isotonic regression, fitted on every
/// labeled item and saved as `<name>-<rule>.json`, with its out-of-fold calibration error and
/// a snippet. With `--min-p-correct`, also the raw threshold it amounts to on this data.
/// `scores` are the rule's per labeled item, `source` says where the labels came from (saved
/// in the file's `fitted_on`). `None` for a learned rule (already a probability) or data
/// without both right and wrong answers.
fn calibrate_isotonic(
    args: &CalibrateArgs,
    aggregate: &Aggregate,
    scores: &[f64],
    correct: &[bool],
    source: &serde_json::Value,
    out: &mut impl Write,
) -> anyhow::Result<Option<Calibrated>> {
    let both = correct.iter().any(|c| *c) && correct.iter().any(|c| !*c);
    if matches!(aggregate, Aggregate::Learned { .. }) || !both {
        anyhow::ensure!(
            args.min_p_correct.is_none(),
            "--min-p-correct needs a fixed rule and labeled data with both right and wrong answers"
        );
        return Ok(None);
    }
    let e = &args.escalation;
    // exp of a log-prob score is a probability already (the whole answer's for the sum, a
    // typical token's for the mean): the calibration error it would have read raw.
    let raw: Option<fn(f64) -> f64> = match aggregate {
        Aggregate::MeanLogprob
        | Aggregate::SumLogprob
        | Aggregate::MinLogprob
        | Aggregate::Quantile { .. }
        | Aggregate::NormalizedLogprob { .. } => Some(f64::exp),
        Aggregate::MeanMargin | Aggregate::FractionAbove { .. } => Some(|s| s),
        _ => None,
    };
    let fit = fit_isotonic(scores, correct, e.folds, e.seed, raw)?;
    let name = format!("{}-{}", args.name, aggregate.name());
    let rule = policies::CalibratedRule {
        format: policies::calibrated::FORMAT.to_owned(),
        name: name.clone(),
        rule: aggregate.name(),
        map: fit.map.clone(),
        fitted_on: with_source(
            source,
            serde_json::json!({
                "items": correct.len(),
                "folds": e.folds,
                "seed": e.seed,
                "cv_ece": fit.ece,
                "raw_ece": fit.raw_ece,
            }),
        ),
    };
    let path = args.out.join(format!("{name}.json"));
    std::fs::write(&path, rule.to_json()).with_context(|| format!("writing {}", path.display()))?;
    writeln!(
        out,
        "calibrated rule `{name}`: {} through isotonic regression, {} steps, cross-validated ECE {:.3}{}\n  saved {}",
        aggregate.name(),
        fit.map.p.len(),
        fit.ece,
        fit.raw_ece
            .map(|r| format!(" (the raw score read as a probability: {r:.3})"))
            .unwrap_or_default(),
        path.display()
    )?;
    let threshold = match args.min_p_correct {
        None => None,
        Some(p) => {
            anyhow::ensure!(
                (0.0..=1.0).contains(&p),
                "--min-p-correct must be within [0, 1]"
            );
            let t = fit.map.lowest_score_reaching(p);
            match t {
                Some(t) => writeln!(
                    out,
                    "min_p_correct = {p}: {} >= {t:.4} on this data",
                    aggregate.name()
                )?,
                None => writeln!(
                    out,
                    "min_p_correct = {p}: no score reaches it on this data (every answer escalates)"
                )?,
            }
            t.filter(|t| t.is_finite())
        }
    };
    writeln!(
        out,
        "# paste into a policy, and install {name}.json where the gateway loads rules:\n\
         aggregate = {{ kind = \"calibrated\", name = \"{name}\" }}\nmin_p_correct = {}\n",
        args.min_p_correct.unwrap_or(0.5)
    )?;
    let entry = serde_json::json!({
        "rule": rule,
        "ece": fit.ece,
        "raw_ece": fit.raw_ece,
        "min_p_correct": args.min_p_correct,
        "threshold": threshold,
    });
    Ok(Some(Calibrated {
        entry,
        threshold,
        map: fit.map,
    }))
}

/// A calibrated rule `calibrate_isotonic` saved.
struct Calibrated {
    /// Its entry in calibration.json.
    entry: serde_json::Value,
    /// The raw threshold `--min-p-correct` amounts to, when given and reached.
    threshold: Option<f64>,
    /// Its map from score to probability.
    map: policies::isotonic::IsotonicMap,
}

/// The learned rule fitted on `correct`: saved as `<name>.json` with its reliability plot,
/// reported to `out`; returns its entry in calibration.json.
fn save_learned(
    args: &CalibrateArgs,
    fit: &LearnedFit,
    correct: &[bool],
    source: &serde_json::Value,
    out: &mut impl Write,
) -> anyhow::Result<serde_json::Value> {
    let e = &args.escalation;
    let mut rule = fit.rule.clone();
    let (ece, reliability) = calibration(&fit.out_of_fold, correct, 10);
    rule.fitted_on = with_source(
        source,
        serde_json::json!({
            "items": correct.len(),
            "folds": e.folds,
            "seed": e.seed,
            "l2": fit.l2,
            "cv_log_loss": fit.log_loss,
            "cv_ece": ece,
        }),
    );
    let path = args.out.join(format!("{}.json", args.name));
    std::fs::write(&path, rule.to_json()).with_context(|| format!("writing {}", path.display()))?;
    let (svg, png) = write_chart(
        &reliability_chart(&reliability, ece, &args.name),
        &args.out.join("reliability"),
    )?;
    writeln!(
        out,
        "learned rule `{}`: {} features, L2 {}, cross-validated log-loss {:.3}, ECE {:.3}\n  saved {}\n  reliability plot {}, {}",
        args.name,
        rule.features.len(),
        fit.l2,
        fit.log_loss,
        ece,
        path.display(),
        svg.display(),
        png.display()
    )?;
    Ok(serde_json::json!({"rule": rule, "ece": ece, "reliability": reliability}))
}

/// Where labeled eval runs came from, for a rule file's `fitted_on`.
fn runs_source(args: &CalibrateArgs) -> serde_json::Value {
    serde_json::json!({
        "runs": args.run.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    })
}

/// `source`'s fields followed by `figures`' (both JSON objects).
fn with_source(source: &serde_json::Value, figures: serde_json::Value) -> serde_json::Value {
    let mut merged = source.as_object().cloned().unwrap_or_default();
    if let serde_json::Value::Object(figures) = figures {
        merged.extend(figures);
    }
    serde_json::Value::Object(merged)
}

fn write_cv(out: &mut impl Write, cv: &CvReport) -> std::io::Result<()> {
    writeln!(
        out,
        "{}-fold cross-validation on {} items ({}); thresholds chosen on training folds at {}",
        cv.folds,
        cv.items,
        cv.datasets.join(", "),
        match cv.target {
            Target::Rate(r) => format!("rate {r}"),
            Target::Quality(q) => format!("quality {q}"),
            Target::Knee => "the knee".to_owned(),
        }
    )?;
    write!(out, "{:<22} {:>6}", "rule", "APGR")?;
    for d in &cv.datasets {
        write!(out, " {:>9}", truncate(d, 9))?;
    }
    writeln!(
        out,
        " {:>9} {:>6} {:>7} {:>7} {:>7} {:>6}",
        "threshold", "rate", "quality", "random", "meanlp", "picked"
    )?;
    for r in &cv.rules {
        write!(out, "{:<22} {:>6.3}", r.name, r.apgr)?;
        for a in &r.apgr_by_dataset {
            write!(
                out,
                " {:>9}",
                a.map_or_else(|| "-".to_owned(), |a| format!("{a:.3}"))
            )?;
        }
        writeln!(
            out,
            " {:>9.4} {:>6.3} {:>7.3} {:>7.3} {:>7.3} {:>6}",
            r.threshold,
            r.rate,
            r.quality,
            r.random_quality,
            r.mean_logprob_quality,
            r.selected_in_folds
        )?;
    }
    writeln!(
        out,
        "APGR: held-out, per dataset then averaged; rate/quality: held-out at the training threshold; \
         random/meanlp: quality of random escalation / mean log-prob at the same rate; picked: folds where it had the best training APGR\n"
    )
}

/// Per held-out dataset: the rule picked on the others and its figures there, then every
/// fixed rule's (AUROC / APGR / headroom share) and the learned rule fitted on the others.
fn write_transfer(out: &mut impl Write, t: &TransferReport) -> std::io::Result<()> {
    let cell = |f: &Figures| {
        let g = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
        format!("{} / {} / {}", g(f.auroc), g(f.apgr), g(f.headroom))
    };
    writeln!(
        out,
        "leave-one-dataset-out: the rule with the best mean APGR on the other sets, judged on the held-out set\n\
         (cells: AUROC / APGR / share of the random-to-oracle APGR headroom)"
    )?;
    for h in &t.held_out {
        writeln!(
            out,
            "\n{} ({} items, local {:.1}%, oracle APGR {}): chosen without it: {} -> {}; its isotonic map from the other sets: ECE {}",
            h.dataset,
            h.items,
            100.0 * h.local_accuracy,
            h.oracle_apgr
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.3}")),
            h.chosen,
            cell(&h.chosen_figures),
            h.chosen_cross_set_ece
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"))
        )?;
        for (name, f) in t.rules.iter().zip(&h.fixed) {
            writeln!(out, "  {name:<22} {}", cell(f))?;
        }
        if let Some(f) = &h.learned_cross_set {
            writeln!(out, "  {:<22} {}", "learned (cross-set)", cell(f))?;
        }
    }
    writeln!(out)
}

/// `--probe`: the probe judged in-set and cross-set, and fitted on every item
/// (`<name>-probe.json`).
fn probe_section(
    args: &CalibrateArgs,
    records: &[EvalRecord],
    probes: &HashMap<(String, String), ProbeFeatures>,
    source: &serde_json::Value,
    out: &mut impl Write,
) -> anyhow::Result<serde_json::Value> {
    let e = &args.escalation;
    let hidden = args
        .probe_inputs
        .split(',')
        .map(|name| {
            policies::HiddenInput::from_name(name.trim())
                .with_context(|| format!("unknown probe input `{name}`"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let settings = ProbeSettings {
        hidden,
        dims: args.probe_dims,
        features: if args.probe_hidden_only {
            Vec::new()
        } else {
            default_features()
        },
        folds: e.folds,
        seed: e.seed,
    };
    let (data, missing) = ProbeData::collect(records, probes, &settings);
    anyhow::ensure!(
        !data.is_empty(),
        "--probe: no labeled item has hidden-state features (`cascade eval` on the tuned engine saves them in run.probe.jsonl; the ledger keeps them for a policy with log_signals = \"hidden\")"
    );
    let report = probe_report(&data, &settings, e.remote_accuracy);
    write_probe_report(out, &report, missing)?;
    let all: Vec<usize> = (0..data.len()).collect();
    let name = format!("{}-probe", args.name);
    let mut entry = serde_json::to_value(&report)?;
    if let Some(mut fit) = fit_probe(&name, &data, &all, &settings) {
        if let serde_json::Value::Object(m) = &mut fit.rule.fitted_on {
            m.insert("source".into(), source.clone());
            m.insert(
                "hidden_inputs".into(),
                serde_json::Value::String(args.probe_inputs.clone()),
            );
        }
        let path = args.out.join(format!("{name}.json"));
        std::fs::write(&path, fit.rule.to_json())
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(
            out,
            "probe rule (every item, L2 {}): {}\n  aggregate = {{ kind = \"probe\", name = \"{name}\" }} with min_p_correct; install {name}.json where the gateway loads rules",
            fit.l2,
            path.display()
        )?;
        if let serde_json::Value::Object(m) = &mut entry {
            m.insert("file".into(), path.display().to_string().into());
        }
    }
    Ok(entry)
}

fn write_probe_report(
    out: &mut impl Write,
    r: &ProbeReport,
    missing: usize,
) -> std::io::Result<()> {
    let cell = |f: &Figures| {
        let g = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
        format!("{} / {}", g(f.auroc), g(f.headroom))
    };
    writeln!(
        out,
        "\nhidden-state probe on {} ({} dims{}), with {}; cells: AUROC / share of the APGR headroom",
        r.hidden.join(" + "),
        r.dims,
        if missing > 0 { format!(", {missing} items without features left out") } else { String::new() },
        r.features.join(", ")
    )?;
    writeln!(
        out,
        "{:<14} {:>6} {:>7}  {:<15} {:<15} {:<15} {:<15}",
        "dataset",
        "items",
        "local",
        "sum_logprob",
        "mean_logprob",
        "probe in-set",
        "probe cross-set"
    )?;
    for s in r.sets.iter().chain([&r.pooled]) {
        writeln!(
            out,
            "{:<14} {:>6} {:>6.1}%  {:<15} {:<15} {:<15} {:<15}",
            truncate(&s.dataset, 14),
            s.items,
            100.0 * s.local_accuracy,
            cell(&s.sum_logprob),
            cell(&s.mean_logprob),
            cell(&s.probe_in_set),
            s.probe_cross_set
                .as_ref()
                .map_or_else(|| "-".to_owned(), cell)
        )?;
    }
    writeln!(out)
}

fn truncate(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

/// Observed accuracy against predicted probability per bin, with the diagonal.
fn reliability_chart(table: &[(f64, f64, usize)], ece: f64, name: &str) -> Chart {
    Chart {
        title: format!("learned rule `{name}`: reliability (out-of-fold, ECE {ece:.3})"),
        x_label: "predicted probability of a correct answer".to_owned(),
        y_label: "observed share correct".to_owned(),
        x_range: (0.0, 1.0),
        y_range: (0.0, 1.0),
        lines: vec![
            Line {
                label: "perfect calibration".to_owned(),
                points: vec![(0.0, 0.0), (1.0, 1.0)],
                color: plotters::style::RGBColor(130, 130, 130),
                kind: LineKind::Dashed,
                width: 2,
            },
            Line {
                label: format!(
                    "learned ({} items)",
                    table.iter().map(|t| t.2).sum::<usize>()
                ),
                points: table.iter().map(|(p, c, _)| (*p, *c)).collect(),
                color: PALETTE[1],
                kind: LineKind::Solid,
                width: 3,
            },
        ],
        markers: true,
    }
}

/// The policy lines that select `aggregate` at `threshold`.
fn write_snippet(
    out: &mut impl Write,
    aggregate: &Aggregate,
    threshold: f64,
) -> std::io::Result<()> {
    let aggregate_toml = match aggregate {
        Aggregate::Quantile { q } => format!("{{ kind = \"quantile\", q = {q} }}"),
        Aggregate::FractionAbove { bound } => {
            format!("{{ kind = \"fraction_above\", bound = {bound} }}")
        }
        Aggregate::Learned { name, .. } => format!("{{ kind = \"learned\", name = \"{name}\" }}"),
        Aggregate::NormalizedLogprob { alpha } => {
            format!("{{ kind = \"normalized_logprob\", alpha = {alpha} }}")
        }
        Aggregate::Calibrated { name, .. } => {
            format!("{{ kind = \"calibrated\", name = \"{name}\" }}")
        }
        other => format!("{{ kind = \"{}\" }}", other.name()),
    };
    writeln!(
        out,
        "\n# paste into a policy ([teams.policy] or an override):"
    )?;
    writeln!(
        out,
        "aggregate = {aggregate_toml}\nthreshold = {threshold:.4}"
    )?;
    if let Aggregate::Learned { name, .. } = aggregate {
        writeln!(
            out,
            "# and install {name}.json where the gateway loads learned rules"
        )?;
    }
    Ok(())
}

/// The gateway's own traffic, of one team when `--team` is given. Requests served locally
/// with feedback are labels: with enough of them, a calibrated rule, a learned rule and the
/// `min_p_correct` threshold are fitted as from a labeled run. `--target-rate` then fits the
/// threshold that would have escalated that share of every recorded request of the rule.
fn from_ledger(args: &CalibrateArgs, url: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let aggregate: Aggregate = if args.rule == LEARNED {
        Aggregate::Learned {
            name: args.name.clone(),
            rule: None,
        }
    } else {
        parse_rule(&args.rule).with_context(|| format!("unknown rule `{}`", args.rule))?
    };
    let now_ms = crate::clock::now_unix_ms();
    let since_ms = now_ms.saturating_sub(i64::from(args.since_days) * 86_400_000);
    let until_ms = now_ms.saturating_add(1);
    let team = args.team.as_deref();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // One read: the labels are the requests among these that were served locally and have
    // feedback (`feedback::labels` picks them), so they need no query of their own.
    let records = runtime.block_on(async {
        let storage = crate::storage::connect(&crate::storage::StorageConfig {
            url: url.to_owned(),
            max_connections: 1,
            reservation_ttl_secs: 300,
            sqlite_sync: crate::storage::SqliteSync::default(),
        })
        .await?;
        let read = storage
            .records_with_signals(team, since_ms, until_ms, LEDGER_LIMIT)
            .await;
        storage.close().await;
        read
    })?;
    let name = aggregate.name();
    let scope = team.map_or_else(|| "every team".to_owned(), |t| format!("team `{t}`"));
    // Where the policy kept the answers' signals (`log_signals`), the ledger is as good as a
    // labeled eval run: every rule, the learned rule and the probe, not one score's curve.
    let kept = feedback::kept_items(&records, team, args.feedback_cutoff)?;
    let kept_labels = kept.labels();
    if feedback::check_enough(&kept_labels).is_ok() {
        writeln!(
            out,
            "the traffic of {scope} with kept signals: {} requests, {} of them served locally with feedback ({} right, {} wrong: a score >= {} counts as right){}
             (only answers the policy served are labeled: the fits describe the scores it served)
",
            kept.records.len(),
            kept_labels.correct.len(),
            kept_labels.right(),
            kept_labels.wrong(),
            args.feedback_cutoff,
            if kept.undecodable > 0 {
                format!("; {} with unreadable signals skipped", kept.undecodable)
            } else {
                String::new()
            }
        )?;
        return calibrate_items(
            args,
            &kept.records,
            &kept.probes,
            &ledger_source(args, url),
            out,
        );
    }
    anyhow::ensure!(
        !args.probe,
        "--probe from the ledger needs the requests' hidden states: set log_signals = \"hidden\" in the policy and collect feedback ({} requests of {scope} with kept signals have feedback on a local answer: {} right, {} wrong; at least {} with {} of each are needed)",
        kept_labels.correct.len(),
        kept_labels.right(),
        kept_labels.wrong(),
        feedback::MIN_LABELED,
        feedback::MIN_PER_CLASS,
    );
    let labels = feedback::labels(&records, &name, args.feedback_cutoff)?;
    let mut report = serde_json::Map::new();
    let fitted = match feedback::check_enough(&labels) {
        Ok(()) => {
            std::fs::create_dir_all(&args.out)
                .with_context(|| format!("creating {}", args.out.display()))?;
            from_feedback(args, url, &aggregate, &labels, &scope, out, &mut report)?;
            true
        }
        Err(too_few @ feedback::LabelError::TooFew { .. }) => {
            // Said out loud: a calibration silently skipped would look like one that ran.
            writeln!(
                out,
                "not enough feedback to calibrate `{name}` on the traffic of {scope}: {too_few}.\n\
                 No calibrated or learned rule was fitted{}; {}",
                if args.min_p_correct.is_some() {
                    " and --min-p-correct is not applied"
                } else {
                    ""
                },
                if args.target_rate.is_some() {
                    "falling back to the unlabeled threshold for --target-rate.\n"
                } else {
                    "pass --target-rate for a threshold from the unlabeled traffic."
                }
            )?;
            anyhow::ensure!(
                args.target_rate.is_some(),
                "too little feedback to calibrate on, and no --target-rate to fall back to"
            );
            false
        }
        Err(other) => return Err(other.into()),
    };
    if let Some(target) = args.target_rate {
        let scores: Vec<f64> = records
            .iter()
            .filter(|r| r.confidence_aggregate.as_deref() == Some(name.as_str()))
            .map(|r| {
                if r.confidence.is_nan() {
                    f64::NEG_INFINITY
                } else {
                    r.confidence
                }
            })
            .collect();
        anyhow::ensure!(
            !scores.is_empty(),
            "the ledger has no requests of {scope} scored with {name} in the last {} days ({} scored with other rules)",
            args.since_days,
            records.len()
        );
        let point = choose(
            &scores,
            None,
            args.escalation.remote_accuracy,
            Target::Rate(target),
        )
        .context("no threshold splits these requests")?;
        writeln!(
            out,
            "{name} on {} ledger requests of {scope}: threshold {:.4} escalates {:.1}% (target {:.1}%)",
            scores.len(),
            point.threshold,
            100.0 * point.rate,
            100.0 * target
        )?;
        write_snippet(out, &aggregate, point.threshold)?;
        report.insert("target".into(), serde_json::to_value(Target::Rate(target))?);
        report.insert("operating_point".into(), serde_json::to_value(point)?);
    }
    if fitted {
        report.insert("rule".into(), serde_json::Value::String(name));
        let path = args.out.join("calibration.json");
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(out, "report: {}", path.display())?;
    }
    Ok(())
}

/// Where labels from the ledger came from, for a rule file's `fitted_on`: the backend, never
/// the URL, which may carry a password.
fn ledger_source(args: &CalibrateArgs, url: &str) -> serde_json::Value {
    serde_json::json!({
        "ledger": url.split(':').next().unwrap_or_default(),
        "team": args.team,
        "since_days": args.since_days,
        "feedback_cutoff": args.feedback_cutoff,
    })
}

/// Most ledger rows one calibration reads.
const LEDGER_LIMIT: u32 = 10_000_000;

/// The fits from feedback labels: the isotonic map of `aggregate` (saved as a calibrated rule
/// with its out-of-fold ECE and the `min_p_correct` threshold), and the learned rule on the
/// same score where the learned rule has that score as a feature.
fn from_feedback(
    args: &CalibrateArgs,
    url: &str,
    aggregate: &Aggregate,
    labels: &feedback::FeedbackLabels,
    scope: &str,
    out: &mut impl Write,
    report: &mut serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    let name = aggregate.name();
    let e = &args.escalation;
    let finite = labels.scores.iter().copied().filter(|s| s.is_finite());
    let lowest = finite.clone().fold(f64::INFINITY, f64::min);
    let highest = finite.fold(f64::NEG_INFINITY, f64::max);
    writeln!(
        out,
        "`{name}` from the feedback of {scope}: {} requests served locally ({} right, {} wrong: a score >= {} counts as right), {name} from {lowest:.4} to {highest:.4}\n\
         (only answers the policy served are labeled: below {lowest:.4} the map repeats its lowest step)",
        labels.correct.len(),
        labels.right(),
        labels.wrong(),
        args.feedback_cutoff,
    )?;
    let source = ledger_source(args, url);
    if let Some(calibrated) = calibrate_isotonic(
        args,
        aggregate,
        &labels.scores,
        &labels.correct,
        &source,
        out,
    )? {
        if args.min_p_correct.is_none() {
            // The snippet's default, as a raw threshold, so the suggestion is complete.
            let p = 0.5;
            match calibrated.map.lowest_score_reaching(p) {
                Some(t) if t.is_finite() => writeln!(
                    out,
                    "min_p_correct = {p} amounts to {name} >= {t:.4} on this traffic"
                )?,
                Some(_) => writeln!(
                    out,
                    "min_p_correct = {p}: every score reaches it on this traffic"
                )?,
                None => writeln!(
                    out,
                    "min_p_correct = {p}: no score reaches it on this traffic"
                )?,
            }
        }
        report.insert("calibrated".into(), calibrated.entry);
    }
    // The ledger keeps each request's score under its routing rule, not its tokens: the
    // learned rule can only be the logistic curve of that one score.
    match policies::learned::Feature::try_from(name.clone()) {
        Ok(feature) => {
            let values: Vec<Option<Vec<f64>>> =
                labels.scores.iter().map(|s| Some(vec![*s])).collect();
            match fit_learned_on_values(
                &args.name,
                &[feature],
                &values,
                &labels.correct,
                e.folds,
                e.seed,
            ) {
                Some(fit) => {
                    let entry = save_learned(args, &fit, &labels.correct, &source, out)?;
                    writeln!(
                        out,
                        "# or: aggregate = {{ kind = \"learned\", name = \"{}\" }}, with min_p_correct as above\n",
                        args.name
                    )?;
                    report.insert("learned".into(), entry);
                }
                None => writeln!(out, "learned rule: not fitted (too few items per fold)\n")?,
            }
        }
        Err(_) => writeln!(
            out,
            "learned rule: not fitted: the ledger records only the routing rule's score, and `{name}` is not an input of the learned rule\n"
        )?,
    }
    Ok(())
}
