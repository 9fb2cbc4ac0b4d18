"""Whole calls of the NumPy backend on arrays of one reduction task, in the calling thread.

Above ``numpy_tiles.SMALL_ELEMENTS`` the primitives cut their arrays into
chunks and hand them to ``cubn._threads``. An array whose rows layout is a
single panel of wide rows summed in one task (one slot: an ``(N, C)`` batch
of up to a few MiB, a small channels-last or NCHW feature map) has its
reductions on one thread anyway, and when it is one chunk, everything;
there the layouts, the task closures, the per-primitive ``np.errstate`` and
buffer-size changes and the merge machinery cost as much as the arithmetic.
Here a whole op -- statistics, finalize, normalization, or the backward's
sums and apply -- is one function doing the same NumPy calls on the same
chunks, in the same order, into the calling thread's chunk buffers
(``numpy_tiles.scratch``: no tensor-sized temporary beyond them, as in the
chunked path). Results are the primitives' results, bit for bit, whatever
the thread count. Arrays of several chunks take this path on one thread
only (``cubn.set_num_threads(1)``); on more, the primitives share their
elementwise passes between the threads.

The callers (``cubn.ops``) use these only where ``plan`` gives a layout and
the other tensors are C-contiguous (``fits``), for unweighted (or inference),
not distributed calls; ``finalize``'s renorm and adjustments go through the
primitive itself.
"""
from __future__ import annotations

import functools

import numpy as np

from .. import _threads
from . import numpy_native as native
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
    if pn.kind != "wide" or len(lay.tasks) != 1:  # reductions in one task: one slot, no merge across tasks
        return None
    return lay, pn


class _Pairwise:
    """``numpy_tiles._pairwise`` of a sequence of arrays fed one by one, holding O(log n) of them:
    adjacent pairs merged as they complete, the rest folded from the right at the end (the same tree)."""

    __slots__ = ("stack",)

    def __init__(self):
        self.stack = []  # (array, number of parts in it): counts strictly decreasing, powers of two

    def add(self, v):
        st, k = self.stack, 1
        while st and st[-1][1] == k:
            v, k = st.pop()[0] + v, 2 * k
        st.append((v, k))

    def total(self):
        st = self.stack
        v = st[-1][0]
        for u, _ in reversed(st[:-1]):
            v = u + v
        return v


class _Sums:
    """The chunks' column sums into a task's slots: one chunk's straight into them (no row-wide
    temporaries: with few wide rows each is a good part of the input), several pairwise."""

    __slots__ = ("slots", "w", "trees")

    def __init__(self, slots, w, n_chunks):
        self.slots, self.w = slots, w
        self.trees = None if n_chunks == 1 else [_Pairwise() for _ in range(slots.shape[0])]

    def reduce(self, j, t):
        if self.trees is None:
            np.add.reduce(t, axis=0, out=self.slots[j, 0, : self.w])
        else:
            self.trees[j].add(np.add.reduce(t, axis=0))

    def close(self):
        if self.trees is not None:
            for j, tr in enumerate(self.trees):
                self.slots[j, 0, : self.w] = tr.total()


def _merge(lay, pn, slots):
    """``Rows._merge`` of one task's slots; rows of whole feature maps (one group) one reduction
    at a time, so that its float64 copy is one row, not all of them (``out += ``, as there: a sum
    of -0.0 comes out 0.0)."""
    if lay.inner == 1 or pn.groups != 1:
        return lay._merge(slots)
    c, inner, w = lay.channels, lay.inner, pn.width
    out = np.zeros((slots.shape[0], c), np.float64)
    for j in range(slots.shape[0]):
        out[j] += np.add.reduce(slots[j, 0, :w].astype(np.float64).reshape(c, inner), axis=1)
    return out


def _chunks(pn):
    """The panel's chunks as row ranges, those of the primitives' one task."""
    h = pn.chunk_rows
    return [(a, min(pn.rows, a + h)) for a in range(0, pn.rows, h)]


def plan(x3, acc):
    """``(layout, panel)`` when the one-chunk path takes ``x3`` in ``acc``, else None."""
    if not ENABLED or not x3.flags.c_contiguous:
        return None
    outer, c, inner = x3.shape
    if x3.size <= tiles.SMALL_ELEMENTS or native.accepts(x3, acc):
        return None  # small: numpy_small's path; compiled loops: the primitives take them
    lp = _panel(outer, c, inner, np.dtype(acc).itemsize)
    if lp is not None and lp[1].chunk_rows < lp[1].rows and _threads.get_num_threads() > 1:
        return None  # chunks enough to share: the threads run the elementwise passes (the same bits)
    return lp


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


