"""Moments and standardization of dask arrays.

A reduction is dask's own ``dask.array.reduction``: every chunk (NumPy or
CuPy) is reduced by cubn to per-feature Welford triples ``(count, mean, M2)``
(float64; on a GPU chunk, cubn's kernels), and dask's tree of ``combine`` /
``aggregate`` tasks merges them with Chan's formula -- the same code that
merges :class:`cubn.RunningMoments` on the host, written once for any array
module. Nothing is ever summed as ``E[x²] − E[x]²``, so large offsets keep
their digits, and the result equals the in-memory one up to rounding
whatever the chunking. The scheduler is whatever dask uses (threads,
processes, a ``distributed`` cluster).

* :func:`moments` -- lazy mean and population variance, like ``cubn.moments``.
* :func:`welford_triple` -- the lazy float64 triples themselves.
* :func:`fit_running_moments` -- a :class:`cubn.RunningMoments` of a dask
  array (computed now); ``RunningMoments.update`` and ``Standardizer.fit`` /
  ``partial_fit`` accept dask arrays directly and go through the same path,
  and ``Standardizer.transform`` of a dask array is a lazy ``map_blocks``.

Inside dask's worker threads the backend follows each chunk's type (NumPy or
CuPy); ``cubn.use_backend`` blocks do not reach them.
"""
from __future__ import annotations

import functools

import numpy as np

try:
    import dask
    import dask.array as da
    from dask.array.utils import meta_from_array
except ImportError as e:  # pragma: no cover - exercised only without dask
    raise ImportError("cubn.dask needs dask: pip install 'cubn[dask]' (dask[array], distributed)") from e

from ._backend import array_module, select
from ._checks import arg_error, describe
from ._memory import readable
from .preprocessing import image
from ._welford import tree_merge
from .preprocessing.running_moments import RunningMoments, normalize_axes

__all__ = ["moments", "welford_triple", "fit_running_moments"]

_KEYS = ("count", "mean", "m2")


# ---------------------------------------------------------------------------
# The three functions of the reduction (module level: picklable for workers)
# ---------------------------------------------------------------------------
def _chunk(x, weights=None, axis=None, keepdims=True, computing_meta=False):
    """One chunk -> a dict of float64 triples in the keepdims shape."""
    if computing_meta:  # dask probing the output type with empty arrays
        return x
    rm = RunningMoments(axis=axis)
    rm.update(x, weights)
    shape = tuple(1 if i in axis else n for i, n in enumerate(x.shape))
    return {k: rm._state[i].reshape(shape) for i, k in enumerate(_KEYS)}


def _flatten(parts):
    if isinstance(parts, (list, tuple)):
        return [p for q in parts for p in _flatten(q)]
    return [parts]


def _merge(parts):
    ps = _flatten(parts)
    if len(ps) == 1:
        return ps[0]
    xp = array_module(ps[0]["count"])
    merged = tree_merge(*(xp.stack([p[k] for p in ps]) for k in _KEYS))
    return dict(zip(_KEYS, merged))


def _combine(parts, axis=None, keepdims=True, computing_meta=False):
    if computing_meta:
        return parts
    return _merge(parts)


def _aggregate(parts, axis=None, keepdims=False, computing_meta=False):
    if computing_meta:
        return parts
    out = _merge(parts)
    if not keepdims:
        out = {k: v.squeeze(axis=tuple(axis)) for k, v in out.items()}
    return out


def _take(d, key):
    return d[key]


def _mean_of(d, dtype):
    xp = array_module(d["count"])
    return xp.where(d["count"] > 0, d["mean"], np.nan).astype(dtype)


def _var_of(d, dtype):
    xp = array_module(d["count"])
    n = d["count"]
    live = n > 0
    with np.errstate(all="ignore"):
        return xp.where(live, xp.maximum(d["m2"], 0) / xp.where(live, n, 1), np.nan).astype(dtype)


# ---------------------------------------------------------------------------
# Building the graph
# ---------------------------------------------------------------------------
def _check(func, name, x):
    if not isinstance(x, da.Array):
        raise arg_error(TypeError, func, name, "a dask.array.Array", describe(x))
    if np.dtype(x.dtype).name not in image.IN_DTYPES:
        raise arg_error(TypeError, func, name, f"a dask array of dtype {image._dtype_names()}",
                        f"dtype {np.dtype(x.dtype).name}")


