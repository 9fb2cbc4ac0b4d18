"""One in-memory batch into a float64 Welford state: what RunningMoments and
the dask reductions (``dask_reduction.py``) both do, below both of them.

A state is a ``(3, C)`` float64 array (count, mean, M2 per kept element).
A batch is reduced by the backend's ``input_partials`` and folded in by its
``merge_into_state``: two kernel launches on a kernel backend, no host
synchronization.
"""
from __future__ import annotations

import operator

import numpy as np

from .. import _dtypes
from .._args import as_like, make_weights
from .._backend import is_array, select
from .._checks import arg_error
from .._plan import plan_for_kept_axes
from ..backends.base import Partials
from . import image


def is_dask_array(a) -> bool:
    # By module name, so that NumPy/CuPy calls never import dask.
    return type(a).__module__.split(".")[0] == "dask" and hasattr(a, "chunks")


def result_dtype(dtype) -> np.dtype:
    """Default dtype of the statistics of a batch: float64 for float64 data, float32 otherwise."""
    return np.dtype(np.float64 if _dtypes.name_of(dtype) == "float64" else np.float32)


def check_axis_type(func, axis):
    if axis is None:
        return
    items = (axis,) if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) else axis
    try:
        [operator.index(a) for a in items]
    except TypeError:
        raise arg_error(TypeError, func, "axis", "None, an int or a sequence of ints", repr(axis)) from None


def normalize_axes(func, axis, ndim, name="axis") -> tuple:
    """``axis`` (None, an int or a sequence of ints) as sorted non-negative axes of a rank-``ndim`` array."""
    if axis is None:
        return tuple(range(ndim))
    items = (axis,) if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) else axis
    try:
        axes = [operator.index(a) for a in items]
    except TypeError:
        raise arg_error(TypeError, func, name, "None, an int or a sequence of ints", repr(axis)) from None
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise arg_error(ValueError, func, name, f"axes in [-{ndim}, {ndim}) for a rank-{ndim} array", repr(axis))
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise arg_error(ValueError, func, name, "no repeated axis", repr(axis))
    return tuple(sorted(out))


class Batch:
    """One checked in-memory batch: its backend, plan, accumulation dtype and weights."""

    def __init__(self, func, xname, wname, x, axes, weights, state=None):
        """Check ``x`` (a preprocessing input) and ``weights`` against each other and ``state``'s side."""
        image.check_input(func, xname, x)
        self.x = x
        self.plan = plan_for_kept_axes(x.shape, tuple(a for a in range(x.ndim) if a not in axes))
        others = {wname: weights} if is_array(weights) else {}
        if state is not None:
            others["running state (from the first batch)"] = state
        self.backend = select(func, xname, x, **others)
        self.acc = _dtypes.stats_acc(x.dtype)
        self.weights = None
        if weights is not None:
            wa = as_like(func, wname, weights, x, self.backend.xp)
            if self.plan.size > 0:
                self.weights = make_weights(func, wname, wa, x.shape, self.plan, self.backend.xp, self.acc)

    def fold_into(self, state) -> None:
        """Merge the batch's statistics into ``state`` ((3, C) float64), in place."""
        if self.plan.size > 0:
            b = self.backend
            partials = b.input_partials(self.plan, self.plan.view3(self.x), self.acc, self.weights)
            b.merge_into_state(partials, self.acc, state)

    def state(self):
        """A new state holding this batch alone."""
        s = self.backend.xp.zeros((3, self.plan.channels), np.float64)
        self.fold_into(s)
        return s


def merge_triples_into(backend, state, count, mean, m2) -> None:
    """``state`` merged with float64 (C,) triples (another accumulator's state)."""
    C = state.shape[1]
    p = Partials(count.reshape(1, C), mean.reshape(1, C), m2.reshape(1, C), 1)
    backend.merge_into_state(p, np.dtype(np.float64), state)
