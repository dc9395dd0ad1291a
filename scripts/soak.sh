#!/usr/bin/env bash
# Soak benchmark: `cascade serve` with the real SmolLM2 model and the mock upstream
# (answering after 200 ms), under a steady open-loop rate of mixed traffic (capital
# questions the local model answers, MT-Bench prompts it escalates) for several minutes.
# Prints the load generator's JSON (throughput, latency percentiles by route, errors,
# the gateway's resident memory every 10 s) and a short summary.
#
#   scripts/soak.sh [SECONDS] [RATE_PER_SECOND]      defaults: 180 s at 1 request/s
#   PROFILE=debug to use debug binaries (default: release; built unless SKIP_BUILD=1)
#
# Not part of CI: it runs for minutes. All traffic stays on 127.0.0.1.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
seconds="${1:-180}"
rate="${2:-1}"
profile="${PROFILE:-release}"
data="${CASCADE_DATA:-$root/../shared/data}"
model="${CASCADE_TEST_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  flag=(); [[ $profile == release ]] && flag=(--release)
  (cd "$root" && cargo build "${flag[@]}" -p cascade -p cascade-e2e --bins)
fi
bin="$target/$profile"
[[ -e "$model" ]] || { echo "error: $model missing; run scripts/fetch-model.sh" >&2; exit 1; }
[[ -d "$data/capitals" ]] || { echo "error: $data/capitals missing (set CASCADE_DATA)" >&2; exit 1; }

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start_workdir

start_mock_upstream "$bin" 200
port="$(free_port)"
cat >"$work/cascade.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[local]
model = "$model"
name = "smollm2"
queue_depth = 64
[policy]
# Escalations are served by the mock; the local queue may wait long under load.
max_queue_wait_ms = 0
[storage]
url = "sqlite://$work/ledger.db"
[[remotes]]
name = "mock"
model = "mock-model"
base_url = "http://127.0.0.1:$mock_port/v1"
timeout_ms = 30000
TOML
RUST_LOG=warn "$bin/cascade" serve --config "$work/cascade.toml" >"$work/cascade.log" 2>&1 &
gateway=$!
pids+=($gateway)
wait_ready "http://127.0.0.1:$port/readyz" "$gateway" "$work/cascade.log" 200

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $profile build; $seconds s at $rate/s"
report="$("$bin/cascade-soak" --url "http://127.0.0.1:$port" --pid "$gateway" --data "$data" --rate "$rate" --seconds "$seconds")"
echo "$report"
python3 - "$report" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"\nthroughput {r['throughput_per_s']:.2f}/s of {r['offered_rate_per_s']}/s offered; ok {r['ok']} of {r['requests']}; errors {r['errors']}")
for route, s in r["by_route"].items():
    print(f"  {route:6s} n={s['requests']:4d}  p50 {s['p50_ms']:8.0f} ms  p90 {s['p90_ms']:8.0f} ms  p99 {s['p99_ms']:8.0f} ms  max {s['max_ms']:8.0f} ms")
rss = [x["kib"] for x in r["rss_kib"] if x["kib"]]
if rss:
    print(f"  gateway RSS: start {rss[0]/1024:.0f} MiB, peak {max(rss)/1024:.0f} MiB, end {rss[-1]/1024:.0f} MiB")
PY
if grep -q panicked "$work/cascade.log"; then echo "error: the gateway panicked" >&2; exit 1; fi
