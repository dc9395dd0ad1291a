//! Secrets are checked where they are used: `cascade report` reads the ledger with no remote
//! key in the environment, and `cascade serve` refuses to start without one, naming it.
//! Runs the real binary on the shipped example configuration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

/// `cascade ARGS --config <the example>` with a ledger in `dir` and no remote key, whatever
/// the environment running the tests has.
fn cascade_on_example(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(args)
        .arg("--config")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/multi-team.toml"))
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env(
            "CASCADE_STORAGE__URL",
            format!("sqlite://{}", dir.join("ledger.db").display()),
        )
        .output()
        .unwrap()
}

#[test]
fn report_reads_the_ledger_without_the_remotes_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = cascade_on_example(&["report"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The example's teams, each with its spend (none yet).
    for team in ["research", "support", "legal"] {
        assert!(stdout.contains(team), "{stdout}");
    }
}

#[test]
fn serve_refuses_to_start_without_a_remote_key_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = cascade_on_example(&["serve", "--listen", "127.0.0.1:0"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("OPENAI_API_KEY") && stderr.contains("api_key_env"),
        "{stderr}"
    );
}
