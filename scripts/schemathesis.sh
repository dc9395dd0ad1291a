#!/usr/bin/env bash
# Property-based run of schemathesis against `cascade serve`: every operation of
# /openapi.json gets generated valid and invalid inputs, and no answer may be a 5xx
# (check `not_a_server_error`) nor the server's log show a panic.
#
#   scripts/schemathesis.sh [CASCADE_BIN] [MOCK_BIN]
#
# Defaults: the debug binaries in $CARGO_TARGET_DIR (or target/), built with
# `cargo build -p cascade -p cascade-e2e --bins`. Creates .venv-schemathesis with a pinned
# schemathesis on first use. Needs the model from scripts/fetch-model.sh (only to start:
# generation goes to the mock upstream, see the configuration below).
#
# SCHEMATHESIS_MAX_EXAMPLES (default 100) bounds the cases per operation, so the run takes a
# few minutes on two cores.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
cascade_bin="${1:-$target/debug/cascade}"
mock_bin="${2:-$(dirname "$cascade_bin")/cascade-mock-upstream}"
model="${CASCADE_TEST_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
# Python 3.12 or newer: on 3.11.7, Hypothesis's lambda descriptions hit a CPython bug
# ("AST constructor recursion depth mismatch") that schemathesis reports as an error.
pick_python() {
  local candidates=("${PYTHON:-}" python3.13 python3.12)
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)"/versions/3.1[2-9]*/bin/python3)
  fi
  candidates+=(python3)
  for p in "${candidates[@]}"; do
    [[ -n "$p" ]] || continue
    if "$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$p"
      return
    fi
  done
  echo "warning: no Python 3.12+; schemathesis may report tool errors" >&2
  echo python3
}
python="$(pick_python)"
max_examples="${SCHEMATHESIS_MAX_EXAMPLES:-100}"
schemathesis_version="4.32.5"

for f in "$cascade_bin" "$mock_bin"; do
  [[ -x "$f" ]] || { echo "error: $f not found; build with: cargo build -p cascade -p cascade-e2e --bins" >&2; exit 1; }
done
[[ -f "$model" ]] || { echo "error: $model missing; run scripts/fetch-model.sh" >&2; exit 1; }

venv="$root/.venv-schemathesis"
if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
if [[ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" != "$schemathesis_version" ]]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$schemathesis_version"
fi

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PYTHON="$venv/bin/python"
start_workdir

sha256() { "$venv/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())' "$1"; }

mock_port="$(free_port)"
"$mock_bin" --port "$mock_port" >"$work/mock.log" 2>&1 &
pids+=($!)

team_key="sk-schemathesis-team"
admin_key="sk-schemathesis-admin"
port="$(free_port)"
# The team's policy (remote_only) sends every cascade request to the mock (the real model on
# two cores would make a run take hours); a request naming the local model directly is 403
# under remote_only, so the model never runs here (`local.max_tokens` = 4 bounds it if it
# did). A request may take 20 s at most.
cat >"$work/cascade.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[local]
model = "$model"
name = "smollm2"
max_tokens = 4
warm_up = false
[storage]
url = "sqlite://$work/ledger.db"
[admin]
api_key_hash = "$(sha256 "$admin_key")"
[limits]
request_timeout_ms = 20000
[[remotes]]
name = "mock"
model = "mock-model"
base_url = "http://127.0.0.1:$mock_port/v1"
api_key_env = "CASCADE_ST_KEY"
timeout_ms = 10000
[prices.mock]
input_usd_per_million = 1.0
output_usd_per_million = 2.0
[[teams]]
name = "fuzz"
api_key_hashes = ["$(sha256 "$team_key")"]
[teams.policy]
remote_only = true
remotes = ["mock"]
allow_route_header = true
allow_direct_models = true
[[experiments]]
id = "fuzz-exp"
team = "fuzz"
subject = "key"
variants = [{ name = "a", weight = 1 }, { name = "b", weight = 1 }]
TOML
CASCADE_ST_KEY=sk-mock "$cascade_bin" serve --config "$work/cascade.toml" >"$work/cascade.log" 2>&1 &
pids+=($!)

wait_ready "http://127.0.0.1:$port/readyz" "${pids[1]}" "$work/cascade.log"

# The served document, with `model` and the experiment id narrowed to names this gateway
# knows: random names would all stop at 404 model_not_found and test nothing behind it.
"$venv/bin/python" - "http://127.0.0.1:$port/openapi.json" "$work/openapi.json" <<'PY'
import json, sys, urllib.request
doc = json.load(urllib.request.urlopen(sys.argv[1]))
for name in ("ChatCompletionRequest", "CompletionRequest"):
    doc["components"]["schemas"][name]["properties"]["model"]["enum"] = ["cascade", "mock", "smollm2"]
for p in doc["paths"]["/admin/experiments/{id}"]["get"]["parameters"]:
    p["schema"]["enum"] = ["fuzz-exp"]
json.dump(doc, open(sys.argv[2], "w"))
PY

run() {
  # No `examples` phase: the document has next to no examples, and schemathesis 4.32.5's
  # example extraction fails inside Hypothesis on some `anyOf` bodies (an error of the tool,
  # not an answer of the gateway).
  # From the scratch folder: schemathesis keeps its state in `.schemathesis/` there.
  (cd "$work" && "$venv/bin/st" run "$work/openapi.json" --url "http://127.0.0.1:$port" \
    --checks not_a_server_error \
    --phases coverage,fuzzing \
    --max-examples "$max_examples" \
    --seed 7 \
    --workers 2 \
    --request-timeout 30 \
    --generation-database none \
    --suppress-health-check all \
    --no-color \
    "$@")
}

status=0
echo "== schemathesis: team routes with a team key"
run --header "Authorization: Bearer $team_key" --exclude-path-regex '^/admin/' || status=1
echo "== schemathesis: admin routes with the admin key"
run --header "Authorization: Bearer $admin_key" --include-path-regex '^/admin/' || status=1

if grep -q "panicked" "$work/cascade.log"; then
  echo "error: the gateway panicked:" >&2
  grep -n -A5 "panicked" "$work/cascade.log" >&2
  status=1
fi
kill -0 "${pids[1]}" 2>/dev/null || { echo "error: the gateway died" >&2; tail -50 "$work/cascade.log" >&2; status=1; }
exit "$status"
