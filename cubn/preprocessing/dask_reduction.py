"""Dask reductions of Welford triples, and the lazy per-chunk transform.

A reduction is dask's own ``dask.array.reduction``: every chunk (NumPy or
CuPy) is reduced by cubn to per-feature Welford triples ``(count, mean, M2)``
(float64; on a GPU chunk, cubn's kernels), and dask's tree of ``combine`` /
``aggregate`` tasks merges them with Chan's formula (``cubn._welford``, the
same code that merges on the host). ``RunningMoments.update`` and
``Standardizer`` call this module for dask inputs, and the public
``cubn.dask`` builds on it; it never imports either of them.
"""
from __future__ import annotations

import functools

import numpy as np

try:
    import dask
    import dask.array as da
    from dask.array.utils import meta_from_array
except ImportError as e:  # pragma: no cover - exercised only without dask
    raise ImportError("cubn's dask support needs dask: pip install 'cubn[dask]' (dask[array], distributed)") from e

from .. import _dtypes
from .._backend import array_module, select
from .._checks import arg_error, describe
from .._memory import readable
from .._welford import mean_or_nan, tree_merge, variance
from . import image
from .batch_moments import Batch

KEYS = ("count", "mean", "m2")


# ---------------------------------------------------------------------------
# The three functions of the reduction (module level: picklable for workers)
# ---------------------------------------------------------------------------
def _chunk(x, weights=None, axis=None, keepdims=True, computing_meta=False):
    """One chunk -> a dict of float64 triples in the keepdims shape."""
    if computing_meta:  # dask probing the output type with empty arrays
        return x
    state = Batch("cubn.dask (a chunk)", "x", "weights", x, axis, weights).state()
    shape = tuple(1 if i in axis else n for i, n in enumerate(x.shape))
    return {k: state[i].reshape(shape) for i, k in enumerate(KEYS)}


def _flatten(parts):
    if isinstance(parts, (list, tuple)):
        return [p for q in parts for p in _flatten(q)]
    return [parts]


def _merge(parts):
    ps = _flatten(parts)
    if len(ps) == 1:
        return ps[0]
    xp = array_module(ps[0]["count"])
    merged = tree_merge(*(xp.stack([p[k] for p in ps]) for k in KEYS))
    return dict(zip(KEYS, merged))


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


def take(d, key):
    return d[key]


def mean_of(d, dtype, weighted=False):
    """The mean; NaN where a feature has no data, 0 where its weights sum to 0 (as weighted_moments)."""
    if weighted:
        return _zero_where_empty(d["count"], d["mean"]).astype(dtype)
    return mean_or_nan(d["count"], d["mean"]).astype(dtype)


def var_of(d, dtype, weighted=False):
    if weighted:
        return _zero_where_empty(d["count"], variance(d["count"], d["m2"])).astype(dtype)
    return variance(d["count"], d["m2"]).astype(dtype)


def _zero_where_empty(count, v):
    xp = array_module(count)
    return xp.where(count > 0, v, 0)


# ---------------------------------------------------------------------------
# Building the graph
# ---------------------------------------------------------------------------
def check(func, name, x):
    if not isinstance(x, da.Array):
        raise arg_error(TypeError, func, name, "a dask.array.Array", describe(x))
    if np.dtype(x.dtype).name not in image.IN_DTYPES:
        names = ", ".join(_dtypes.available(image.IN_DTYPES))
        raise arg_error(TypeError, func, name, f"a dask array of dtype {names}", f"dtype {np.dtype(x.dtype).name}")


def weights_for(func, name, w, x):
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


def triples(func, x, axes, weights, keepdims, split_every):
    """The lazy reduction: a dask array whose blocks are dicts of float64 triples."""
    out_ndim = x.ndim if keepdims else x.ndim - len(axes)
    return da.reduction(
        x, _chunk, _aggregate, combine=_combine, axis=axes, keepdims=keepdims, dtype=np.float64,
        split_every=split_every, concatenate=False, name="cubn-welford",
        meta=meta_from_array(x._meta, ndim=out_ndim, dtype=np.float64), weights=weights,
    )


def project(t, fn, dtype, *args):
    return t.map_blocks(fn, *args, dtype=dtype, meta=meta_from_array(t._meta, ndim=t.ndim, dtype=dtype))


def computed_triple(func, xname, wname, x, axes, weights):
    """Computed (count, mean, m2) of the kept axes (RunningMoments' dask path)."""
    check(func, xname, x)
    w = weights_for(func, wname, weights, x)
    t = triples(func, x, axes, w, False, None)
    return dask.compute(*(project(t, take, np.float64, k) for k in KEYS))


# ---------------------------------------------------------------------------
# Standardizer.transform of a dask array
# ---------------------------------------------------------------------------
def _affine_block(block, a, d, out_dtype, in_last, out_last, inverse):
    func = "Standardizer.transform (dask chunk)"
    block = readable(func, "X", block)
    backend = select(func, "X", block, **{"fitted statistics": a})
    lay = image.make_layout(func, block.shape, in_last, out_last, name="X")
    return image.affine_map(backend, block, lay, a, d, out_dtype, inverse)


def map_affine(X, in_last, out_last, ch, a, d, out_dtype, inverse):
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
