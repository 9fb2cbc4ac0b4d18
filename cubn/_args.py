"""Conversions shared by the ops: per-channel parameters and frequency weights."""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _dtypes
from ._backend import is_array
from ._checks import arg_error, describe
from ._memory import readable
from .backends.base import Weights


def channel_param(func, name, value, plan, xp, acc, *, required=False):
    """A per-channel argument as a contiguous (C,) array in ``acc`` (or None).

    Accepts a scalar, a (C,) vector, or any shape holding exactly the kept
    axes (e.g. the keepdims shape ``(1, C, 1, 1)``).
    """
    c = plan.channels
    if value is None:
        if required:
            raise arg_error(ValueError, func, name, f"an array of shape ({c},)", "None")
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return xp.full((c,), value, dtype=acc)
    a = readable(func, name, value) if is_array(value) else np.asarray(value)
    if a.dtype.kind != "f" and not _dtypes.is_supported_float(a.dtype):
        if a.dtype.kind in "iu" and not is_array(value):
            a = a.astype(acc)  # a Python list of ints, e.g. [1, 2, 3]
        else:
            raise arg_error(TypeError, func, name, "a floating-point array", describe(value))
    if a.ndim == 0:
        return xp.full((c,), a.item() if not is_array(value) or xp is np else a, dtype=acc)
    ok = (a.ndim == 1 and a.shape[0] == c) or tuple(a.shape) == plan.keepdims_shape or tuple(a.shape) == plan.stat_shape
    if not ok:
        raise arg_error(
            ValueError, func, name,
            f"one value per channel: shape ({c},) or {plan.keepdims_shape}", f"shape {tuple(a.shape)}",
        )
    if not is_array(value):
        a = xp.asarray(a)
    return xp.ascontiguousarray(a.reshape(c), dtype=acc)


def as_like(func, name, value, x, xp):
    """``value`` as an array of ``x``'s module (lists and scalars converted)."""
    if is_array(value):
        return readable(func, name, value)
    try:
        return xp.asarray(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        raise arg_error(TypeError, func, name, "an array or a number", describe(value)) from None


def refuse_negative(func, name, w):
    """Frequency weights count samples: a negative one has no meaning (and would let a
    merge keep a partial of total weight 0 as if it held a mean), so refuse it.
    On a GPU this reads one flag back to the host."""
    if w.size and w.dtype.kind != "b" and bool((w < 0).any()):
        raise arg_error(ValueError, func, name, "non-negative frequency weights",
                        f"a weight of {float(w.min())}")


def make_weights(func, name, w, x_shape, plan, xp, acc) -> Weights:
    """Frequency weights broadcastable to x -> the cheapest [`Weights`][Weights] form.

    A 1-D vector whose length is ``x.shape[0]`` (and x of rank >= 2) means one
    weight per batch item, like ``batch_weights`` in tf.contrib; any other
    weights broadcast against x by NumPy's trailing-axes rule.
    """
    ndim = len(x_shape)
    if w.dtype.kind not in "fiub" and not _dtypes.is_supported_float(w.dtype):
        raise arg_error(TypeError, func, name, "real-valued weights", describe(w))
    refuse_negative(func, name, w)
    if w.ndim == 1 and ndim >= 2 and w.shape[0] == x_shape[0] and w.shape[0] != 1:
        w = w.reshape((w.shape[0],) + (1,) * (ndim - 1))
    try:
        b = np.broadcast_shapes(tuple(w.shape), tuple(x_shape))
    except ValueError:
        b = None
    if b != tuple(x_shape):
        raise arg_error(
            ValueError, func, name, f"weights broadcastable to x of shape {tuple(x_shape)} (or a [{x_shape[0]}] batch vector)",
            f"shape {tuple(w.shape)}",
        )
    wb = w.reshape((1,) * (ndim - w.ndim) + tuple(w.shape))
    if plan.perm is not None:
        wb = wb.transpose(plan.perm)
    n_outer_axes = plan.outer_axes
    varying = [a for a, n in enumerate(wb.shape) if n != 1]
    if all(a < n_outer_axes for a in varying):
        k = varying[-1] if varying else -1
        lead = plan.shape[: k + 1]
        values = xp.ascontiguousarray(xp.broadcast_to(wb[tuple(slice(None) if i <= k else 0 for i in range(wb.ndim))], lead), dtype=acc).reshape(-1)
        # outer index o = (index over axes <= k) * divisor + (index over the rest)
        divisor = math.prod(plan.shape[k + 1 : n_outer_axes]) if k >= 0 else max(plan.outer, 1)
        return Weights("outer", values, int(divisor))
    full = xp.ascontiguousarray(xp.broadcast_to(wb, plan.shape), dtype=acc)
    return Weights("full", full.reshape(plan.outer, plan.channels, plan.inner))
