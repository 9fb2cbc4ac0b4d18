"""The NumPy backend: the primitives of ``backends.base`` in NumPy, one pass over memory.

Each primitive walks its tensors chunk by chunk (``numpy_tiles``: a few
hundred KiB, read once and worked on in the L2 cache with in-place ufuncs),
on the threads of ``cubn._threads``; nothing tensor-sized is allocated
besides the outputs. Channels-last data is reduced down its rows, never
transposed.

Statistics are shifted sums: every element is taken relative to a pivot of
its channel (the mean of a sample of its elements), ``S = sum(x - p)`` and
``Q = sum((x - p)**2)``, summed per chunk in the accumulation dtype and across
chunks in float64. Differences of nearby floats are exact, so the sums keep
the digits an offset would cost a plain sum; ``M2 = Q - S**2/n`` loses only
the bits of ``Q / M2 = 1 + (mean - p)**2 / var``. Where that ratio exceeds
``PIVOT_RATIO`` (a pivot far from its channel's mean) the statistics are
computed again about the mean just found, so the variance is always within a
few float32 roundings of the two-pass value.
"""
from __future__ import annotations

import functools

import numpy as np

from .. import _threads
from .._welford import tree_merge
from . import numpy_native as native
from . import numpy_tiles as tiles
from .base import Affine, BackwardCoeffs, Partials, RawAffine, Stats, Sums
from .numpy_preprocessing import NumpyPreprocessing

# Q / M2 above this (about 4 bits lost) -> compute again about the mean
PIVOT_RATIO = 16.0
PIVOT_SAMPLE = 64  # elements per channel whose mean is the pivot
SPREAD_SAMPLE = 16  # elements per channel whose std decides whether its mean folds into its shift
_BOOL = np.dtype(bool)


def _quiet(f):
    """NaN/Inf in the data propagate to their channel by design: no warnings."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            return f(*args, **kwargs)

    return wrapper


def _layout(x3, acc):
    outer, c, inner = x3.shape
    return tiles.layout(outer, c, inner, acc.itemsize)


def _bufsize(acc, *arrays):
    """Loops that cast (16-bit floats, integers) want NumPy's default buffers; the others small ones."""
    for a in arrays:
        if a is not None and a.dtype != acc:
            return _threads.DEFAULT_BUFSIZE
    return _threads.UFUNC_BUFSIZE


def _contiguous(a):
    return a if a is None or a.flags.c_contiguous else np.ascontiguousarray(a)


