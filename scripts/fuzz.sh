#!/usr/bin/env bash
# Fuzzes the request, feedback and configuration parsers with cargo-fuzz, each target for a
# fixed time. Not part of CI (it needs cargo-fuzz and minutes per target).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Default: 120 s for each of chat_request, completion_request, feedback, config. Runs on the
# stable toolchain through RUSTC_BOOTSTRAP=1, without a sanitizer (Rust's own checks catch
# what matters here: panics, overflows in debug assertions, stack overflows). A crash leaves
# its input in fuzz/artifacts/<target>/; add it as a regression test (see
# docs/reliability.md) before fixing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-120}"
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(chat_request completion_request feedback config)

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_FUZZ_TARGET_DIR:-$root/target-fuzz}"
cd "$root/fuzz"

cargo fuzz build --sanitizer none -O

status=0
for target in "${targets[@]}"; do
  corpus="corpus/$target"
  mkdir -p "$corpus" "artifacts/$target"
  cp -n seeds/"$target"/* "$corpus"/ 2>/dev/null || true
  echo "== $target for ${seconds}s"
  # -rss_limit_mb: a parser that allocates without bound is a finding too.
  if ! cargo fuzz run --sanitizer none -O "$target" "$corpus" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 \
      -artifact_prefix="artifacts/$target/" -print_final_stats=1 2>&1 | tee "artifacts/$target.log" | grep -E "^(#[0-9]+ +DONE|Done|stat::number_of_executed_units|stat::average_exec_per_sec|==[0-9]+==|SUMMARY|thread .* panicked)"; then
    :
  fi
  if ls "artifacts/$target"/crash-* "artifacts/$target"/oom-* "artifacts/$target"/timeout-* >/dev/null 2>&1; then
    echo "!! $target: findings in fuzz/artifacts/$target/" >&2
    status=1
  fi
done
exit "$status"
