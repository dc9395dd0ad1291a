#!/usr/bin/env bash
# Runs the official `openai` Python client against `cascade serve`, which
# serves the real SmolLM2 model in front of the mock upstream.
#
#   scripts/python-client-test.sh [CASCADE_BIN] [MOCK_BIN]
#
# Defaults: the binaries in $CARGO_TARGET_DIR (or target/), release when
# built, else debug (`cargo build -p cascade -p cascade-e2e --bins`). Creates
# .venv with the `openai` and `pytest` packages on first use. Needs the model
# from scripts/fetch-model.sh.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
default_bin="$target/release/cascade"
[[ -x "$default_bin" && -x "$target/release/cascade-mock-upstream" ]] || default_bin="$target/debug/cascade"
cascade_bin="${1:-$default_bin}"
mock_bin="${2:-$(dirname "$cascade_bin")/cascade-mock-upstream}"
model="${CASCADE_TEST_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
python="${PYTHON:-python3}"

for f in "$cascade_bin" "$mock_bin"; do
  [[ -x "$f" ]] || { echo "error: $f not found; build with: cargo build -p cascade -p cascade-e2e --bins" >&2; exit 1; }
done
[[ -f "$model" ]] || { echo "error: $model missing; run scripts/fetch-model.sh" >&2; exit 1; }

venv="$root/.venv"
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import openai, pytest" 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check openai pytest
fi

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PYTHON="$venv/bin/python"
start_workdir


mock_port="$(free_port)"
"$mock_bin" --port "$mock_port" >"$work/mock.log" 2>&1 &
pids+=($!)

port="$(free_port)"
cat >"$work/cascade.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[local]
model = "$model"
name = "smollm2"
max_tokens = 64
[policy]
aggregate = "mean_logprob"
threshold = -0.5
allow_route_header = true
[[remotes]]
name = "mock"
model = "mock-model"
base_url = "http://127.0.0.1:$mock_port/v1"
api_key_env = "CASCADE_PY_TEST_KEY"
timeout_ms = 10000
TOML
CASCADE_PY_TEST_KEY=sk-mock "$cascade_bin" serve --config "$work/cascade.toml" >"$work/cascade.log" 2>&1 &
pids+=($!)

# Ready once the model is loaded and warmed up.
wait_ready "http://127.0.0.1:$port/readyz" "${pids[1]}" "$work/cascade.log"

CASCADE_URL="http://127.0.0.1:$port/v1" CASCADE_LOCAL_MODEL=smollm2 CASCADE_REMOTE_MODEL=mock \
  "$venv/bin/python" -m pytest -q "$root/tests/python/test_openai_client.py"
