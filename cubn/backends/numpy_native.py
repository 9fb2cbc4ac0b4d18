"""Compiled loops for the NumPy backend: one pass over memory per primitive.

NumPy spends a pass over memory on every ufunc, so a normalization written
with ufuncs reads and writes its chunk four or five times, and its
statistics twice. ``native_loops.cpp`` does each of the backend's four hot
primitives -- the statistics, the normalization (with its ReLU and residual
add), the backward's sums and its apply -- in one pass over memory, built on
first use with the host C++ compiler and loaded through ctypes; a whole
forward or backward that runs in one thread is one C call (``forward``,
``infer``, ``backward``).

Where it applies: C-contiguous float32 and float64 tensors of more than
``MIN_ELEMENTS`` elements whose other tensors (side input, dy) share their
dtype, unweighted statistics, no activation or the ReLU. Everything else
takes the NumPy code. Without a compiler (or with ``CUBN_NATIVE=0``) the
NumPy code runs throughout; ``status()`` says which and why.

Statistics are sums of ``x - pivot`` and its square in double, the pivot a
channel's first few elements' mean, ``M2 = Q - S^2 / n``; a channel whose
pivot turns out far from its mean is summed again about the mean found, so
a large offset costs no precision. Parts are cut by shape alone and their
sums added in a fixed order: results do not depend on the thread count.
Elementwise loops compute ``(x - mean) * scale + shift`` in the data's type,
the multiply and add fused where the CPU has FMA (one rounding where the
NumPy code has two); the per-channel steps round exactly as the NumPy code.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from typing import NamedTuple

import numpy as np

from .. import _threads
from . import _memory


def _address(a) -> int:
    return a.__array_interface__["data"][0]


# An array's data address, read from NumPy's struct where that is verified (a tenth of the interface's cost)
pointer = _memory._read_data or _address

__all__ = ["MIN_ELEMENTS", "available", "disabled", "status", "build"]

SOURCE = pathlib.Path(__file__).resolve().parent / "native_loops.cpp"
CALLS_SOURCE = SOURCE.with_name("native_calls.c")  # direct calls of the one-thread entry points
MIN_ELEMENTS = 8192  # smaller arrays take numpy_small's few NumPy calls (a ctypes call costs ~1 us)
PART_BYTES = 256 << 10  # one part of the statistics: read twice, the second time from L2
TASK_BYTES = 1 << 20  # bytes below which a call runs in the calling thread; tasks of at least a quarter of it
# Outputs of at least this many bytes are written with non-temporal (streaming)
# stores: they would not stay in cache anyway, and a plain store reads each
# line before writing it. Smaller outputs are written plainly, so that the
# next op finds them in cache.
STREAM_BYTES = 8 << 20
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp-simd", "-std=c++17",
          "-fPIC", "-shared", "-fvisibility=hidden", "-Wall")  # fmt: skip
# (no contraction: the extension's few per-channel steps round as NumPy's ufuncs do)
_CALLS_FLAGS = ("-O2", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall")
_ABI = 11  # cubn_native_abi() of this version of native_loops.cpp
_SUFFIX = {np.dtype(np.float32): "f4", np.dtype(np.float64): "f8"}
_I64 = ctypes.c_int64
_P = ctypes.c_void_p
_INT = ctypes.c_int

_lock = threading.Lock()
_lib = None
_why: str | None = None  # why the loops are not in use (None: not tried yet, or in use)
# The extension of native_calls.c, where it could be built: the one-thread C calls with the arrays
# themselves as arguments (a ctypes call costs ~0.15 us an argument and ~0.25 us an array address)
_calls = None
_calls_why: str | None = None
_DT_INDEX = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}  # native_calls.c's `kind`
_tried = False
_local = threading.local()  # .off: the loops are disabled in this thread (``disabled()``)

_SIGNATURES = {  # ctypes argument types of each entry point (f4 and f8 alike)
    "stats_rows": (_P, _I64, _I64, _P, _P, _P),
    "stats_short": (_P, _I64, _I64, _I64, _I64, _P, _P, _P),
    "stats_runs": (_P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P),
    "pivots": (_P, _I64, _I64, _I64, _I64, _I64, _P),
    "stats_finish": (_I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P, ctypes.c_double, _P, ctypes.c_double, _P, _P),
    "stats_serial": (_P, _P, ctypes.c_double, _P, _P),
    "bwd_sums_serial": (_INT, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P),
    "fold": (_I64, _I64, _P, ctypes.c_double, _P, _P, _P, _P, _P),
    "moving": (_I64, _I64, ctypes.c_double, _INT, _P, _P, _P, _P, _P, _P),
    "train_serial": (_INT, _P, _P, _P, _P, ctypes.c_double, ctypes.c_double, _P, _P, _P, _P, _P, _P, _P,
                     ctypes.c_double, _INT, _P, _P, _P, _P),
    "infer_serial": (_INT, _P, _P, _P, _I64, _I64, _I64, _I64, ctypes.c_double, _P, _P, _P, _P, _P, _P),
    "bwd_coefficients": (_I64, _INT, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P),
    "backward_serial": (_INT, _P, _P, _P, _P, _P, _P, _INT, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P),
    "sums_finish": (_I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P),
    "normalize_rows": (_INT, _P, _P, _P, _I64, _I64, _P, _P, _P),
    "normalize_runs": (_INT, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _P),
    "bwd_sums_rows": (_INT, _P, _P, _P, _I64, _I64, _P, _P, _P, _P, _P, _P),
    "bwd_sums_short": (_INT, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P),
    "bwd_sums_runs": (_INT, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P),
    "bwd_apply_rows": (_INT, _P, _P, _P, _P, _P, _I64, _I64, _P, _P, _P, _P, _P, _P),
    "bwd_apply_runs": (_INT, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P),
}


# ---------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------
def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx) or shutil.which("g++")


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("CUBN_CACHE_DIR")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "cubn"
    return base / "native"


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the machine and its CPU's feature flags."""
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    ident += "|" + line.strip()
    except OSError:
        pass
    return ident


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _target(cxx: str) -> pathlib.Path:
    h = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    for part in (SOURCE.read_bytes(), " ".join(_FLAGS).encode(), version.encode(), _cpu_identity().encode()):
        h.update(part)
        h.update(b"\0")
    return _cache_dir() / f"native_loops-{h.hexdigest()[:24]}.so"


