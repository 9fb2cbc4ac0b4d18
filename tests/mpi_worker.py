"""One MPI rank of the SyncBatchNorm tests (launched by test_sync_batch_norm.py).

    mpiexec -n K python -m mpi_worker SCENARIO BACKEND SEED [OUTDIR]

``equal``: every rank draws the same global batch from SEED, runs
SyncBatchNorm on its own slice (uneven sizes, maybe empty) and BatchNorm on
the whole batch in the same process, and compares outputs, dx, d side_input,
gradients and every state variable after each step, then checks that state
and gradients are bit-identical across ranks. ``mismatch``: ranks call the
layer inconsistently on purpose; every rank must raise the expected error.
``gpu-mpi`` / ``gpu-nccl``: ``equal`` on CuPy arrays through MPI (host
staging) or NCCL. ``fail-raise`` / ``fail-exit``: rank 1 raises outside the
layer before a training call, or exits between a training call and its
backward; every other rank must end in the layer's timeout with a clear
error, and then be refused at once (``fail-raise-abort``: the same raise
with a long timeout, for ``python -m mpi4py``, which aborts every rank).

Each rank prints ``RANK r OK ...`` lines (and, given OUTDIR, writes them to
``OUTDIR/rank<r>.txt``: mpiexec may interleave the ranks' stdout); problems
print ``RANK r FAIL ...`` and the rank exits 1. An unexpected exception aborts the whole job (no rank
is left waiting) -- except in the ``fail-*`` scenarios, where rank 1 fails on purpose and must not
take the others down.
"""
from __future__ import annotations

import contextlib
import sys
import time
import traceback

import numpy as np
from mpi4py import MPI

import cubn
from cubn.distributed import ExchangeTimeout, as_communicator
from cubn.layers.sync_batch_norm import SyncBatchNorm

SPLITS = {2: [7, 2], 4: [5, 0, 3, 8]}  # per-rank batch sizes: uneven, one rank empty
TOL = {"float32": 3e-5, "float64": 1e-11}

# (name, per-sample shape, data_format, dtype, layer kwargs, options)
CONFIGS = [
    ("nhwc-f32-relu-side-inplace", (3, 2, 5), "NHWC", "float32",
     dict(scale=True, decay=0.8, activation_fn="relu", updates_collections=None), dict(side=True)),
    ("nchw-f64-renorm-tanh-deferred", (4, 3, 2), "NCHW", "float64",
     dict(scale=True, decay=0.7, renorm=True, renorm_decay=0.6, activation_fn="tanh",
          renorm_clipping={"rmax": 1.4, "rmin": 0.8, "dmax": 0.4}), dict(deferred=True)),
    ("nc-f32-weights-zerodebias-deferred", (6,), "NHWC", "float32",
     dict(scale=True, decay=0.9, zero_debias_moving_mean=True), dict(weights=True, deferred=True)),
    ("nchw-f32-weights-renorm-elu-side", (3, 2, 2), "NCHW", "float32",
     dict(scale=True, renorm=True, activation_fn="elu", updates_collections=None), dict(side=True, weights=True)),
    ("nhwc3d-f64-weights-leaky", (4, 3), "NHWC", "float64",
     dict(scale=True, decay=0.5, activation_fn="leaky_relu", updates_collections=None), dict(weights=True)),
]
STEPS = 3


class Rank:
    def __init__(self, comm, xp, device_comm=None, outdir=None):
        self.comm, self.xp = comm, xp
        self.log = None if outdir is None else open(f"{outdir}/rank{comm.Get_rank()}.txt", "w")
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.layer_comm = device_comm if device_comm is not None else comm
        self.failures = 0
        self.worst = 0.0  # largest relative error seen in the current config

    def say(self, status, msg):
        line = f"RANK {self.rank} {status} {msg}"
        print(line, flush=True)
        if self.log is not None:
            self.log.write(line + "\n")
            self.log.flush()
        if status == "FAIL":
            self.failures += 1

    def host(self, a):
        return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)

    def dev(self, a):
        return self.xp.asarray(a)

    def close(self, what, actual, expected, dtype):
        a = np.asarray(self.host(actual), np.float64)
        e = np.asarray(self.host(expected), np.float64)
        if a.shape != e.shape:
            self.say("FAIL", f"{what}: shape {a.shape} != {e.shape}")
            return
        if a.size == 0:
            return
        if not np.array_equal(np.isfinite(a), np.isfinite(e)):
            self.say("FAIL", f"{what}: non-finite pattern differs")
            return
        fin = np.isfinite(e)
        err = float(np.max(np.abs(a[fin] - e[fin]))) / max(1.0, float(np.max(np.abs(e[fin])))) if fin.any() else 0.0
        self.worst = max(self.worst, err)
        if err > TOL[dtype]:
            self.say("FAIL", f"{what}: relative error {err:.3g} > {TOL[dtype]}")


