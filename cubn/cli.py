"""The ``cubn`` command: ``cubn info``, ``cubn demo``, ``cubn bench``, ``cubn model``."""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
from pathlib import Path


def _info(args) -> int:
    import numpy as np

    import cubn
    from cubn import _backend

    print(f"cubn        {cubn.__version__}")
    print(f"python      {platform.python_version()} ({sys.executable})")
    print(f"numpy       {np.__version__}")
    cp = _backend.cupy_or_none()
    print(f"cupy        {getattr(cp, '__version__', 'not installed')}")
    try:
        import ml_dtypes

        print(f"ml_dtypes   {ml_dtypes.__version__} (bfloat16 for NumPy)")
    except ImportError:
        print("ml_dtypes   not installed (no bfloat16 on NumPy)")
    print(f"backend     {'cupy (GPU)' if cubn.gpu_available() else 'numpy (CPU)'} -- {_backend.gpu_status()}")
    if cubn.gpu_available():
        for i in range(cp.cuda.runtime.getDeviceCount()):
            p = cp.cuda.runtime.getDeviceProperties(i)
            name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
            print(f"gpu {i}       {name}, sm_{p['major']}{p['minor']}, {p['multiProcessorCount']} SMs, "
                  f"{p['totalGlobalMem'] / 2**30:.1f} GiB")
        from cubn.backends.cupy_launcher import compile_options

        print(f"nvrtc opts  {' '.join(compile_options())}")
    cupy_cache = os.environ.get("CUPY_CACHE_DIR", str(Path.home() / ".cupy" / "kernel_cache"))
    print(f"kernel cache (GPU, by CuPy)   {cupy_cache}")
    from cubn.backends.emulated_launcher import cache_dir

    cxx = os.environ.get("CXX", "g++")
    print(f"kernel cache (emulated, CPU)  {cache_dir()}  [{cxx}: {'found' if shutil.which(cxx) else 'missing'}]")
    from cubn.backends import numpy_native

    print(f"compiled loops (NumPy backend)  {numpy_native.status()}")
    return 0


def _demo(args) -> int:
    from cubn.demo import run

    res = run(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=args.device,
              progress=not args.no_progress)
    return 0 if res["test_accuracy"] >= args.min_accuracy else 1


def _parse_bench_shape(text):
    """``LAYOUT:D1,D2,...`` -> (layout, shape)."""
    lay, _, dims = text.partition(":")
    lay = lay.upper()
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise SystemExit(f"cubn bench --shape {text!r}: expected LAYOUT:D1,D2,..., e.g. NHWC:32,56,56,64") from None
    if lay not in ("NCHW", "NHWC", "NC") or any(d <= 0 for d in shape) or len(shape) < 2 \
            or (lay == "NC") != (len(shape) == 2):
        raise SystemExit(f"cubn bench --shape {text!r}: NC takes 2 positive dimensions, NCHW/NHWC 3 or more")
    return lay, shape


def _bench(args) -> int:
    import cubn

    args.shapes = [_parse_bench_shape(s) for s in args.shape] if args.shape else None
    if args.cpu or not cubn.gpu_available():
        # No GPU: the NumPy backend beside PyTorch's CPU kernels and naive NumPy
        from cubn.cpu_benchmarks import main as cpu_main

        return cpu_main(args)
    from cubn.benchmarking import main as bench_main

    if args.dtypes is None:
        args.dtypes = "float32,float16,bfloat16"
    return bench_main(args)


def _model(args) -> int:
    from cubn.model.suite import run

    return run(args)


def _precompile(args) -> int:
    from cubn.backends.cupy_launcher import precompile

    try:
        from tqdm import tqdm
    except ImportError:  # the count at the end is all
        n = precompile(jobs=args.jobs)
    else:
        with tqdm(desc="precompile", unit="variant", disable=None) as bar:  # no bar unless stderr is a terminal
            def progress(k, total):
                bar.total = total
                bar.update(k)

            n = precompile(jobs=args.jobs, progress=progress)
    print(f"compiled {n} kernel variants into CuPy's cache")
    return 0


def main(argv=None) -> int:
    from cubn._version import __version__

    parser = argparse.ArgumentParser(prog="cubn", description="Batch normalization and moments as CUDA kernels.")
    parser.add_argument("--version", action="version", version=f"cubn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, backend, GPU and kernel caches")
    p.set_defaults(func=_info)
    p = sub.add_parser("demo", help="train a small MLP with batch norm on sklearn's digits")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--min-accuracy", type=float, default=0.0,
                   help="exit with status 1 when the final test accuracy is below this")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo)
    p = sub.add_parser("bench", help="benchmark the kernels against PyTorch and naive CuPy; without a GPU, the "
                       "NumPy backend against PyTorch CPU and naive NumPy (see docs)")
    p.add_argument("--out", default="bench-results", help="folder for the JSON, PNG and table")
    p.add_argument("--quick", action="store_true", help="a few shapes only")
    p.add_argument("--shape", action="append", metavar="LAYOUT:D1,D2,...",
                   help="a shape to run instead of the suite's (repeatable), e.g. NC:1024,64")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated (default: float32,float16,bfloat16 on a GPU, float32,float64 on the CPU)")
    p.add_argument("--ops", default=None, help="comma-separated subset of ops")
    p.add_argument("--peers", default=None, help="comma-separated subset of peers (default: every registered one; "
                   "on the CPU: cubn-1t,cubn-Nt,torch-1t,torch-Nt,numpy)")
    p.add_argument("--repeat", type=int, default=None, help="GPU: timed repetitions; CPU: the least rounds per case")
    p.add_argument("--cpu", action="store_true", help="the CPU benchmark even where a GPU is present")
    p.add_argument("--budget", type=float, default=None,
                   help="CPU: seconds of interleaved rounds per case, after the least rounds (default 2)")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="CPU: MiB of the np.copyto whose bandwidth each case is compared with (default 256)")
    p.set_defaults(func=_bench)
    p = sub.add_parser("model", help="predicted GPU time of the benchmark's ops: a traced traffic and "
                       "instruction model, no GPU needed (see docs/performance.md)")
    p.add_argument("--device", choices=("h100", "h200"), default="h100")
    p.add_argument("--shape", action="append", metavar="LAYOUT:D1,D2,...[:DTYPE]",
                   help="a shape to model (repeatable); default: the benchmark suite")
    p.add_argument("--ops", default=None, help="comma-separated subset of ops")
    p.add_argument("--dtypes", default=None, help="dtypes for shapes that name none (default float32,float16,bfloat16)")
    p.add_argument("--quick", action="store_true", help="the quick benchmark's shapes")
    p.add_argument("--three-launch", action="store_true", help="model the three-launch path only")
    p.add_argument("--extra-samples", type=int, default=0, help="random blocks traced per role besides its first and last")
    p.add_argument("--json", required=True, help="where to write the records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no summary table")
    p.set_defaults(func=_model)
    p = sub.add_parser("precompile", help="compile every kernel variant for this GPU into CuPy's disk cache")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.set_defaults(func=_precompile)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