def _verified(target: pathlib.Path) -> bool:
    try:
        return (target.with_suffix(".sha256").read_text().strip() == _digest(target))
    except OSError:
        return False


def _compile(cxx: str, target: pathlib.Path) -> None:
    _build(target, [cxx, *_FLAGS, str(SOURCE)])


def _build(target: pathlib.Path, command: list) -> None:
    """``command -o <staged>``, then the object and its digest moved to ``target`` (and beside it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        staged = pathlib.Path(tmp) / target.name
        proc = subprocess.run([*command, "-o", str(staged)], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{command[0]} failed on {pathlib.Path(command[-1]).name}: "
                               f"{proc.stderr.strip()[-2000:]}")
        digest = staged.with_suffix(".sha256")
        digest.write_text(_digest(staged) + "\n")
        # the object first, then its digest: a reader in between sees a mismatch and rebuilds
        os.replace(staged, target)
        os.replace(digest, target.with_suffix(".sha256"))


def _load():
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    target = _target(cxx)
    if not _verified(target):  # missing, truncated or overwritten: build it anew
        _compile(cxx, target)
    lib = ctypes.CDLL(str(target))  # CDLL: the GIL is released during every call
    if lib.cubn_native_abi() != _ABI:
        raise RuntimeError(f"{target} is not this version's build")
    funcs = {}
    for name, argtypes in _SIGNATURES.items():
        for dt, suf in _SUFFIX.items():
            f = getattr(lib, f"cubn_{name}_{suf}")
            f.argtypes, f.restype = argtypes, (_INT if name == "stats_finish" else None)
            funcs[name, dt] = f
    return funcs


def _calls_target(cc: str) -> pathlib.Path:
    h = hashlib.sha256()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    for part in (CALLS_SOURCE.read_bytes(), " ".join(_CALLS_FLAGS).encode(), version.encode(), sys.version.encode(),
                 sysconfig.get_paths()["include"].encode()):
        h.update(part)
        h.update(b"\0")
    return _cache_dir() / f"native_calls-{h.hexdigest()[:24]}{importlib.machinery.EXTENSION_SUFFIXES[0]}"


def _load_calls(funcs):
    """Build (or load from the cache) the extension of native_calls.c and point it at ``funcs``' one-thread
    entry points; raises RuntimeError where it cannot be built here."""
    if _memory.DATA_OFFSET is None:
        raise RuntimeError("an array's data pointer cannot be read from its object in this Python")
    include = sysconfig.get_paths().get("include")
    if not include or not (pathlib.Path(include) / "Python.h").exists():
        raise RuntimeError("Python's headers (Python.h) are not installed")
    cc = _compiler()
    target = _calls_target(cc)
    if not _verified(target):
        _build(target, [cc, "-x", "c", *_CALLS_FLAGS, f"-I{include}", str(CALLS_SOURCE)])
    spec = importlib.util.spec_from_file_location("_cubn_native_calls", target)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"{target} cannot be loaded as an extension module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    entry = tuple(ctypes.cast(funcs[name, dt], ctypes.c_void_p).value
                  for name in ("train_serial", "infer_serial", "stats_serial", "backward_serial") for dt in _DT_INDEX)
    mod.init(np.ndarray, _memory.DATA_OFFSET, entry)
    return mod


def build() -> bool:
    """Build (or load from the cache) the compiled loops now; True if they are in use."""
    global _lib, _why, _tried, _calls, _calls_why
    with _lock:
        if not _tried:
            _tried = True
            setting = os.environ.get("CUBN_NATIVE", "1").strip().lower()
            if setting in ("0", "false", "no", "off"):
                _why = "disabled by CUBN_NATIVE=0"
            else:
                try:
                    _lib = _load()
                    _why = None
                except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                    _lib, _why = None, f"could not build them: {e}"
            if _lib is not None:
                if os.environ.get("CUBN_NATIVE_CALLS", "1").strip().lower() in ("0", "false", "no", "off"):
                    _calls_why = "disabled by CUBN_NATIVE_CALLS=0"
                else:
                    try:
                        _calls = _load_calls(_lib)
                    except (OSError, RuntimeError, subprocess.SubprocessError, ImportError, AttributeError,
                            TypeError, ValueError) as e:
                        _calls, _calls_why = None, f"{e}"
    return _lib is not None


def available() -> bool:
    """The compiled loops are built and in use (in this thread)."""
    if getattr(_local, "off", False):
        return False
    return _lib is not None or (not _tried and build())


def status() -> str:
    """Whether the NumPy backend's compiled loops are in use, and if not, why."""
    build()
    if _lib is not None:
        calls = "direct calls" if _calls is not None else f"ctypes calls ({_calls_why})"
        return f"in use ({_cache_dir()}; {calls})"
    return f"not in use: {_why}"


