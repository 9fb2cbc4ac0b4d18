"""Whole calls of the NumPy backend on small arrays, in the fewest NumPy calls.

At (8, 16) a NumPy call on a ``(C,)`` or ``(N, C)`` array costs about half a
microsecond whatever its size, so a call's time is the number of them plus
the Python around them. The primitives of ``numpy_backend`` are written for
arrays of any size (chunks, threads, float64 merges); here a whole op --
statistics, folding, normalization, moving update, or the backward -- is one
function that computes the same formulas as those primitives' one-chunk
(``Whole``) layout, in the same order, without the conversions that are
no-ops for small arrays: results are the primitives' results, bit for bit.

The callers (``cubn.ops``) use these only where [`fits`][cubn.backends.numpy_small.fits] says so: an
``(outer, C, inner)`` C-contiguous view with at most ``numpy_tiles.SMALL_ELEMENTS``
elements and at least one element per channel, unweighted, not distributed.
"""
from __future__ import annotations

import math

import numpy as np

from . import numpy_native as _native
from . import numpy_tiles
from .base import Stats

LIMIT = numpy_tiles.SMALL_ELEMENTS


# NaN/Inf propagate to their channel by design: no warnings. np.errstate
# costs a microsecond to enter and leave, as much as the op's NumPy calls on
# a small array; the context variable it sets is set here directly, to the
# same state, where NumPy exposes it (otherwise errstate itself).
try:
    from numpy._core._ufunc_config import _extobj_contextvar, _make_extobj

    _QUIET = _make_extobj(invalid="ignore", divide="ignore", over="ignore")

    def _quiet():
        return _extobj_contextvar.set(_QUIET)

    def _loud(token):
        _extobj_contextvar.reset(token)
except (ImportError, TypeError, AttributeError):  # another NumPy: the documented context manager
    def _quiet():
        e = np.errstate(invalid="ignore", divide="ignore", over="ignore")
        e.__enter__()
        return e

    def _loud(token):
        token.__exit__(None, None, None)


def fits(x3) -> bool:
    """Whether the small path takes ``x3`` (an (outer, C, inner) array of the NumPy backend)."""
    outer, _, inner = x3.shape
    return x3.size <= LIMIT and outer * inner > 0 and x3.flags.c_contiguous


def whole(x3, side3=None, act=None, dy3=None) -> bool:
    """``fits``, or a larger array the compiled loops take whole (``numpy_native``): float32 or
    float64 (its own accumulation dtype), its side input and dy of its dtype and layout, no
    activation or the ReLU. The functions below then run the loops in place of their ufuncs."""
    if fits(x3):
        return True
    return _native.takes_act(act) and _native.accepts(x3, x3.dtype, side3, dy3)


def _loops(x3, acc, *others) -> bool:
    """The compiled loops take this call (``numpy_native.accepts``: any non-empty float32 or float64 input
    where the direct calls are built, else inputs above LIMIT that ``whole`` passed)."""
    return _native.accepts(x3, acc, *others)


def _view(x3):
    """``(x3 as 2-D (outer, C) when channels last, reduced axes, whether (C,) vectors need a (C, 1) view)``."""
    outer, c, inner = x3.shape
    if inner == 1:
        return x3.reshape(outer, c), 0, False
    return x3, (0, 2), True


def _col(v, col):
    return v[:, None] if col else v


def _moments(xv, x3, axis, col, acc, n):
    """Mean and biased variance about each channel's first element (``_small_moments`` + ``finalize``)."""
    p = x3[0, :, 0]
    if p.dtype != acc:
        p = p.astype(acc)
    if not math.isfinite(np.add.reduce(p)):  # (also when a sum of finite pivots overflows: then it changes nothing)
        p = np.where(np.isfinite(p), p, acc.type(0))
    d = np.subtract(xv, _col(p, col)) if xv.dtype == acc else np.subtract(xv, _col(p, col), dtype=acc)
    dev = np.add.reduce(d, axis=axis)
    np.divide(dev, n, out=dev)  # Python numbers take the arrays' dtype (NEP 50): the float32 arithmetic of acc.type(n)
    np.subtract(d, _col(dev, col), out=d)
    np.multiply(d, d, out=d)
    m2 = np.add.reduce(d, axis=axis)
    # a sum of squares: never below 0, so finalize's clamp changes nothing here
    return np.add(p, dev), np.divide(m2, n, out=m2)