def _partials(lay, pn, x3, acc):
    """``welford_partials`` (unweighted) of ``x3``; None: the pivot was far (the primitive redoes it)."""
    outer, c, inner = x3.shape
    w = pn.width
    xw = x3.reshape(pn.rows, w)
    pivot = _pivot(x3, acc)
    prow = lay._param_row(pivot, pn)
    slots = np.empty((2, 1, lay.slot_width), acc)
    sums = _Sums(slots, w, len(_chunks(pn)))
    for a, b in _chunks(pn):
        d = tiles.scratch(0, (b - a) * w, acc).reshape(b - a, w)
        np.subtract(xw[a:b], prow, out=d)
        sums.reduce(0, d)
        np.multiply(d, d, out=d)
        sums.reduce(1, d)
    sums.close()
    s, q = _merge(lay, pn, slots)
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
    """``act((x - m) * k + h + side)`` into ``y3`` (the normalize kernel, chunk by chunk)."""
    w = pn.width
    y, x, sd = _mat(y3, pn), _mat(x3, pn), _mat(side3, pn)
    for a, b in _chunks(pn):
        n, shape = (b - a) * w, (b - a, w)
        ya = y[a:b]
        z = ya if ya.dtype == acc else tiles.scratch(0, n, acc).reshape(shape)
        np.subtract(x[a:b], mrow, out=z)
        np.multiply(z, krow, out=z)
        np.add(z, hrow, out=z)
        if sd is not None:
            np.add(z, sd[a:b], out=z)
        if act is not None:
            if act.name == "relu":
                np.maximum(z, tiles.zeros(n, acc).reshape(shape), out=z)
            else:
                z[...] = act.forward(z)
        if z is not ya:
            np.copyto(ya, z, casting="unsafe")


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
    ``backward_partials``, ``backward_finalize`` and ``backward_apply``, chunk by chunk."""
    lay, pn = lp
    w = pn.width
    side = side3 if act is not None else None  # the side input matters only under an activation
    dx3 = np.empty(x3.shape, out_dtype)
    if act is None and want_dside and dy3.dtype == np.dtype(side_dtype):
        dside3, write_dside = dy3, None
    elif want_dside:
        dside3 = write_dside = np.empty(x3.shape, side_dtype)
    else:
        dside3 = write_dside = None
    dy, x, sd = _mat(dy3, pn), _mat(x3, pn), _mat(side, pn)
    dxw, dsw = _mat(dx3, pn), _mat(write_dside, pn)
    chunks = _chunks(pn)
    with _Env(_bufsize(acc, dy3, x3, side, dx3, write_dside)):
        mrow, krow, hrow = _rows(lay, pn, acc, stats.mean, stats.scale, stats.shift)
        pre = (mrow, krow, hrow)
        slots = np.empty((2, 1, lay.slot_width), acc)
        sums = _Sums(slots, w, len(chunks))
        for a, b in chunks:
            n, shape = (b - a) * w, (b - a, w)
            dyp = _dy_prime(dy[a:b], x[a:b], None if sd is None else sd[a:b], pre, act, acc, n, shape)
            xm = tiles.scratch(0, n, acc).reshape(shape)
            np.subtract(x[a:b], mrow, out=xm)
            sums.reduce(0, dyp)
            np.multiply(xm, dyp, out=xm)
            sums.reduce(1, xm)
        sums.close()
        s1, s2 = _merge(lay, pn, slots)
        sums = Sums(s1.astype(acc)[None, :], s2.astype(acc)[None, :])
        coeffs = _backward_finalize(backend, sums, stats, acc, training)
        k1row, k2row = _rows(lay, pn, acc, coeffs.k1, coeffs.k2)
        for a, b in chunks:
            n, shape = (b - a) * w, (b - a, w)
            if len(chunks) > 1:  # (one chunk: its dy' is still in its buffer, or is dy itself)
                dyp = _dy_prime(dy[a:b], x[a:b], None if sd is None else sd[a:b], pre, act, acc, n, shape)
            corr = tiles.scratch(0, n, acc).reshape(shape)
            np.subtract(x[a:b], mrow, out=corr)
            np.multiply(corr, k2row, out=corr)
            np.add(corr, k1row, out=corr)
            da = dxw[a:b]
            t = da if da.dtype == acc else tiles.scratch(2, n, acc).reshape(shape)
            np.multiply(dyp, krow, out=t)
            np.subtract(t, corr, out=t)
            if t is not da:
                np.copyto(da, t, casting="unsafe")
            if dsw is not None:
                np.copyto(dsw[a:b], dyp, casting="unsafe")
    return dx3, coeffs.dgamma, coeffs.dbeta, dside3
