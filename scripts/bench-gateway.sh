#!/usr/bin/env bash
# Gateway overhead benchmark: the same requests sent straight to the mock
# upstream (answering after a fixed 20 ms) and through `cascade serve` on a
# remote-only route (the local model is bypassed), at several concurrencies,
# in the same run. Prints one line per run and a summary table.
#
#   scripts/bench-gateway.sh [SECONDS_PER_RUN] [CONCURRENCIES...]
#   defaults: 10 s, concurrency 1 8 64
#   GATEWAY_THREADS=N: the gateway's worker threads (default: server.worker_threads's, min(4, CPUs))
#
# Builds the release binaries unless SKIP_BUILD=1. The load generator is
# `cascade-loadgen` (tests crate): closed loop, kept-alive connections.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
seconds="${1:-10}"
shift || true
if [[ $# -gt 0 ]]; then levels=("$@"); else levels=(1 8 64); fi
model="${CASCADE_TEST_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  (cd "$root" && cargo build --release -p cascade -p cascade-e2e --bins)
fi
bin="$target/release"
[[ -e "$model" ]] || { echo "error: $model missing; run scripts/fetch-model.sh" >&2; exit 1; }

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start_workdir

start_mock_upstream "$bin" 20
port="$(free_port)"
cat >"$work/cascade.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[local]
model = "$model"
name = "smollm2"
warm_up = false
[[remotes]]
name = "mock"
model = "mock-model"
base_url = "http://127.0.0.1:$mock_port/v1"
timeout_ms = 10000
TOML
env ${GATEWAY_THREADS:+CASCADE_SERVER__WORKER_THREADS=$GATEWAY_THREADS} RUST_LOG=warn "$bin/cascade" serve --config "$work/cascade.toml" >"$work/cascade.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$port/readyz" "${pids[1]}" "$work/cascade.log" 200

body_for() { printf '{"model":"%s","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}' "$1"; }
direct_url="http://127.0.0.1:$mock_port/v1/chat/completions"
gateway_url="http://127.0.0.1:$port/v1/chat/completions"

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
results="$work/results.jsonl"
for c in "${levels[@]}"; do
  for target_name in direct gateway; do
    if [[ $target_name == direct ]]; then url=$direct_url; body=$(body_for mock-model); else url=$gateway_url; body=$(body_for mock); fi
    line=$("$bin/cascade-loadgen" --url "$url" --body "$body" --concurrency "$c" --seconds "$seconds" --warmup-seconds 2)
    echo "{\"target\":\"$target_name\",\"result\":$line}" | tee -a "$results"
  done
done

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["result"]["concurrency"], {})[r["target"]] = r["result"]
print()
print("| concurrency | direct p50 / p99 ms | gateway p50 / p99 ms | added p50 / p99 ms | direct rps | gateway rps | gateway/direct |")
print("|---|---|---|---|---|---|---|")
for c in sorted(by):
    d, g = by[c]["direct"], by[c]["gateway"]
    print(f"| {c} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | {g['p50_ms']:.2f} / {g['p99_ms']:.2f} | "
          f"{g['p50_ms']-d['p50_ms']:+.2f} / {g['p99_ms']-d['p99_ms']:+.2f} | {d['rps']:.0f} | {g['rps']:.0f} | "
          f"{100*g['rps']/d['rps']:.1f}% |")
errors = sum(r["result"]["errors"] for r in rows)
print(f"\nerrors: {errors}")
PY