def _loop_moments(x3, acc, n):
    mean, m2 = _native.statistics(x3, acc)
    with np.errstate(invalid="ignore", divide="ignore"):
        return mean, np.divide(m2, n, out=m2)


def moments(x3, acc):
    """``(mean, var)`` per channel in ``acc``."""
    if _loops(x3, acc):
        return _loop_moments(x3, acc, x3.shape[0] * x3.shape[2])
    xv, axis, col = _view(x3)
    t = _quiet()
    try:
        return _moments(xv, x3, axis, col, acc, x3.shape[0] * x3.shape[2])
    finally:
        _loud(t)


def _fold(var, eps, gamma, beta, acc):
    """invstd, scale and shift of ``finalize`` (no adjustment, no renorm; hcoef is 0); every
    vector in ``acc``."""
    invstd = np.add(var, float(eps))
    np.sqrt(invstd, out=invstd)
    np.divide(1, invstd, out=invstd)
    if gamma is None:
        scale = invstd
        shift = np.zeros(invstd.shape, acc) if beta is None else np.add(beta, 0.0)
    else:
        scale = np.multiply(gamma, invstd)
        shift = np.multiply(gamma, 0.0)  # gamma * hcoef, hcoef = 0 (NaN where gamma is)
        if beta is not None:
            np.add(shift, beta, out=shift)
    return invstd, scale, shift


def given_stats(mean, var, eps, gamma, beta, acc) -> Stats:
    """``finalize(None, acc, Fold(eps, gamma, beta), given=(mean, var))`` for (C,) vectors in ``acc``."""
    t = _quiet()
    try:
        invstd, scale, shift = _fold(var, eps, gamma, beta, acc)
    finally:
        _loud(t)
    return Stats(np.zeros(mean.shape, acc), mean, var, invstd, scale, shift, invstd, np.zeros(mean.shape, acc))


def _normalize(xv, mean, scale, shift, side, act, out_dtype, acc, col):
    """``act((x - mean) * scale + shift + side)`` (``normalize``'s one-chunk kernel)."""
    z = np.subtract(xv, _col(mean, col), dtype=acc)
    np.multiply(z, _col(scale, col), out=z)
    np.add(z, _col(shift, col), out=z)
    if side is not None:
        np.add(z, side, out=z)
    if act is not None:
        if act.name == "relu":
            np.maximum(z, 0, out=z)
        else:
            z[...] = act.forward(z)
    return z if z.dtype == out_dtype else z.astype(out_dtype)


def _normalize3(x3, side3, mean, scale, shift, act, out_dtype, acc):
    """``_normalize`` of the (outer, C, inner) arrays, through the compiled loops where they take it."""
    if out_dtype == acc and _native.takes_act(act) and _loops(x3, acc, side3):
        y3 = np.empty(x3.shape, acc)
        _native.normalize(x3, side3, y3, mean, scale, shift, act, acc)
        return y3
    xv, _, col = _view(x3)
    side = None if side3 is None else side3.reshape(xv.shape)
    return _normalize(xv, mean, scale, shift, side, act, out_dtype, acc, col).reshape(x3.shape)


def _blend(old, batch, a, out):
    """``old - (old - batch) * a`` into ``out`` (None: a new array); ``out`` may be ``old``."""
    t = np.subtract(old, batch)
    np.multiply(t, a, out=t)
    return np.subtract(old, t, out=out)


def _moving(mean, var, n, acc, a, bessel, mean_in, mean_out, var_in, var_out):
    """``moving_update`` without renorm or zero-debias; ``*_out`` None: new arrays, returned."""
    a = float(a)
    bv = np.multiply(var, acc.type(n) / acc.type(max(n - 1, 1))) if bessel else var  # n / (n - 1) in acc
    if mean_in is None:
        if mean_out is None:
            new_mean = mean.copy()
        else:
            mean_out[...] = mean
            new_mean = mean_out
    else:
        new_mean = _blend(mean_in, mean, a, mean_out)
    if var_in is None:
        if var_out is None:
            new_var = bv.copy() if bv is var else bv
        else:
            var_out[...] = bv
            new_var = var_out
    else:
        new_var = _blend(var_in, bv, a, var_out)
    return new_mean, new_var