def run_equal(ctx: Rank, seed: int):
    sizes = SPLITS.get(ctx.size) or [3 + (r % 3) for r in range(ctx.size)]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    lo, hi = int(offsets[ctx.rank]), int(offsets[ctx.rank + 1])
    n = int(offsets[-1])
    for ci, (name, sample, fmt, dtype, kw, opt) in enumerate(CONFIGS):
        failures, ctx.worst = ctx.failures, 0.0
        rng = np.random.default_rng([seed, ci])  # the same draws on every rank
        c = sample[-1] if fmt == "NHWC" else sample[0]
        coll_s, coll_r = cubn.UpdateCollection(), cubn.UpdateCollection()
        kw_s = dict(kw, data_format=fmt, updates_collections=coll_s) if opt.get("deferred") else dict(kw, data_format=fmt)
        kw_r = dict(kw, data_format=fmt, updates_collections=coll_r) if opt.get("deferred") else dict(kw, data_format=fmt)
        init = {"gamma": ctx.dev(rng.uniform(0.5, 1.5, c)), "beta": ctx.dev(rng.normal(size=c))}
        sync = SyncBatchNorm(comm=ctx.layer_comm, param_initializers=init, **kw_s)
        ref = cubn.BatchNorm(param_initializers=init, **kw_r)
        axis = 1 if (len(sample) > 1 and fmt == "NCHW") else len(sample)
        loc = np.arange(c, dtype=np.float64) * 3.0
        shape_c = [1] * (len(sample) + 1)
        shape_c[axis] = c
        for step in range(STEPS):
            x = (rng.normal(size=(n, *sample)) * 2 + 5 * step + loc.reshape(shape_c)).astype(dtype)
            dy = rng.normal(size=x.shape).astype(dtype)
            side = rng.normal(size=x.shape).astype(dtype) if opt.get("side") else None
            w = rng.uniform(0, 2, n) * (rng.uniform(size=n) > 0.2) if opt.get("weights") else None
            where = f"{name} step {step}"
            sl = slice(lo, hi)
            part = lambda a: None if a is None else ctx.dev(np.ascontiguousarray(a[sl]))  # noqa: E731
            full = lambda a: None if a is None else ctx.dev(a)  # noqa: E731
            ys = sync(part(x), is_training=True, batch_weights=part(w), side_input=part(side))
            yr = ref(full(x), is_training=True, batch_weights=full(w), side_input=full(side))
            ctx.close(f"{where} y", ys, ctx.host(yr)[sl], dtype)
            gs, gr = sync.backward(part(dy)), ref.backward(full(dy))
            if side is not None:
                ctx.close(f"{where} dx", gs[0], ctx.host(gr[0])[sl], dtype)
                ctx.close(f"{where} d side_input", gs[1], ctx.host(gr[1])[sl], dtype)
            else:
                ctx.close(f"{where} dx", gs, ctx.host(gr)[sl], dtype)
            if set(sync.gradients) != set(ref.gradients):
                ctx.say("FAIL", f"{where}: gradients {sorted(sync.gradients)} != {sorted(ref.gradients)}")
            for k in ref.gradients:
                ctx.close(f"{where} gradient {k}", sync.gradients[k], ref.gradients[k], dtype)
            if opt.get("deferred"):
                if len(coll_s) != 1:
                    ctx.say("FAIL", f"{where}: {len(coll_s)} pending updates, expected 1")
                cubn.run_updates(coll_s)
                cubn.run_updates(coll_r)
            for k, v in ref.variables.items():
                ctx.close(f"{where} {k}", sync.variables[k], v, dtype)
        # Inference uses the moving statistics only: local, no exchange.
        x = (rng.normal(size=(n, *sample)) * 2 + loc.reshape(shape_c)).astype(dtype)
        ctx.close(f"{name} inference", sync(ctx.dev(x[lo:hi]), is_training=False),
                  ctx.host(ref(ctx.dev(x), is_training=False))[lo:hi], dtype)
        # The merged statistics and the all-reduced sums are the same bits on every rank.
        mine = {k: ctx.host(v) for k, v in {**sync.variables, **{"d/" + g: a for g, a in sync.gradients.items()}}.items()}
        first = ctx.comm.bcast(mine, root=0)
        for k, v in mine.items():
            if not np.array_equal(v, first[k], equal_nan=True):
                ctx.say("FAIL", f"{name} {k}: differs from rank 0's bits")
        if ctx.failures == failures:
            ctx.say("OK", f"{name} sizes {sizes}: largest relative error {ctx.worst:.2g}")


