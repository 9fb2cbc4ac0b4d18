#!/usr/bin/env bash
# One device call: precompile, the GPU test suite, then the benchmark suite.
# Usage (on the lent machine): bash bench/gpu_session.sh [tests|bench|all] ; logs and results go to $OUT.
set -uo pipefail
what=${1:-all}
OUT=${OUT:-/tmp/cubn-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
  $PY -c "import cupy, numpy, torch; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
  $PY -m cubn info
} 2>&1 | tee "$OUT/env.txt"
t0=$(date +%s)
$PY -m cubn precompile --jobs 16 2>&1 | tail -2 | tee "$OUT/precompile.txt"
echo "precompile: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/precompile.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  t1=$(date +%s)
  $PY -m pytest tests -k "cupy or test_gpu" -p no:cacheprovider -q -rfE --durations=15 2>&1 | tee "$OUT/gpu-tests.log" | tail -45
  echo "gpu tests: $(( $(date +%s) - t1 )) s" | tee -a "$OUT/gpu-tests.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  $PY -m cubn bench --out "$OUT/bench" ${BENCH_ARGS:-} 2>"$OUT/bench-stderr.log" | tee "$OUT/bench.txt" | tail -60
fi