def plain_update(u) -> bool:
    """Whether a ``MovingUpdate`` is one the small path applies (no renorm, no zero-debias)."""
    return u is None or (u.zd_biased is None and u.renorm_mean is None and u.moving_stddev is None
                         and u.renorm_stddev is None)


def _loop_forward(x3, acc, eps, gamma, beta, side3, act, out_dtype, a, bessel, mean_in, var_in, mean_out, var_out):
    """The training forward through the compiled loops (``numpy_native.forward``): ``(y3, mean, var,
    invstd, scale, shift)``; the moving statistics into the outs (NumPy arrays of ``acc`` or None)."""
    c = x3.shape[1]
    norm = out_dtype == acc and _native.takes_act(act) and _loops(x3, acc, side3)
    direct = _native.plain(mean_out, c, acc, True) and _native.plain(var_out, c, acc, True)
    y3, mean, var, invstd, scale, shift = _native.forward(
        x3, side3, act, acc, eps, gamma, beta, norm, a, bessel, mean_in, var_in,
        mean_out if direct else None, var_out if direct else None)
    t = _quiet()
    try:
        if not norm:
            y3 = _normalize3(x3, side3, mean, scale, shift, act, out_dtype, acc)
        if not direct:
            _moving(mean, var, x3.shape[0] * x3.shape[2], acc, a, bessel, mean_in, mean_out, var_in, var_out)
    finally:
        _loud(t)
    return y3, mean, var, invstd, scale, shift


def train(x3, acc, eps, gamma, beta, side3, act, out_dtype, update=None):
    """The training forward: ``(y3, Stats)``, ``update`` (a plain ``MovingUpdate``) applied in place."""
    outer, c, inner = x3.shape
    n = outer * inner
    u = update
    if _loops(x3, acc):
        moving = (0.0, False, None, None, None, None) if u is None else (u.a, u.bessel, u.mean_in, u.var_in,
                                                                        u.mean_out, u.var_out)
        y, mean, var, invstd, scale, shift = _loop_forward(x3, acc, eps, gamma, beta, side3, act, out_dtype, *moving)
    else:
        xv, axis, col = _view(x3)
        t = _quiet()
        try:
            mean, var = _moments(xv, x3, axis, col, acc, n)
            invstd, scale, shift = _fold(var, eps, gamma, beta, acc)
            y = _normalize3(x3, side3, mean, scale, shift, act, out_dtype, acc)
            if u is not None:
                _moving(mean, var, n, acc, u.a, u.bessel, u.mean_in, u.mean_out, u.var_in, u.var_out)
        finally:
            _loud(t)
    count = np.empty(c, acc)
    count.fill(n)
    return y.reshape(x3.shape), Stats(count, mean, var, invstd, scale, shift, invstd, np.zeros(c, acc))


def fused_train(x3, acc, eps, gamma, beta, side3, act, f, mean_in, var_in):
    """fused_batch_norm's training call: ``(y3, batch_mean, batch_var)`` (the variance Bessel-corrected,
    both blended with the given ones when ``f != 1``)."""
    outer, c, inner = x3.shape
    n = outer * inner
    if _loops(x3, acc):
        m, v = np.empty(c, acc), np.empty(c, acc)
        y, *_ = _loop_forward(x3, acc, eps, gamma, beta, side3, act, x3.dtype, f, True,
                              mean_in if f != 1.0 else None, var_in if f != 1.0 else None, m, v)
        return y.reshape(x3.shape), m, v
    xv, axis, col = _view(x3)
    t = _quiet()
    try:
        mean, var = _moments(xv, x3, axis, col, acc, n)
        _, scale, shift = _fold(var, eps, gamma, beta, acc)
        y = _normalize3(x3, side3, mean, scale, shift, act, x3.dtype, acc)
        if f != 1.0:
            m, v = _moving(mean, var, n, acc, f, True, mean_in, None, var_in, None)
        else:
            m, v = _moving(mean, var, n, acc, f, True, None, None, None, None)
    finally:
        _loud(t)
    return y.reshape(x3.shape), m, v


