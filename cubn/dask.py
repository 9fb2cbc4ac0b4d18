"""Moments and standardization of dask arrays.

A reduction is dask's own ``dask.array.reduction``: every chunk (NumPy or
CuPy) is reduced by cubn to per-feature Welford triples ``(count, mean, M2)``
(float64; on a GPU chunk, cubn's kernels), and dask's tree of ``combine`` /
``aggregate`` tasks merges them with Chan's formula -- the same code that
merges [`cubn.RunningMoments`][cubn.preprocessing.running_moments.RunningMoments] on the host, written once for any array
module. Nothing is ever summed as ``E[x²] − E[x]²``, so large offsets keep
their digits, and the result equals the in-memory one up to rounding
whatever the chunking. The scheduler is whatever dask uses (threads,
processes, a ``distributed`` cluster).

* [`moments`][moments] -- lazy mean and population variance, like ``cubn.moments``.
* [`welford_triple`][welford_triple] -- the lazy float64 triples themselves.
* [`fit_running_moments`][fit_running_moments] -- a [`cubn.RunningMoments`][cubn.preprocessing.running_moments.RunningMoments] of a dask
  array (computed now); ``RunningMoments.update`` and ``Standardizer.fit`` /
  ``partial_fit`` accept dask arrays directly and go through the same path,
  and ``Standardizer.transform`` of a dask array is a lazy ``map_blocks``.

The reductions themselves live in ``cubn.preprocessing.dask_reduction``
(which the preprocessing API calls for dask inputs); this module depends on
the preprocessing package, never the other way.

Inside dask's worker threads the backend follows each chunk's type (NumPy or
CuPy); ``cubn.use_backend`` blocks do not reach them.
"""
from __future__ import annotations

import numpy as np

try:
    import dask  # noqa: F401 - a clear error here rather than in the reduction module
except ImportError as e:  # pragma: no cover - exercised only without dask
    raise ImportError("cubn.dask needs dask: pip install 'cubn[dask]' (dask[array], distributed)") from e

from .preprocessing import image
from .preprocessing.batch_moments import normalize_axes
from .preprocessing.dask_reduction import KEYS, check, mean_of, project, take, triples, var_of, weights_for
from .preprocessing.running_moments import RunningMoments

__all__ = ["moments", "welford_triple", "fit_running_moments"]


def welford_triple(x, axis=None, *, weights=None, keepdims=False, split_every=None):
    """Lazy per-feature Welford triples of a dask array.

    Args:
        x: dask array (NumPy or CuPy chunks) of uint8, uint16, float16,
            bfloat16, float32 or float64.
        axis: the axes reduced (None: all).
        weights: frequency weights broadcastable to ``x`` (dask or NumPy); a
            ``[N]`` vector weighs each item along axis 0.
        keepdims: keep the reduced axes with length 1.
        split_every: fan-in of dask's reduction tree (dask's default if None).

    Returns:
        ``(count, mean, m2)``: lazy float64 dask arrays; ``m2`` is the sum of
        squared deviations, so ``var = m2 / count``.
    """
    func = "cubn.dask.welford_triple"
    check(func, "x", x)
    axes = normalize_axes(func, axis, x.ndim)
    w = weights_for(func, "weights", weights, x)
    t = triples(func, x, axes, w, keepdims, split_every)
    return tuple(project(t, take, np.float64, k) for k in KEYS)


def moments(x, axes, *, weights=None, keepdims=False, split_every=None):
    """Lazy mean and population variance of a dask array, like [`cubn.moments`][cubn.ops.moments.moments].

    One tree reduction of Welford triples computes both (``dask.compute(mean,
    var)`` runs it once). Results have ``x``'s dtype for float inputs and
    float32 for uint8/uint16; a feature with no data gets NaN, one whose
    weights sum to 0 gets mean 0 and variance 0 (as ``cubn.weighted_moments``).

    Args:
        x: dask array (NumPy or CuPy chunks).
        axes: the axes to reduce (an int or a sequence of ints; None: all).
        weights: optional frequency weights broadcastable to ``x`` (a ``[N]``
            vector weighs each item along axis 0), as ``cubn.weighted_moments``.
        keepdims: keep the reduced axes with length 1.
        split_every: fan-in of dask's reduction tree.

    Returns:
        ``(mean, variance)`` as lazy dask arrays.
    """
    func = "cubn.dask.moments"
    check(func, "x", x)
    ax = normalize_axes(func, axes, x.ndim, name="axes")
    w = weights_for(func, "weights", weights, x)
    name = np.dtype(x.dtype).name
    out = np.dtype(x.dtype) if name in image.OUT_DTYPES else np.dtype(np.float32)
    t = triples(func, x, ax, w, keepdims, split_every)
    weighted = w is not None
    return project(t, mean_of, out, out, weighted), project(t, var_of, out, out, weighted)


def fit_running_moments(x, axis=0, *, weights=None, dtype=None):
    """A [`cubn.RunningMoments`][cubn.preprocessing.running_moments.RunningMoments] holding the statistics of dask array ``x`` (computed now).

    Equivalent to ``RunningMoments(axis, dtype=dtype).update(x, weights)``; the
    state lives where the chunks live (NumPy or CuPy), and the accumulator can
    go on with in-memory batches or ``merge`` others.
    """
    func = "cubn.dask.fit_running_moments"
    check(func, "x", x)
    return RunningMoments(axis=axis, dtype=dtype)._update(x, weights, func, "x", "weights")


