"""Fused image normalization, and the kernel orchestration of the preprocessing API.

``normalize_images`` converts, normalizes per channel and changes the layout in
one pass (one kernel launch on the GPU): a uint8 NHWC batch straight from a
decoder becomes a float16/bfloat16/float32 NCHW model input without any
intermediate array.

The arithmetic is defined once, and the NumPy backend, the emulated kernels and
the GPU kernels all perform it with the same two IEEE operations::

    forward:  y = (float(x) - a[c]) / d[c]      a = mean / scale, d = std / scale
    inverse:  y = x * d[c] + a[c]               (the product rounded, never fused)

in float32 (float64 when the input or the output is float64), then rounded once
to the output dtype (a float64 value bound for a 16-bit output is rounded to
float32 first). A division rather than a multiplication by ``1/d`` gives
scikit-learn's ``(x - mean_) / scale_`` and torchvision's ``(x - mean) / std``.
Because no step can be contracted into an FMA, the results are bit-identical
on every backend for integer and 16-bit inputs (and float32 inputs, save
subnormal values, which the GPU flushes to zero).

Orchestration shared by the emulated and the CuPy paths lives here too: both
call :func:`welford_partials`, :func:`affine_map` and the launch helpers with a
``KernelBackend``, so the emulator runs exactly the GPU's launches.
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import numpy as np

from .. import _dtypes
from .._backend import is_array, select, take_dlpack
from .._checks import arg_error, describe
from .._memory import readable
from ..backends.base import Partials
from ..kernels import registry

SOURCE = "preprocess.cu"

# Input dtypes of the preprocessing API (the only part of cubn that takes
# integers), and the outputs its transforms write.
INT_DTYPES = ("uint8", "uint16")
IN_DTYPES = INT_DTYPES + ("float16", "bfloat16", "float32", "float64")
OUT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_CTYPES = {"uint8": "unsigned char", "uint16": "unsigned short", **_dtypes.CTYPES}

TILE_BYTES = 16 * 1024   # shared memory staging one transpose tile
PP_THREADS = 256
RM_MERGE_THREADS = 128


def _itemsize(name: str) -> int:
    return {"uint8": 1, "uint16": 2, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[name]


def compute_dtype(in_name: str, out_name: str) -> np.dtype:
    """float64 when either side is float64, else float32."""
    return np.dtype(np.float64 if "float64" in (in_name, out_name) else np.float32)


def _affine_vec(in_name, out_name) -> int:
    return 16 // max(_itemsize(in_name), _itemsize(out_name))


def _transpose_vec(in_name) -> int:
    return 16 // _itemsize(in_name)


def _transform_pairs():
    """(input, output, inverse) combinations the transform kernels exist for.

    The inverse (``Standardizer.inverse_transform``) maps a float array back to
    the same float dtype.
    """
    out = [(i, o, 0) for i in IN_DTYPES for o in OUT_DTYPES]
    out += [(f, f, 1) for f in OUT_DTYPES]
    return out


def kernel_variants(Variant) -> list:
    """Every variant of preprocess.cu the library may launch (read by the registry)."""
    out = []
    for dt in INT_DTYPES + ("float32",):
        t = _stats_ctype(dt)
        for layout in ("cl", "cf"):
            for wmode in (0, 1, 2):
                # The same vector widths the kernel backend's configuration picks.
                for v in registry.vector_widths(np.dtype(dt)):
                    out.append(Variant(SOURCE, f"cubn_moments_{layout}", (t, str(wmode), str(v))))
    for acc in ("float", "double"):
        out.append(Variant(SOURCE, "cubn_rm_merge", (acc,)))
    for i, o, inv in _transform_pairs():
        ti, to = _CTYPES[i], _CTYPES[o]
        for v in sorted({1, _affine_vec(i, o)}):
            out.append(Variant(SOURCE, "cubn_pp_affine", (ti, to, str(inv), str(v))))
        for ch_q in (0, 1):
            for v in sorted({1, _transpose_vec(i)}):
                out.append(Variant(SOURCE, "cubn_pp_transpose", (ti, to, str(ch_q), str(inv), str(v))))
    return out


@functools.lru_cache(maxsize=None)
def _registered() -> frozenset:
    return frozenset(registry.variants_for_source(SOURCE))


def variant(kernel: str, targs: tuple):
    """A registered preprocess.cu variant (refuses anything the NVRTC test does not compile)."""
    v = registry.Variant(SOURCE, kernel, tuple(targs))
    if v not in _registered():
        raise KeyError(f"kernel variant {v.name_expression} ({SOURCE}) is not registered")
    return v


def ctype(dtype) -> str:
    return _CTYPES[np.dtype(dtype).name]


def _stats_ctype(name: str) -> str:
    # float32 statistics kernels here are the double-accumulator ones (see preprocess.cu).
    return "cubn_f32_wide" if name == "float32" else _CTYPES[name]


def stats_acc(dtype) -> np.dtype:
    """Accumulation dtype of the preprocessing statistics.

    float64 for float32 and float64 data (a float32 partial mean is good to
    only ulp(|mean|)/2, which merges of many batches turn into variance
    errors of ~1e-4 at |mean|/std ~ 1e4; scikit-learn also accumulates
    float32 in float64); float32 for 8- and 16-bit data, whose values and
    means float32 holds closely enough.
    """
    return np.dtype(np.float64 if np.dtype(dtype).name in ("float32", "float64") else np.float32)


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------
def _dtype_names() -> str:
    return ", ".join(n for n in IN_DTYPES if n != "bfloat16" or _dtypes.bfloat16 is not None)


def check_input(func: str, name: str, x) -> None:
    """``x`` must be an array (numpy or cupy) of a preprocessing input dtype."""
    if not is_array(x):
        raise arg_error(TypeError, func, name, "a numpy.ndarray or cupy.ndarray", describe(x))
    if np.dtype(x.dtype).name not in IN_DTYPES:
        raise arg_error(TypeError, func, name, f"an array of dtype {_dtype_names()}", f"dtype {np.dtype(x.dtype).name}")


def check_out_dtype(func: str, name: str, value) -> np.dtype:
    """A transform output dtype: float16, bfloat16, float32 or float64."""
    try:
        bf16 = isinstance(value, str) and value == "bfloat16" and _dtypes.bfloat16 is not None
        dt = np.dtype(_dtypes.bfloat16 if bf16 else value)
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt.name not in OUT_DTYPES:
        names = ", ".join(repr(n) for n in OUT_DTYPES if n != "bfloat16" or _dtypes.bfloat16 is not None)
        raise arg_error(ValueError, func, name, f"one of {names}", repr(value))
    return dt


_LAST = {"NHWC": 4, "NDHWC": 5, "NWC": 3, "NC": 2}
_FIRST = {"NCHW": 4, "NCDHW": 5, "NCW": 3}
FORMATS = ("NHWC", "NCHW", "NDHWC", "NCDHW")


def channels_last(func: str, name: str, fmt, ndim: int) -> bool:
    """Whether ``fmt`` (a data_format string) puts channels last, for a rank-``ndim`` input."""
    f = fmt.upper() if isinstance(fmt, str) else None
    if f not in _LAST and f not in _FIRST:
        raise arg_error(ValueError, func, name, "one of " + ", ".join(repr(d) for d in FORMATS), repr(fmt))
    if f in ("NDHWC", "NCDHW") and ndim != 5:
        raise arg_error(ValueError, func, name, f"{f!r} with a rank-5 input", f"rank {ndim}")
    return ndim == 2 or f in _LAST


# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How a transform reads its input and writes its output.

    ``in_last``/``out_last``: channels on the last axis (else on axis 1). The
    same layout is an elementwise pass over the (outer, C, inner) view; a
    change of layout transposes each (P, Q) matrix of a (B, P, Q) view, the
    channel being q (``ch_q``, channels last in) or p (channels first in).
    """

    shape_in: tuple
    shape_out: tuple
    channels: int
    in_last: bool
    out_last: bool
    outer: int
    inner: int
    B: int = 0
    P: int = 0
    Q: int = 0

    @property
    def transpose(self) -> bool:
        # One channel or one pixel per item: both layouts are the same bytes.
        return self.in_last != self.out_last and self.P > 1 and self.Q > 1

    @property
    def ch_q(self) -> int:
        return 1 if self.in_last else 0


