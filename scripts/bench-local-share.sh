#!/usr/bin/env bash
# Share of requests the cascade keeps local, by concurrency (issue 15's gateway goal):
# `cascade serve` with the real SmolLM2 and a mock remote (answers after 20 ms), the same 64
# questions ("What is the capital of X? Explain briefly.", 64 tokens at most) sent by C
# clients at once for each C, and the routes and reasons counted from the response headers.
#
#   scripts/bench-local-share.sh [CONCURRENCIES...]      default: 1 16 32
#   MAX_BATCH (8), QUEUE_DEPTH (8): the local engine's settings
#
# Builds the release binaries unless SKIP_BUILD=1.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
if [[ $# -gt 0 ]]; then levels=("$@"); else levels=(1 16 32); fi
model="${CASCADE_TEST_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
[[ -e "$model" ]] || { echo "error: $model missing; run scripts/fetch-model.sh" >&2; exit 1; }
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  (cd "$root" && cargo build --release -p cascade -p cascade-e2e --bins)
fi
bin="$target/release"

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start_workdir

start_mock_upstream "$bin" 20
port="$(free_port)"
cat >"$work/cascade.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
model_name = "cascade"
[local]
model = "$model"
name = "smollm2"
queue_depth = ${QUEUE_DEPTH:-8}
max_batch = ${MAX_BATCH:-8}
warm_up = true
[policy]
aggregate = { kind = "sum_logprob" }
threshold = -3.4
on_overload = "escalate"
max_queue_wait_ms = 5000
[[remotes]]
name = "mock"
model = "mock-model"
base_url = "http://127.0.0.1:$mock_port/v1"
timeout_ms = 10000
TOML
RUST_LOG=warn "$bin/cascade" serve --config "$work/cascade.toml" >"$work/cascade.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$port/readyz" "${pids[1]}" "$work/cascade.log" 200

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
python3 - "http://127.0.0.1:$port/v1/chat/completions" "${levels[@]}" <<'PY'
import collections, concurrent.futures, json, sys, time, urllib.request

url, levels = sys.argv[1], [int(c) for c in sys.argv[2:]]
countries = """France Germany Italy Spain Portugal Japan China India Brazil Canada Mexico Egypt
Kenya Nigeria Peru Chile Argentina Australia Russia Poland Sweden Norway Finland Denmark Greece
Turkey Iran Iraq Thailand Vietnam Indonesia Malaysia Philippines Colombia Venezuela Cuba Ireland
Austria Switzerland Belgium Netherlands Hungary Romania Bulgaria Ukraine Morocco Algeria Tunisia
Ethiopia Ghana Senegal Pakistan Bangladesh Nepal Mongolia Kazakhstan Israel Jordan Lebanon Syria
Iceland Estonia Latvia Lithuania""".split()[:64]

def ask(country):
    body = json.dumps({"model": "cascade", "max_tokens": 64, "messages": [
        {"role": "user", "content": f"What is the capital of {country}? Explain briefly."}]}).encode()
    req = urllib.request.Request(url, body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("x-cascade-route"), r.headers.get("x-cascade-reason")
    except urllib.error.HTTPError as e:
        return e.code, None, e.headers.get("x-cascade-reason")

print("| concurrency | served locally | escalated for load (local_overloaded) | other escalations | errors | wall s |")
print("|---|---|---|---|---|---|")
for c in levels:
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(c) as pool:
        results = list(pool.map(ask, countries))
    wall = time.monotonic() - started
    local = sum(1 for s, route, _ in results if s == 200 and route == "local")
    overload = sum(1 for s, route, reason in results if s == 200 and reason == "local_overloaded")
    errors = sum(1 for s, _, _ in results if s != 200)
    other = len(results) - local - overload - errors
    reasons = collections.Counter(reason for s, route, reason in results if route != "local")
    print(f"| {c} | {local}/{len(results)} ({100*local/len(results):.0f}%) | {overload} | {other} | {errors} | {wall:.1f} |")
    print(f"  (not local: {dict(reasons)})", file=sys.stderr)
    failed = collections.Counter((s, reason) for s, _, reason in results if s != 200)
    if failed:
        print(f"  (errors by status and reason: {dict(failed)})", file=sys.stderr)
PY
