//! Every saved fuzz input (the seeds in `fuzz/seeds/<target>/` and each crash, saved in
//! `fuzz/regressions/<target>/`) fed to the function its fuzz target calls, as a normal test:
//! a fixed crash stays fixed without cargo-fuzz.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use cascade::config::{Config, RawConfig};
use cascade::limits::RequestLimits;
use cascade::openai::{parse_request, Endpoint};

/// The files saved for `target`, seeds and regressions.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut found = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
            continue;
        };
        for entry in dir {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            found.push((path, bytes));
        }
    }
    assert!(!found.is_empty(), "no saved inputs for {target}");
    found
}

fn request(endpoint: Endpoint, target: &str) {
    for (path, bytes) in inputs(target) {
        eprintln!("{}", path.display());
        if let Ok(request) = parse_request(endpoint, &bytes) {
            let _ = RequestLimits::default().check(&request);
        }
    }
}

#[test]
fn saved_chat_request_inputs_parse_or_fail_cleanly() {
    request(Endpoint::Chat, "chat_request");
}

#[test]
fn saved_completion_request_inputs_parse_or_fail_cleanly() {
    request(Endpoint::Completions, "completion_request");
}

#[test]
fn saved_feedback_inputs_parse_or_fail_cleanly() {
    for (path, bytes) in inputs("feedback") {
        eprintln!("{}", path.display());
        let _ = cascade::accounts::parse_feedback(&bytes);
    }
}

#[test]
fn saved_config_inputs_validate_or_fail_cleanly() {
    for (path, bytes) in inputs("config") {
        eprintln!("{}", path.display());
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        if let Ok(raw) = RawConfig::parse_toml(text) {
            let _ = Config::validate(raw, None, &|_| None);
        }
    }
}
