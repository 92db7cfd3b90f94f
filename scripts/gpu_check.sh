#!/usr/bin/env bash
# CUDA correctness check, run by hand on a machine with an NVIDIA GPU (CI has none).
# Installs nothing: it uses the existing .venv, whose torch must be a CUDA build
# (the CPU setup in scripts/setup.sh is not). Runs the parity and re-batching
# invariance tests with the engine on --device cuda (HF references on the CPU),
# then a short `baton bench perf` on cuda, and prints a summary.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (default benchmarks/results/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu_check}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  "$PY" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
PY
} | tee "$OUT/summary.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "no CUDA device visible to this torch: nothing to check" | tee -a "$OUT/summary.txt"; exit 1; }

"$PY" -m pytest -q -p no:cacheprovider --device cuda \
  tests/models/test_parity.py tests/models/test_families.py tests/models/test_transformers_backend.py \
  tests/test_invariance.py tests/test_fault_isolation.py 2>&1 | tee "$OUT/pytest.txt"
tests_rc=${PIPESTATUS[0]}

"$PY" -m baton.cli bench perf --quick --no-hf --device cuda --out "$OUT/perf" 2>&1 | tail -30 | tee "$OUT/perf.txt"
perf_rc=${PIPESTATUS[0]}

{
  echo
  echo "tests: $(tail -1 "$OUT/pytest.txt") (exit $tests_rc)"
  echo "bench perf --quick on cuda: exit $perf_rc (table in $OUT/perf/report.md)"
} | tee -a "$OUT/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$perf_rc" -eq 0 ]
