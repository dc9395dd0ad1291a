//! `cascade calibrate` on a small hand-made run: the calibrated rule file it saves is the
//! isotonic fit computed by hand, loads in the policies crate, and `--min-p-correct` reports
//! the score step it amounts to; `--leave-one-dataset-out` reports every set.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use cascade::cli::{Cli, Command};
use clap::Parser;

/// One single-token answer (its sum is the token's log-prob) graded `correct`.
fn line(dataset: &str, i: usize, logprob: f32, correct: bool) -> String {
    serde_json::json!({
        "id": format!("{dataset}/{i}"), "dataset": dataset, "prompt": "q", "output": "a",
        "correct": correct,
        "tokens": [{"id": 1, "text": "a", "logprob": logprob, "entropy": 0.5, "margin": 0.5}],
        "prompt_tokens": 3, "finish_reason": "stop", "elapsed_ms": 1.0
    })
    .to_string()
}

#[test]
fn the_saved_calibrated_rule_is_the_hand_computed_isotonic_fit() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run.jsonl");
    let items: [(&str, f32, bool); 10] = [
        ("a", -0.25, true),
        ("a", -0.125, true),
        ("a", -1.0, false),
        ("a", -2.0, false),
        ("a", -0.5, true),
        ("a", -3.0, false),
        ("b", -0.375, true),
        ("b", -2.5, false),
        ("b", -1.5, true),
        ("b", -4.0, false),
    ];
    let text: Vec<String> = items
        .iter()
        .enumerate()
        .map(|(i, (d, lp, c))| line(d, i, *lp, *c))
        .collect();
    std::fs::write(&run, text.join("\n")).unwrap();
    let out = dir.path().join("calibrate");
    let Command::Calibrate(args) = Cli::try_parse_from([
        "cascade",
        "calibrate",
        "--run",
        run.to_str().unwrap(),
        "--folds",
        "2",
        "--min-p-correct",
        "0.5",
        "--leave-one-dataset-out",
        "--name",
        "t",
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap()
    .command
    else {
        panic!("not a calibrate command")
    };
    let mut report = Vec::new();
    cascade::commands::calibrate::execute(&args, &mut report).unwrap();
    let report = String::from_utf8(report).unwrap();
    // By score: -4 F, -3 F, -2.5 F, -2 F | -1.5 T, -1 F | -0.5 T, -0.375 T, -0.25 T, -0.125 T:
    // pool-adjacent-violators gives 0 from -4, 1/2 from -1.5, 1 from -0.5.
    let rule = policies::CalibratedRule::from_json(
        &std::fs::read_to_string(out.join("t-sum_logprob.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rule.rule, "sum_logprob");
    assert_eq!(rule.map.lower, [-4.0, -1.5, -0.5]);
    assert_eq!(rule.map.p, [0.0, 0.5, 1.0]);
    assert_eq!(rule.map.count, [4, 2, 4]);
    assert!(
        report.contains("min_p_correct = 0.5: sum_logprob >= -1.5000 on this data"),
        "{report}"
    );
    assert!(
        report.contains("aggregate = { kind = \"calibrated\", name = \"t-sum_logprob\" }"),
        "{report}"
    );
    assert!(report.contains("\na (6 items, local 50.0%"), "{report}");
    assert!(report.contains("\nb (4 items, local 50.0%"), "{report}");
}
