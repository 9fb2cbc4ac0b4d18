"""The benchmark suite behind ``cubn bench`` and ``bench/`` (pytest-benchmark).

Peers measured side by side in one run, on the same device buffers:
``cubn`` (our kernels), ``torch`` (``torch.nn.functional.batch_norm`` and its
relu/add, channels_last for NHWC, tensors shared through DLPack),
``cupy_naive`` (CuPy mean/var and elementwise expressions) and ``numpy``
(cubn's NumPy backend on the CPU, a few shapes, for scale); for the training
forward ops and backward also ``cubn_three_launch``: cubn with its one-launch
path switched off (``cubn.use_one_launch(False)``), so the two paths are
compared in the same run.

GPU timing: CUDA events around each call, warm-up first, the median of many
repetitions, input buffers rotated so that the L2 cache (50 MB on an H100)
does not flatter anyone. The roofline column divides the bytes an op must
move by the device-to-device copy bandwidth measured in the same run.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import contextlib
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# (layout, shape): NCHW/NHWC 4-D shapes come in pairs with the same data.
SUITE = [
    ("NCHW", (32, 64, 112, 112)), ("NHWC", (32, 112, 112, 64)),
    ("NCHW", (256, 64, 56, 56)), ("NHWC", (256, 56, 56, 64)),
    ("NCHW", (256, 256, 14, 14)), ("NHWC", (256, 14, 14, 256)),
    ("NCHW", (64, 2048, 7, 7)), ("NHWC", (64, 7, 7, 2048)),
    ("NCHW", (16, 3, 512, 512)), ("NHWC", (16, 512, 512, 3)),
    ("NCHW", (20, 6, 65536)),
    ("NC", (65536, 1024)), ("NC", (1024, 64)),
]
QUICK = [SUITE[2], SUITE[3], SUITE[10], SUITE[11], SUITE[12]]
OPS = ("moments", "bn_train", "bn_infer", "bn_relu", "bn_add_relu", "backward")
PEERS = ("cubn", "cubn_three_launch", "torch", "cupy_naive", "numpy")
ONE_LAUNCH_OPS = ("bn_train", "bn_relu", "bn_add_relu", "backward")  # where cubn_three_launch differs from cubn
# Tensor-sized transfers each op must make (x reads, dy/side reads, y/dx writes):
# statistics need one read of x, normalizing another read and a write.
TENSOR_PASSES = {"moments": 1, "bn_train": 3, "bn_infer": 2, "bn_relu": 3, "bn_add_relu": 4, "backward": 5}
EPS = 1e-3
MOMENTUM = 0.1
L2_FLUSH_BYTES = 128 << 20     # rotate inputs over at least this much memory
ROTATION_CAP_BYTES = 3 << 30
NUMPY_MAX_ELEMENTS = 1 << 22          # with a GPU: NumPy is only there for scale
NUMPY_MAX_ELEMENTS_CPU_ONLY = 1 << 24  # without one, NumPy is all there is to plot


@dataclasses.dataclass
class Record:
    op: str
    layout: str
    shape: tuple
    dtype: str
    peer: str
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    reps: int = 0
    bytes: int = 0
    gbps: float | None = None
    roofline: float | None = None
    error: str | None = None


def channel_axis(layout, ndim):
    return ndim - 1 if layout in ("NHWC", "NC") else 1


def reduce_axes(layout, ndim):
    ax = channel_axis(layout, ndim)
    return tuple(a for a in range(ndim) if a != ax)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------
class Inputs:
    """Rotating input sets for one (layout, shape, dtype) on one device."""

    def __init__(self, xp, layout, shape, dtype, seed=0):
        self.xp, self.layout, self.shape = xp, layout, tuple(shape)
        self.dtype = np.dtype(dtype)
        n = math.prod(shape)
        nbytes = n * self.dtype.itemsize
        self.k = int(max(2, min(64, math.ceil(L2_FLUSH_BYTES / max(nbytes, 1)))))
        self.k = max(1, min(self.k, ROTATION_CAP_BYTES // max(3 * nbytes, 1)))
        c = shape[channel_axis(layout, len(shape))]
        self.c = c
        rs = np.random.default_rng(seed)
        acc = np.float64 if self.dtype == np.float64 else np.float32

        def rand(scale=1.0, loc=0.0):
            if xp is np:
                return (loc + scale * rs.standard_normal(shape)).astype(self.dtype)
            r = xp.random.RandomState(int(rs.integers(1 << 31)))
            return (loc + scale * r.standard_normal(shape, dtype=xp.float32)).astype(self.dtype)

        self.x = [rand(2.0, 1.0) for _ in range(self.k)]
        self.dy = [rand() for _ in range(min(self.k, 2))]
        self.side = [rand() for _ in range(min(self.k, 2))]
        self.gamma = xp.asarray(rs.uniform(0.5, 1.5, c).astype(acc))
        self.beta = xp.asarray(rs.standard_normal(c).astype(acc))
        self.rmean = xp.asarray(rs.standard_normal(c).astype(acc))
        self.rvar = xp.asarray(rs.uniform(0.5, 2.0, c).astype(acc))
        self.nbytes = nbytes

    def release(self):
        self.x = self.dy = self.side = None


# ---------------------------------------------------------------------------
# Peers: each returns a callable run(i) for input rotation i, or raises
# ---------------------------------------------------------------------------
def _cubn_case(op, inp):
    import cubn
    from cubn import _dtypes
    from cubn._backend import select
    from cubn._plan import plan_for_channels
    from cubn.backends.base import Fold
    from cubn.ops.normalization import bn_backward, bn_forward

    fmt = "NCHW" if inp.layout == "NCHW" else "NHWC"
    axes = reduce_axes(inp.layout, len(inp.shape))
    g, b, rm, rv = inp.gamma, inp.beta, inp.rmean, inp.rvar
    if op == "moments":
        return lambda i: cubn.moments(inp.x[i], axes)
    if op == "bn_train":
        return lambda i: cubn.fused_batch_norm(inp.x[i], g, b, rm, rv, EPS, fmt, exponential_avg_factor=MOMENTUM)
    if op == "bn_infer":
        return lambda i: cubn.fused_batch_norm(inp.x[i], g, b, rm, rv, EPS, fmt, is_training=False)
    if op == "bn_relu":
        return lambda i: cubn.fused_batch_norm(inp.x[i], g, b, rm, rv, EPS, fmt, exponential_avg_factor=MOMENTUM,
                                               activation="relu")
    if op == "bn_add_relu":
        return lambda i: cubn.fused_batch_norm(inp.x[i], g, b, rm, rv, EPS, fmt, exponential_avg_factor=MOMENTUM,
                                               activation="relu", side_input=inp.side[i % len(inp.side)])
    if op == "backward":
        # What BatchNorm.backward runs: the saved forward context, then 3 launches.
        ctxs = []
        for x in inp.x:
            backend = select("bench", "x", x)
            plan = plan_for_channels(x.shape, fmt, "bench")
            acc = _dtypes.acc_dtype(x.dtype)
            _, ctx = bn_forward(backend, plan, plan.view3(x), acc, training=True, fold=Fold(EPS, g, b))
            ctxs.append((ctx, plan))
        return lambda i: bn_backward(ctxs[i][0], ctxs[i][1].view3(inp.dy[i % len(inp.dy)]), False)
    raise KeyError(op)


def _torch_case(op, inp):
    import torch
    import torch.nn.functional as F

    nd = len(inp.shape)

    def tt(a):
        t = torch.from_dlpack(a)
        if inp.layout == "NHWC":  # NCHW logical view with channels_last strides
            t = t.permute(0, nd - 1, *range(1, nd - 1))
        return t

    xs = [tt(x) for x in inp.x]
    dys = [tt(d) for d in inp.dy]
    sides = [tt(s) for s in inp.side]
    w, b = torch.from_dlpack(inp.gamma), torch.from_dlpack(inp.beta)
    rm, rv = torch.from_dlpack(inp.rmean).clone(), torch.from_dlpack(inp.rvar).clone()
    dims = tuple(a for a in range(nd) if a != 1)
    if op == "moments":
        return lambda i: torch.var_mean(xs[i], dim=dims, correction=0)
    if op == "bn_train":
        return lambda i: F.batch_norm(xs[i], rm, rv, w, b, True, MOMENTUM, EPS)
    if op == "bn_infer":
        return lambda i: F.batch_norm(xs[i], rm, rv, w, b, False, MOMENTUM, EPS)
    if op == "bn_relu":
        return lambda i: F.relu(F.batch_norm(xs[i], rm, rv, w, b, True, MOMENTUM, EPS), inplace=True)
    if op == "bn_add_relu":
        return lambda i: F.batch_norm(xs[i], rm, rv, w, b, True, MOMENTUM, EPS).add_(sides[i % len(sides)]).relu_()
    if op == "backward":
        saved = [torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, MOMENTUM, EPS) for x in xs]
        return lambda i: torch.ops.aten.native_batch_norm_backward(
            dys[i % len(dys)], xs[i], w, rm, rv, saved[i][1], saved[i][2], True, EPS, [True, True, True])
    raise KeyError(op)


def _cupy_naive_case(op, inp):
    xp = inp.xp
    nd = len(inp.shape)
    axes = reduce_axes(inp.layout, nd)
    shp = [1] * nd
    shp[channel_axis(inp.layout, nd)] = inp.c
    g, b = inp.gamma.reshape(shp), inp.beta.reshape(shp)
    rm, rv = inp.rmean.reshape(shp), inp.rvar.reshape(shp)
    n = math.prod(inp.shape) // inp.c

    def train(x):
        m = x.mean(axis=axes, keepdims=True)
        v = x.var(axis=axes, keepdims=True)
        return (x - m) / xp.sqrt(v + EPS) * g + b

    if op == "moments":
        return lambda i: (inp.x[i].mean(axis=axes), inp.x[i].var(axis=axes))
    if op == "bn_train":
        return lambda i: train(inp.x[i])
    if op == "bn_infer":
        return lambda i: (inp.x[i] - rm) / xp.sqrt(rv + EPS) * g + b
    if op == "bn_relu":
        return lambda i: xp.maximum(train(inp.x[i]), 0)
    if op == "bn_add_relu":
        return lambda i: xp.maximum(train(inp.x[i]) + inp.side[i % len(inp.side)], 0)
    if op == "backward":
        stats = [(x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)) for x in inp.x]

        def bwd(i):
            x, dy = inp.x[i], inp.dy[i % len(inp.dy)]
            m, v = stats[i]
            inv = 1 / xp.sqrt(v + EPS)
            xhat = (x - m) * inv
            db = dy.sum(axis=axes, keepdims=True)
            dg = (dy * xhat).sum(axis=axes, keepdims=True)
            return g * inv * (dy - db / n - xhat * dg / n), dg, db

        return bwd
    raise KeyError(op)


def _numpy_case(op, inp):
    return _cubn_case(op, inp)  # cubn on NumPy arrays: the NumPy backend


class SameAsCubn(Exception):
    """cubn_three_launch on an op without a one-launch path."""


def _cubn_three_launch_case(op, inp):
    if op not in ONE_LAUNCH_OPS:
        raise SameAsCubn(f"{op} runs the same kernels as cubn")
    return _cubn_case(op, inp)  # built and timed inside peer_context (cubn.use_one_launch(False))


def peer_context(peer):
    """The scoped options a peer is built and timed under."""
    import cubn

    if peer == "cubn_three_launch":
        return cubn.use_one_launch(False)
    return contextlib.nullcontext()


CASE_BUILDERS = {"cubn": _cubn_case, "cubn_three_launch": _cubn_three_launch_case, "torch": _torch_case,
                 "cupy_naive": _cupy_naive_case, "numpy": _numpy_case}


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
def time_gpu(cp, run, k, warmup=3, reps=None, budget_s=0.25):
    """Median/p10/p90 in ms of run(i), CUDA events around each call."""
    for i in range(warmup):
        run(i % k)
    cp.cuda.Device().synchronize()
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    e0.record()
    run(warmup % k)
    e1.record()
    e1.synchronize()
    est = max(cp.cuda.get_elapsed_time(e0, e1), 1e-3)
    n = reps or int(min(100, max(15, budget_s * 1e3 / est)))
    times = []
    for r in range(n):
        e0.record()
        run(r % k)
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1))
    return _summary(times)


def time_cpu(run, k, warmup=1, reps=3):
    for i in range(warmup):
        run(i % k)
    times = []
    for r in range(reps):
        t = time.perf_counter()
        run(r % k)
        times.append((time.perf_counter() - t) * 1e3)
    return _summary(times)


def _summary(times):
    s = sorted(times)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return statistics.median(s), q(0.1), q(0.9), len(s)


def copy_bandwidth(cp, nbytes=1 << 30):
    """Device-to-device copy bandwidth in GB/s, bytes read plus bytes written."""
    a = cp.empty(nbytes // 4, cp.float32)
    a.fill(1.0)
    b = cp.empty_like(a)
    med, _, _, _ = time_gpu(cp, lambda i: cp.copyto(b, a), 1, warmup=3, reps=20)
    return 2 * nbytes / (med * 1e-3) / 1e9


# ---------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------
def environment(cp=None):
    import cubn

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cubn": cubn.__version__, "numpy": np.__version__, "python": platform.python_version(),
           "machine": platform.machine()}
    if cp is not None:
        p = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
        env.update(device=name, sm_count=p["multiProcessorCount"], l2_bytes=p.get("l2CacheSize"),
                   cupy=cp.__version__, cuda_runtime=cp.cuda.runtime.runtimeGetVersion(),
                   driver=cp.cuda.runtime.driverGetVersion())
    try:
        import torch

        env["torch"] = torch.__version__
        env["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except ImportError:
        env["torch"] = None
    return env


def run_suite(shapes=None, dtypes=("float32", "float16", "bfloat16"), ops=OPS, peers=PEERS, progress=None,
              reps=None, log=None):
    """Run every (shape, dtype, op, peer) case; returns (env, copy_gbps, records)."""
    import cubn

    log = log or (lambda s: None)
    shapes = shapes or SUITE
    gpu = cubn.gpu_available()
    cp = None
    if gpu:
        import cupy as cp
    env = environment(cp)
    bw = copy_bandwidth(cp) if gpu else None
    env["copy_gbps"] = bw
    records = []
    total = len(shapes) * len(dtypes) * len(ops) * len(peers)
    done = 0
    for layout, shape in shapes:
        for dt in dtypes:
            dtype = _resolve_dtype(dt)
            n = math.prod(shape)
            for peer in peers:
                on_cpu = peer == "numpy"
                recs = [Record(op, layout, tuple(shape), dt, peer) for op in ops]
                skip = None
                if dtype is None:
                    skip = f"{dt} is not available"
                elif not on_cpu and not gpu:
                    skip = "no CUDA device"
                elif on_cpu and (n > (NUMPY_MAX_ELEMENTS if gpu else NUMPY_MAX_ELEMENTS_CPU_ONLY) or dt != "float32"):
                    skip = f"numpy runs only float32 shapes up to {(NUMPY_MAX_ELEMENTS if gpu else NUMPY_MAX_ELEMENTS_CPU_ONLY) >> 20}M elements"
                if skip:
                    for r in recs:
                        r.error = "skipped: " + skip
                    records.extend(recs)
                    done += len(ops)
                    if progress:
                        progress(done, total)
                    continue
                xp = np if on_cpu else cp
                try:
                    inp = Inputs(xp, layout, shape, dtype)
                except Exception as e:  # e.g. a dtype CuPy cannot hold
                    for r in recs:
                        r.error = f"inputs: {type(e).__name__}: {e}"[:300]
                    records.extend(recs)
                    done += len(ops)
                    continue
                for r in recs:
                    try:
                        with peer_context(peer):
                            run = CASE_BUILDERS[peer](r.op, inp)
                            if on_cpu:
                                med, p10, p90, cnt = time_cpu(run, inp.k)
                            else:
                                med, p10, p90, cnt = time_gpu(cp, run, inp.k, reps=reps)
                        r.median_ms, r.p10_ms, r.p90_ms, r.reps = med, p10, p90, cnt
                        r.bytes = TENSOR_PASSES[r.op] * inp.nbytes
                        r.gbps = r.bytes / (med * 1e-3) / 1e9
                        if bw and not on_cpu:
                            r.roofline = r.gbps / bw
                    except SameAsCubn as e:
                        r.error = f"skipped: {e}"
                    except Exception as e:
                        r.error = f"{type(e).__name__}: {e}"[:300]
                    log(_fmt_record(r))
                    records.append(r)
                    done += 1
                    if progress:
                        progress(done, total)
                inp.release()
                if gpu:
                    cp.get_default_memory_pool().free_all_blocks()
    return env, bw, records


def _resolve_dtype(name):
    if name == "bfloat16":
        try:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        except ImportError:
            return None
    return np.dtype(name)


def _fmt_record(r):
    if r.median_ms is None:
        return f"{r.op:11s} {r.layout:4s} {str(r.shape):22s} {r.dtype:8s} {r.peer:10s} {r.error}"
    rf = f"{100 * r.roofline:5.1f}%" if r.roofline else "   -  "
    return f"{r.op:11s} {r.layout:4s} {str(r.shape):22s} {r.dtype:8s} {r.peer:10s} {r.median_ms:9.4f} ms {rf}"


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------
def summarize(records):
    """Per (op, dtype): geometric means of cubn's speedup over torch and of its roofline fraction."""
    by = {}
    for r in records:
        if r.median_ms is not None:
            by[(r.op, r.layout, r.shape, r.dtype, r.peer)] = r
    out = {}
    for op in OPS:
        for dt in ("float32", "float16", "bfloat16"):
            speed, roof, worst = [], [], None
            for (o, lay, shp, d, p), r in by.items():
                if o != op or d != dt or p != "cubn":
                    continue
                if r.roofline:
                    roof.append(r.roofline)
                t = by.get((o, lay, shp, d, "torch"))
                if t:
                    s = t.median_ms / r.median_ms
                    speed.append(s)
                    if worst is None or s < worst[0]:
                        worst = (s, lay, shp)
            if speed or roof:
                out[f"{op}/{dt}"] = {
                    "speedup_vs_torch_geomean": _geomean(speed), "roofline_geomean": _geomean(roof),
                    "slowest_vs_torch": worst[0] if worst else None,
                    "slowest_case": f"{worst[1]} {worst[2]}" if worst else None, "cases": len(roof) or len(speed)}
                if op in ONE_LAUNCH_OPS:
                    # cubn (one launch where the shape allows) over its three-launch path
                    gains = [by[(o, lay, shp, d, "cubn_three_launch")].median_ms / r.median_ms
                             for (o, lay, shp, d, p), r in by.items()
                             if o == op and d == dt and p == "cubn" and (o, lay, shp, d, "cubn_three_launch") in by]
                    out[f"{op}/{dt}"]["speedup_vs_three_launch_geomean"] = _geomean(gains)
    return out


