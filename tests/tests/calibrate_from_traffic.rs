//! The per-team calibration loop end to end: a team whose policy keeps its answers' signals
//! (`log_signals = "hidden"`) asks the real SmolLM2 questions through the gateway, rates the
//! answers with `/v1/feedback`, and `cascade calibrate --ledger` fits every rule, the learned
//! rule and the hidden-state probe from that ledger alone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use clap::Parser;
use common::*;
use serde_json::json;

const KEY: &str = "sk-alpha-calibrates";

/// Countries and their capitals: well-known ones SmolLM2 mostly gets right and small ones it
/// mostly does not, so both labels occur.
const CAPITALS: [(&str, &str); 40] = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Thailand", "Bangkok"),
    ("Kenya", "Nairobi"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Cuba", "Havana"),
    ("Burkina Faso", "Ouagadougou"),
    ("Kyrgyzstan", "Bishkek"),
    ("Eswatini", "Mbabane"),
    ("Bhutan", "Thimphu"),
    ("Comoros", "Moroni"),
    ("Vanuatu", "Port Vila"),
    ("Tuvalu", "Funafuti"),
    ("Palau", "Ngerulmud"),
    ("Kiribati", "Tarawa"),
    ("Lesotho", "Maseru"),
    ("Djibouti", "Djibouti"),
    ("Eritrea", "Asmara"),
    ("Turkmenistan", "Ashgabat"),
    ("Tajikistan", "Dushanbe"),
    ("Suriname", "Paramaribo"),
    ("Guyana", "Georgetown"),
    ("Benin", "Porto-Novo"),
    ("Malawi", "Lilongwe"),
    ("Mauritania", "Nouakchott"),
    ("Burundi", "Gitega"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_rates_its_answers_and_calibrates_every_rule_and_the_probe_from_the_ledger() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let mut raw = raw_config(&[&mock]);
    raw.storage.url = url.clone();
    price(&mut raw, REMOTE, 0.15, 0.60);
    // Every answer is served locally (no score is below -1000), so every one can be rated.
    raw.teams = vec![team(
        "alpha",
        KEY,
        json!({"threshold": -1000.0, "remotes": [REMOTE], "log_signals": "hidden"}),
    )];
    let server = start(raw, Some(shared_engine())).await;
    let auth = format!("Bearer {KEY}");
    let mut right = 0;
    for (country, capital) in CAPITALS {
        let question = format!("What is the capital of {country}? Answer with the city name only.");
        let r = post(
            &server,
            "/v1/chat/completions",
            &chat("cascade", &question, 8),
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(r.header("x-cascade-route"), "local", "{:?}", r.headers);
        let is_right = r.answer().to_lowercase().contains(&capital.to_lowercase());
        right += usize::from(is_right);
        let thumbs = if is_right { "up" } else { "down" };
        let rated = post(
            &server,
            "/v1/feedback",
            &json!({"request_id": r.header("x-request-id"), "thumbs": thumbs}),
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(rated.status, 200, "{}", rated.text);
    }
    assert!(
        (5..=35).contains(&right),
        "{right} of 40 right: the set must hold at least five of each label"
    );

    let out = dir.path().join("calibrate");
    let cli = cascade::cli::Cli::try_parse_from([
        "cascade",
        "calibrate",
        "--ledger",
        &url,
        "--team",
        "alpha",
        "--rule",
        "normalized_logprob_0.5",
        "--probe",
        "--probe-dims",
        "16",
        "--name",
        "alpha",
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    let cascade::cli::Command::Calibrate(args) = cli.command else {
        panic!("not a calibrate command")
    };
    // The command makes its own runtime, as on the command line: off this test's.
    let report = tokio::task::spawn_blocking(move || {
        let mut report = Vec::new();
        cascade::commands::calibrate::execute(&args, &mut report).unwrap();
        String::from_utf8(report).unwrap()
    })
    .await
    .unwrap();
    assert!(
        report.contains(&format!(
            "40 requests, 40 of them served locally with feedback ({right} right, {} wrong",
            40 - right
        )),
        "{report}"
    );
    assert!(
        report.contains("5-fold cross-validation on 40 items"),
        "{report}"
    );
    // A rule that did not route the requests (they were routed by sum_logprob), calibrated.
    let calibrated =
        std::fs::read_to_string(out.join("alpha-normalized_logprob_0.5.json")).unwrap();
    let calibrated = policies::CalibratedRule::from_json(&calibrated).unwrap();
    assert_eq!(calibrated.fitted_on["items"], 40);
    // The probe over SmolLM2's hidden states, loadable by the gateway.
    let probe = std::fs::read_to_string(out.join("alpha-probe.json")).unwrap();
    let probe = policies::ProbeRule::from_json(&probe).unwrap();
    assert_eq!(probe.width, 576);
    assert_eq!(probe.hidden_weights.len(), 2 * 576);
}