def infer(x3, acc, eps, gamma, beta, mean, var, side3, act):
    """The inference forward from given (C,) statistics in ``acc``: ``y3`` (``fold_raw`` + ``normalize``)."""
    if x3.dtype == acc and _native.takes_act(act) and _loops(x3, acc, side3):
        return _native.infer(x3, side3, act, acc, eps, gamma, beta, mean, var)
    t = _quiet()
    try:
        invstd = np.add(var, float(eps))
        np.sqrt(invstd, out=invstd)
        np.divide(1, invstd, out=invstd)
        scale = invstd if gamma is None else np.multiply(gamma, invstd)
        shift = np.zeros(invstd.shape, acc) if beta is None else beta
        y = _normalize3(x3, side3, mean, scale, shift, act, x3.dtype, acc)
    finally:
        _loud(t)
    return y.reshape(x3.shape)


def backward(dy3, x3, side3, stats, act, acc, training, want_dside, out_dtype, side_dtype):
    """``(dx3, dgamma, dbeta, dside3)`` unweighted (``backward_partials``, ``backward_finalize`` and
    ``backward_apply`` in their one-chunk layout)."""
    if (out_dtype == acc and _native.takes_act(act) and _loops(x3, acc, dy3, side3)
            and (not want_dside or np.dtype(side_dtype) == acc)):
        return _loop_backward(dy3, x3, side3, stats, act, acc, training, want_dside)
    xv, axis, col = _view(x3)
    dyv = dy3.reshape(xv.shape)
    mean, scale = _col(stats.mean, col), _col(stats.scale, col)
    t = _quiet()
    try:
        if act is None:
            dyp = dyv if dyv.dtype == acc else dyv.astype(acc)
        else:
            z = np.subtract(xv, mean, dtype=acc)
            np.multiply(z, scale, out=z)
            np.add(z, _col(stats.shift, col), out=z)
            if side3 is not None:
                np.add(z, side3.reshape(xv.shape), out=z)
            if act.name == "relu":
                np.multiply(dyv, np.greater(z, 0), out=z)
            else:
                np.multiply(dyv, act.derivative(z), out=z)
            dyp = z
        xm = np.subtract(xv, mean, dtype=acc)
        s1 = np.add.reduce(dyp, axis=axis)
        prod = np.multiply(xm, dyp)
        s2 = np.add.reduce(prod, axis=axis)
        dgamma, k1, k2 = _coefficients(stats, s1, s2, training)
        np.multiply(xm, _col(k2, col), out=xm)  # (x - mean) * k2 + k1: NaN where x - mean is not finite
        np.add(xm, _col(k1, col), out=xm)
        dx = np.multiply(dyp, scale, out=prod)
        np.subtract(dx, xm, out=dx)
        if dx.dtype != out_dtype:
            dx = dx.astype(out_dtype)
        dside = None
        if want_dside:
            if act is None and dy3.dtype == np.dtype(side_dtype):
                dside = dy3
            else:
                dside = dyp.astype(side_dtype).reshape(x3.shape)
    finally:
        _loud(t)
    return dx.reshape(x3.shape), dgamma, s1, dside


def _coefficients(stats, s1, s2, training):
    """dgamma, and the dx correction's k1, k2 (``backward_finalize``)."""
    dgamma = np.multiply(stats.gcoef, s2)
    np.add(dgamma, np.multiply(stats.hcoef, s1), out=dgamma)
    if training:
        count = stats.count
        inv_n = np.divide(1, count, out=np.zeros(count.shape, count.dtype), where=count > 0)
        k1 = np.multiply(stats.scale, s1)
        np.multiply(k1, inv_n, out=k1)
        k2 = np.multiply(stats.scale, stats.invstd)
        np.multiply(k2, stats.invstd, out=k2)
        np.multiply(k2, s2, out=k2)
        np.multiply(k2, inv_n, out=k2)
    else:
        k1 = k2 = np.zeros_like(s1)
    return dgamma, k1, k2


def _loop_backward(dy3, x3, side3, stats, act, acc, training, want_dside):
    """``backward`` through the compiled loops (``numpy_native.backward``): the sums in one pass, the
    per-channel coefficients, dx (and dside) in another."""
    dx3 = np.empty(x3.shape, acc)
    dside3 = write = None
    if want_dside:
        dside3 = dy3 if act is None else np.empty(x3.shape, acc)
        write = None if act is None else dside3
    dgamma, s1 = _native.backward(dy3, x3, side3, dx3, write, stats, act, acc, training)
    return dx3, dgamma, s1, dside3
