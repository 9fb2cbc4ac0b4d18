"""The benchmark suite: every (shape, dtype, peer, op) case, timed, as [`Record`][Record] rows."""
from __future__ import annotations

import dataclasses
import datetime
import platform

import numpy as np

from .cases import DTYPES, OPS, SUITE, Inputs, resolve_dtype
from .peers import PEERS, Skip
from .roofline import copy_bandwidth, op_bytes
from .timing import time_cpu, time_gpu


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


def run_suite(shapes=None, dtypes=DTYPES, ops=OPS, peers=None, progress=None, reps=None, log=None):
    """Run every (shape, dtype, op, peer) case; returns (env, copy_gbps, records).

    ``peers``: names of registered peers (default: all of them); ``progress(n)``
    is called with the number of cases just finished; ``log(line)`` with each
    record as text.
    """
    import cubn

    log = log or (lambda s: None)
    shapes = shapes or SUITE
    peers = tuple(PEERS) if peers is None else tuple(peers)
    gpu = cubn.gpu_available()
    cp = None
    if gpu:
        import cupy as cp
    env = environment(cp)
    bw = copy_bandwidth(cp) if gpu else None
    env["copy_gbps"] = bw
    records = []
    for layout, shape in shapes:
        for dt in dtypes:
            dtype = resolve_dtype(dt)
            for name in peers:
                peer = PEERS[name]
                on_cpu = peer.device == "cpu"
                recs = [Record(op, layout, tuple(shape), dt, name) for op in ops]
                skip = None
                if dtype is None:
                    skip = f"{dt} is not available"
                elif not on_cpu and not gpu:
                    skip = "no CUDA device"
                elif peer.skip is not None:
                    skip = peer.skip(layout, tuple(shape), dt, gpu)
                if skip:
                    for r in recs:
                        r.error = "skipped: " + skip
                    records.extend(recs)
                    if progress:
                        progress(len(ops))
                    continue
                xp = np if on_cpu else cp
                try:
                    inp = Inputs(xp, layout, shape, dtype)
                except Exception as e:  # e.g. a dtype CuPy cannot hold
                    for r in recs:
                        r.error = f"inputs: {type(e).__name__}: {e}"[:300]
                    records.extend(recs)
                    if progress:
                        progress(len(ops))
                    continue
                for r in recs:
                    try:
                        with peer.options():
                            run = peer.build(r.op, inp)
                            if on_cpu:
                                med, p10, p90, cnt = time_cpu(run, inp.k)
                            else:
                                med, p10, p90, cnt = time_gpu(cp, run, inp.k, reps=reps)
                        r.median_ms, r.p10_ms, r.p90_ms, r.reps = med, p10, p90, cnt
                        r.bytes = op_bytes(r.op, inp.nbytes)
                        r.gbps = r.bytes / (med * 1e-3) / 1e9
                        if bw and not on_cpu:
                            r.roofline = r.gbps / bw
                    except Skip as e:
                        r.error = f"skipped: {e}"
                    except Exception as e:
                        r.error = f"{type(e).__name__}: {e}"[:300]
                    log(format_record(r))
                    records.append(r)
                    if progress:
                        progress(1)
                inp.release()
                if gpu:
                    cp.get_default_memory_pool().free_all_blocks()
    return env, bw, records


def format_record(r):
    if r.median_ms is None:
        return f"{r.op:11s} {r.layout:4s} {str(r.shape):22s} {r.dtype:8s} {r.peer:10s} {r.error}"
    rf = f"{100 * r.roofline:5.1f}%" if r.roofline else "   -  "
    return f"{r.op:11s} {r.layout:4s} {str(r.shape):22s} {r.dtype:8s} {r.peer:10s} {r.median_ms:9.4f} ms {rf}"