# -- mismatches -------------------------------------------------------------------
def _mismatch_cases(rank):
    """name -> (expected error type, substring every rank's message has, function running the calls)."""
    odd = rank == 1

    def channels():
        bn = SyncBatchNorm(updates_collections=None)
        bn(np.ones((4, 2, 2, 3 + odd), np.float32))

    def dtype():
        bn = SyncBatchNorm(updates_collections=None)
        bn(np.ones((4, 2, 2, 3), np.float64 if odd else np.float32))

    def data_format():
        bn = SyncBatchNorm(updates_collections=None, data_format="NCHW" if odd else "NHWC")
        bn(np.ones((4, 3, 2, 3), np.float32))

    def config():
        bn = SyncBatchNorm(updates_collections=None, decay=0.9 if odd else 0.99)
        bn(np.ones((4, 3), np.float32))

    def out_of_step():  # rank 1 skips a backward
        bn = SyncBatchNorm(updates_collections=None)
        x = np.arange(24, dtype=np.float32).reshape(8, 3)
        bn(x)
        if not odd:
            bn.backward(x)
        bn(x)

    def local_failure():  # rank 1 fails its own argument check on the second call
        bn = SyncBatchNorm(updates_collections=None)
        x = np.arange(24, dtype=np.float32).reshape(8, 3)
        bn(x, batch_weights=np.ones(8, np.float32))
        bn.backward(x)
        bn(x, batch_weights=np.ones(5 if odd else 8, np.float32))

    def local_failure_backward():  # rank 1 gives dy of the wrong shape
        bn = SyncBatchNorm(updates_collections=None)
        x = np.arange(24, dtype=np.float32).reshape(8, 3)
        bn(x)
        bn.backward(x[:7] if odd else x)

    def all_empty():
        bn = SyncBatchNorm(updates_collections=None)
        bn(np.ones((0, 2, 3), np.float32))

    return {
        "channels": (ValueError, "the same channel count on every rank", channels),
        "dtype": (TypeError, "the same dtype on every rank", dtype),
        "data_format": (ValueError, "the same data_format on every rank", data_format),
        "config": (ValueError, "the same layer arguments on every rank", config),
        "out_of_step": (RuntimeError, "out of step", out_of_step),
        "local_failure": (ValueError, "batch_weights", local_failure),
        "local_failure_backward": (ValueError, "'dy'", local_failure_backward),
        "all_empty": (ValueError, "empty batch on all", all_empty),
    }


def run_mismatch(ctx: Rank, seed: int):
    for name, (etype, text, fn) in _mismatch_cases(ctx.rank).items():
        try:
            fn()
        except etype as e:
            msg = " ".join(str(e).split())
            status = "OK" if text in msg else "FAIL"
            ctx.say(status, f"{name} {type(e).__name__}: {msg}")
        except Exception as e:  # noqa: BLE001 - any other error is a failure of the test
            ctx.say("FAIL", f"{name} unexpected {type(e).__name__}: {e}")
        else:
            ctx.say("FAIL", f"{name}: no error raised")
        ctx.comm.Barrier()  # the communicator is still usable after the error


# -- a rank that fails outside the layer -------------------------------------------
FAIL_TIMEOUT = 3.0  # seconds: SyncBatchNorm's timeout in the fail-* scenarios


def run_failure(ctx: Rank, scenario: str):
    timeout = 600.0 if scenario == "fail-raise-abort" else FAIL_TIMEOUT
    bn = SyncBatchNorm(updates_collections=None, timeout=timeout)
    x = np.arange(24, dtype=np.float32).reshape(8, 3) + ctx.rank
    bn(x)  # training call 1 and its backward: every rank
    bn.backward(x)
    if ctx.rank == 1:
        if scenario.startswith("fail-raise"):
            raise ValueError("rank 1's data loader failed")  # outside the layer, uncaught
        bn(x)  # training call 2 ...
        ctx.say("OK", "exiting before the backward of training call 2")
        sys.exit(0)  # ... and this rank is gone
    start = time.monotonic()
    try:
        bn(x)
        if scenario == "fail-exit":
            bn.backward(x)
    except ExchangeTimeout as e:
        ctx.say("OK", f"timeout after {time.monotonic() - start:.2f} s: {' '.join(str(e).split())}")
    else:
        ctx.say("FAIL", "no ExchangeTimeout")
    start = time.monotonic()  # the layer cannot wait again: its communicator has a collective pending
    try:
        bn(x)
    except RuntimeError as e:
        ctx.say("OK", f"refused after {time.monotonic() - start:.2f} s: {' '.join(str(e).split())}")
    else:
        ctx.say("FAIL", "a later call was not refused")


def main(argv):
    scenario, backend, seed = argv[0], argv[1], int(argv[2])
    comm = MPI.COMM_WORLD
    xp, layer_comm = np, None
    if scenario.startswith("gpu"):
        import cupy

        ndev = cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(comm.Get_rank() % ndev).use()
        xp = cupy
        if scenario == "gpu-nccl":
            from cupy.cuda import nccl

            uid = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
            layer_comm = as_communicator(nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank()))
    ctx = Rank(comm, xp, layer_comm, argv[3] if len(argv) > 3 else None)
    use = cubn.use_backend(backend) if backend == "emulated" else contextlib.nullcontext()
    with use:
        if scenario == "mismatch":
            run_mismatch(ctx, seed)
        elif scenario.startswith("fail-"):
            run_failure(ctx, scenario)
        else:
            run_equal(ctx, seed)
    return 1 if ctx.failures else 0


if __name__ == "__main__":
    on_purpose = len(sys.argv) > 1 and sys.argv[1].startswith("fail-")
    try:
        code = main(sys.argv[1:])
    except BaseException:  # noqa: BLE001 - never leave the other ranks waiting
        if on_purpose:
            raise  # the failing rank of a fail-* scenario ends as a user's script would
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(2)
    sys.exit(code)
