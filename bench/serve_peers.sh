#!/usr/bin/env bash
# `nanoseek serve` against llama.cpp's OpenAI-compatible server on the same GGUF, one after the
# other (never both up at once: the 2 cores would be shared), each measured by bench/serve.py:
#
#   bash bench/serve_peers.sh [OUT_DIR]      # JSON per server in OUT_DIR (default /tmp/serve-peers)
#
# Needs the bench extra: pip install "llama-cpp-python[server]" (on Intel CPUs with AMX, build it
# with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON ...": its native AMX path segfaults, see
# docs/benchmarks.md). Both servers get the same threads (THREADS, default: all cores).
set -euo pipefail
OUT=${1:-/tmp/serve-peers}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-$(nproc)}
LEVELS=${LEVELS:-1,4,16}
REQUESTS=${REQUESTS:-32}
mkdir -p "$OUT"
GGUF=$($PY -c "from nanoseek.checkpoint import resolve; print(resolve('smollm2-135m'))")

wait_ready() {   # $1: URL of a route that answers 200 once the model is loaded
  for _ in $(seq 600); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "server at $1 did not come up" >&2; return 1
}

run_one() {      # $1: name, $2: port, then the server command
  local name=$1 port=$2; shift 2
  OMP_NUM_THREADS=$THREADS "$@" >"$OUT/$name.log" 2>&1 &
  local pid=$!
  trap "kill $pid 2>/dev/null || true" EXIT
  wait_ready "http://127.0.0.1:$port/v1/models"
  $PY -m bench.serve --url "http://127.0.0.1:$port" --concurrency "$LEVELS" --num-requests "$REQUESTS" \
    --json "$OUT/$name.json" | tee "$OUT/$name.txt"
  kill -TERM $pid; wait $pid || true
  trap - EXIT
}

# llama-cpp-python's server runs one request at a time; --interrupt_requests False makes the others
# wait their turn (its default aborts the running request when a new one arrives)
SERVERS=${SERVERS:-nanoseek,llama.cpp}
[[ ,$SERVERS, == *,nanoseek,* ]] && run_one nanoseek 8101 .venv/bin/nanoseek serve --model smollm2-135m --port 8101
[[ ,$SERVERS, == *,llama.cpp,* ]] && run_one llama.cpp 8102 $PY -m llama_cpp.server --model "$GGUF" --port 8102 --n_threads "$THREADS" \
  --n_threads_batch "$THREADS" --n_ctx 4096 --interrupt_requests False
