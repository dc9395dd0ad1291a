//! `cascade calibrate --ledger`: thresholds for unlabeled traffic from the confidence values
//! the gateway recorded, only those of the named rule; with enough `/v1/feedback` scores on
//! locally served requests, a calibrated and a learned rule fitted to a team's own traffic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use cascade::cli::{Cli, Command};
use cascade::storage::{connect, EncodedSignals, LedgerRecord, StorageConfig};
use clap::Parser;

fn request(i: usize, confidence: f64, aggregate: &str, now_ms: i64) -> LedgerRecord {
    LedgerRecord {
        id: format!("req-{i}"),
        created_unix_ms: now_ms - 60_000,
        team: Some("alpha".to_owned()),
        key_id: None,
        experiment: None,
        variant: None,
        route: "local".to_owned(),
        reason: "confident".to_owned(),
        confidence: Some(confidence),
        confidence_aggregate: Some(aggregate.to_owned()),
        local_tokens: 10,
        remote_model: None,
        remote_input_tokens: 0,
        remote_output_tokens: 0,
        cost_nanos: 0,
        latency_ms: 50,
        status: 200,
        prompt_text: None,
        overrun_nanos: 0,
        signals: None,
    }
}

#[test]
fn calibrate_from_the_ledger_targets_an_escalation_rate_of_recorded_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let now_ms = now_ms();
    // Ten requests scored by sum_logprob (-1, -2, ..., -10), and noise from another rule.
    let mut records: Vec<LedgerRecord> = (0..10)
        .map(|i| request(i, -(i as f64 + 1.0), "sum_logprob", now_ms))
        .collect();
    records.push(request(99, -50.0, "mean_logprob", now_ms));
    write_ledger(&url, &records, &[]);
    let out = dir.path().join("calibrate");
    let report = calibrate(&[
        "--ledger",
        &url,
        "--rule",
        "sum_logprob",
        "--target-rate",
        "0.3",
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    // Escalating the three lowest (-10, -9, -8): the threshold lies between -8 and -7.
    assert!(report.contains("on 10 ledger requests"), "{report}");
    assert!(
        report.contains("aggregate = { kind = \"sum_logprob\" }\nthreshold = -7.5000"),
        "{report}"
    );
}

/// Runs `cascade calibrate` with these arguments and returns its report, or its error.
fn calibrate(arguments: &[&str]) -> Result<String, String> {
    let cli = Cli::try_parse_from(["cascade", "calibrate"].iter().chain(arguments))
        .map_err(|e| e.to_string())?;
    let Command::Calibrate(args) = cli.command else {
        panic!("not a calibrate command")
    };
    let mut report = Vec::new();
    cascade::commands::calibrate::execute(&args, &mut report).map_err(|e| format!("{e:#}"))?;
    Ok(String::from_utf8(report).unwrap())
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Writes the records, then each `(id, score)` feedback, through the storage API.
fn write_ledger(url: &str, records: &[LedgerRecord], feedback: &[(String, f64)]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let storage = connect(&StorageConfig {
            url: url.to_owned(),
            max_connections: 1,
            reservation_ttl_secs: 60,
            sqlite_sync: Default::default(),
        })
        .await
        .unwrap();
        storage.record_batch(records).await.unwrap();
        for (id, score) in feedback {
            storage
                .record_feedback(id, *score, None, now_ms())
                .await
                .unwrap();
        }
        storage.close().await;
    });
}

