#!/usr/bin/env bash
# One device call that fits a GPU lease: 15 device-minutes per issue, machine
# start included, one command at most 10 minutes. Run on the lent machine:
#
#     bash bench/gpu_session.sh            # the whole plan, stops cleanly before 9 minutes
#     DRY_RUN=1 bash bench/gpu_session.sh  # on a CPU: every stage but the GPU work, timed
#
# Stages, in priority order (each one bounded by what is left of the budget):
#   1. environment (nvidia-smi, versions)
#   2. precompile exactly the variants the benchmark launches, in parallel
#      (found by `python -m cubn.model.session`: the benchmark's calls on a
#      recording launcher; the tests compile the rest on demand)
#   3. GPU tests, fast subset: tests/test_gpu.py, the launch counts, then the
#      cupy cases of the forward and backward tests (-x: stop at the first failure)
#   4. the quick benchmark (cubn bench --quick's cases, shape by shape)
#   5. the full benchmark (cubn bench's cases, shape by shape; the guard may cut it)
#   6. the remaining GPU tests (every test id with "cupy")
#   7. `cubn model` for the same device on the quick benchmark's shapes: CPU
#      work, so it runs in the background from the precompile on, at low
#      priority, and is stopped at the end (its JSON grows record by record)
# Stage timings (the CPU dry run, 2 busy cores; GPU stages estimated) are in
# docs/model.md, "The GPU session".
# Everything goes to $OUT as it happens (logs are tee'd line by line), so a
# cut run still returns data: the benchmark logs every record as it is
# measured and rewrites its results folder after every shape. $OUT comes back
# as 8 files: session.log, env.txt, gpu-tests.log, bench-quick.log,
# bench-full.log, bench.tgz (the benchmark folders, packed at the end),
# model-$DEVICE.json and stderr.log.
set -uo pipefail
START=$(date +%s)
BUDGET=${BUDGET:-510}          # seconds: everything ends by 8.5 minutes
OUT=${OUT:-/tmp/cubn-out}
DRY_RUN=${DRY_RUN:-0}
JOBS=${JOBS:-$(nproc)}
DEVICE=${DEVICE:-h200}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
LOG="$OUT/session.log"
: > "$LOG"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
# stage NAME MAX_SECONDS CMD...: runs CMD under the smaller of MAX_SECONDS and
# what is left (minus a margin for packing up), logs how long it took.
stage() {
  local name=$1 max=$2; shift 2
  local avail=$(( $(left) - 15 ))
  if [ "$avail" -le 5 ]; then say "skip $name: budget spent"; return 0; fi
  local limit=$(( max < avail ? max : avail ))
  say "start $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  local rc=$?
  say "end $name: rc=$rc after $(( $(date +%s) - t0 ))s$([ $rc = 124 ] && echo ' (cut by the time guard)')"
  return 0
}

{
  echo "== $(date -u +%FT%TZ) dry_run=$DRY_RUN jobs=$JOBS"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>&1 || true
  $PY -c "import numpy, sys; print('python', sys.version.split()[0], 'numpy', numpy.__version__)"
  $PY -c "import cupy; print('cupy', cupy.__version__)" 2>&1 | tail -1
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -1
  $PY -m cubn info 2>&1
} > "$OUT/env.txt" 2>&1
say "environment: $(head -2 "$OUT/env.txt" | tail -1)"

if [ "$DRY_RUN" = 1 ]; then
  PRECOMPILE_FLAGS=--nvrtc-only   # same compiler, no GPU: times the stage
  # no GPU: the benchmark runs only its CPU peer; keep that to two small ops
  BENCH_ARGS=${BENCH_ARGS:---dtypes float32 --ops moments,bn_infer}
else
  PRECOMPILE_FLAGS=
  BENCH_ARGS=${BENCH_ARGS:-}
fi
stage precompile-quick 60 sh -c "$PY -m cubn.model.session precompile --shapes quick --device $DEVICE --jobs $JOBS $PRECOMPILE_FLAGS 2>&1 | tee -a '$LOG'"

# 7. (background, low priority: it needs CPUs only) `cubn model` on the quick shapes
nice -n 19 $PY -m cubn model --device $DEVICE --quick --json "$OUT/model-$DEVICE.json" --no-progress --quiet \
  >>"$OUT/stderr.log" 2>&1 &
MODEL_PID=$!
say "model started in the background (pid $MODEL_PID)"

PYTEST="$PY -m pytest -p no:cacheprovider -q -rfE --durations=10"
stage gpu-tests-fast 120 sh -c "$PYTEST tests/test_gpu.py tests/test_launches.py tests/test_forward.py tests/test_backward.py -k 'cupy or test_gpu' -x 2>&1 | tee '$OUT/gpu-tests.log'"

stage bench-quick 180 sh -c "$PY -m cubn.model.session bench --shapes quick $BENCH_ARGS --out '$OUT/bench-quick' 2>'$OUT/bench-quick-stderr.log' | tee '$OUT/bench-quick.log'"

stage precompile-full 60 sh -c "$PY -m cubn.model.session precompile --shapes full --device $DEVICE --jobs $JOBS $PRECOMPILE_FLAGS 2>&1 | tee -a '$LOG'"

stage bench-full 200 sh -c "$PY -m cubn.model.session bench --shapes full $BENCH_ARGS --out '$OUT/bench-full' 2>'$OUT/bench-full-stderr.log' | tee '$OUT/bench-full.log'"

stage gpu-tests-rest 240 sh -c "$PYTEST tests -k cupy --deselect tests/test_gpu.py 2>&1 | tee -a '$OUT/gpu-tests.log' | tail -40"

# the model (CPU only) has run in the background since the precompile; stop it now
if [ -n "${MODEL_PID:-}" ]; then
  if kill -0 "$MODEL_PID" 2>/dev/null; then
    say "stop model (its JSON holds every record finished so far)"; kill -INT "$MODEL_PID" 2>/dev/null; sleep 2
    kill "$MODEL_PID" 2>/dev/null
  fi
  wait "$MODEL_PID" 2>/dev/null
  say "model: $($PY -c "import json; print(len(json.load(open('$OUT/model-$DEVICE.json'))['records']), 'records')" 2>/dev/null || echo 'no records')"
fi

# stderr logs are small; fold them into one file so that $OUT stays within 8 files
cat "$OUT"/*-stderr.log >> "$OUT/stderr.log" 2>/dev/null; rm -f "$OUT"/*-stderr.log
# the benchmark folders (rewritten after every shape) go back as one tarball
dirs=$(cd "$OUT" && ls -d bench-quick bench-full 2>/dev/null | tr '\n' ' ')
[ -n "$dirs" ] && tar -C "$OUT" -czf "$OUT/bench.tgz" $dirs && (cd "$OUT" && rm -rf $dirs)
say "done in $(( $(date +%s) - START ))s; files: $(ls "$OUT" | tr '\n' ' ')"