def make_layout(func, shape, in_last: bool, out_last: bool, name="x") -> Layout:
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if not 2 <= ndim <= 5:
        raise arg_error(ValueError, func, name, "a tensor of rank 2 to 5", f"shape {shape} (rank {ndim})")
    if ndim == 2:
        in_last = out_last = True  # (N, C): one layout
    ax = ndim - 1 if in_last else 1
    c = shape[ax]
    spatial = shape[1:-1] if in_last else shape[2:]
    s = int(np.prod(spatial, dtype=np.int64)) if spatial else 1
    n = shape[0]
    if in_last:
        outer, inner = n * s, 1
    else:
        outer, inner = n, s
    if in_last == out_last:
        return Layout(shape, shape, c, in_last, out_last, outer, inner)
    if in_last:  # (N, S, C) -> (N, C, S)
        out_shape = (n, c) + spatial
        return Layout(shape, out_shape, c, True, False, outer, inner, n, s, c)
    out_shape = (n,) + spatial + (c,)  # (N, C, S) -> (N, S, C)
    return Layout(shape, out_shape, c, False, True, outer, inner, n, c, s)


# ---------------------------------------------------------------------------
# Per-channel coefficients
# ---------------------------------------------------------------------------
def per_channel(func, name, value, c, xp, x=None):
    """A scalar or a (C,) vector (list, tuple or array) as a float64 (C,) array of ``xp``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return xp.full((c,), float(value), dtype=np.float64)
    if is_array(value):
        a = readable(func, name, value)
    else:
        try:
            a = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise arg_error(TypeError, func, name, "a number or one number per channel", describe(value)) from None
    if a.dtype.kind not in "fiu" and not _dtypes.is_supported_float(a.dtype):
        raise arg_error(TypeError, func, name, "real numbers", describe(value))
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1 or a.shape[0] not in (1, c):
        raise arg_error(ValueError, func, name, f"a number or {c} values (one per channel)", f"shape {tuple(a.shape)}")
    if not is_array(value):
        a = xp.asarray(a)
    return xp.ascontiguousarray(xp.broadcast_to(a.astype(np.float64), (c,)))


# ---------------------------------------------------------------------------
# Statistics of integer inputs on the kernel backends
# ---------------------------------------------------------------------------
def welford_partials(backend, plan, x3, acc, weights=None) -> Partials:
    """``backend.welford_partials`` with ``acc`` = :func:`stats_acc`, for every input dtype.

    Inputs whose accumulator the backend's own primitive already uses
    (16-bit floats, float64) go to it (moments.cu). uint8/uint16 inputs, and
    float32 inputs with float64 partials, launch moments.cu's kernels
    instantiated for them in preprocess.cu, with the backend's own launch
    configuration (``KernelBackend.welford_partials`` with its ``kernel`` hook). The NumPy backend converts rows to ``acc`` for every dtype.
    """
    own = x3.dtype.kind not in "ui" and not (x3.dtype == np.float32 and acc == np.float64)
    if backend.name == "numpy":
        if acc == np.float64 and weights is None and plan.channels_last and x3.shape[0] > 0:
            return _numpy_columns_f64(x3)
        return backend.welford_partials(plan, x3, acc, weights)
    if own:
        return backend.welford_partials(plan, x3, acc, weights)
    t = _stats_ctype(x3.dtype.name)
    return backend.welford_partials(
        plan, x3, acc, weights,
        kernel=lambda layout, wmode, vec: variant(f"cubn_moments_{layout}", (t, str(wmode), str(vec))))


def _numpy_columns_f64(x3) -> Partials:
    """Two-pass float64 statistics of the columns of an (N, C) matrix, without transposing it.

    The NumPy backend's primitive copies the data into per-channel rows first
    (for pairwise sums in the accumulation dtype); in float64 plain column
    sums are accurate enough (n·eps ~ 1e-10 at n = 1e6), and skipping the
    copy halves the memory traffic of ``Standardizer.fit`` on the CPU.
    """
    xr = x3.reshape(x3.shape[0], x3.shape[1])
    n = xr.shape[0]
    with np.errstate(invalid="ignore", over="ignore"):
        mean = np.add.reduce(xr, axis=0, dtype=np.float64) / n
        d = np.subtract(xr, mean, dtype=np.float64)
        m2 = np.einsum("ij,ij->j", d, d)
    return Partials(np.full((1, xr.shape[1]), float(n)), mean[None, :], m2[None, :], 1)


# ---------------------------------------------------------------------------
# The fused transform
# ---------------------------------------------------------------------------
def _ptr(a) -> int:
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return a.data.ptr


def _aligned(nbytes, *arrays) -> bool:
    return all(_ptr(a) % nbytes == 0 for a in arrays)


def _tile(P: int, Q: int, A_size: int) -> tuple:
    """(TP, TQ) of a transpose tile that fits TILE_BYTES of staged values."""
    budget = TILE_BYTES // A_size
    if Q <= 32:  # a few channels of many pixels: whole rows
        return max(32, (budget // (Q | 1)) // 32 * 32), Q
    if P <= 32:  # a few channels, each a long run of pixels
        tq = max(32, ((budget // P) - 1) // 32 * 32)
        return P, min(tq, Q)
    return max(32, (budget // 33) // 32 * 32), 32


def affine_map(backend, x, lay: Layout, a, d, out_dtype, inverse: bool):
    """``y = (x - a[c]) / d[c]`` (or ``x * d[c] + a[c]``) in ``lay``'s output layout.

    ``a`` and ``d`` are contiguous (C,) arrays in :func:`compute_dtype`.
    One kernel launch on a kernel backend; vectorized NumPy otherwise.
    """
    xp = backend.xp
    out_dtype = np.dtype(out_dtype)
    A = compute_dtype(x.dtype.name, out_dtype.name)
    if backend.name == "numpy":
        return _numpy_affine(x, lay, a, d, A, out_dtype, inverse)
    if not x.flags.c_contiguous:
        x = xp.ascontiguousarray(x)
    y = xp.empty(lay.shape_out, out_dtype)
    n = x.size
    if n == 0:
        return y
    ti, to, inv = ctype(x.dtype), ctype(out_dtype), str(int(inverse))
    if not lay.transpose:
        vmax = _affine_vec(x.dtype.name, out_dtype.name)
        vec = vmax if _aligned(vmax * x.dtype.itemsize, x) and _aligned(vmax * out_dtype.itemsize, y) else 1
        grid, block = backend._elementwise_grid(n, vec)
        backend._launch(
            variant("cubn_pp_affine", (ti, to, inv, str(vec))), grid, block, 0,
            (x, y, np.int64(n), np.int32(lay.channels), np.int64(lay.inner), a, d),
        )
        return y
    B, P, Q = lay.B, lay.P, lay.Q
    tp, tq = _tile(P, Q, A.itemsize)
    vmax = _transpose_vec(x.dtype.name)
    if tq == Q:
        fits = (P * Q) % vmax == 0 and (tp * Q) % vmax == 0
    else:
        fits = Q % vmax == 0 and tq % vmax == 0
    vec = vmax if fits and _aligned(vmax * x.dtype.itemsize, x) else 1
    ntiles = B * (-(-P // tp)) * (-(-Q // tq))
    grid = (max(1, min(ntiles, backend.info.multiprocessor_count * 8 * 4)), 1, 1)
    shared = tp * (tq | 1) * A.itemsize
    backend._launch(
        variant("cubn_pp_transpose", (ti, to, str(lay.ch_q), inv, str(vec))), grid, (PP_THREADS, 1, 1), shared,
        (x, y, np.int64(B), np.int64(P), np.int32(Q), np.int32(tp), np.int32(tq), a, d),
    )
    return y


def _numpy_affine(x, lay, a, d, A, out_dtype, inverse):
    """The reference arithmetic, vectorized: the kernels' exact operations."""
    x3 = np.ascontiguousarray(x).reshape(lay.outer, lay.channels, lay.inner)
    ab = np.asarray(a, A)[None, :, None]
    db = np.asarray(d, A)[None, :, None]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore", under="ignore"):
        # One temporary in A; the ufuncs convert x exactly, as astype(A) would.
        if inverse:
            y = np.multiply(x3, db, dtype=A)
            y += ab
        else:
            y = np.subtract(x3, ab, dtype=A)
            y /= db
        if A == np.float64 and out_dtype.itemsize == 2:
            y = y.astype(np.float32)  # 16-bit outputs round from float32, as in the kernels
        y = y.astype(out_dtype, copy=False)
    if lay.in_last != lay.out_last:
        if lay.in_last:  # (N*S, C, 1) -> (N, S, C) -> (N, C, S)
            y = y.reshape(lay.shape_in[0], -1, lay.channels).transpose(0, 2, 1)
        else:  # (N, C, S) -> (N, S, C)
            y = y.transpose(0, 2, 1)
        y = np.ascontiguousarray(y)
    return y.reshape(lay.shape_out)