/// Forty local requests of `team` scored -0.05, -0.15, ..., -3.95 by sum_logprob, with
/// feedback that calls an answer right exactly when its score is above -2 (or exactly when
/// it is below, with `inverted`), graded 0.9 / 0.1 on every fifth request, thumbs otherwise.
fn separable_traffic(
    team: &str,
    inverted: bool,
    now_ms: i64,
) -> (Vec<LedgerRecord>, Vec<(String, f64)>) {
    let mut records = Vec::new();
    let mut feedback = Vec::new();
    for i in 0..40 {
        let id = format!("{team}-{i}");
        let mut r = request(0, -0.05 - 0.1 * i as f64, "sum_logprob", now_ms);
        r.id = id.clone();
        r.team = Some(team.to_owned());
        records.push(r);
        let right = (i < 20) != inverted;
        let graded = i % 5 == 0;
        feedback.push((
            id,
            match (right, graded) {
                (true, false) => 1.0,
                (true, true) => 0.9,
                (false, false) => 0.0,
                (false, true) => 0.1,
            },
        ));
    }
    (records, feedback)
}

#[test]
fn a_teams_feedback_fits_a_calibrated_and_a_learned_rule_on_its_own_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let now = now_ms();
    let (mut records, mut feedback) = separable_traffic("alpha", false, now);
    // Another team whose feedback says the opposite: mixed in, it would flatten the map.
    let (beta, beta_feedback) = separable_traffic("beta", true, now);
    records.extend(beta);
    feedback.extend(beta_feedback);
    // Escalated requests of alpha rated highly at low scores: their feedback judges the
    // remote's answer and must not count.
    for i in 0..10 {
        let mut r = request(0, -3.5, "sum_logprob", now);
        r.id = format!("alpha-remote-{i}");
        r.route = "remote".to_owned();
        records.push(r);
        feedback.push((format!("alpha-remote-{i}"), 1.0));
    }
    write_ledger(&url, &records, &feedback);
    let out = dir.path().join("calibrate");
    let report = calibrate(&[
        "--ledger",
        &url,
        "--team",
        "alpha",
        "--rule",
        "sum_logprob",
        "--name",
        "alpha",
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    assert!(
        report.contains("40 requests served locally (20 right, 20 wrong"),
        "{report}"
    );
    assert!(report.contains("cross-validated ECE"), "{report}");
    // The right answers start at -1.95, the map's upper step.
    assert!(
        report.contains("min_p_correct = 0.5 amounts to sum_logprob >= -1.9500"),
        "{report}"
    );
    assert!(
        report.contains("aggregate = { kind = \"calibrated\", name = \"alpha-sum_logprob\" }"),
        "{report}"
    );

    let text = std::fs::read_to_string(out.join("alpha-sum_logprob.json")).unwrap();
    let rule = policies::CalibratedRule::from_json(&text).unwrap();
    assert_eq!(rule.rule, "sum_logprob");
    assert!(
        rule.map.p.windows(2).all(|w| w[0] <= w[1]),
        "{:?}",
        rule.map
    );
    assert!(rule.map.probability(-0.5) > 0.99, "{:?}", rule.map);
    assert!(rule.map.probability(-3.0) < 0.01, "{:?}", rule.map);
    assert_eq!(rule.fitted_on["team"], "alpha");
    assert_eq!(rule.fitted_on["items"], 40);
    assert!(
        rule.fitted_on["cv_ece"].as_f64().unwrap() < 0.1,
        "{}",
        rule.fitted_on
    );

    // The learned rule: the logistic curve of the same recorded score.
    let text = std::fs::read_to_string(out.join("alpha.json")).unwrap();
    let learned = policies::learned::LearnedRule::from_json(&text).unwrap();
    assert_eq!(learned.features, [policies::learned::Feature::SumLogprob]);
    let answer = |sum: f32| {
        [policies::TokenSignal {
            logprob: sum,
            entropy: 0.0,
            margin: 0.0,
        }]
    };
    let sure = learned.probability(&answer(-0.5)).unwrap();
    let unsure = learned.probability(&answer(-3.5)).unwrap();
    assert!(sure > 0.9 && unsure < 0.1, "{sure} {unsure}");
}

#[test]
fn too_little_feedback_says_so_and_falls_back_to_the_target_rate_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let now = now_ms();
    let records: Vec<LedgerRecord> = (0..10)
        .map(|i| request(i, -(i as f64 + 1.0), "sum_logprob", now))
        .collect();
    // Ten labels, half right: fewer than a fit needs.
    let feedback: Vec<(String, f64)> = (0..10)
        .map(|i| (format!("req-{i}"), if i < 5 { 1.0 } else { 0.0 }))
        .collect();
    write_ledger(&url, &records, &feedback);
    let out = dir.path().join("calibrate");
    let out = out.to_str().unwrap();
    let base = ["--ledger", &url, "--team", "alpha", "--out", out];
    let report = calibrate(&[&base[..], &["--target-rate", "0.3"][..]].concat()).unwrap();
    assert!(
        report.contains("not enough feedback to calibrate `sum_logprob` on the traffic of team `alpha`: 10 requests served locally with feedback (5 right, 5 wrong)"),
        "{report}"
    );
    assert!(
        report.contains("falling back to the unlabeled threshold"),
        "{report}"
    );
    assert!(
        report.contains("aggregate = { kind = \"sum_logprob\" }\nthreshold = -7.5000"),
        "{report}"
    );
    assert!(!std::path::Path::new(out)
        .join("default-sum_logprob.json")
        .exists());

    // Without a target rate there is nothing to fall back to: an error, not an empty report.
    let err = calibrate(&base).unwrap_err();
    assert!(err.contains("too little feedback"), "{err}");
    // Another team's traffic is not this team's.
    let err = calibrate(&[&base[..2], &["--team", "beta", "--target-rate", "0.3"][..]].concat())
        .unwrap_err();
    assert!(err.contains("no requests of team `beta`"), "{err}");
}

