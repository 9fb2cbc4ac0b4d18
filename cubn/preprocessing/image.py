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

The arithmetic itself is the backends' ``affine_map`` / ``affine_transpose``
primitives (``backends/numpy_preprocessing.py``, ``backends/kernel_preprocessing.py``);
this module checks arguments, builds the layout and picks the primitive.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from .. import _dtypes
from .._backend import is_array, select, take_dlpack
from .._checks import arg_error, describe
from .._memory import readable

# Input dtypes of the preprocessing API (the only part of cubn that takes
# integers), and the outputs its transforms write.
INT_DTYPES = _dtypes.INT_INPUT_NAMES
IN_DTYPES = _dtypes.PREPROCESSING_INPUT_NAMES
OUT_DTYPES = _dtypes.PREPROCESSING_OUTPUT_NAMES


compute_dtype = _dtypes.compute_dtype  # the transforms' arithmetic: float64 when either side is float64


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------
def _dtype_names() -> str:
    return ", ".join(_dtypes.available(IN_DTYPES))


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
        names = ", ".join(repr(n) for n in _dtypes.available(OUT_DTYPES))
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
# The fused transform
# ---------------------------------------------------------------------------
def affine_map(backend, x, lay: Layout, a, d, out_dtype, inverse: bool):
    """``y = (x - a[c]) / d[c]`` (or ``x * d[c] + a[c]``) in ``lay``'s output layout.

    ``a`` and ``d`` are (C,) arrays (converted to [`compute_dtype`][compute_dtype]).
    One kernel launch on a kernel backend: the backend's ``affine_map``
    primitive in place, or ``affine_transpose`` when the layout changes.
    """
    xp = backend.xp
    out_dtype = np.dtype(out_dtype)
    A = compute_dtype(_dtypes.name_of(x.dtype), out_dtype.name)
    a, d = xp.ascontiguousarray(a, dtype=A), xp.ascontiguousarray(d, dtype=A)
    x = xp.ascontiguousarray(x)
    if lay.transpose:
        y = backend.affine_transpose(x.reshape(lay.B, lay.P, lay.Q), lay.ch_q, a, d, out_dtype, inverse)
    else:  # the same layout, or one whose change moves no byte (one channel or one pixel per item)
        y = backend.affine_map(x.reshape(lay.outer, lay.channels, lay.inner), a, d, out_dtype, inverse)
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