# ---------------------------------------------------------------------------
# Public: normalize_images
# ---------------------------------------------------------------------------
def normalize_images(images, mean, std, *, scale=1.0, out_dtype="float32", data_format="NHWC", out_format="NCHW"):
    """Convert, normalize per channel and change layout in one pass.

    ``y = (images * scale - mean) / std`` per channel, computed as
    ``(images - mean / scale) / (std / scale)`` in float32 (float64 when the
    input or the output is float64) and rounded once to ``out_dtype``; the
    result is bit-identical on the NumPy, emulated and CuPy backends for
    integer and 16-bit inputs. One kernel launch on the GPU.

    Args:
        images: uint8, uint16, float16, bfloat16, float32 or float64 array
            (numpy or cupy) of rank 2 to 5, e.g. a ``(N, H, W, C)`` batch.
        mean: per-channel mean, a number or C numbers, in the units of
            ``images * scale`` (e.g. ImageNet's ``(0.485, 0.456, 0.406)``
            with ``scale=1/255``).
        std: per-channel standard deviation, likewise; must not be 0.
        scale: multiplies the raw values first (``1/255`` maps uint8 to
            [0, 1] as torchvision's ``ToTensor`` does); default 1.
        out_dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` (default) or
            ``"float64"``.
        data_format: layout of ``images``: ``"NHWC"`` (default; channels
            last, any rank) or ``"NCHW"`` (channels on axis 1); ``"NDHWC"``/
            ``"NCDHW"`` for rank 5.
        out_format: layout of the result, ``"NCHW"`` (default, what PyTorch
            models take) or ``"NHWC"``; None keeps ``data_format``.

    Returns:
        A new array on the input's device, in ``out_format`` and ``out_dtype``.
    """
    func = "normalize_images"
    images, mean, std = take_dlpack(func, images=images, mean=mean, std=std)
    check_input(func, "images", images)
    images = readable(func, "images", images)
    ndim = images.ndim
    if not 2 <= ndim <= 5:
        raise arg_error(ValueError, func, "images", "a tensor of rank 2 to 5",
                        f"shape {tuple(images.shape)} (rank {ndim})")
    in_last = channels_last(func, "data_format", data_format, ndim)
    out_last = in_last if out_format is None else channels_last(func, "out_format", out_format, ndim)
    odt = check_out_dtype(func, "out_dtype", out_dtype)
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise arg_error(TypeError, func, "scale", "a positive number", describe(scale)) from None
    if not (np.isfinite(s) and s > 0):
        raise arg_error(ValueError, func, "scale", "a finite number > 0", repr(scale))
    backend = select(func, "images", images, mean=mean if is_array(mean) else None, std=std if is_array(std) else None)
    xp = backend.xp
    lay = make_layout(func, images.shape, in_last, out_last, name="images")
    if lay.channels == 0:
        raise arg_error(ValueError, func, "images", "a channel dimension of size >= 1", f"shape {tuple(images.shape)}")
    m = per_channel(func, "mean", mean, lay.channels, xp)
    sd = per_channel(func, "std", std, lay.channels, xp)
    if not is_array(std) and bool(np.any(np.asarray(std, dtype=np.float64) == 0)):
        raise arg_error(ValueError, func, "std", "nonzero standard deviations", repr(std))
    A = compute_dtype(images.dtype.name, odt.name)
    a = xp.ascontiguousarray((m / s).astype(A))
    d = xp.ascontiguousarray((sd / s).astype(A))
    return affine_map(backend, images, lay, a, d, odt, inverse=False)