def _geomean(v):
    v = [x for x in v if x and x > 0]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None


def table(records):
    """A text table: one row per (op, shape, dtype), peers side by side."""
    rows = {}
    for r in records:
        rows.setdefault((r.op, r.layout, r.shape, r.dtype), {})[r.peer] = r
    lines = [f"{'op':11s} {'layout':6s} {'shape':22s} {'dtype':8s} {'cubn ms':>9s} {'3-launch':>9s} {'torch ms':>9s} "
             f"{'naive ms':>9s} {'numpy ms':>9s} {'x torch':>8s} {'roofline':>8s}"]
    for (op, lay, shp, dt), peers in rows.items():
        def ms(p):
            r = peers.get(p)
            return f"{r.median_ms:9.4f}" if r and r.median_ms is not None else f"{'-':>9s}"
        c, t = peers.get("cubn"), peers.get("torch")
        sp = f"{t.median_ms / c.median_ms:8.2f}" if c and t and c.median_ms and t.median_ms else f"{'-':>8s}"
        rf = f"{100 * c.roofline:7.1f}%" if c and c.roofline else f"{'-':>8s}"
        if all(p.median_ms is None for p in peers.values()):
            continue
        lines.append(f"{op:11s} {lay:6s} {str(shp):22s} {dt:8s} {ms('cubn')} {ms('cubn_three_launch')} {ms('torch')} "
                     f"{ms('cupy_naive')} {ms('numpy')} {sp} {rf}")
    return "\n".join(lines)