class ThreadSwitch:
    """A context manager that sets the thread-local flag ``flag`` (on ``_local``) for its block, and
    restores the flag's previous value after it (nested blocks and other threads are unaffected)."""

    flag = "off"

    def __enter__(self):
        self._old = getattr(_local, self.flag, False)
        setattr(_local, self.flag, True)
        return self

    def __exit__(self, *exc):
        setattr(_local, self.flag, self._old)
        return False


class disabled(ThreadSwitch):
    """``with numpy_native.disabled():`` the NumPy code throughout, in this thread (tests, A/B timing)."""

    flag = "off"


# ---------------------------------------------------------------------------
# Which calls take the loops
# ---------------------------------------------------------------------------
def smallest() -> int:
    """Arrays of more elements than this take the loops: none but empty ones with the direct calls
    (a C call then costs less than the NumPy code's ufunc calls at any size), else more than
    MIN_ELEMENTS (a ctypes call costs several microseconds). Builds the loops first."""
    return (0 if _calls is not None else MIN_ELEMENTS) if available() else -1


def accepts(x3, acc, *others) -> bool:
    """x3 and each of ``others`` (None: absent) C-contiguous, of dtype ``acc`` (float32 or float64),
    of x3's shape, and x3 larger than ``smallest()``; the loops built."""
    acc = np.dtype(acc)
    if x3.dtype != acc or acc not in _SUFFIX or not x3.flags.c_contiguous:
        return False
    least = smallest()
    if least < 0 or x3.size <= least:
        return False
    for a in others:
        if a is not None and (a.dtype != acc or not a.flags.c_contiguous or a.shape != x3.shape):
            return False
    return True


def takes_act(act) -> bool:
    return act is None or act.name == "relu"


# ---------------------------------------------------------------------------
# Parts: decided by the shape alone
# ---------------------------------------------------------------------------
MAX_PARTS = 32  # of the rows and short layouts: partial sums stay a small fraction of the input
SHORT_RUN_BYTES = 4096  # runs shorter than this: the short layout
PIECE_ELEMENTS = 1 << 16  # the runs layout cuts longer runs into pieces of at most this many
# A pivot this far from its channel's mean (Q > ratio * M2) loses digits to the
# cancellation in Q - S^2/n; the statistics are summed again about the mean found.
FAR_PIVOT_RATIO = {np.dtype(np.float32): 1e4, np.dtype(np.float64): 16.0}


