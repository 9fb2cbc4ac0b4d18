"""Whole calls of the NumPy backend on arrays of one chunk, in the calling thread.

Above ``numpy_tiles.SMALL_ELEMENTS`` the primitives of ``numpy_backend`` cut
their arrays into chunks and hand them to ``cubn._threads``. An array whose
rows layout is a single panel of wide rows that fits in one chunk (an
``(N, C)`` batch of a few hundred KiB, a small channels-last or NCHW feature
map) is one chunk on one thread anyway; there the layouts, the task
closures, the per-primitive ``np.errstate`` and buffer-size changes and the
float64 merge machinery cost as much as the arithmetic. Here a whole op --
statistics, finalize, normalization, or the backward's sums and apply -- is
one function doing the same NumPy calls on the same chunk, in the same order,
into the calling thread's chunk buffers (``numpy_tiles.scratch``: no
tensor-sized temporary beyond them, as in the chunked path). Results are the
primitives' results, bit for bit, whatever the thread count.

The callers (``cubn.ops``) use these only where ``plan`` gives a layout and
the other tensors are C-contiguous (``fits``), for unweighted (or inference),
not distributed calls; ``finalize``'s renorm and adjustments go through the
primitive itself.
"""
from __future__ import annotations

import functools

import numpy as np

from .. import _threads
from . import numpy_tiles as tiles
from .base import Affine, Partials, Stats, Sums
from .numpy_backend import PIVOT_RATIO, NumpyBackend, _pivot, fold_raw
from . import numpy_small as _small
from .numpy_small import _loud, _quiet

ENABLED = True  # False: the chunked primitives throughout (the same bits; for A/B timing)
_BOOL = np.dtype(bool)
_finalize = NumpyBackend.finalize.__wrapped__
_backward_finalize = NumpyBackend.backward_finalize.__wrapped__


@functools.lru_cache(maxsize=256)
def _panel(outer, c, inner, itemsize):
    """The rows layout's one panel for this shape when it is a single chunk of wide rows, else None."""
    lay = tiles.layout(outer, c, inner, itemsize)
    if lay.kind != "rows" or len(lay.panels) != 1:
        return None
    pn = lay.panels[0]
    if pn.kind != "wide" or pn.chunk_rows < pn.rows:
        return None
    return lay, pn


def plan(x3, acc):
    """``(layout, panel)`` when the one-chunk path takes ``x3`` in ``acc``, else None."""
    if not ENABLED or not x3.flags.c_contiguous:
        return None
    outer, c, inner = x3.shape
    if x3.size <= tiles.SMALL_ELEMENTS:
        return None
    return _panel(outer, c, inner, np.dtype(acc).itemsize)


def fits(*arrays) -> bool:
    return all(a is None or a.flags.c_contiguous for a in arrays)


def _mat(a, pn):
    return None if a is None else a.reshape(pn.rows, pn.width)


def _bufsize(acc, *arrays):
    for a in arrays:
        if a is not None and a.dtype != acc:
            return _threads.DEFAULT_BUFSIZE
    return _threads.UFUNC_BUFSIZE


class _Env:
    """Quiet floating-point errors and the chunks' ufunc buffer size, set once for a whole op."""

    __slots__ = ("tok", "old", "size")

    def __init__(self, size):
        self.size = size

    def __enter__(self):
        self.tok = _quiet()
        self.old = np.getbufsize()
        if self.old != self.size:
            np.setbufsize(self.size)
        return self

    def __exit__(self, *exc):
        if self.old != self.size:
            np.setbufsize(self.old)
        _loud(self.tok)


def _sums(lay, pn, d_list, acc):
    """Column sums of the chunk's reductions -> per-channel float64 sums (``Rows._merge``)."""
    slots = np.empty((len(d_list), 1, lay.slot_width), acc)
    for j, d in enumerate(d_list):
        np.add.reduce(d, axis=0, out=slots[j, 0, : pn.width])
    return lay._merge(slots)


