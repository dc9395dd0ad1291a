//! `cascade calibrate --ledger`: thresholds for unlabeled traffic from the confidence values
//! the gateway recorded, only those of the named rule.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use cascade::cli::{Cli, Command};
use cascade::storage::{connect, LedgerRecord, StorageConfig};
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
    }
}

#[test]
fn calibrate_from_the_ledger_targets_an_escalation_rate_of_recorded_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let storage = connect(&StorageConfig {
            url: url.clone(),
            max_connections: 1,
            reservation_ttl_secs: 60,
            sqlite_sync: Default::default(),
        })
        .await
        .unwrap();
        // Ten requests scored by sum_logprob (-1, -2, ..., -10), and noise from another rule.
        for i in 0..10 {
            storage
                .record(&request(i, -(i as f64 + 1.0), "sum_logprob", now_ms))
                .await
                .unwrap();
        }
        storage
            .record(&request(99, -50.0, "mean_logprob", now_ms))
            .await
            .unwrap();
        storage.close().await;
    });
    let out = dir.path().join("calibrate");
    let Command::Calibrate(args) = Cli::try_parse_from([
        "cascade",
        "calibrate",
        "--ledger",
        &url,
        "--rule",
        "sum_logprob",
        "--target-rate",
        "0.3",
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
    // Escalating the three lowest (-10, -9, -8): the threshold lies between -8 and -7.
    assert!(report.contains("on 10 ledger requests"), "{report}");
    assert!(
        report.contains("aggregate = { kind = \"sum_logprob\" }\nthreshold = -7.5000"),
        "{report}"
    );
}
