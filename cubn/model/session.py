"""Helpers for a GPU session that must fit a short lease (bench/gpu_session.sh).

    python -m cubn.model.session variants --shapes quick|full [--device h200]
    python -m cubn.model.session precompile --shapes quick|full --jobs 16 [--nvrtc-only]
    python -m cubn.model.session bench --shapes quick|full --out DIR [--dtypes ...] [--ops ...]

``variants`` lists the kernel variants the benchmark will launch on the
shapes (both training paths: the ``cubn`` and ``cubn_three_launch`` peers), found by running
the benchmark's calls on a [`RecordingLauncher`][cubn.model.tracing.RecordingLauncher] for
the device: nothing is guessed, and nothing runs. ``precompile`` compiles
exactly those into CuPy's disk cache in parallel processes, so the timed run
compiles nothing; ``--nvrtc-only`` compiles them with NVRTC alone (no GPU
needed: the CPU dry run uses it to time the stage). ``bench`` runs the
benchmark suite one shape at a time and rewrites the results folder after
each, printing every record as it is measured: a run cut short by the
session's time guard keeps every finished shape.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import sys
import time

from . import _adapter
from .plans import DTYPES, benchmark_shapes, used_variants  # noqa: F401 - used_variants re-exported


_shapes = benchmark_shapes


def _compile_nvrtc(group):
    from . import sass

    source, names, arch = group
    sass.compile_cubin(source, names, arch)
    return len(names)


def _compile_cupy(keys):
    return _adapter.cupy_compile(keys)


def precompile(variants, jobs: int, nvrtc_only: bool = False, arch: str = "sm_90") -> float:
    """Compile ``variants`` in ``jobs`` processes; returns the seconds it took."""
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")  # CUDA does not survive fork
    if nvrtc_only:
        # One NVRTC program per variant, as CuPy compiles them.
        work = [(v.source, [v.name_expression], arch) for v in variants]
        fn = _compile_nvrtc
    else:
        keys = [(v.source, v.name_expression) for v in variants]
        work = [keys[i::jobs] for i in range(jobs) if keys[i::jobs]]
        fn = _compile_cupy
    done = 0
    with cf.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as ex:
        for n in ex.map(fn, work):
            done += n
    return time.perf_counter() - t0


def bench(shapes, dtypes, ops, out) -> int:
    """The benchmark, shape by shape, results rewritten after each shape."""
    records, env = [], None
    for shape in shapes:
        env, _, recs = _adapter.run_benchmark([shape], dtypes, ops, log=lambda line: print(line, flush=True))
        records += recs
        _adapter.write_benchmark(out, env, records)
        print(f"-- {shape[0]} {shape[1]}: {len(recs)} records (results in {out})", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cubn.model.session")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("variants", "precompile", "bench"):
        q = sub.add_parser(name)
        q.add_argument("--shapes", choices=("quick", "full"), default="quick")
        q.add_argument("--dtypes", default=",".join(DTYPES))
        q.add_argument("--device", default="h200")
        if name == "bench":
            q.add_argument("--out", required=True)
            q.add_argument("--ops", default=None)
        if name == "precompile":
            q.add_argument("--jobs", type=int, default=mp.cpu_count())
            q.add_argument("--nvrtc-only", action="store_true")
            q.add_argument("--skip", default=None, help="a file of variants already compiled (one per line)")
    args = p.parse_args(argv)
    if args.command == "bench":
        ops = tuple(args.ops.split(",")) if args.ops else _adapter.benchmark_ops()
        return bench(_shapes(args.shapes), tuple(args.dtypes.split(",")), ops, args.out)
    vs = used_variants(_shapes(args.shapes), tuple(args.dtypes.split(",")), device=args.device)
    if args.command == "variants":
        for v in vs:
            print(f"{v.source}\t{v.name_expression}")
        return 0
    if args.skip:
        try:
            done = set(open(args.skip).read().splitlines())
        except FileNotFoundError:
            done = set()
        vs = [v for v in vs if f"{v.source}\t{v.name_expression}" not in done]
    secs = precompile(vs, args.jobs, args.nvrtc_only)
    print(f"precompiled {len(vs)} variants ({'NVRTC only' if args.nvrtc_only else 'CuPy cache'}) "
          f"in {secs:.1f} s with {args.jobs} processes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