def write_results(folder, env, records):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"environment": env, "summary": summarize(records), "records": [dataclasses.asdict(r) for r in records]}
    (folder / "results.json").write_text(json.dumps(data, indent=1))
    (folder / "table.txt").write_text(table(records) + "\n")
    try:
        chart(data, folder / "chart.png")
    except Exception as e:  # matplotlib missing: the JSON and table still stand
        print(f"no chart: {e}", file=sys.stderr)
    return data


def chart(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = data["summary"]
    keys = [k for k in summ if summ[k]["speedup_vs_torch_geomean"]]
    if not keys and not any(summ[k]["roofline_geomean"] for k in summ):
        return cpu_chart(data, path)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    ax.barh(keys, [summ[k]["speedup_vs_torch_geomean"] for k in keys], color="tab:green")
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlabel("speedup over PyTorch (geometric mean over shapes)")
    ax = axes[1]
    keys2 = [k for k in summ if summ[k]["roofline_geomean"]]
    ax.barh(keys2, [100 * summ[k]["roofline_geomean"] for k in keys2], color="tab:blue")
    ax.set_xlabel("% of the copy-bandwidth roofline (geometric mean)")
    ax.set_xlim(0, 100)
    env = data["environment"]
    fig.suptitle(f"cubn {env.get('cubn')} on {env.get('device', 'CPU')} ({env.get('date', '')[:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_chart(data, path):
    """Without a GPU run: the NumPy backend's throughput per op and shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in data["records"] if r["peer"] == "numpy" and r["median_ms"]]
    if not recs:
        return
    labels = sorted({f"{r['layout']} {'x'.join(map(str, r['shape']))}" for r in recs})
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(OPS)
    for k, op in enumerate(OPS):
        vals = []
        for lab in labels:
            hit = [r for r in recs if r["op"] == op and f"{r['layout']} {'x'.join(map(str, r['shape']))}" == lab]
            vals.append(hit[0]["gbps"] if hit else 0)
        ax.bar([i + k * width for i in range(len(labels))], vals, width, label=op)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_ylabel("GB/s of tensor traffic (NumPy backend, 1 CPU thread)")
    ax.legend(ncol=3, fontsize=8)
    env = data["environment"]
    fig.suptitle(f"cubn {env.get('cubn')} NumPy backend on {env.get('machine')} ({env.get('date', '')[:10]}): no GPU in this run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    """``cubn bench``: run the suite with a progress bar, write JSON/PNG/table, print the table."""
    from .demo import _Progress

    shapes = QUICK if args.quick else SUITE
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    ops = tuple(args.ops.split(",")) if args.ops else OPS
    bar = _Progress(len(shapes) * len(dtypes) * len(ops) * len(PEERS), "bench")
    env, bw, records = run_suite(shapes, dtypes, ops, PEERS, progress=lambda d, t: bar.update(d - bar.n), reps=args.repeat)
    bar.close()
    data = write_results(args.out, env, records)
    print(table(records))
    if bw:
        print(f"\ndevice-to-device copy: {bw:.0f} GB/s (read + write) on {env.get('device')}")
    print(json.dumps(data["summary"], indent=1))
    print(f"results in {args.out}/ (results.json, table.txt, chart.png)")
    return 0