def _width(c: int) -> int:
    """Elements per row of the rows layout: k * c, k rows at a time, at least 64."""
    return c * max(1, -(-64 // c))


def _split(n_items: int, item_bytes: int) -> list[int]:
    """Bounds of up to MAX_PARTS parts of about PART_BYTES or more, over ``n_items``."""
    parts = max(1, min(MAX_PARTS, n_items, n_items * item_bytes // PART_BYTES))
    return [n_items * p // parts for p in range(parts + 1)]


def _pieces(inner: int) -> tuple[int, int]:
    pieces = -(-inner // PIECE_ELEMENTS)
    return -(-inner // pieces), pieces


def _tasks(n_items: int, item_bytes: int) -> int:
    """Thread-pool tasks over ``n_items`` parts (tasks only group parts: no result depends on them)."""
    threads = _threads.get_num_threads()
    total = n_items * item_bytes
    if threads <= 1 or total < TASK_BYTES:
        return 1
    return max(1, min(n_items, total // (TASK_BYTES // 4), 4 * threads))


def _run_ranges(n_items: int, item_bytes: int, body) -> None:
    """``body(i0, i1)`` over ``[0, n_items)`` cut into contiguous ranges, on the thread pool."""
    tasks = _tasks(n_items, item_bytes)
    if tasks == 1:
        if n_items:
            body(0, n_items)
        return
    bounds = [n_items * t // tasks for t in range(tasks + 1)]
    _threads.run(tasks, lambda t: body(bounds[t], bounds[t + 1]))


def _vec(v, acc, c):
    if type(v) is np.ndarray and v.dtype == acc and v.shape == (c,) and v.flags.c_contiguous:
        return v  # (most calls: the checks are cheaper than the conversion's)
    v = np.ascontiguousarray(v, dtype=acc).reshape(-1)
    return np.full(c, v[0], acc) if v.size == 1 and c != 1 else v


LANES = 8  # native_loops.cpp's LANES


def _tile(v, acc, width, c):
    """(C,) ``v`` repeated along rows of ``width`` and LANES more elements: the streamed row loops load
    LANES columns' coefficients as one vector from any column."""
    return np.resize(_vec(v, acc, c), width + LANES)


# ---------------------------------------------------------------------------
# The reductions: parts, then totals in C
# ---------------------------------------------------------------------------
class _Reduction(NamedTuple):
    """How a shape's reduction is cut (``_reduction``): the parts' kernel arguments and where
    their sums go in a buffer of ``size`` doubles per sum (plus C for the rows left over)."""

    kind: str  # "rows", "short" or "runs"
    width: int  # rows: elements per row (k * C); else C
    bounds: tuple  # rows: super-row bounds of the parts; short: n bounds
    rest: int  # rows: the rows left over (at width C), else 0
    piece: int  # runs: elements per piece
    pieces: int  # runs: pieces per run
    size: int  # doubles per sum buffer
    totals: tuple  # (P, K, sp, sk, sc) of the C totals


@functools.lru_cache(maxsize=512)
def _reduction(outer: int, c: int, inner: int, itemsize: int) -> _Reduction:
    if inner == 1:
        width = _width(c)
        k = width // c
        full = outer // k
        bounds = tuple(_split(full, width * itemsize)) if full else (0,)
        n_parts = len(bounds) - 1
        return _Reduction("rows", width, bounds, outer - full * k, 0, 0, n_parts * width,
                          (n_parts, k, width, c, 1))
    if inner * itemsize < SHORT_RUN_BYTES:
        bounds = tuple(_split(outer, c * inner * itemsize))
        n_parts = len(bounds) - 1
        return _Reduction("short", c, bounds, 0, 0, 0, n_parts * c, (n_parts, 1, c, 0, 1))
    piece, pieces = _pieces(inner)
    return _Reduction("runs", c, (), 0, piece, pieces, outer * c * pieces, (outer, pieces, c * pieces, 1, pieces))


def _reduce(red, x3, isz, per_elem, buf, rows_fn, short_fn, runs_fn):
    """Run the parts of ``red`` (on the thread pool when large); sums into ``buf``
    (2 * (size + C) doubles: s, q, then the rest's s and q)."""
    outer, c, inner = x3.shape
    base = pointer(buf)
    ps, pq = base, base + red.size * 8
    if red.kind == "rows":
        width, b = red.width, red.bounds
        n_parts = len(b) - 1

        def body(p0, p1):
            for p in range(p0, p1):
                o = p * width * 8
                rows_fn(b[p] * width, b[p + 1] - b[p], width, ps + o, pq + o)

        _run_ranges(n_parts, ((b[-1] * width * per_elem) // max(1, n_parts)), body)
        if red.rest:
            rs = base + 2 * red.size * 8
            rows_fn(b[-1] * width, red.rest, c, rs, rs + c * 8)  # the rows left over, at width C
            return rs, rs + c * 8
        return None, None
    if red.kind == "short":
        b = red.bounds

        def body(p0, p1):
            for p in range(p0, p1):
                short_fn(b[p], b[p + 1], ps + p * c * 8, pq + p * c * 8)

        _run_ranges(len(b) - 1, (outer * c * inner * per_elem) // (len(b) - 1), body)
        return None, None
    _run_ranges(outer * c * red.pieces, red.piece * per_elem,
                lambda q0, q1: runs_fn(q0, q1, red.piece, red.pieces, ps, pq))
    return None, None


_KIND = {"rows": 0, "short": 1, "runs": 2}


@functools.lru_cache(maxsize=512)
def _plan_block(outer: int, c: int, inner: int, itemsize: int) -> tuple:
    """The reduction of this shape packed for the one-thread C calls: ``(array, its address)``, the
    array ``[kind, outer, C, inner, width, nbounds, rest, piece, pieces, size, P, K, sp, sk, sc, k1, k2,
    bounds...]`` (int64; ``CUBN_PLAN`` in native_loops.cpp reads it)."""
    red = _reduction(outer, c, inner, itemsize)
    block = np.array([_KIND[red.kind], outer, c, inner, red.width, len(red.bounds), red.rest, red.piece, red.pieces,
                      red.size, *red.totals, *_pivot_sample(outer, inner), *red.bounds], dtype=np.int64)
    block.setflags(write=False)
    return block, _address(block)


def _buffer(red, c):
    return np.empty(2 * (red.size + c))


# ---------------------------------------------------------------------------
# The primitives
# ---------------------------------------------------------------------------
PIVOT_SAMPLE = 16


def _pivot_sample(outer, inner):
    """(k1, k2): a channel's pivot is the mean of x[n, c, i] for n < k1, i < k2."""
    k2 = min(inner, PIVOT_SAMPLE)
    return min(outer, max(1, PIVOT_SAMPLE // k2)), k2


def _pivots(x3, width, acc):
    """Each channel's pivot, the mean of its first few elements (0 where not finite), tiled to ``width``."""
    outer, c, inner = x3.shape
    pivot = np.empty(width)
    _lib["pivots", acc](pointer(x3), c, inner, *_pivot_sample(outer, inner), width, pointer(pivot))
    return pivot


def statistics(x3, acc):
    """Per channel (mean, M2) of x3 (outer, C, inner), as ``acc`` arrays (C,).

    Sums about a pivot per channel (the mean of its first few elements); where a
    pivot turns out far from its channel's mean, summed again about that mean."""
    acc = np.dtype(acc)
    outer, c, inner = x3.shape
    isz = x3.itemsize
    red = _reduction(outer, c, inner, isz)
    lib = _lib
    mean = np.empty(c, acc)
    m2 = np.empty(c, acc)
    if x3.nbytes < TASK_BYTES or _threads.get_num_threads() <= 1:
        # one task: the same parts and sums in one C call (no Python per part)
        block = _plan_block(outer, c, inner, isz)  # (held until the call returns)
        if _calls is not None:
            _calls.stats(_DT_INDEX[acc], x3, block[1], FAR_PIVOT_RATIO[acc], mean, m2)
        else:
            lib["stats_serial", acc](pointer(x3), block[1], FAR_PIVOT_RATIO[acc], pointer(mean), pointer(m2))
        return mean, m2
    px = pointer(x3)
    pivot = _pivots(x3, red.width, acc)
    buf = _buffer(red, c)
    for again in (False, True):
        pp = pointer(pivot)
        fs, fq, fr = lib["stats_rows", acc], lib["stats_short", acc], lib["stats_runs", acc]
        rs, rq = _reduce(
            red, x3, isz, isz, buf,
            lambda off, rows, width, s, q: fs(px + off * isz, rows, width, pp, s, q),
            lambda n0, n1, s, q: fq(px, n0, n1, inner, c, pp, s, q),
            lambda q0, q1, piece, pieces, s, q: fr(px, inner, c, piece, pieces, q0, q1, pp, s, q))
        pb = pointer(buf)
        far = lib["stats_finish", acc](c, *red.totals, pb, pb + red.size * 8, rs, rq, float(outer * inner), pp,
                                       FAR_PIVOT_RATIO[acc], pointer(mean), pointer(m2))
        if not far or again:
            return mean, m2
        # about the mean found (where finite), once
        centre = np.where(np.isfinite(mean), mean.astype(np.float64), pivot[:c])
        pivot = np.ascontiguousarray(np.tile(centre, red.width // c))


def _opt(a):
    return None if a is None else pointer(a)


def plain(v, c, acc, out=False) -> bool:
    """v is None or a C-contiguous (C,) NumPy array of dtype ``acc`` (writable when ``out``)."""
    return v is None or (type(v) is np.ndarray and v.dtype == acc and v.shape == (c,) and v.flags.c_contiguous
                         and (not out or v.flags.writeable))


def forward(x3, side3, act, acc, eps, gamma, beta, norm, a=0.0, bessel=False, mean_in=None, var_in=None,
            mean_out=None, var_out=None):
    """The training forward: statistics, the fold (``invstd = 1 / sqrt(var + eps)``, ``scale = gamma * invstd``,
    ``shift = gamma * 0 + beta``), the normalization when ``norm``, and the moving statistics
    (``out = in - (in - batch) * a``, the variance Bessel-corrected when ``bessel``) into ``mean_out`` /
    ``var_out`` when given. Returns ``(y3 or None, mean, var, invstd, scale, shift)``, ``var`` biased.

    The per-channel steps round as the NumPy code's ufuncs do. A call that runs in one thread is one C
    call. ``gamma``, ``beta``, ``mean_in``, ``var_in``: None or (C,) vectors; the outs ``plain``."""
    acc = np.dtype(acc)
    outer, c, inner = x3.shape
    gamma = None if gamma is None else _vec(gamma, acc, c)
    beta = None if beta is None else _vec(beta, acc, c)
    mean_in = None if mean_in is None else _vec(mean_in, acc, c)
    var_in = None if var_in is None else _vec(var_in, acc, c)
    invstd = np.empty(c, acc)
    scale = invstd if gamma is None else np.empty(c, acc)
    shift = np.empty(c, acc)
    y3 = np.empty(x3.shape, acc) if norm else None
    if x3.nbytes < TASK_BYTES or _threads.get_num_threads() <= 1:
        mean = np.empty(c, acc)
        var = np.empty(c, acc)
        flags = (((1 if side3 is not None else 0) | (2 if act is not None else 0)
                  | (8 if x3.nbytes >= STREAM_BYTES else 0)) if norm else 0)
        block = _plan_block(outer, c, inner, x3.itemsize)  # (held until the call returns)
        if _calls is not None:
            _calls.train(_DT_INDEX[acc], flags, x3, side3 if norm else None, y3, block[1], FAR_PIVOT_RATIO[acc],
                         float(eps), gamma, beta, mean, var, invstd, scale, shift, float(a), int(bool(bessel)),
                         mean_in, var_in, mean_out, var_out)
        else:
            _lib["train_serial", acc](
                flags, pointer(x3), _opt(side3) if norm else None, _opt(y3), block[1],
                FAR_PIVOT_RATIO[acc], float(eps), _opt(gamma), _opt(beta), pointer(mean), pointer(var),
                pointer(invstd), pointer(scale), pointer(shift), float(a), int(bool(bessel)), _opt(mean_in),
                _opt(var_in), _opt(mean_out), _opt(var_out))
        return y3, mean, var, invstd, scale, shift
    mean, var = statistics(x3, acc)  # var holds M2 until the fold
    _lib["fold", acc](c, outer * inner, pointer(var), float(eps), _opt(gamma), _opt(beta), pointer(invstd),
                      pointer(scale), pointer(shift))
    if norm:
        normalize(x3, side3, y3, mean, scale, shift, act, acc)
    if mean_out is not None or var_out is not None:
        _lib["moving", acc](c, outer * inner, float(a), int(bool(bessel)), pointer(mean), pointer(var),
                            _opt(mean_in), _opt(var_in), _opt(mean_out), _opt(var_out))
    return y3, mean, var, invstd, scale, shift


def infer(x3, side3, act, acc, eps, gamma, beta, mean, var):
    """The inference forward ``act((x - mean) * scale + shift [+ side])`` with ``scale = gamma /
    sqrt(var + eps)`` (as ``gamma * (1 / sqrt(var + eps))``, the NumPy code's roundings) and
    ``shift = beta``: a new ``y3``; one C call when it runs in one thread."""
    acc = np.dtype(acc)
    outer, c, inner = x3.shape
    gamma = None if gamma is None else _vec(gamma, acc, c)
    beta = None if beta is None else _vec(beta, acc, c)
    mean, var = _vec(mean, acc, c), _vec(var, acc, c)
    scale, shift = np.empty(c, acc), np.empty(c, acc)
    y3 = np.empty(x3.shape, acc)
    serial = x3.nbytes < TASK_BYTES or _threads.get_num_threads() <= 1
    flags = (1 if side3 is not None else 0) | (2 if act is not None else 0) | (8 if x3.nbytes >= STREAM_BYTES else 0)
    if _calls is not None:
        _calls.infer(_DT_INDEX[acc], flags, x3, side3, y3 if serial else None, outer, c, inner, _width(c),
                     float(eps), gamma, beta, mean, var, scale, shift)
    else:
        _lib["infer_serial", acc](flags, pointer(x3), _opt(side3), pointer(y3) if serial else None, outer, c,
                                  inner, _width(c), float(eps), _opt(gamma), _opt(beta), pointer(mean),
                                  pointer(var), pointer(scale), pointer(shift))
    if not serial:
        normalize(x3, side3, y3, mean, scale, shift, act, acc)
    return y3


def normalize(x3, side3, y3, mean, scale, shift, act, acc) -> None:
    """y3 = act((x3 - mean) * scale + shift [+ side3]), per channel, into y3."""
    outer, c, inner = x3.shape
    flags = (1 if side3 is not None else 0) | (2 if act is not None else 0) | (8 if y3.nbytes >= STREAM_BYTES else 0)
    isz = x3.itemsize
    px, py = pointer(x3), pointer(y3)
    ps = pointer(side3) if side3 is not None else None
    if inner == 1:
        width = _width(c)
        params = [_tile(v, acc, width, c) for v in (mean, scale, shift)]
        pm, pk, ph = (pointer(v) for v in params)
        full, rest = divmod(outer, width // c)
        f = _lib["normalize_rows", acc]
        step = width * isz

        def body(r0, r1):
            o = r0 * step
            f(flags, px + o, ps and ps + o, py + o, r1 - r0, width, pm, pk, ph)

        _run_ranges(full, step, body)
        if rest:
            o = full * step
            f(flags, px + o, ps and ps + o, py + o, rest, c, pm, pk, ph)
        return
    params = [_vec(v, acc, c) for v in (mean, scale, shift)]
    pm, pk, ph = (pointer(v) for v in params)
    f = _lib["normalize_runs", acc]
    _run_ranges(outer * c, inner * isz, lambda r0, r1: f(flags, px, ps, py, inner, c, r0, r1, pm, pk, ph))


def backward_sums(dy3, x3, side3, mean, pre, act, acc):
    """Per channel (S1, S2) = (sum(dy'), sum(dy' (x - mean))) as ``acc`` arrays (C,); dy' is dy
    times the ReLU's derivative at the pre-activation ``pre`` = (mean, scale, shift) gives."""
    acc = np.dtype(acc)
    outer, c, inner = x3.shape
    flags = (1 if side3 is not None else 0) | (2 if act is not None else 0)
    isz = x3.itemsize
    pdy, px = pointer(dy3), pointer(x3)
    psd = pointer(side3) if side3 is not None else None
    red = _reduction(outer, c, inner, isz)
    lib = _lib
    vs = [_tile(v, acc, red.width, c) for v in (mean, *pre)]
    vargs = tuple(pointer(v) for v in vs)
    s1 = np.empty(c, acc)
    s2 = np.empty(c, acc)
    if x3.nbytes < TASK_BYTES or _threads.get_num_threads() <= 1:
        # one task: the same parts and sums in one C call
        block = _plan_block(outer, c, inner, isz)  # (held until the call returns)
        lib["bwd_sums_serial", acc](flags, pdy, px, psd, block[1], *vargs, pointer(s1),
                                    pointer(s2))
        return s1, s2
    fs, fq, fr = lib["bwd_sums_rows", acc], lib["bwd_sums_short", acc], lib["bwd_sums_runs", acc]

    def rows_fn(off, rows, width, s, q):
        o = off * isz
        fs(flags, pdy + o, px + o, psd and psd + o, rows, width, *vargs, s, q)

    buf = _buffer(red, c)
    rs, rq = _reduce(
        red, x3, isz, 2 * isz, buf, rows_fn,
        lambda n0, n1, s, q: fq(flags, pdy, px, psd, n0, n1, inner, c, *vargs, s, q),
        lambda q0, q1, piece, pieces, s, q: fr(flags, pdy, px, psd, inner, c, piece, pieces, q0, q1, *vargs, s, q))
    pb = pointer(buf)
    lib["sums_finish", acc](c, *red.totals, pb, pb + red.size * 8, rs, rq, pointer(s1), pointer(s2))
    return s1, s2


def backward_apply(dy3, x3, side3, dx3, dside3, pre, mean, k1, k2, act, acc) -> None:
    """dx3 = dy' * scale - ((x3 - mean) * k2 + k1) and, when given, dside3 = dy'
    (``pre`` = (mean, scale, shift) of the forward's pre-activation)."""
    outer, c, inner = x3.shape
    flags = ((1 if side3 is not None else 0) | (2 if act is not None else 0) | (4 if dside3 is not None else 0)
             | (8 if dx3.nbytes >= STREAM_BYTES else 0))
    isz = x3.itemsize
    pdy, px, pdx = pointer(dy3), pointer(x3), pointer(dx3)
    ps = pointer(side3) if side3 is not None else None
    pds = pointer(dside3) if dside3 is not None else None
    if inner == 1:
        width = _width(c)
        vs = [_tile(v, acc, width, c) for v in (*pre, mean, k1, k2)]
        vargs = tuple(pointer(v) for v in vs)
        full, rest = divmod(outer, width // c)
        f = _lib["bwd_apply_rows", acc]
        step = width * isz

        def body(r0, r1):
            o = r0 * step
            f(flags, pdy + o, px + o, ps and ps + o, pdx + o, pds and pds + o, r1 - r0, width, *vargs)

        _run_ranges(full, 2 * step, body)
        if rest:
            o = full * step
            f(flags, pdy + o, px + o, ps and ps + o, pdx + o, pds and pds + o, rest, c, *vargs)
        return
    vs = [_vec(v, acc, c) for v in (*pre, mean, k1, k2)]
    vargs = tuple(pointer(v) for v in vs)
    f = _lib["bwd_apply_runs", acc]
    _run_ranges(outer * c, 2 * inner * isz, lambda r0, r1: f(flags, pdy, px, ps, pdx, pds, inner, c, r0, r1, *vargs))


def backward(dy3, x3, side3, dx3, dside3, stats, act, acc, training):
    """The whole backward into ``dx3`` (and ``dside3`` when given): the sums, then ``dgamma = gcoef * S2 +
    hcoef * S1`` and the dx correction's ``k1 = scale * S1 / n``, ``k2 = scale * invstd^2 * S2 / n`` (training
    statistics; else 0) rounded as the NumPy code's ufuncs, then the apply. Returns ``(dgamma, dbeta)``;
    one C call when it runs in one thread."""
    acc = np.dtype(acc)
    outer, c, inner = x3.shape
    vs = [stats.mean, stats.scale, stats.shift, stats.gcoef, stats.hcoef, stats.count, stats.invstd]
    for k, v in enumerate(vs):  # (inline: seven calls of _vec cost a microsecond at (8, 16))
        if not (type(v) is np.ndarray and v.dtype == acc and v.shape == (c,) and v.flags.c_contiguous):
            vs[k] = _vec(v, acc, c)
    mean, scale, shift, gcoef, hcoef, count, invstd = vs
    s1, s2, dgamma, k1, k2 = np.empty(c, acc), np.empty(c, acc), np.empty(c, acc), np.empty(c, acc), np.empty(c, acc)
    if x3.nbytes < TASK_BYTES or _threads.get_num_threads() <= 1:
        flags = ((1 if side3 is not None else 0) | (2 if act is not None else 0) | (4 if dside3 is not None else 0)
                 | (8 if dx3.nbytes >= STREAM_BYTES else 0))
        block = _plan_block(outer, c, inner, x3.itemsize)  # (held until the call returns)
        if _calls is not None:
            _calls.backward(_DT_INDEX[acc], flags, dy3, x3, side3, dx3, dside3, block[1], int(bool(training)), mean,
                            scale, shift, gcoef, hcoef, count, invstd, s1, s2, dgamma, k1, k2)
        else:
            _lib["backward_serial", acc](
                flags, pointer(dy3), pointer(x3), _opt(side3), pointer(dx3), _opt(dside3),
                block[1], int(bool(training)), pointer(mean), pointer(scale),
                pointer(shift), pointer(gcoef), pointer(hcoef), pointer(count), pointer(invstd), pointer(s1),
                pointer(s2), pointer(dgamma), pointer(k1), pointer(k2))
        return dgamma, s1
    s1, s2 = backward_sums(dy3, x3, side3, mean, (mean, scale, shift), act, acc)
    _lib["bwd_coefficients", acc](c, int(bool(training)), pointer(s1), pointer(s2), pointer(gcoef), pointer(hcoef),
                                  pointer(count), pointer(scale), pointer(invstd), pointer(dgamma), pointer(k1),
                                  pointer(k2))
    backward_apply(dy3, x3, side3, dx3, dside3, (mean, scale, shift), mean, k1, k2, act, acc)
    return dgamma, s1