def _partials(lay, pn, x3, acc):
    """``welford_partials`` (unweighted) of a one-chunk ``x3``; None: the pivot was far (the primitive redoes it)."""
    outer, c, inner = x3.shape
    n = pn.rows * pn.width
    shape = (pn.rows, pn.width)
    xw = x3.reshape(shape)
    pivot = _pivot(x3, acc)
    d = tiles.scratch(0, n, acc).reshape(shape)
    np.subtract(xw, lay._param_row(pivot, pn), out=d)
    s_col = np.add.reduce(d, axis=0)
    np.multiply(d, d, out=d)
    slots = np.empty((2, 1, lay.slot_width), acc)
    slots[0, 0, : pn.width] = s_col
    np.add.reduce(d, axis=0, out=slots[1, 0, : pn.width])
    s, q = lay._merge(slots)
    nn = float(outer * inner)
    dev = s / nn
    m2 = q - s * dev
    if (q > PIVOT_RATIO * m2).any():
        return None
    mean = pivot + dev
    return Partials(np.full((1, c), nn, acc), mean.astype(acc)[None, :], m2.astype(acc)[None, :])


def moments(backend, x3, acc, lp):
    """``(mean, var)`` in ``acc`` (``welford_partials`` + ``finalize``)."""
    lay, pn = lp
    with _Env(_bufsize(acc, x3)):
        p = _partials(lay, pn, x3, acc)
    if p is None:
        p = backend.welford_partials(None, x3, acc)
    st = backend.finalize(p, acc, fold=None)
    return st.mean, st.var


def _plain(fold, update, acc):
    """Whether ``finalize`` is the small path's fold and moving update (no adjustment or renorm,
    parameters in ``acc``): its arithmetic, in fewer calls."""
    return (fold.adj_scale is None and fold.adj_bias is None and fold.renorm is None and _small.plain_update(update)
            and (fold.gamma is None or getattr(fold.gamma, "dtype", None) == acc)
            and (fold.beta is None or getattr(fold.beta, "dtype", None) == acc))


def _finalize_plain(p, acc, fold, update):
    """``finalize(p, acc, fold, update)`` of one-row, unweighted partials (every count n > 0)."""
    count, mean, m2 = p.count[0], p.mean[0], p.m2[0]
    n = int(count[0])
    t = _quiet()
    try:
        var = np.divide(m2, count)
        np.maximum(var, 0, out=var)
        invstd, scale, shift = _small._fold(var, fold.eps, fold.gamma, fold.beta, acc)
        if update is not None:
            u = update
            _small._moving(mean, var, n, acc, u.a, u.bessel, u.mean_in, u.mean_out, u.var_in, u.var_out)
    finally:
        _loud(t)
    return Stats(count, mean, var, invstd, scale, shift, invstd, np.zeros(mean.shape, acc))


def _normalize_into(y3, x3, side3, mrow, krow, hrow, act, acc, pn):
    """``act((x - m) * k + h + side)`` into ``y3`` (the normalize kernel on the one chunk)."""
    n = pn.rows * pn.width
    shape = (pn.rows, pn.width)
    y, x = _mat(y3, pn), _mat(x3, pn)
    z = y if y.dtype == acc else tiles.scratch(0, n, acc).reshape(shape)
    np.subtract(x, mrow, out=z)
    np.multiply(z, krow, out=z)
    np.add(z, hrow, out=z)
    if side3 is not None:
        np.add(z, _mat(side3, pn), out=z)
    if act is not None:
        if act.name == "relu":
            np.maximum(z, tiles.zeros(n, acc).reshape(shape), out=z)
        else:
            z[...] = act.forward(z)
    if z is not y:
        np.copyto(y, z, casting="unsafe")


def _rows(lay, pn, acc, *vs):
    return tuple(None if v is None else lay._param_row(np.asarray(v, acc), pn) for v in vs)


