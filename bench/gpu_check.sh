#!/usr/bin/env bash
# One GPU session: the kernel tests on the real GPU (no interpreter; h bit-exact with torch), then every
# microbenchmark, the end-to-end calibration benchmark, the score-kernel configuration sweep, and the whole
# product (bench/gpu_product.py: prune, --offload layerwise, eval --speed, utilisation, torchrun).
# CSVs, PNGs and gpu_check.log go to $OUT (default bench/results). Usage: bash bench/gpu_check.sh [--quick]
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/bench/results}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" && cd "$ROOT" || exit 1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
LOG="$OUT/gpu_check.log"
unset TRITON_INTERPRET COMPACT_KERNELS_BACKEND
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: >"$LOG"
SUMMARY=()
FAILED=0

step() {  # step NAME SECONDS COMMAND...: run under timeout, log, record rc and duration
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name: $*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=$?
  SUMMARY+=("$(printf '%-14s rc=%-3s %4ss (limit %ss)' "$name" "$rc" $((SECONDS - start)) "$limit")")
  [ "$rc" -eq 0 ] || FAILED=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>&1 | tee -a "$LOG"
step kernel-tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernel_ops
step bench-scores 180 "$PY" bench/bench_scores.py --out "$OUT" "$@"
step bench-gather 60 "$PY" bench/bench_gather.py --out "$OUT" "$@"
step calibration 180 "$PY" bench/calibration.py --device cuda --out "$OUT"
step sweep 120 "$PY" bench/sweep_scores.py --out "$OUT"
# the whole product at the Llama-3.1-8B shape (each of its steps has its own limit; --quick skips three)
step product 590 "$PY" bench/gpu_product.py --out "$OUT" "$@"

{ echo "== summary (results in $OUT)"; printf '%s\n' "${SUMMARY[@]}"; } | tee -a "$LOG"
exit "$FAILED"
