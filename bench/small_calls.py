"""Per-call time of small inputs: cubn's NumPy backend beside PyTorch's CPU call on one thread.

    python bench/small_calls.py [--shape 8,16] [--dtype float32] [--batches 31] [--calls 200] [--out DIR]

A tight loop of calls on the same arrays (warm caches: the per-call cost of
the Python and C around the arithmetic), timed in thread CPU time
(``time.thread_time``: another process's load on a shared machine does not
count), batch by batch interleaved across the columns so that drifts of the
machine fall on all of them alike; each cell is the median of the batches.
Columns: cubn as installed (the compiled loops' direct calls where they are
built), cubn with the direct route from the ops off (``numpy_direct.disabled``:
the same C calls reached through the small path), cubn's NumPy code
(``numpy_native.disabled``), and PyTorch with ``torch.set_num_threads(1)``.
The cold-cache regime (a pause and a cache flush before each call) is
``cubn bench --cpu``'s. Writes ``small_calls.json`` and ``table.md`` to
``--out`` when given.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cubn  # noqa: E402
from cubn import cpu_benchmarks  # noqa: E402
from cubn.backends import numpy_direct, numpy_native  # noqa: E402


def cases(shape, dtype, rng):
    """{op: (cubn call, torch call or None, torch's name)}: the same arrays for both."""
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[-1]
    g, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    mean, var = (a.astype(dtype) for a in cubn.moments(x, list(range(x.ndim - 1))))
    axes = list(range(x.ndim - 1))
    bn = cubn.BatchNorm(scale=True, updates_collections=None)
    _, ctx = bn.forward(x, is_training=True)
    out = {
        "moments": (lambda: cubn.moments(x, axes), "var_mean"),
        "fused_batch_norm, training": (lambda: cubn.fused_batch_norm(x, g, b), "batch_norm"),
        "fused_batch_norm, inference": (lambda: cubn.fused_batch_norm(x, g, b, mean, var, is_training=False),
                                        "batch_norm"),
        "fused_batch_norm + ReLU, training": (lambda: cubn.fused_batch_norm(x, g, b, activation="relu"),
                                              "batch_norm + relu"),
        "batch_norm_backward": (lambda: cubn.batch_norm_backward(dy, x, g, mean, var), "native_batch_norm_backward"),
        "BatchNorm(x), training": (lambda: bn(x, is_training=True), "nn.BatchNorm (training)"),
        "bn.backward(dy, ctx)": (lambda: bn.backward(dy, ctx), "native_batch_norm_backward"),
    }
    try:
        import torch
    except ImportError:
        return {k: (f, None, name) for k, (f, name) in out.items()}
    F = torch.nn.functional
    xt, dyt = torch.from_numpy(x.reshape(-1, c)), torch.from_numpy(dy.reshape(-1, c))
    gt, bt, mt, vt = (torch.from_numpy(a) for a in (g, b, mean, var))
    rm, rv = torch.zeros(c, dtype=xt.dtype), torch.ones(c, dtype=xt.dtype)
    invstd = 1 / torch.sqrt(vt + 1e-3)
    mod = torch.nn.BatchNorm1d(c, eps=1e-3, dtype=xt.dtype).train()
    torch_calls = {
        "moments": lambda: torch.var_mean(xt, dim=0, correction=0),
        "fused_batch_norm, training": lambda: F.batch_norm(xt, rm, rv, gt, bt, True, 0.1, 1e-3),
        "fused_batch_norm, inference": lambda: F.batch_norm(xt, mt, vt, gt, bt, False, 0.1, 1e-3),
        "fused_batch_norm + ReLU, training": lambda: F.relu(F.batch_norm(xt, rm, rv, gt, bt, True, 0.1, 1e-3)),
        "batch_norm_backward": lambda: torch.ops.aten.native_batch_norm_backward(
            dyt, xt, gt, None, None, mt, invstd, True, 1e-3, [True, True, True]),
        "BatchNorm(x), training": lambda: mod(xt),
        "bn.backward(dy, ctx)": lambda: torch.ops.aten.native_batch_norm_backward(
            dyt, xt, gt, None, None, mt, invstd, True, 1e-3, [True, True, True]),
    }
    torch.set_num_threads(1)
    return {k: (f, torch_calls[k], name) for k, (f, name) in out.items()}


def _batch(fn, calls, ctx):
    with ctx():
        t0 = time.thread_time_ns()
        for _ in range(calls):
            fn()
        return (time.thread_time_ns() - t0) / calls / 1e3


COLUMNS = ("cubn", "cubn, direct route off", "cubn NumPy code", "PyTorch 1 thread")


def measure(shape=(8, 16), dtype="float32", batches=31, calls=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = {}
    for op, (f, tf, tname) in cases(shape, dtype, rng).items():
        runs = [(COLUMNS[0], f, contextlib.nullcontext), (COLUMNS[1], f, numpy_direct.disabled),
                (COLUMNS[2], f, numpy_native.disabled)]
        if tf is not None:
            runs.append((COLUMNS[3], tf, contextlib.nullcontext))
        for _, fn, ctx in runs:  # warm up
            _batch(fn, calls, ctx)
        times = {name: [] for name, _, _ in runs}
        for _ in range(batches):
            for name, fn, ctx in runs:
                times[name].append(_batch(fn, calls, ctx))
        rows[op] = {"torch": tname, **{k: statistics.median(v) for k, v in times.items()}}
    return rows


def table(rows) -> str:
    head = "| op | " + " | ".join(f"{c} (µs)" for c in COLUMNS) + " | cubn / PyTorch | route off / PyTorch |"
    out = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for op, r in rows.items():
        cells = [f"{r[c]:.1f}" if c in r else "-" for c in COLUMNS]
        t = r.get(COLUMNS[3])
        ratio = [f"{r[c] / t:.2f}×" if t else "-" for c in COLUMNS[:2]]
        out.append(f"| `{op}` | " + " | ".join(cells) + " | " + " | ".join(ratio) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8,16")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batches", type=int, default=31)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--out")
    a = p.parse_args(argv)
    shape = tuple(int(s) for s in a.shape.split(","))
    cubn.set_num_threads(1)
    env = cpu_benchmarks.environment()  # (its load average before the run)
    rows = measure(shape, a.dtype, a.batches, a.calls)
    text = table(rows)
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        env.update(cpu=env["processor"], cubn_native=numpy_native.status(), shape=shape, dtype=a.dtype, batches=a.batches, calls=a.calls)
        (out / "small_calls.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        (out / "table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
