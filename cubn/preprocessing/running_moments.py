"""Streaming, mergeable per-feature statistics: [`RunningMoments`][RunningMoments].

The state is one Welford triple per kept element, ``(count, mean, M2)``, kept
in float64 whatever the data's dtype (so counts stay exact to 2**53 and a long
stream does not drift). A batch is reduced to its own triples (partials in
float64 for float32/float64 data, in float32 for 8- and 16-bit data: see
``cubn._dtypes.stats_acc``) and merged into the state with Chan et al.'s pairwise
formula; two accumulators merge the same way, so any split of the data into
batches, in any order, and any tree of merges gives the same statistics up to
rounding.

An update is two backend primitives, ``input_partials`` and
``merge_into_state``: on a kernel backend (CuPy, emulated) two launches that
never read a device value back on the host -- moments.cu's Welford partials,
then ``cubn_rm_merge`` (preprocess.cu), which merges the partials and folds
them into the state in place.
"""
from __future__ import annotations

import copy as _copy

import numpy as np

from .._backend import array_module, select, take_dlpack
from .._checks import arg_error, describe
from .._memory import readable_all
from .._welford import mean_or_nan, variance
from . import image
from .batch_moments import Batch, check_axis_type, is_dask_array, merge_triples_into, normalize_axes, result_dtype

__all__ = ["RunningMoments", "is_dask_array", "normalize_axes", "result_dtype"]