/// Sixty local requests of `team` whose policy kept their signals (`log_signals = "hidden"`),
/// routed by `mean_logprob`: the right answers (every other one) have a hidden state whose
/// first middle-layer value is positive, and slightly more probable tokens. The feedback says
/// which were right. Returns the records and the feedback.
fn kept_traffic(team: &str, now_ms: i64) -> (Vec<LedgerRecord>, Vec<(String, f64)>) {
    let mut records = Vec::new();
    let mut feedback = Vec::new();
    for i in 0..60 {
        let right = i % 2 == 0;
        // Deterministic jitter in [-0.5, 0.5).
        let jitter = |k: usize| ((i * 7 + k * 13) % 10) as f32 / 10.0 - 0.5;
        let width = 8;
        let vector = |k: usize| -> Vec<f32> { (0..width).map(|j| jitter(k + j)).collect() };
        let mut middle_mean = vector(2);
        middle_mean[0] = if right { 1.0 } else { -1.0 } + jitter(9);
        let hidden = local_model::ProbeFeatures {
            final_mean: vector(0),
            final_last: vector(1),
            middle_mean,
            middle_last: vector(3),
        };
        let tokens: Vec<policies::TokenSignal> = (0..3 + i % 4)
            .map(|k| policies::TokenSignal {
                logprob: -0.4 - jitter(k).abs() - if right { 0.0 } else { 0.3 },
                entropy: 1.0 + jitter(k + 1),
                margin: 0.5 + jitter(k + 2) / 2.0,
            })
            .collect();
        let mut r = request(0, -1.0, "mean_logprob", now_ms);
        r.id = format!("{team}-kept-{i}");
        r.team = Some(team.to_owned());
        r.signals = Some(EncodedSignals::encode(&tokens, Some(&hidden)));
        feedback.push((r.id.clone(), if right { 1.0 } else { 0.0 }));
        records.push(r);
    }
    (records, feedback)
}