def _weights(func, name, w, x):
    """Weights broadcastable to x; a [N] vector weighs each item of the batch (as weighted_moments)."""
    if w is None:
        return None
    if not isinstance(w, da.Array):
        if not hasattr(w, "shape"):
            w = np.asarray(w, dtype=np.float64)
    if w.ndim == 1 and x.ndim >= 2 and w.shape[0] == x.shape[0] and w.shape[0] != 1:
        w = w.reshape((w.shape[0],) + (1,) * (x.ndim - 1))
    try:
        b = np.broadcast_shapes(tuple(w.shape), tuple(x.shape))
    except ValueError:
        b = None
    if b != tuple(x.shape):
        raise arg_error(ValueError, func, name, f"weights broadcastable to x of shape {tuple(x.shape)}",
                        f"shape {tuple(w.shape)}")
    return w


def _triples(func, x, axes, weights, keepdims, split_every):
    """The lazy reduction: a dask array whose blocks are dicts of float64 triples."""
    out_ndim = x.ndim if keepdims else x.ndim - len(axes)
    return da.reduction(
        x, _chunk, _aggregate, combine=_combine, axis=axes, keepdims=keepdims, dtype=np.float64,
        split_every=split_every, concatenate=False, name="cubn-welford",
        meta=meta_from_array(x._meta, ndim=out_ndim, dtype=np.float64), weights=weights,
    )


def _project(t, fn, dtype, *args):
    return t.map_blocks(fn, *args, dtype=dtype, meta=meta_from_array(t._meta, ndim=t.ndim, dtype=dtype))


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
    _check(func, "x", x)
    axes = normalize_axes(func, axis, x.ndim)
    w = _weights(func, "weights", weights, x)
    t = _triples(func, x, axes, w, keepdims, split_every)
    return tuple(_project(t, _take, np.float64, k) for k in _KEYS)


def moments(x, axes, *, weights=None, keepdims=False, split_every=None):
    """Lazy mean and population variance of a dask array, like :func:`cubn.moments`.

    One tree reduction of Welford triples computes both (``dask.compute(mean,
    var)`` runs it once). Results have ``x``'s dtype for float inputs and
    float32 for uint8/uint16; a feature with no data (or zero total weight)
    gets NaN.

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
    _check(func, "x", x)
    ax = normalize_axes(func, axes, x.ndim, name="axes")
    w = _weights(func, "weights", weights, x)
    name = np.dtype(x.dtype).name
    out = np.dtype(x.dtype) if name in image.OUT_DTYPES else np.dtype(np.float32)
    t = _triples(func, x, ax, w, keepdims, split_every)
    return _project(t, _mean_of, out, out), _project(t, _var_of, out, out)


def _compute_triple(func, xname, wname, x, axes, weights):
    """Computed (count, mean, m2) of the kept axes (RunningMoments' dask path)."""
    _check(func, xname, x)
    w = _weights(func, wname, weights, x)
    t = _triples(func, x, axes, w, False, None)
    return dask.compute(*(_project(t, _take, np.float64, k) for k in _KEYS))


def fit_running_moments(x, axis=0, *, weights=None, dtype=None):
    """A :class:`cubn.RunningMoments` holding the statistics of dask array ``x`` (computed now).

    Equivalent to ``RunningMoments(axis, dtype=dtype).update(x, weights)``; the
    state lives where the chunks live (NumPy or CuPy), and the accumulator can
    go on with in-memory batches or ``merge`` others.
    """
    func = "cubn.dask.fit_running_moments"
    _check(func, "x", x)
    return RunningMoments(axis=axis, dtype=dtype)._update(x, weights, func, "x", "weights")


# ---------------------------------------------------------------------------
# Standardizer.transform of a dask array
# ---------------------------------------------------------------------------
def _affine_block(block, a, d, out_dtype, in_last, out_last, inverse):
    func = "Standardizer.transform (dask chunk)"
    block = readable(func, "X", block)
    backend = select(func, "X", block, **{"fitted statistics": a})
    lay = image.make_layout(func, block.shape, in_last, out_last, name="X")
    return image.affine_map(backend, block, lay, a, d, out_dtype, inverse)


def _map_affine(X, in_last, out_last, ch, a, d, out_dtype, inverse):
    """Lazy per-chunk ``affine_map``: dask's blockwise with the output's axes permuted.

    The channel axis is one chunk, so every chunk holds all coefficients.
    """
    X = X.rechunk({ch: -1})
    ind = tuple(range(X.ndim))
    out_ind = ind
    if X.ndim > 2 and in_last != out_last:
        out_ind = (0, X.ndim - 1) + ind[1:-1] if in_last else (0,) + ind[2:] + (1,)
    fn = functools.partial(_affine_block, a=a, d=d, out_dtype=np.dtype(out_dtype), in_last=in_last,
                           out_last=out_last, inverse=inverse)
    return da.blockwise(fn, out_ind, X, ind, dtype=out_dtype,
                        meta=meta_from_array(X._meta, ndim=X.ndim, dtype=out_dtype))
