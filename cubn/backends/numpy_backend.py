"""The NumPy backend: the primitives of ``backends.base`` in vectorized NumPy.

Sums run along contiguous rows (one row per channel), where NumPy uses
pairwise summation, so their error grows like log(n) rather than n; variances
are two-pass (mean first, then squared deviations), never E[x²] − E[x]².
"""
from __future__ import annotations

import functools

import numpy as np

from .._welford import tree_merge
from .base import Affine, BackwardCoeffs, Partials, RawAffine, Stats, Sums
from .numpy_preprocessing import NumpyPreprocessing


def _quiet(f):
    """NaN/Inf in the data propagate to their channel by design: no warnings."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            return f(*args, **kwargs)

    return wrapper


def _rows(a3, dtype):
    """(outer, C, inner) -> contiguous (C, outer*inner) in ``dtype``."""
    outer, c, inner = a3.shape
    return np.ascontiguousarray(np.moveaxis(a3, 1, 0), dtype=dtype).reshape(c, outer * inner)


def _bc(v):
    """Per-channel (C,) array broadcast against (outer, C, inner)."""
    return v[None, :, None]


def _weights_rows(weights, shape3, dtype):
    outer, c, inner = shape3
    if weights.kind == "full":
        return _rows(weights.values, dtype)
    w = np.repeat(np.asarray(weights.values, dtype=dtype), weights.divisor)[:outer]
    return np.broadcast_to(np.repeat(w, inner)[None, :], (c, outer * inner))


def _by_channel(p, fold):
    """(nsplit, C*fold) partials -> (nsplit*fold, C): column j belongs to channel j % C."""
    n, cols = p.shape
    return p.reshape(n * fold, cols // fold)


class NumpyBackend(NumpyPreprocessing):
    name = "numpy"
    xp = np
    info = None  # no device: the one-launch path never runs here

    # -- statistics -------------------------------------------------------
    @_quiet
    def welford_partials(self, plan, x3, acc, weights=None) -> Partials:
        xr = _rows(x3, acc)
        c, n = xr.shape
        if weights is None:
            count = np.full(c, n, dtype=acc)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = xr.sum(axis=1) / count if n else np.zeros(c, acc)
            d = xr - mean[:, None]
            m2 = np.einsum("ij,ij->i", d, d) if n else np.zeros(c, acc)
        else:
            # Zero weights are skipped (as the kernels do), so an Inf or NaN
            # under a zero weight does not reach the statistics.
            wr = _weights_rows(weights, x3.shape, acc)
            live = wr != 0
            xr = np.where(live, xr, 0)
            count = wr.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(count != 0, (wr * xr).sum(axis=1) / count, 0).astype(acc)
            d = np.where(live, xr - mean[:, None], 0)
            m2 = (wr * d * d).sum(axis=1)
        return Partials(count[None, :], mean[None, :], m2[None, :])

    @_quiet
    def finalize(self, partials, acc, fold, update=None, given=None) -> Stats:
        """Statistics -> normalization coefficients (and moving updates).

        ``partials`` (nsplit, C) are merged here; with ``partials=None`` the
        statistics are ``given = (mean, var)`` (inference), count unused.
        """
        if partials is not None:
            count, mean, m2 = tree_merge(*[_by_channel(np.asarray(p, dtype=acc), partials.fold) for p in partials[:3]])
            with np.errstate(invalid="ignore", divide="ignore"):
                var = np.where(count > 0, m2 / count, np.nan).astype(acc)
                mean = np.where(count > 0, mean, np.nan).astype(acc)
            var = np.maximum(var, 0)  # M2 >= 0 in exact arithmetic; guard the last bit
        else:
            mean, var = (np.asarray(g, dtype=acc) for g in given)
            count = np.zeros_like(mean)
        if fold is None:  # moments only
            return Stats(count, mean, var, None, None, None, None, None)
        eps = acc.type(fold.eps)
        invstd = (1 / np.sqrt(var + eps)).astype(acc)
        one = np.ones_like(mean)
        gamma = one if fold.gamma is None else fold.gamma
        beta = np.zeros_like(mean) if fold.beta is None else fold.beta
        a_s = one if fold.adj_scale is None else fold.adj_scale
        a_b = np.zeros_like(mean) if fold.adj_bias is None else fold.adj_bias
        r = d = None
        if fold.renorm is not None:
            rn = fold.renorm
            sd = np.sqrt(var + eps)
            rs = np.maximum(rn.renorm_stddev, np.sqrt(eps))
            r = np.clip(sd / rs, acc.type(rn.rmin), acc.type(rn.rmax)).astype(acc)
            d = np.clip((mean - rn.renorm_mean) / rs, -acc.type(rn.dmax), acc.type(rn.dmax)).astype(acc)
            gcoef = (a_s * r * invstd).astype(acc)
            hcoef = (a_s * d + a_b).astype(acc)
        else:
            gcoef = (a_s * invstd).astype(acc)
            hcoef = a_b.astype(acc) if fold.adj_bias is not None else np.zeros_like(mean)
        scale = (gamma * gcoef).astype(acc)
        shift = (gamma * hcoef + beta).astype(acc)
        stats = Stats(count, mean, var, invstd, scale, shift, gcoef, hcoef, r, d)
        if update is not None:
            self.moving_update(stats, acc, update)
        return stats

    @_quiet
    def merge_partials(self, partials, acc) -> Partials:
        count, mean, m2 = tree_merge(*[_by_channel(np.asarray(p, dtype=acc), partials.fold) for p in partials[:3]])
        return Partials(count[None, :], mean[None, :], m2[None, :], 1)

    def merge_sums(self, sums, acc) -> Sums:
        return Sums(np.asarray(sums.s1, acc).sum(axis=0)[None, :], np.asarray(sums.s2, acc).sum(axis=0)[None, :], 1)

    @_quiet
    def moving_update(self, stats, acc, u) -> None:
        """Apply a :class:`MovingUpdate` from saved batch statistics (in place)."""
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
    def _preact(self, x3, affine, side3, acc):
        if isinstance(affine, RawAffine):
            affine = fold_raw(affine, acc)
        z = (x3.astype(acc, copy=False) - _bc(affine.mean)) * _bc(affine.scale) + _bc(affine.shift)
        if side3 is not None:
            z = z + side3.astype(acc, copy=False)
        return z

    @_quiet
    def normalize(self, plan, x3, affine, side3, act, acc, out_dtype):
        z = self._preact(x3, affine, side3, acc)
        if act is not None:
            z = act.forward(z)
        return z.astype(out_dtype, copy=False)

    @_quiet
    def backward_partials(self, plan, dy3, x3, side3, affine, act, acc):
        dyp = dy3.astype(acc, copy=False)
        if act is not None:
            dyp = dyp * act.derivative(self._preact(x3, affine, side3, acc))
        xm = x3.astype(acc, copy=False) - _bc(affine.mean)
        s1 = _rows(dyp, acc).sum(axis=1)
        s2 = np.einsum("ij,ij->i", _rows(dyp, acc), _rows(xm, acc))
        return Sums(s1[None, :], s2[None, :])

    @_quiet
    def backward_finalize(self, sums, stats, acc, training):
        s1 = np.asarray(sums.s1, acc).sum(axis=0)
        s2 = np.asarray(sums.s2, acc).sum(axis=0)
        dgamma = stats.gcoef * s2 + stats.hcoef * s1
        if training:
            with np.errstate(invalid="ignore", divide="ignore"):
                inv_n = np.where(stats.count > 0, 1 / stats.count, 0).astype(acc)
            k1 = stats.scale * s1 * inv_n
            k2 = stats.scale * stats.invstd * stats.invstd * s2 * inv_n
        else:
            k1 = k2 = np.zeros_like(s1)
        return BackwardCoeffs(dgamma.astype(acc), s1.astype(acc), k1.astype(acc), k2.astype(acc))

    @_quiet
    def backward_apply(self, plan, dy3, x3, side3, affine, act, coeffs, weights, acc, want_dside, out_dtype, side_dtype):
        dyp = dy3.astype(acc, copy=False)
        if act is not None:
            dyp = dyp * act.derivative(self._preact(x3, affine, side3, acc))
        xm = x3.astype(acc, copy=False) - _bc(affine.mean)
        corr = _bc(coeffs.k1) + _bc(coeffs.k2) * xm
        if weights is not None:
            corr = corr * _weight3(weights, x3.shape, acc)
        dx = dyp * _bc(affine.scale) - corr
        dside = dyp.astype(side_dtype, copy=False) if want_dside else None
        return dx.astype(out_dtype, copy=False), dside


def _weight3(weights, shape3, acc):
    outer, c, inner = shape3
    if weights.kind == "full":
        return weights.values.astype(acc, copy=False)
    w = np.repeat(np.asarray(weights.values, dtype=acc), weights.divisor)[:outer]
    return w[:, None, None]


def fold_raw(raw: RawAffine, acc) -> Affine:
    """RawAffine -> Affine, the same arithmetic the normalize kernel does inline."""
    invstd = 1 / np.sqrt(np.asarray(raw.var, acc) + acc.type(raw.eps))
    scale = invstd if raw.gamma is None else raw.gamma * invstd
    shift = np.zeros_like(invstd) if raw.beta is None else np.asarray(raw.beta, acc)
    return Affine(np.asarray(raw.mean, acc), scale.astype(acc), shift)