class RunningMoments:
    """Streaming mean and variance over batches, mergeable across accumulators.

    ``rm = RunningMoments(axis=0)``; ``rm.update(batch)`` for each batch;
    ``rm.mean``, ``rm.var`` (population variance), ``rm.std``, ``rm.count``.
    The statistics are those of all batches concatenated along the reduced
    axes, whatever the split, the order, or the tree of ``merge`` calls
    (Welford within a batch, Chan's formula between batches), up to rounding.

    The state lives where the first batch lives (NumPy or a CUDA device);
    a later batch on the other side is a ``TypeError``, never a silent copy.
    On the GPU an update is two kernel launches on device arrays and no host
    synchronization (the Welford partials of the batch, then one launch that
    merges them into the state in place).

    Args:
        axis: the axes reduced over (None: all). Statistics have the shape of
            the other axes, which every batch must share; the reduced axes may
            differ in length from batch to batch. Default 0: rows of a
            ``(samples, features)`` matrix.
        dtype: dtype of ``mean``/``var``/``std`` (a float dtype). Default:
            float64 for float64 data, float32 otherwise. The state itself is
            always float64.

    Batches may be uint8, uint16, float16, bfloat16, float32 or float64 arrays
    (numpy or cupy), or dask arrays (reduced by [`cubn.dask`][cubn.dask]). NaN is not
    treated as missing: it propagates to its feature's statistics.
    """

    def __init__(self, axis=0, *, dtype=None):
        check_axis_type("RunningMoments", axis)  # ranges are checked against the first batch's rank
        self.axis = axis
        self.dtype = None if dtype is None else image.check_out_dtype("RunningMoments", "dtype", dtype)
        self.reset()

    def reset(self):
        """Forget every batch (and the shape and device of the first)."""
        self._state = None       # (3, C) float64: count, mean, M2
        self._axes = None        # normalized reduced axes
        self._ndim = None
        self._stat_shape = None
        self._result_dtype = None         # default dtype of the results
        return self

    # -- updating ---------------------------------------------------------
    def update(self, batch, weights=None):
        """Add a batch (``weights``: frequency weights broadcastable to it; a
        ``[N]`` vector weighs each item of the batch). Returns ``self``."""
        return self._update(batch, weights, "RunningMoments.update", "batch", "weights")

    def _update(self, x, weights, func, xname, wname):
        x, weights = take_dlpack(func, **{xname: x, wname: weights})
        if is_dask_array(x) or is_dask_array(weights):
            from .dask_reduction import computed_triple  # imports dask: only for dask inputs

            if not is_dask_array(x):
                raise arg_error(TypeError, func, xname, "a dask array when the weights are one", describe(x))
            axes = self._axes_for(func, x.ndim)
            stat_shape = tuple(x.shape[a] for a in range(x.ndim) if a not in axes)
            self._check_shape(func, xname, x.ndim, stat_shape)
            count, mean, m2 = computed_triple(func, xname, wname, x, axes, weights)
            self._merge_triple(func, xname, x.ndim, axes, stat_shape, result_dtype(x.dtype), count, mean, m2)
            return self
        image.check_input(func, xname, x)
        x, weights = readable_all(func, **{xname: x, wname: weights})
        axes = self._axes_for(func, x.ndim)
        stat_shape = tuple(x.shape[a] for a in range(x.ndim) if a not in axes)
        self._check_shape(func, xname, x.ndim, stat_shape)
        batch = Batch(func, xname, wname, x, axes, weights, self._state)
        if self._state is None:
            self._init(batch.backend.xp, x.ndim, axes, batch.plan.stat_shape, result_dtype(x.dtype))
        batch.fold_into(self._state)
        return self

    def _axes_for(self, func, ndim):
        return normalize_axes(func, self.axis, ndim)

    def _check_shape(self, func, xname, ndim, stat_shape):
        if self._state is None:
            return
        if ndim != self._ndim or tuple(stat_shape) != self._stat_shape:
            raise arg_error(
                ValueError, func, xname,
                f"a rank-{self._ndim} batch whose kept axes have shape {self._stat_shape} (as the first batch's)",
                f"rank {ndim} with kept shape {tuple(stat_shape)}",
            )

    def _init(self, xp, ndim, axes, stat_shape, result):
        c = int(np.prod(stat_shape, dtype=np.int64)) if stat_shape else 1
        self._state = xp.zeros((3, c), np.float64)
        self._ndim, self._axes, self._stat_shape = ndim, tuple(axes), tuple(stat_shape)
        self._result_dtype = np.dtype(result)

    def _merge_triple(self, func, xname, ndim, axes, stat_shape, result, count, mean, m2):
        """Merge float64 triples of shape ``stat_shape`` (computed elsewhere, e.g. by dask)."""
        self._check_shape(func, xname, ndim, stat_shape)
        others = {"running state (from the first batch)": self._state} if self._state is not None else {}
        backend = select(func, xname + " (computed)", count, **others)
        if self._state is None:
            self._init(backend.xp, ndim, axes, stat_shape, result)
        xp = backend.xp
        flat = [xp.ascontiguousarray(xp.asarray(a, dtype=np.float64).reshape(-1)) for a in (count, mean, m2)]
        if flat[0].size:
            merge_triples_into(backend, self._state, *flat)

    def merge(self, other):
        """Merge another accumulator (same axes and statistic shape, same side) into this one. Returns ``self``."""
        func = "RunningMoments.merge"
        if not isinstance(other, RunningMoments):
            raise arg_error(TypeError, func, "other", "a RunningMoments", describe(other))
        if other._state is None:
            return self
        if self._axes_for(func, other._ndim) != other._axes:
            raise arg_error(ValueError, func, "other", f"an accumulator over axes {self._axes_for(func, other._ndim)}",
                            f"axes {other._axes}")
        if self._state is None:
            self._ndim, self._axes, self._stat_shape = other._ndim, other._axes, other._stat_shape
            self._result_dtype = other._result_dtype
            self._state = other._state.copy()
            return self
        if other._stat_shape != self._stat_shape:
            raise arg_error(ValueError, func, "other", f"statistics of shape {self._stat_shape}",
                            f"shape {other._stat_shape}")
        backend = select(func, "self", self._state, other=other._state)
        src = other._state.copy() if other is self else other._state
        if self._state.shape[1]:
            merge_triples_into(backend, self._state, src[0], src[1], src[2])
        return self

    def copy(self):
        """An independent accumulator with the same state."""
        return _copy.deepcopy(self)

    # -- results ------------------------------------------------------------
    @property
    def shape(self):
        """Shape of the statistics (None before the first batch)."""
        return self._stat_shape

    def _out(self, a):
        return a.astype(self.dtype or self._result_dtype).reshape(self._stat_shape)

    @property
    def count(self):
        """Samples (sum of weights) seen per statistic, float64; 0 before the first batch."""
        if self._state is None:
            return 0
        return self._state[0].copy().reshape(self._stat_shape)

    @property
    def mean(self):
        """Mean per statistic (NaN where nothing was seen); None before the first batch."""
        if self._state is None:
            return None
        return self._out(mean_or_nan(self._state[0], self._state[1]))

    def _var64(self):
        return variance(self._state[0], self._state[2])

    @property
    def var(self):
        """Population variance (ddof 0) per statistic; None before the first batch."""
        if self._state is None:
            return None
        return self._out(self._var64())

    @property
    def std(self):
        """Square root of [`var`][var]; None before the first batch."""
        if self._state is None:
            return None
        return self._out(array_module(self._state).sqrt(self._var64()))

    def triple(self):
        """The float64 state ``(count, mean, M2)`` (copies), each of shape [`shape`][shape]."""
        if self._state is None:
            return None
        return tuple(self._state[i].copy().reshape(self._stat_shape) for i in range(3))

    def __repr__(self):
        return f"RunningMoments(axis={self.axis!r}, shape={self._stat_shape})"