#[test]
fn kept_signals_fit_every_rule_the_learned_rule_and_the_probe_from_a_teams_feedback() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let now = now_ms();
    let (mut records, feedback) = kept_traffic("alpha", now);
    // Escalated requests with kept signals: unlabeled items, counted for a rate target only.
    for i in 0..5 {
        let mut r = records[i].clone();
        r.id = format!("alpha-remote-{i}");
        r.route = "remote".to_owned();
        records.push(r);
    }
    write_ledger(&url, &records, &feedback);
    let out = dir.path().join("calibrate");
    // Routed by mean_logprob, calibrated for sum_logprob: with the tokens kept, any rule.
    let report = calibrate(&[
        "--ledger",
        &url,
        "--team",
        "alpha",
        "--rule",
        "sum_logprob",
        "--probe",
        "--name",
        "alpha",
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    assert!(
        report.contains("with kept signals: 65 requests, 60 of them served locally with feedback (30 right, 30 wrong"),
        "{report}"
    );
    // Every rule cross-validated, as for a labeled run.
    assert!(
        report.contains("5-fold cross-validation on 60 items"),
        "{report}"
    );
    assert!(report.contains("mean_entropy"), "{report}");
    let calibrated = std::fs::read_to_string(out.join("alpha-sum_logprob.json")).unwrap();
    let calibrated = policies::CalibratedRule::from_json(&calibrated).unwrap();
    assert_eq!(calibrated.fitted_on["team"], "alpha");
    assert_eq!(calibrated.fitted_on["ledger"], "sqlite");
    // The learned rule on every log-prob feature, not one recorded score.
    let learned = std::fs::read_to_string(out.join("alpha.json")).unwrap();
    let learned = policies::learned::LearnedRule::from_json(&learned).unwrap();
    assert!(learned.features.len() > 1, "{:?}", learned.features);
    // The probe reads the hidden state: right answers score higher than wrong ones.
    let probe = std::fs::read_to_string(out.join("alpha-probe.json")).unwrap();
    let probe = policies::ProbeRule::from_json(&probe).unwrap();
    assert_eq!(probe.width, 8);
    let stored: Vec<_> = records[..60]
        .iter()
        .map(|r| r.signals.as_ref().unwrap().decode().unwrap())
        .collect();
    let score = |s: &cascade::storage::RequestSignals| {
        let h = s.hidden.as_ref().unwrap();
        probe
            .log_odds(
                &s.tokens,
                &policies::HiddenState {
                    final_mean: &h.final_mean,
                    final_last: &h.final_last,
                    middle_mean: &h.middle_mean,
                    middle_last: &h.middle_last,
                },
            )
            .unwrap()
    };
    let (mut right, mut wrong) = (Vec::new(), Vec::new());
    for (i, s) in stored.iter().enumerate() {
        if i % 2 == 0 {
            right.push(score(s))
        } else {
            wrong.push(score(s))
        }
    }
    let lowest_right = right.iter().copied().fold(f64::INFINITY, f64::min);
    let highest_wrong = wrong.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert!(lowest_right > highest_wrong, "{right:?} {wrong:?}");
}

#[test]
fn a_probe_from_the_ledger_without_kept_hidden_states_says_how_to_keep_them() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let now = now_ms();
    let (records, feedback) = separable_traffic("alpha", false, now);
    write_ledger(&url, &records, &feedback);
    let out = dir.path().join("calibrate");
    let err = calibrate(&[
        "--ledger",
        &url,
        "--team",
        "alpha",
        "--probe",
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(err.contains("log_signals = \"hidden\""), "{err}");
    // Tokens kept but no hidden states (log_signals = "tokens"): the rules fit, the probe
    // cannot.
    let (mut kept, kept_feedback) = kept_traffic("beta", now);
    for r in &mut kept {
        let tokens = r.signals.as_ref().unwrap().decode().unwrap().tokens;
        r.signals = Some(EncodedSignals::encode(&tokens, None));
    }
    write_ledger(&url, &kept, &kept_feedback);
    let base = [
        "--ledger",
        &url,
        "--team",
        "beta",
        "--out",
        out.to_str().unwrap(),
    ];
    let report = calibrate(&base).unwrap();
    assert!(
        report.contains("5-fold cross-validation on 60 items"),
        "{report}"
    );
    let err = calibrate(&[&base[..], &["--probe"][..]].concat()).unwrap_err();
    assert!(
        err.contains("no labeled item has hidden-state features"),
        "{err}"
    );
}