def _pivot_sample(x3, k=PIVOT_SAMPLE):
    """The elements a channel's pivot is the mean of: about ``k`` of them, the first of rows spread over the batch."""
    outer, _, inner = x3.shape
    ki = min(inner, k)
    ko = min(outer, max(1, k // ki))
    return x3[:: outer // ko, :, :ki][:ko]


def _pivot(x3, acc):
    """Per channel, the mean of a sample of its elements (0 where that is not finite).

    Near the channel's mean, so ``Q / M2`` stays close to 1; a sample with an
    outlier only costs the second pass that ``PIVOT_RATIO`` triggers.
    """
    s = _pivot_sample(x3)
    p = np.add.reduce(s, axis=(0, 2), dtype=acc) / acc.type(s.shape[0] * s.shape[2])
    return np.where(np.isfinite(p), p, acc.type(0))


def _small_moments(x3, acc) -> Partials:
    """Two-pass statistics of a small array about its first elements: the fewest NumPy calls."""
    outer, c, inner = x3.shape
    n = outer * inner
    p = x3[0, :, 0].astype(acc)
    p = np.where(np.isfinite(p), p, acc.type(0))
    d = np.subtract(x3, p[:, None], dtype=acc)
    dev = np.add.reduce(d, axis=(0, 2)) / acc.type(n)
    np.subtract(d, dev[:, None], out=d)
    np.multiply(d, d, out=d)
    m2 = np.add.reduce(d, axis=(0, 2))
    return Partials(np.full((1, c), n, acc), (p + dev)[None, :], m2[None, :])


def _outer_weights(weights, outer, acc):
    """An "outer" Weights as one weight per outer index (outer,); None for "full" weights."""
    if weights is None or weights.kind == "full":
        return None
    return np.repeat(np.asarray(weights.values, dtype=acc), weights.divisor)[:outer]


# ---------------------------------------------------------------------------
# Chunk kernels: kernel(views, params, outer_w, red, tmp, zero) -> reductions
#   tmp(slot, dtype=acc): a temporary shaped like the chunk; zero(): zeros to compare with
# ---------------------------------------------------------------------------
def _sums_kernel(acc):
    """S = sum(x - p), Q = sum((x - p)**2)."""

    def kernel(v, p, w, red, tmp, zero):
        d = tmp(0)
        np.subtract(v[0], p[0], out=d)
        s = red(d)
        np.multiply(d, d, out=d)
        return s, red(d)

    return kernel


def _weighted_sums_kernel(acc):
    """W = sum(w), S = sum(w (x - p)), Q = sum(w (x - p)**2); elements of weight 0 skipped."""

    def kernel(v, p, w, red, tmp, zero):
        wt = v[1] if v[1] is not None else w
        d = tmp(0)
        np.subtract(v[0], p[0], out=d)
        d = np.where(wt != 0, d, acc.type(0))  # an Inf/NaN under weight 0 does not spread
        wb = np.broadcast_to(wt, d.shape)
        total = red(wb)
        wd = wb * d
        s = red(wd)
        np.multiply(wd, d, out=wd)
        return total, s, red(wd)

    return kernel


def _act_inplace(act, z, zero):
    if act.name == "relu":  # against a zeros buffer: NumPy's scalar maximum loop is 4x slower
        np.maximum(z, zero(), out=z)
    else:
        z[...] = act.forward(z)


# Folding the mean into the shift saves a pass over a chunk, but x * scale is
# rounded at the magnitude of x * scale, not of (x - mean) * scale: the folded
# form's error is about u/2 (2 |mean * scale| + |y| + |d|), d = (x - mean) *
# scale, against u/2 (|d| + |y|) unfolded. Over a channel the largest errors
# are where |d| reaches about 4 |scale| sigma, so the folded form's largest
# error stays within twice the unfolded one's while 2 |mean * scale| <=
# |shift| + 8 |scale| sigma. A channel folds where |mean * scale| <= |shift| / 2
# + 2 |scale| spread (spread: the std of a sample of its elements, half of sigma's
# factor kept as margin for the sample); elsewhere, e.g. at large offsets,
# its mean is subtracted first as ever. A folded channel keeps a mean of 0,
# and (x - 0) * scale is x * scale exactly; a chunk is computed folded, then
# the columns of its channels that do not fold (if any, and few) computed
# again unfolded, so every channel's bits are those of its own form, whatever
# chunk or thread it runs in.
# Deciding costs some 50-100 us (a sample, a few (C,) arrays); the pass it saves
# about 10 us per 128K elements: smaller arrays never fold.
FOLD_MIN_ELEMENTS = 1 << 20
BACKWARD_SIGMAS = 1.0  # the correction k1 + k2 (x - mean) of dx folds within 1 sample std (a smaller part of dx)
PATCH_FRACTION = 8  # a chunk whose unfolded columns exceed 1/8 of it runs unfolded throughout


def _spread(x3, acc):
    """Per channel, the standard deviation of a sample of about SPREAD_SAMPLE of its elements."""
    s = _pivot_sample(x3, SPREAD_SAMPLE)
    # (sample, C), a copy (never a view of x: it is written), summed down axis 0
    t = np.array(np.moveaxis(s, 1, 2), dtype=acc, order="C").reshape(-1, x3.shape[1])
    n = acc.type(t.shape[0])
    np.subtract(t, np.add.reduce(t, axis=0) / n, out=t)
    np.multiply(t, t, out=t)
    return np.sqrt(np.add.reduce(t, axis=0) / n).astype(np.float64)


def _fold_offsets(mean, coef, const, acc, spread, sigmas=2.0):
    """``(x - mean) * coef + const`` as ``(x - mean') * coef + const'``: per channel
    ``mean' = 0, const' = const - mean * coef`` where that is accurate (above), else unchanged."""
    m, k, c = (np.asarray(v, np.float64) for v in (mean, coef, const))
    with np.errstate(invalid="ignore", over="ignore"):
        folded = c - m * k
        ok = (np.abs(m * k) <= 0.5 * np.abs(c) + sigmas * np.abs(k) * spread) & np.isfinite(folded.astype(acc))
    return (np.where(ok, 0, mean).astype(acc), np.where(ok, folded, const).astype(acc))


def _unfolded_columns(mean, memo):
    """The columns of a parameter row whose channels do not fold: None (none), an index array,
    or True (too many: the whole chunk unfolded). Memoized per row for one call."""
    e = memo.get(id(mean))
    if e is None or e[0] is not mean:
        if mean.ndim != 1:  # a scalar (a chunk of one channel) or (C, 1) (one small chunk)
            cols = True if mean.any() else None
        else:
            cols = np.flatnonzero(mean)
            cols = None if not cols.size else (True if cols.size * PATCH_FRACTION > mean.size else cols)
        e = memo[id(mean)] = (mean, cols)  # holds the row: its id stays its own
    return e[1]


def _affine_into(z, x, mean, coef, const, memo):
    """z = (x - mean) * coef + const in ``z``; channels of mean 0 (folded) as x * coef + const."""
    cols = None if mean is None else _unfolded_columns(mean, memo)
    if cols is not None and cols is not True and not (x.flags.c_contiguous and z.flags.c_contiguous):
        cols = True  # the unfolded columns are patched through flat indices
    if cols is True:
        np.subtract(x, mean, out=z)
        np.multiply(z, coef, out=z)
    else:
        np.multiply(x, coef, out=z)
    np.add(z, const, out=z)
    if cols is not None and cols is not True:
        key = (id(mean), id(coef), id(const), x.shape)
        e = memo.get(key)
        if e is None or e[0] is not mean or e[1] is not coef or e[2] is not const:
            rows = 1 if x.ndim == 1 else x.shape[0]
            flat = (np.arange(rows)[:, None] * x.shape[-1] + cols).reshape(-1)
            e = memo[key] = (mean, coef, const, flat, *(np.tile(v[cols], rows) for v in (mean, coef, const)))
        flat, m, k, c = e[3:]
        t = x.reshape(-1).take(flat).astype(z.dtype, copy=False)
        np.subtract(t, m, out=t)
        np.multiply(t, k, out=t)
        np.add(t, c, out=t)
        z.reshape(-1).put(flat, t)


def _preact_into(z, x, mean, scale, shift, side, memo):
    """z = (x - mean) * scale + shift (+ side), in place in ``z``."""
    _affine_into(z, x, mean, scale, shift, memo)
    if side is not None:
        np.add(z, side, out=z)


def _normalize_kernel(act, acc):
    memo = {}

    def kernel(v, p, w, red, tmp, zero):
        x, side, y = v
        z = y if y.dtype == acc else tmp(0)
        _preact_into(z, x, p[0], p[1], p[2], side, memo)
        if act is not None:
            _act_inplace(act, z, zero)
        if z is not y:
            np.copyto(y, z, casting="unsafe")

    return kernel


def _dy_prime(act, acc, dy, x, side, pre, tmp, memo):
    """dy' = dy * act'(z) (the pre-activation z recomputed from x as the forward did), or dy itself."""
    if act is None:
        if dy.dtype == acc:
            return dy
        t = tmp(1)
        np.copyto(t, dy)
        return t
    z = tmp(1)
    _preact_into(z, x, pre[0], pre[1], pre[2], side, memo)
    if act.name == "relu":
        mask = tmp(3, _BOOL)
        np.greater(z, 0, out=mask)
        np.multiply(dy, mask, out=z)
    else:
        np.multiply(dy, act.derivative(z), out=z)
    return z


# Backward parameters: mean, then the pre-activation's mean, scale and shift as
# _affine_params gives them, then k1, k2 and the correction's mean, folded as those.
def _backward_sums_kernel(act, acc):
    """S1 = sum(dy'), S2 = sum(dy' (x - mean))."""
    memo = {}

    def kernel(v, p, w, red, tmp, zero):
        dy, x, side = v
        dyp = _dy_prime(act, acc, dy, x, side, p[1:4], tmp, memo)
        xm = tmp(0)
        np.subtract(x, p[0], out=xm)
        s1 = red(dyp)
        np.multiply(xm, dyp, out=xm)
        return s1, red(xm)

    return kernel


def _backward_apply_kernel(act, acc):
    """dx = dy' * scale - w * (k1 + k2 * (x - mean)); dside = dy'."""
    memo = {}

    def kernel(v, p, w, red, tmp, zero):
        dy, x, side, dx, dside, wfull = v
        dyp = _dy_prime(act, acc, dy, x, side, p[1:4], tmp, memo)
        corr = tmp(0)
        _affine_into(corr, x, p[6], p[5], p[4], memo)
        wt = wfull if wfull is not None else w
        if wt is not None:
            np.multiply(corr, wt, out=corr)
        t = dx if dx.dtype == acc else tmp(2)
        np.multiply(dyp, p[2], out=t)
        np.subtract(t, corr, out=t)
        if t is not dx:
            np.copyto(dx, t, casting="unsafe")
        if dside is not None:
            np.copyto(dside, dyp, casting="unsafe")

    return kernel


def _affine_params(x3, affine, acc, lay):
    """The pre-activation's (mean, scale, shift) as the chunks use them (``_fold_offsets``), and
    the channels' spread (None where nothing folds: inputs below FOLD_MIN_ELEMENTS)."""
    m, k, h = (np.asarray(v, acc) for v in affine)
    if lay.kind == "whole" or x3.size < FOLD_MIN_ELEMENTS:
        return (m, k, h), None
    spread = _spread(x3, acc)
    m, h = _fold_offsets(m, k, h, acc, spread)
    return (m if m.any() else None, k, h), spread


def _by_channel(p, fold):
    """(nsplit, C*fold) partials -> (nsplit*fold, C): column j belongs to channel j % C."""
    n, cols = p.shape
    return p.reshape(n * fold, cols // fold)


def _merge(partials, acc):
    """Partials (any nsplit, fold) -> one (count, mean, M2) per channel."""
    cols = [np.asarray(p, dtype=acc) for p in partials[:3]]
    if cols[0].shape[0] == 1 and partials.fold == 1:
        return cols[0][0], cols[1][0], cols[2][0]
    return tree_merge(*[_by_channel(c, partials.fold) for c in cols])


class NumpyBackend(NumpyPreprocessing):
    name = "numpy"
    xp = np
    info = None  # no device: the one-launch path never runs here

    # -- statistics -------------------------------------------------------
    @_quiet
    def welford_partials(self, plan, x3, acc, weights=None) -> Partials:
        acc = np.dtype(acc)
        outer, c, inner = x3.shape
        if outer * inner == 0:
            z = np.zeros((1, c), acc)
            return Partials(z, z.copy(), z.copy(), weighted=weights is not None)
        x3 = _contiguous(x3)
        if weights is None and native.accepts(x3, acc):
            mean, m2 = native.statistics(x3, acc)
            return Partials(np.full((1, c), outer * inner, acc), mean[None, :], m2[None, :])
        lay = _layout(x3, acc)
        if lay.kind == "whole" and weights is None:
            return _small_moments(x3, acc)
        wo = _outer_weights(weights, outer, acc)
        wfull = _contiguous(weights.values) if weights is not None and weights.kind == "full" else None
        bufsize = _bufsize(acc, x3, wfull)
        pivot = _pivot(x3, acc)
        for again in (False, True):
            if weights is None:
                s, q = lay.run(_sums_kernel(acc), (x3,), (pivot,), 2, acc, bufsize=bufsize)
                n = float(outer * inner)
                dev = s / n
                live = True
            else:
                n, s, q = lay.run(_weighted_sums_kernel(acc), (x3, wfull), (pivot,), 3, acc,
                                  outer_weights=wo, bufsize=bufsize)
                live = n != 0
                dev = np.where(live, s / np.where(live, n, 1), 0)
            m2 = q - s * dev
            far = q > PIVOT_RATIO * m2
            if weights is not None:
                far &= live
            if again or not far.any():  # the method: np.any costs more than the comparison here
                break
            # A pivot far from its channel's mean: again, about the mean found.
            centre = (pivot + dev).astype(acc)
            pivot = np.where(np.isfinite(centre), centre, pivot)
        mean = pivot + dev
        if weights is None:
            return Partials(np.full((1, c), n, acc), mean.astype(acc)[None, :], m2.astype(acc)[None, :])
        mean = np.where(live, mean, 0)
        m2 = np.where(live, m2, 0)
        return Partials(n.astype(acc)[None, :], mean.astype(acc)[None, :], m2.astype(acc)[None, :], weighted=True)

    @_quiet
    def finalize(self, partials, acc, fold, update=None, given=None) -> Stats:
        """Statistics -> normalization coefficients (and moving updates).

        ``partials`` (nsplit, C) are merged here; with ``partials=None`` the
        statistics are ``given = (mean, var)`` (inference), count unused.
        """
        if partials is not None:
            count, mean, m2 = _merge(partials, acc)
            var = m2 / count
            if not count.min() > 0:
                # No data in a channel: NaN; weights summing to 0: 0 and 0 (TF's div_no_nan).
                live = count > 0
                empty = 0 if partials.weighted else np.nan
                var = np.where(live, var, empty).astype(acc, copy=False)
                mean = np.where(live, mean, empty).astype(acc, copy=False)
            np.maximum(var, 0, out=var)  # M2 >= 0 in exact arithmetic; guard the last bit
        else:
            mean, var = (np.asarray(g, dtype=acc) for g in given)
            count = np.zeros_like(mean)
        if fold is None:  # moments only
            return Stats(count, mean, var, None, None, None, None, None)
        eps = acc.type(fold.eps)
        invstd = np.add(var, eps, dtype=acc)
        np.sqrt(invstd, out=invstd)
        np.divide(1, invstd, out=invstd)
        r = d = None
        if fold.renorm is not None:
            one = np.ones_like(mean)
            a_s = one if fold.adj_scale is None else fold.adj_scale
            a_b = np.zeros_like(mean) if fold.adj_bias is None else fold.adj_bias
            rn = fold.renorm
            sd = np.sqrt(var + eps)
            rs = np.maximum(rn.renorm_stddev, np.sqrt(eps))
            r = np.clip(sd / rs, acc.type(rn.rmin), acc.type(rn.rmax)).astype(acc)
            d = np.clip((mean - rn.renorm_mean) / rs, -acc.type(rn.dmax), acc.type(rn.dmax)).astype(acc)
            gcoef = (a_s * r * invstd).astype(acc)
            hcoef = (a_s * d + a_b).astype(acc)
        else:
            gcoef = invstd if fold.adj_scale is None else np.multiply(fold.adj_scale, invstd, dtype=acc)
            hcoef = np.zeros_like(mean) if fold.adj_bias is None else np.asarray(fold.adj_bias).astype(acc)
        # y = gamma * (gcoef * (x - mean) + hcoef) + beta, folded; a missing gamma or beta is the identity
        scale = gcoef if fold.gamma is None else np.multiply(fold.gamma, gcoef, dtype=acc)
        shift = hcoef.copy() if fold.gamma is None else np.multiply(fold.gamma, hcoef, dtype=acc)
        if fold.beta is not None:
            np.add(shift, fold.beta, out=shift, dtype=acc)
        stats = Stats(count, mean, var, invstd, scale, shift, gcoef, hcoef, r, d)
        if update is not None:
            self.moving_update(stats, acc, update)
        return stats

    @_quiet
    def merge_partials(self, partials, acc) -> Partials:
        count, mean, m2 = _merge(partials, acc)
        return Partials(count[None, :], mean[None, :], m2[None, :], 1, weighted=partials.weighted)

    def merge_sums(self, sums, acc) -> Sums:
        return Sums(np.asarray(sums.s1, acc).sum(axis=0)[None, :], np.asarray(sums.s2, acc).sum(axis=0)[None, :], 1)

    @_quiet
    def moving_update(self, stats, acc, u) -> None:
        """Apply a [`MovingUpdate`][MovingUpdate] from saved batch statistics (in place)."""
        a = acc.type(u.a)
        bm = stats.mean
        if u.bessel:
            n = stats.count
            bv = stats.var * (n / np.maximum(n - 1, 1))
        else:
            bv = stats.var
        sd = None
        if u.renorm_mean is not None or u.moving_stddev is not None:
            sd = np.sqrt(stats.var + acc.type(u.eps))
        if u.renorm_mean is not None:
            ra = acc.type(u.renorm_a)
            u.renorm_mean[...] = u.renorm_mean - (u.renorm_mean - bm) * ra
            u.renorm_stddev[...] = u.renorm_stddev - (u.renorm_stddev - sd) * ra
        if u.mean_out is not None:
            if u.zd_biased is not None:
                u.zd_biased[...] = u.zd_biased - (u.zd_biased - bm) * a
                u.mean_out[...] = u.zd_biased / acc.type(u.zd_factor)
            elif u.mean_in is None:
                u.mean_out[...] = bm
            else:
                u.mean_out[...] = u.mean_in - (u.mean_in - bm) * a
        if u.var_out is not None:
            if u.moving_stddev is not None:
                u.moving_stddev[...] = u.moving_stddev - (u.moving_stddev - sd) * a
                u.var_out[...] = np.maximum(u.moving_stddev * u.moving_stddev - acc.type(u.eps), 0)
            elif u.var_in is None:
                u.var_out[...] = bv
            else:
                u.var_out[...] = u.var_in - (u.var_in - bv) * a

    # -- elementwise -------------------------------------------------------
    @_quiet
    def normalize(self, plan, x3, affine, side3, act, acc, out_dtype):
        acc = np.dtype(acc)
        if isinstance(affine, RawAffine):
            affine = fold_raw(affine, acc)
        x3, side3 = _contiguous(x3), _contiguous(side3)
        y3 = np.empty(x3.shape, out_dtype)
        if y3.dtype == acc and native.takes_act(act) and native.accepts(x3, acc, side3):
            native.normalize(x3, side3, y3, *affine, act, acc)
        elif y3.size:
            lay = _layout(x3, acc)
            params = _affine_params(x3, affine, acc, lay)[0]
            lay.run(_normalize_kernel(act, acc), (x3, side3, y3), params, 0, acc,
                    bufsize=_bufsize(acc, x3, side3, y3))
        return y3

    @_quiet
    def backward_partials(self, plan, dy3, x3, side3, affine, act, acc):
        acc = np.dtype(acc)
        dy3, x3, side3 = _contiguous(dy3), _contiguous(x3), _contiguous(side3)
        c = x3.shape[1]
        if x3.size == 0:
            z = np.zeros((1, c), acc)
            return Sums(z, z.copy())
        if native.takes_act(act) and native.accepts(x3, acc, dy3, side3):
            s1, s2 = native.backward_sums(dy3, x3, side3, affine[0], affine, act, acc)
            return Sums(s1[None, :], s2[None, :])
        lay = _layout(x3, acc)
        params = tuple(np.asarray(v, acc) for v in affine)
        pre = _affine_params(x3, affine, acc, lay)[0] if act is not None else params
        params = (params[0], *pre)
        s1, s2 = lay.run(_backward_sums_kernel(act, acc), (dy3, x3, side3), params, 2, acc,
                         bufsize=_bufsize(acc, dy3, x3, side3))
        return Sums(s1.astype(acc)[None, :], s2.astype(acc)[None, :])

    @_quiet
    def backward_finalize(self, sums, stats, acc, training):
        s1 = np.asarray(sums.s1, acc).sum(axis=0)
        s2 = np.asarray(sums.s2, acc).sum(axis=0)
        dgamma = stats.gcoef * s2 + stats.hcoef * s1
        if training:
            inv_n = np.where(stats.count > 0, 1 / stats.count, 0).astype(acc)
            k1 = stats.scale * s1 * inv_n
            k2 = stats.scale * stats.invstd * stats.invstd * s2 * inv_n
        else:
            k1 = k2 = np.zeros_like(s1)
        return BackwardCoeffs(dgamma.astype(acc), s1.astype(acc), k1.astype(acc), k2.astype(acc))

    @_quiet
    def backward_apply(self, plan, dy3, x3, side3, affine, act, coeffs, weights, acc, want_dside, out_dtype, side_dtype):
        acc = np.dtype(acc)
        dy3, x3, side3 = _contiguous(dy3), _contiguous(x3), _contiguous(side3)
        dx3 = np.empty(x3.shape, out_dtype)
        if act is None and want_dside and dy3.dtype == np.dtype(side_dtype):
            dside3, write_dside = dy3, None  # dy' is dy itself
        elif want_dside:
            dside3 = write_dside = np.empty(x3.shape, side_dtype)
        else:
            dside3 = write_dside = None
        if x3.size == 0:
            return dx3, dside3
        if (weights is None and dx3.dtype == acc and native.takes_act(act)
                and native.accepts(x3, acc, dy3, side3, write_dside)):
            native.backward_apply(dy3, x3, side3, dx3, write_dside, tuple(affine), affine.mean, coeffs.k1, coeffs.k2,
                                  act, acc)
            return dx3, dside3
        wo = _outer_weights(weights, x3.shape[0], acc)
        wfull = _contiguous(weights.values) if weights is not None and weights.kind == "full" else None
        lay = _layout(x3, acc)
        m, k1, k2 = (np.asarray(v, acc) for v in (affine.mean, coeffs.k1, coeffs.k2))
        pre, spread = _affine_params(x3, affine, acc, lay)
        cm = m
        if spread is not None:
            cm, k1 = _fold_offsets(m, k2, k1, acc, spread, BACKWARD_SIGMAS)
            cm = cm if cm.any() else None
        if act is None:  # dy' is dy: no pre-activation
            pre = (None, pre[1], None)
        lay.run(_backward_apply_kernel(act, acc), (dy3, x3, side3, dx3, write_dside, wfull), (None, *pre, k1, k2, cm),
                0, acc, outer_weights=wo, bufsize=_bufsize(acc, dy3, x3, side3, dx3, write_dside, wfull))
        return dx3, dside3


def fold_raw(raw: RawAffine, acc) -> Affine:
    """RawAffine -> Affine, the same arithmetic the normalize kernel does inline."""
    invstd = 1 / np.sqrt(np.asarray(raw.var, acc) + acc.type(raw.eps))
    scale = invstd if raw.gamma is None else raw.gamma * invstd
    shift = np.zeros_like(invstd) if raw.beta is None else np.asarray(raw.beta, acc)
    return Affine(np.asarray(raw.mean, acc), scale.astype(acc), shift)
