"""Gradients TensorFlow's autodiff gives and ``batch_norm_backward`` does not:
``tf.nn.batch_normalization`` w.r.t. every argument (the given mean and
variance included), and ``moments`` / ``weighted_moments`` w.r.t. ``x``.

All are compositions of the backward primitives (``backward_partials`` gives
the per-channel sums S1 = Σ dy′ and S2 = Σ dy′·(x − mean);
``backward_apply`` the elementwise pass), so they run on every backend,
kernels included, with no kernel of their own.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import _dtypes
from .._args import as_like, channel_param, make_weights
from .._backend import select
from .._checks import arg_error, check_float_input
from .._plan import plan_for_reduction
from ..backends import base as _base
from ..backends.base import Affine, BackwardCoeffs, Fold
from .normalization import batch_normalization_args


class BatchNormalizationGrads(NamedTuple):
    """Gradients of ``batch_normalization`` w.r.t. x, mean, variance, offset and scale,
    each shaped like its argument (None where the argument was None)."""

    dx: Any
    dmean: Any
    dvariance: Any
    doffset: Any
    dscale: Any


def batch_normalization_backward(dy, x, mean, variance, offset, scale, variance_epsilon, *, activation=None,
                                 data_format=None):
    """Gradients of ``y = act(scale·(x − mean)/sqrt(variance + eps) + offset)``.

    The arguments broadcast as in [`cubn.batch_normalization`][cubn.ops.normalization.batch_normalization]; each
    gradient is summed over the axes its argument was broadcast along and has
    that argument's shape, as TensorFlow's gradient of
    ``tf.nn.batch_normalization`` does. With ``invstd = 1/sqrt(variance+eps)``:
    ``dx = scale·invstd·dy′``, ``doffset = Σ dy′``, ``dscale = invstd·Σ dy′(x−mean)``,
    ``dmean = −scale·invstd·Σ dy′`` and
    ``dvariance = −½·scale·invstd³·Σ dy′(x−mean)`` (dy′: dy through the
    activation's derivative).

    Returns:
        [`BatchNormalizationGrads`][BatchNormalizationGrads] ``(dx, dmean, dvariance, doffset, dscale)``.
    """
    func = "batch_normalization_backward"
    check_float_input(func, "dy", dy)
    check_float_input(func, "x", x)
    params = {"mean": mean, "variance": variance, "offset": offset, "scale": scale}
    backend = select(func, "x", x, dy=dy, **params)
    xp = backend.xp
    if tuple(dy.shape) != tuple(x.shape) or dy.dtype != x.dtype:
        raise arg_error(ValueError, func, "dy", f"x's shape {tuple(x.shape)} and dtype {x.dtype}",
                        f"shape {tuple(dy.shape)} and dtype {dy.dtype}")
    eps, act, acc, plan, p, shaped, _ = batch_normalization_args(func, x, params, variance_epsilon, activation,
                                                                 data_format, xp)
    gamma = p.get("scale")
    if x.size == 0:
        s1 = dscale_c = xp.zeros(plan.channels, acc)
        invstd = 1 / xp.sqrt(p["variance"] + acc.type(eps))
        dx = xp.empty_like(x)
    else:
        stats = backend.finalize(None, acc, Fold(eps, gamma, p.get("offset")), given=(p["mean"], p["variance"]))
        affine = Affine(stats.mean, stats.scale, stats.shift)
        x3, dy3 = plan.view3(x), plan.view3(dy)
        sums = backend.backward_partials(plan, dy3, x3, None, affine, act, acc)
        coeffs = backend.backward_finalize(sums, stats, acc, False)  # dgamma = invstd·S2, dbeta = S1, k = 0
        dx3, _ = backend.backward_apply(plan, dy3, x3, None, affine, act, coeffs, None, acc, False, x.dtype, x.dtype)
        dx = plan.unview3(dx3)
        invstd, s1, dscale_c = stats.invstd, coeffs.dbeta, coeffs.dgamma
    g = 1 if gamma is None else gamma
    per_c = {
        "mean": -(g * invstd) * s1,
        "variance": -0.5 * g * invstd * invstd * dscale_c,  # −½·g·invstd³·S2, with dscale = invstd·S2
        "offset": s1,
        "scale": dscale_c,
    }
    out = {k: None if v is None else _to_param_shape(per_c[k], shaped[k], v, plan) for k, v in params.items()}
    return BatchNormalizationGrads(dx, out["mean"], out["variance"], out["offset"], out["scale"])


def _to_param_shape(g, full, given, plan):
    """A per-channel gradient -> the argument's shape, summed over the axes it was broadcast along."""
    block = tuple(plan.orig_shape[a] for a in plan.kept)
    g = g.reshape(block)
    sum_axes = tuple(i for i, a in enumerate(plan.kept) if full.shape[a] == 1)
    if sum_axes:
        g = g.sum(axis=sum_axes, keepdims=True)
    return g.reshape(np.shape(given))


def moments_backward(dmean, dvariance, x, axes, *, keepdims=False):
    """Gradient w.r.t. ``x`` of ``(mean, variance) = moments(x, axes)``.

    ``dx = dmean/n + dvariance·2(x − mean)/n`` (n values per statistic);
    ``dmean``/``dvariance`` have the statistics' shape (with or without the
    reduced axes) or are None (zero).
    """
    return _moments_backward("moments_backward", dmean, dvariance, x, axes, None, "weights")


def weighted_moments_backward(dmean, dvariance, x, axes, weights, *, keepdims=False):
    """Gradient w.r.t. ``x`` of ``weighted_moments(x, axes, weights)`` (weights are constants).

    ``dx = w·(dmean + dvariance·2(x − mean))/Σw``; a statistic whose weights
    sum to 0 passes no gradient.
    """
    if weights is None:
        raise arg_error(TypeError, "weighted_moments_backward", "weights", "an array broadcastable to x", "None")
    return _moments_backward("weighted_moments_backward", dmean, dvariance, x, axes, weights, "weights")


def _moments_backward(func, dmean, dvariance, x, axes, weights_arg, wname):
    check_float_input(func, "x", x)
    backend = select(func, "x", x, dmean=dmean, dvariance=dvariance, **{wname: weights_arg})
    xp = backend.xp
    plan = plan_for_reduction(x.shape, axes, func)
    acc = _dtypes.acc_dtype(x.dtype)
    if x.size == 0:
        return xp.zeros(x.shape, x.dtype)
    c = plan.channels
    dm = channel_param(func, "dmean", dmean, plan, xp, acc)
    dv = channel_param(func, "dvariance", dvariance, plan, xp, acc)
    zeros = xp.zeros(c, acc)
    dm = zeros if dm is None else dm
    dv = zeros if dv is None else dv
    weights = None
    if weights_arg is not None:
        w = as_like(func, wname, weights_arg, x, xp)
        weights = make_weights(func, wname, w, x.shape, plan, xp, acc)
    x3 = plan.view3(x)
    stats = _base.statistics(backend, plan, x3, acc, weights)
    total = stats.count
    inv = xp.where(total > 0, 1 / xp.where(total > 0, total, 1), 0).astype(acc)
    # backward_apply: dx = scale·dy′ − w·(k1 + k2·(x − mean)); scale 0 leaves the statistics' part
    coeffs = BackwardCoeffs(zeros, zeros, (-dm * inv).astype(acc), (-2 * dv * inv).astype(acc))
    mean = xp.where(total > 0, stats.mean, 0).astype(acc)
    dx3, _ = backend.backward_apply(plan, x3, x3, None, Affine(mean, zeros, zeros), None, coeffs, weights, acc,
                                    False, x.dtype, x.dtype)
    return plan.unview3(dx3)
