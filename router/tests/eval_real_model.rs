//! `cascade eval --limit 20` on the real SmolLM2-135M model (fetched by
//! `scripts/fetch-model.sh`) and the capitals development set in `../shared/data`: it runs,
//! writes its four files, and they parse; then the saved run re-scores without the model and
//! calibrates.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};

use cascade::cli::{Cli, Command};
use clap::Parser;
use common::model_path;

fn data_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    assert!(
        dir.join("capitals/capitals-dev.jsonl").is_file(),
        "{} is missing",
        dir.display()
    );
    dir
}

fn parse(args: &[&str]) -> Command {
    Cli::try_parse_from(std::iter::once("cascade").chain(args.iter().copied()))
        .unwrap()
        .command
}

#[test]
fn eval_limit_20_on_the_real_model_writes_run_summary_and_plots() {
    let out = tempfile::tempdir().unwrap();
    let model = model_path();
    let data = data_dir();
    let Command::Eval(args) = parse(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        "capitals",
        "--data-dir",
        data.to_str().unwrap(),
        "--limit",
        "20",
        "--seed",
        "1",
        "--quiet",
        "--out",
        out.path().to_str().unwrap(),
    ]) else {
        panic!("not an eval command")
    };
    let outputs = cascade::commands::eval::execute(&args).unwrap();

    // run.jsonl: 20 graded items with their token signals.
    let run = outputs.run.clone().unwrap();
    let records = cascade::eval::record::read_records(&run).unwrap();
    assert_eq!(records.len(), 20);
    assert!(records
        .iter()
        .all(|r| r.correct.is_some() && !r.tokens.is_empty()));
    assert!(records
        .iter()
        .flat_map(|r| &r.tokens)
        .all(|t| t.logprob <= 0.0 && t.entropy >= 0.0));
    // SmolLM2 knows some capitals and not others.
    let right = records.iter().filter(|r| r.correct == Some(true)).count();
    assert!((1..20).contains(&right), "{right} of 20 right");

    // run.probe.jsonl beside it: every item's hidden-state features, SmolLM2's width.
    let probes = cascade::eval::probe::read_probes(&run).unwrap();
    assert_eq!(probes.len(), 20);
    for r in &records {
        let p = &probes[&(r.dataset.clone(), r.id.clone())];
        for v in [&p.final_mean, &p.final_last, &p.middle_mean, &p.middle_last] {
            assert_eq!(v.len(), 576);
            assert!(v.iter().all(|x| x.is_finite()));
        }
    }

    // summary.json: every rule, both baselines.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&outputs.summary).unwrap()).unwrap();
    assert_eq!(summary["items"], 20);
    let names: Vec<&str> = summary["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for rule in [
        "mean_logprob",
        "min_logprob",
        "quantile_0.1",
        "mean_entropy",
        "mean_margin",
        "learned",
    ] {
        assert!(names.contains(&rule), "{rule} missing from {names:?}");
    }
    assert!((summary["random"]["apgr"].as_f64().unwrap() - 0.5).abs() < 1e-9);

    // The plots: an SVG document with its text, and a PNG.
    let svg = std::fs::read_to_string(&outputs.plots.0).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("escalation rate"));
    let png = std::fs::read(&outputs.plots.1).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // Re-scoring the saved run needs no model and gives the same figures.
    let rescored = out.path().join("rescored");
    let Command::Eval(args) = parse(&[
        "eval",
        "--rescore",
        run.to_str().unwrap(),
        "--out",
        rescored.to_str().unwrap(),
    ]) else {
        panic!("not an eval command")
    };
    let again = cascade::commands::eval::execute(&args).unwrap();
    assert_eq!(again.evaluation.summary, outputs.evaluation.summary);

    // Calibration from the run: the learned rule file loads in the policies crate.
    let calibrated = out.path().join("calibrate");
    let Command::Calibrate(args) = parse(&[
        "calibrate",
        "--run",
        run.to_str().unwrap(),
        "--folds",
        "2",
        "--rule",
        "quantile_0.1",
        "--target-rate",
        "0.3",
        "--name",
        "capitals",
        "--out",
        calibrated.to_str().unwrap(),
    ]) else {
        panic!("not a calibrate command")
    };
    let mut report = Vec::new();
    cascade::commands::calibrate::execute(&args, &mut report).unwrap();
    let report = String::from_utf8(report).unwrap();
    assert!(
        report.contains("aggregate = { kind = \"quantile\", q = 0.1 }"),
        "{report}"
    );
    let rule = policies::LearnedRule::from_json(
        &std::fs::read_to_string(calibrated.join("capitals.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rule.name, "capitals");
}
