#!/usr/bin/env bash
# Runs Cascade's whole test suite: fetches the model, makes sure the
# services the tests need are up, then runs every Rust test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/fetch-model.sh
bash scripts/fetch-gemma.sh
bash scripts/start-postgres.sh
export CASCADE_TEST_POSTGRES_URL="${CASCADE_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"

# The lints the workspace declares (no unwrap, no panic, ...) and one format, enforced.
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (workspace, all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings 2>&1

echo "== cargo test (workspace)"
cargo test --workspace --all-targets 2>&1

echo "== official openai Python client against cascade serve"
target="${CARGO_TARGET_DIR:-$root/target}"
cargo build -p cascade -p cascade-e2e --bins 2>&1
bash scripts/python-client-test.sh "$target/debug/cascade" "$target/debug/cascade-mock-upstream"

echo "== schemathesis against cascade serve (no 5xx, no panic)"
bash scripts/schemathesis.sh "$target/debug/cascade" "$target/debug/cascade-mock-upstream"