def forward(backend, lp, x3, acc, training, fold, update, given, side3, act):
    """``(y3, stats)`` of ``_bn_forward`` (stats None in inference)."""
    lay, pn = lp
    y3 = np.empty(x3.shape, x3.dtype)
    size = _bufsize(acc, x3, side3)
    stats = None
    if training:
        with _Env(size):
            p = _partials(lay, pn, x3, acc)
        if p is None:
            p = backend.welford_partials(None, x3, acc)
        if _plain(fold, update, acc):
            stats = _finalize_plain(p, acc, fold, update)
        else:
            stats = backend.finalize(p, acc, fold, update)
        m, k, h = stats.mean, stats.scale, stats.shift
    else:
        from .base import RawAffine

        with _Env(size):
            a = fold_raw(RawAffine(given[0], given[1], fold.gamma, fold.beta, fold.eps), acc)
        m, k, h = a
    with _Env(size):
        mrow, krow, hrow = _rows(lay, pn, acc, m, k, h)
        _normalize_into(y3, x3, side3, mrow, krow, hrow, act, acc, pn)
    return y3, stats


def _dy_prime(dy, x, side, pre, act, acc, n, shape):
    """dy' = dy * act'(z), z recomputed from x as the forward did; or dy itself (``_dy_prime``)."""
    if act is None:
        if dy.dtype == acc:
            return dy
        t = tiles.scratch(1, n, acc).reshape(shape)
        np.copyto(t, dy)
        return t
    z = tiles.scratch(1, n, acc).reshape(shape)
    np.subtract(x, pre[0], out=z)
    np.multiply(z, pre[1], out=z)
    np.add(z, pre[2], out=z)
    if side is not None:
        np.add(z, side, out=z)
    if act.name == "relu":
        mask = tiles.scratch(3, n, _BOOL).reshape(shape)
        np.greater(z, 0, out=mask)
        np.multiply(dy, mask, out=z)
    else:
        np.multiply(dy, act.derivative(z), out=z)
    return z


def backward(backend, lp, dy3, x3, side3, stats, act, acc, training, want_dside, out_dtype, side_dtype):
    """``(dx3, dgamma, dbeta, dside3)`` of ``_bn_backward`` (unweighted or inference):
    ``backward_partials``, ``backward_finalize`` and ``backward_apply`` on the one chunk."""
    lay, pn = lp
    n = pn.rows * pn.width
    shape = (pn.rows, pn.width)
    side = side3 if act is not None else None  # the side input matters only under an activation
    dx3 = np.empty(x3.shape, out_dtype)
    if act is None and want_dside and dy3.dtype == np.dtype(side_dtype):
        dside3, write_dside = dy3, None
    elif want_dside:
        dside3 = write_dside = np.empty(x3.shape, side_dtype)
    else:
        dside3 = write_dside = None
    dy, x, sd = _mat(dy3, pn), _mat(x3, pn), _mat(side, pn)
    with _Env(_bufsize(acc, dy3, x3, side, dx3, write_dside)):
        mrow, krow, hrow = _rows(lay, pn, acc, stats.mean, stats.scale, stats.shift)
        pre = (mrow, krow, hrow)
        dyp = _dy_prime(dy, x, sd, pre, act, acc, n, shape)
        xm = tiles.scratch(0, n, acc).reshape(shape)
        np.subtract(x, mrow, out=xm)
        slots = np.empty((2, 1, lay.slot_width), acc)
        np.add.reduce(dyp, axis=0, out=slots[0, 0, : pn.width])
        np.multiply(xm, dyp, out=xm)
        np.add.reduce(xm, axis=0, out=slots[1, 0, : pn.width])
        s1, s2 = lay._merge(slots)
        sums = Sums(s1.astype(acc)[None, :], s2.astype(acc)[None, :])
        coeffs = _backward_finalize(backend, sums, stats, acc, training)
        k1row, k2row = _rows(lay, pn, acc, coeffs.k1, coeffs.k2)
        corr = tiles.scratch(0, n, acc).reshape(shape)
        np.subtract(x, mrow, out=corr)
        np.multiply(corr, k2row, out=corr)
        np.add(corr, k1row, out=corr)
        dxw = _mat(dx3, pn)
        t = dxw if dxw.dtype == acc else tiles.scratch(2, n, acc).reshape(shape)
        np.multiply(dyp, krow, out=t)
        np.subtract(t, corr, out=t)
        if t is not dxw:
            np.copyto(dxw, t, casting="unsafe")
        if write_dside is not None:
            np.copyto(_mat(write_dside, pn), dyp, casting="unsafe")
    return dx3, coeffs.dgamma, coeffs.dbeta, dside3
