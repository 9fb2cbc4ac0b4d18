"""CPU benchmarks: cubn's NumPy backend beside its peers, measured side by side.

Columns (peers), each a separately named thing that was timed:

* ``cubn-1t``, ``cubn-Nt``: cubn's NumPy backend on 1 and on N threads
  (``cubn.set_num_threads``), N the CPUs this process may use.
* ``torch-1t``, ``torch-Nt``: PyTorch on the CPU with ``torch.set_num_threads``
  1 and N: ``torch.nn.functional.batch_norm`` (then ``relu`` / ``add_`` and
  ``relu_``), ``torch.var_mean`` for moments, ``aten.native_batch_norm_backward``
  with the forward's saved statistics for backward. NHWC inputs are
  ``channels_last`` tensors viewing the very NumPy buffers cubn reads.
* ``numpy``: the naive NumPy formula (``mean``, ``var`` and elementwise
  expressions; NumPy runs these on one thread).
* ``copy``: ``np.copyto`` between two 256 MiB buffers, timed in the same
  rounds: the machine's copy bandwidth (bytes read plus bytes written) under
  the same load as the ops, which every throughput is compared with.

Timing is interleaved: every round times each peer once, in an order drawn
afresh each round (so no peer always follows the same one), so that a
machine shared with other work loads every column alike;
the median over rounds is reported. Inputs, parameters and the peers' code
are the suite's own (``cubn.benchmarking``: the cubn, torch and naive peers),
on NumPy arrays; inputs rotate over copies totalling at least 128 MiB, so that
the L3 cache does not flatter small shapes.
Peak memory is the most ``tracemalloc`` saw allocated during one call beyond
the call's outputs, as a fraction of the input; it sees NumPy's allocations
only (not PyTorch's).

``run(...)`` returns the records; ``table(records)`` formats them;
``bench/run_cpu_peers.py`` writes a committed run, and ``bench/test_bench_cpu.py``
runs the same cases under pytest-benchmark.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
import tracemalloc
import zlib

import numpy as np

from . import benchmarking as _B
from .benchmarking import OPS, SUITE, TENSOR_PASSES

PEERS = ("cubn-1t", "cubn-Nt", "torch-1t", "torch-Nt", "numpy")
COPY_BYTES = 256 << 20


def all_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_of(peer: str) -> int:
    return 1 if peer.endswith("-1t") else all_threads()


@dataclasses.dataclass
class Record:
    op: str
    layout: str
    shape: tuple
    dtype: str
    peer: str
    threads: int = 1
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    rounds: int = 0
    bytes: int = 0
    gbps: float | None = None
    copy_gbps: float | None = None     # the copy measured in the same rounds
    roofline: float | None = None      # gbps / copy_gbps
    peak_memory: float | None = None   # beyond the outputs, as a fraction of the input
    loadavg: float | None = None       # the machine's 1-minute load average when the case ran
    error: str | None = None


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------
class Copy:
    """A large ``np.copyto``: the copy bandwidth, read plus write bytes."""

    def __init__(self, nbytes=COPY_BYTES):
        self.src = np.ones(nbytes // 4, np.float32)
        self.dst = np.zeros_like(self.src)
        self.nbytes = 2 * self.src.nbytes

    def __call__(self, i=0):
        np.copyto(self.dst, self.src)


def copy_bandwidth(nbytes=COPY_BYTES, reps=7) -> float:
    """GB/s of a large ``np.copyto`` (bytes read plus bytes written), the median of ``reps``."""
    c = Copy(nbytes)
    c()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        c()
        ts.append(time.perf_counter() - t)
    return c.nbytes / statistics.median(ts) / 1e9


def _root(a):
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


def peak_memory(fn, *args) -> tuple[int, object]:
    """Bytes ``tracemalloc`` saw allocated at most during ``fn(*args)`` beyond its outputs; and the outputs."""
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn(*args)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was:
            tracemalloc.stop()
    flat = out if isinstance(out, (tuple, list)) else (out,)
    roots = {}
    for a in flat:
        r = _root(a)
        if isinstance(r, np.ndarray):
            roots[id(r)] = r.nbytes
    return peak - sum(roots.values()), out


# ---------------------------------------------------------------------------
# Inputs and peers: the suite's own (cubn.benchmarking), on NumPy arrays
# ---------------------------------------------------------------------------
def inputs(layout, shape, dtype):
    """Rotating copies of x (over at least 128 MiB), dy, side inputs and per-channel parameters."""
    return _B.Inputs(np, layout, shape, np.dtype(dtype))


# The suite's case builders work on NumPy arrays as on CuPy ones: cubn on NumPy
# arrays is the NumPy backend; PyTorch views the same buffers (channels_last
# for NHWC); the naive formula runs in NumPy.
_FAMILY = {"cubn": "cubn", "torch": "torch", "numpy": "cupy_naive"}


def build(peer, op, inp):
    """``run(i)`` for peer ``peer`` (see PEERS) doing ``op`` on input rotation ``i``."""
    return _B.PEERS[_FAMILY[peer.split("-")[0]]].build(op, inp)


def set_threads(peer):
    n = threads_of(peer)
    if peer.startswith("cubn"):
        import cubn

        cubn.set_num_threads(n)
    elif peer.startswith("torch"):
        import torch

        torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------
def environment() -> dict:
    import cubn

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cubn": cubn.__version__, "numpy": np.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "processor": _cpu_name(), "cpus_available": all_threads(),
           "cpu_count": os.cpu_count()}
    try:
        env["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads_default"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


SETTLE_S = 0.01  # before each timed call: threads of the previous peer (OpenMP spins) go idle


def _time_once(run, i):
    time.sleep(SETTLE_S)
    t = time.perf_counter()
    run(i)
    return (time.perf_counter() - t) * 1e3


def run_case(layout, shape, dtype, op, peers=PEERS, budget_s=2.0, min_rounds=5, max_rounds=25, copy=None,
             memory=True, log=None):
    """Time one (shape, dtype, op) for every peer, interleaved; returns one Record per peer."""
    inp = inputs(layout, shape, dtype)
    copy = copy or Copy()
    recs = {p: Record(op, layout, tuple(shape), np.dtype(dtype).name, p, threads_of(p)) for p in peers}
    runs = {}
    for p in peers:
        try:
            set_threads(p)
            runs[p] = build(p, op, inp)
            runs[p](0)  # warm-up (and the first touch of lazily built state)
            runs[p](1 % inp.k)
        except Exception as e:  # a peer that cannot run this case (e.g. torch missing)
            recs[p].error = f"{type(e).__name__}: {e}"[:300]
    live = [p for p in peers if p in runs]
    times = {p: [] for p in live + ["copy"]}
    start = time.perf_counter()
    r = 0
    max_rounds = max(max_rounds, min_rounds)
    # A fresh order every round, not a rotation: a rotation keeps each peer behind the same one, and
    # what a peer leaves behind (freed memory that the next allocation must fault in again, a flushed
    # cache) would then always fall on the same neighbour. Seeded by the case: runs are repeatable.
    order_rng = np.random.default_rng(zlib.crc32(repr((layout, tuple(shape), np.dtype(dtype).name, op)).encode()))
    while r < max_rounds and (r < min_rounds or time.perf_counter() - start < budget_s):
        order = [live[i] for i in order_rng.permutation(len(live))]
        for p in order:
            set_threads(p)
            times[p].append(_time_once(runs[p], (r + 2) % inp.k))
        times["copy"].append(_time_once(copy, 0))
        r += 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    copy_ms = statistics.median(times["copy"])
    copy_gbps = copy.nbytes / (copy_ms * 1e-3) / 1e9
    nbytes = TENSOR_PASSES[op] * inp.nbytes
    for p in live:
        rec = recs[p]
        s = sorted(times[p])
        rec.median_ms = statistics.median(s)
        rec.p10_ms, rec.p90_ms = s[int(0.1 * (len(s) - 1))], s[int(0.9 * (len(s) - 1))]
        rec.rounds = len(s)
        rec.bytes = nbytes
        rec.gbps = nbytes / (rec.median_ms * 1e-3) / 1e9
        rec.copy_gbps = copy_gbps
        rec.roofline = rec.gbps / copy_gbps
        rec.loadavg = load
        if memory and (p.startswith("cubn") or p == "numpy"):
            set_threads(p)
            extra, _ = peak_memory(runs[p], 0)
            rec.peak_memory = extra / inp.nbytes
        if log:
            log(format_record(rec))
    inp.release()
    return list(recs.values())


def run(shapes=None, dtypes=("float32", "float64"), ops=OPS, peers=PEERS, budget_s=2.0, log=None, memory=True,
        each=None, min_rounds=5, max_rounds=25, copy_bytes=COPY_BYTES):
    """Every (shape, dtype, op): interleaved peers. Returns (environment, records).

    ``each(env, records)`` is called after every shape (to save partial results).
    ``copy_bytes``: the size of the copy whose bandwidth every case is compared with.
    """
    import cubn

    shapes = shapes or SUITE
    env = environment()
    env["copy_bytes"] = copy_bytes
    env["copy_gbps_start"] = copy_bandwidth(copy_bytes)
    copy = Copy(copy_bytes)
    records = []
    try:
        for layout, shape in shapes:
            for dt in dtypes:
                for op in ops:
                    records += run_case(layout, shape, dt, op, peers, budget_s=budget_s, copy=copy, log=log,
                                        memory=memory, min_rounds=min_rounds, max_rounds=max_rounds)
            if each is not None:
                each(env, records)
    finally:
        cubn.set_num_threads(None)
    env["copy_gbps_end"] = copy_bandwidth(copy_bytes)
    try:
        env["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    return env, records


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------
def format_record(r) -> str:
    if r.median_ms is None:
        return f"{r.op:11s} {r.layout:4s} {str(r.shape):20s} {r.dtype:7s} {r.peer:8s} {r.error}"
    mem = f" mem {r.peak_memory:.2f}x" if r.peak_memory is not None else ""
    return (f"{r.op:11s} {r.layout:4s} {str(r.shape):20s} {r.dtype:7s} {r.peer:8s} {r.median_ms:10.3f} ms "
            f"{r.gbps:6.1f} GB/s {100 * r.roofline:5.1f}% of copy{mem}")


def ratios(records):
    """Per (op, layout, shape, dtype): the peers' records and cubn's time ratios (< 1: cubn faster)."""
    rows = {}
    for r in records:
        rows.setdefault((r.op, r.layout, r.shape, r.dtype), {})[r.peer] = r
    out = {}
    for key, peers in rows.items():
        def ms(p):
            r = peers.get(p)
            return r.median_ms if r is not None and r.median_ms else None

        def ratio(a, b):
            return ms(a) / ms(b) if ms(a) and ms(b) else None

        out[key] = {"peers": peers, "vs_torch_1t": ratio("cubn-1t", "torch-1t"), "vs_torch_Nt": ratio("cubn-Nt", "torch-Nt"),
                    "vs_numpy_1t": ratio("cubn-1t", "numpy"), "vs_numpy_Nt": ratio("cubn-Nt", "numpy")}
    return out


def table(records, peers=PEERS) -> str:
    """Text table: times per peer, cubn's ratios to its peers, cubn's fraction of the copy bandwidth, peak memory."""
    head = (f"{'op':11s} {'layout':6s} {'shape':20s} {'dtype':7s} "
            + " ".join(f"{p + ' ms':>11s}" for p in peers)
            + f" {'1t/torch':>8s} {'Nt/torch':>8s} {'1t/numpy':>8s} {'Nt/numpy':>8s} {'Nt copy%':>8s} {'mem':>5s}")
    lines = [head]
    for (op, lay, shp, dt), row in ratios(records).items():
        ps = row["peers"]
        if all(r.median_ms is None for r in ps.values()):
            continue

        def cell(p):
            r = ps.get(p)
            return f"{r.median_ms:11.3f}" if r is not None and r.median_ms is not None else f"{'-':>11s}"

        def rat(v):
            return f"{v:8.2f}" if v is not None else f"{'-':>8s}"

        nt = ps.get("cubn-Nt")
        roof = f"{100 * nt.roofline:7.0f}%" if nt is not None and nt.roofline else f"{'-':>8s}"
        mem = f"{nt.peak_memory:5.2f}" if nt is not None and nt.peak_memory is not None else f"{'-':>5s}"
        lines.append(f"{op:11s} {lay:6s} {str(shp):20s} {dt:7s} " + " ".join(cell(p) for p in peers)
                     + f" {rat(row['vs_torch_1t'])} {rat(row['vs_torch_Nt'])} {rat(row['vs_numpy_1t'])}"
                     + f" {rat(row['vs_numpy_Nt'])} {roof} {mem}")
    return "\n".join(lines)


def summary(records) -> dict:
    """Per op and dtype: how many cases meet each target, and the worst ratio."""
    out = {}
    for (op, lay, shp, dt), row in ratios(records).items():
        s = out.setdefault(f"{op}/{dt}", {"cases": 0, "torch_1t_met": 0, "torch_Nt_met": 0, "numpy_met": 0,
                                           "copy50_met": 0, "worst_vs_torch": None, "worst_vs_numpy": None,
                                           "lowest_copy_fraction": None})
        nt = row["peers"].get("cubn-Nt")
        if nt is None or nt.median_ms is None:
            continue
        s["cases"] += 1
        for key, name in (("vs_torch_1t", "torch_1t_met"), ("vs_torch_Nt", "torch_Nt_met")):
            if row[key] is not None and row[key] <= 1.0:
                s[name] += 1
        vn = row["vs_numpy_Nt"]
        if vn is not None and vn <= 1.0:
            s["numpy_met"] += 1
        if nt.roofline is not None and nt.roofline >= 0.5:
            s["copy50_met"] += 1
        worst_t = max(v for v in (row["vs_torch_1t"], row["vs_torch_Nt"]) if v is not None) \
            if row["vs_torch_1t"] or row["vs_torch_Nt"] else None
        for k, v, pick in (("worst_vs_torch", worst_t, max), ("worst_vs_numpy", vn, max),
                           ("lowest_copy_fraction", nt.roofline, min)):
            if v is not None:
                s[k] = v if s[k] is None else pick(s[k], v)
        for k, v in (("vs_torch_1t", row["vs_torch_1t"]), ("vs_torch_Nt", row["vs_torch_Nt"]),
                     ("vs_numpy", vn), ("copy_fraction", nt.roofline), ("peak_memory", nt.peak_memory)):
            if v is not None:
                s.setdefault("_" + k, []).append(v)
    for s in out.values():  # medians over the shapes
        for k in ("vs_torch_1t", "vs_torch_Nt", "vs_numpy", "copy_fraction", "peak_memory"):
            vals = s.pop("_" + k, [])
            s["median_" + k] = statistics.median(vals) if vals else None
        s["worst_peak_memory"] = None
    for (op, lay, shp, dt), row in ratios(records).items():
        nt = row["peers"].get("cubn-Nt")
        if nt is not None and nt.peak_memory is not None:
            s = out[f"{op}/{dt}"]
            s["worst_peak_memory"] = nt.peak_memory if s["worst_peak_memory"] is None else max(s["worst_peak_memory"], nt.peak_memory)
    return out


def _load_range(records):
    loads = [r["loadavg"] for r in records if r.get("loadavg") is not None]
    if not loads:
        return "not available"
    return f"median {statistics.median(loads):.1f}, from {min(loads):.1f} to {max(loads):.1f}"


def readme(env, data, table_text, notes=""):
    """A run's README.md: the machine, its load, the copy bandwidth, the targets met, the table."""
    s = data["summary"]
    lines = [
        "# CPU benchmark: cubn's NumPy backend beside PyTorch and naive NumPy",
        "",
        f"- Date: {env['date']}; cubn {env['cubn']}, NumPy {env['numpy']}, PyTorch {env.get('torch')}, "
        f"Python {env['python']}.",
        f"- Machine: {env.get('processor')} ({env['machine']}), {env['cpus_available']} CPUs available to the process "
        f"(of {env['cpu_count']}); 'Nt' columns ran on {env['cpus_available']} threads.",
        f"- Load average (1 minute) over the cases: {_load_range(data['records'])}; "
        f"{env['cpus_available']} means the CPUs were busy with this run alone, more means other work shared them.",
        f"- Copy bandwidth (np.copyto, {env.get('copy_bytes', COPY_BYTES) >> 20} MiB, read + write): {env['copy_gbps_start']:.1f} GB/s at the start"
        + (f", {env['copy_gbps_end']:.1f} GB/s at the end" if "copy_gbps_end" in env else " (run still going)")
        + "; each case's roofline uses the copy timed in its own rounds.",
        "",
        notes.strip(),
        "",
        "Columns: times (median of interleaved rounds) per peer; `1t/torch`, `Nt/torch`: cubn's time over",
        "PyTorch's on 1 and on N threads; `1t/numpy`, `Nt/numpy`: over the naive NumPy formula; `Nt copy%`:",
        "cubn-Nt's tensor traffic (moments 1, inference 2, training 3, +1 with a residual, backward 5 tensor",
        "passes) per second, over the copy bandwidth; `mem`: cubn-Nt's peak allocation beyond its outputs, as a",
        "fraction of the input (tracemalloc).",
        "",
        "## Targets per op and dtype (cases meeting them / cases)",
        "",
        "| op/dtype | <= torch 1t | <= torch Nt | <= numpy | >= 50% copy | worst ratio to torch | worst to numpy | lowest copy fraction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, v in s.items():
        f = lambda x, pct=False: "-" if x is None else (f"{100 * x:.0f}%" if pct else f"{x:.2f}")  # noqa: E731
        lines.append(f"| {k} | {v['torch_1t_met']}/{v['cases']} | {v['torch_Nt_met']}/{v['cases']} | "
                     f"{v['numpy_met']}/{v['cases']} | {v['copy50_met']}/{v['cases']} | {f(v['worst_vs_torch'])} | "
                     f"{f(v['worst_vs_numpy'])} | {f(v['lowest_copy_fraction'], True)} |")
    lines += ["", "## Median over the shapes, per op and dtype", "",
              "cubn-1t over torch-1t, cubn-Nt over torch-Nt (the same number of threads), cubn-Nt over naive NumPy "
              "(< 1: cubn faster); cubn-Nt's fraction of the copy bandwidth; its peak memory beyond the outputs "
              "(median and worst).", "",
              "| op/dtype | cubn/torch-1t | cubn/torch-Nt | cubn/numpy | copy fraction | peak memory (median, worst) |",
              "|---|---|---|---|---|---|"]
    for k, v in s.items():
        f = lambda x, pct=False: "-" if x is None else (f"{100 * x:.0f}%" if pct else f"{x:.2f}")  # noqa: E731
        lines.append(f"| {k} | {f(v.get('median_vs_torch_1t'))} | {f(v.get('median_vs_torch_Nt'))} | "
                     f"{f(v.get('median_vs_numpy'))} | {f(v.get('median_copy_fraction'), True)} | "
                     f"{f(v.get('median_peak_memory'))}, {f(v.get('worst_peak_memory'))} |")
    lines += ["", "## Table", "", "```", table_text.rstrip(), "```", ""]
    return "\n".join(lines)


def write(folder, env, records, notes=""):
    """results.json, table.txt and README.md (the machine, the load, the targets met) in ``folder``."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"kind": "cpu-peers", "environment": env, "summary": summary(records),
            "records": [dataclasses.asdict(r) for r in records], "notes": notes}
    text = table(records)
    (folder / "results.json").write_text(json.dumps(data, indent=1))
    (folder / "table.txt").write_text(text + "\n")
    (folder / "README.md").write_text(readme(env, data, text, notes))
    return data


# ---------------------------------------------------------------------------
# ``cubn bench`` without a GPU (or with --cpu)
# ---------------------------------------------------------------------------
DEFAULT_DTYPES = ("float32", "float64")


def main(args) -> int:
    """``cubn bench`` on the CPU: every case timed for each peer side by side, a results folder, the table.

    ``args``: ``out``, ``quick``, ``shapes`` (a list of (layout, shape) or None), ``dtypes``
    (comma-separated or None), ``ops``, ``peers`` (comma-separated or None), ``repeat``
    (the least rounds per case), ``budget`` (seconds of rounds per case), ``copy_mib``.
    """
    import json
    import math

    from .benchmarking import QUICK

    shapes = list(getattr(args, "shapes", None) or (QUICK if args.quick else SUITE))
    shapes.sort(key=lambda ls: math.prod(ls[1]))  # smallest first: partial results come early
    dtypes = tuple(d for d in (args.dtypes or ",".join(DEFAULT_DTYPES)).split(",") if d)
    bad = [d for d in dtypes if d not in ("float32", "float64", "float16")]
    if bad:
        raise SystemExit(f"cubn bench --dtypes (CPU): unknown {', '.join(bad)} (known: float32, float64, float16)")
    ops = tuple(args.ops.split(",")) if args.ops else OPS
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise SystemExit(f"cubn bench --ops: unknown {', '.join(bad)} (known: {', '.join(OPS)})")
    peers = tuple(args.peers.split(",")) if getattr(args, "peers", None) else PEERS
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise SystemExit(f"cubn bench --peers (CPU): unknown {', '.join(bad)} (known: {', '.join(PEERS)})")
    min_rounds = args.repeat if args.repeat else 5
    budget = 2.0 if getattr(args, "budget", None) is None else args.budget
    copy_bytes = int(getattr(args, "copy_mib", None) or (COPY_BYTES >> 20)) << 20
    print(f"CPU benchmark: {len(shapes)} shapes x {len(dtypes)} dtypes x {len(ops)} ops; peers {', '.join(peers)} "
          f"({all_threads()} threads for the -Nt columns), timed side by side", flush=True)
    env, records = run(shapes, dtypes, ops, peers, budget_s=budget, log=lambda s: print(s, flush=True),
                       each=lambda e, r: write(args.out, e, r), min_rounds=min_rounds,
                       max_rounds=max(25, min_rounds), copy_bytes=copy_bytes)
    data = write(args.out, env, records)
    print(table(records, peers))
    print(f"\ncopy bandwidth (np.copyto, read + write): {env['copy_gbps_start']:.1f} GB/s at the start, "
          f"{env['copy_gbps_end']:.1f} GB/s at the end")
    print(json.dumps(data["summary"], indent=1))
    print(f"results in {args.out}/ (results.json, table.txt, README.md)")
    return 0
