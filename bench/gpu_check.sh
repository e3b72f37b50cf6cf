#!/usr/bin/env bash
# One prepared script for a GPU machine (DESIGN.md, Benchmarks): build, gpu tests,
# GPU benchmarks, table last. Target: under 8 minutes. Results JSON goes to
# $FASTREG_RESULTS_DIR (default bench/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
export FASTREG_RESULTS_DIR="${FASTREG_RESULTS_DIR:-bench/results}"
mkdir -p "$FASTREG_RESULTS_DIR"
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
unset TRITON_INTERPRET
t0=$(date +%s)
echo "== device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton, numba; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numba', numba.__version__)"

echo "== build ($(($(date +%s) - t0)) s)"
$PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
$PY setup.py -q build_ext --inplace 2>&1 | grep -E "error|warning: unused" | head -20

echo "== gpu tests ($(($(date +%s) - t0)) s)"
timeout 240 $PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== gpu benchmarks ($(($(date +%s) - t0)) s)"
timeout 240 $PY -m pytest -q -m gpu bench -o python_files="bench_*.py" --benchmark-only -p no:cacheprovider \
  --benchmark-json="$FASTREG_RESULTS_DIR/gpu-last-run.json" 2>&1 | tail -5
echo "== summary ($(($(date +%s) - t0)) s); gpu tests exit code: $tests_rc"
$PY bench/summary.py "$FASTREG_RESULTS_DIR/gpu-last-run.json"
# the chart: docs/figures/bench-<gpu>.png (the README embeds it), and a copy beside the JSON
$PY bench/chart.py "$FASTREG_RESULTS_DIR/gpu-last-run.json"
$PY bench/chart.py "$FASTREG_RESULTS_DIR/gpu-last-run.json" "$FASTREG_RESULTS_DIR"
