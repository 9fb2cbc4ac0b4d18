"""``batch_norm_backward``: gradients of (fused) batch normalization."""
from __future__ import annotations

from typing import Any, NamedTuple

import math

import numpy as np

from .. import _dtypes, activations
from .. import _launch_cache as _lc
from .._options import one_launch_enabled
from ..backends._memory import alignment_of
from .._backend import fast_select, select, take_dlpack
from .._fast import plain_like, plain_vector
from ..backends import numpy_direct as _direct
from ..backends import numpy_native as _native
from ..backends import numpy_small as _small
from .._checks import arg_error, check_float_input, check_positive_epsilon
from .._memory import readable_all
from .._plan import plan_for_channels
from ..backends.base import Fold
from .._args import as_like, channel_param, make_weights
from .normalization import ForwardContext, _bn_backward, bn_backward, check_side_input, check_training_batch


class BatchNormGrads(NamedTuple):
    """Gradients w.r.t. x, scale (gamma), offset (beta) and side_input; in inference
    (``is_training=False``) also w.r.t. the given mean and variance (None in training,
    where the statistics are the batch's and their gradient is part of ``dx``)."""

    dx: Any
    dscale: Any
    doffset: Any
    dside_input: Any
    dmean: Any = None
    dvariance: Any = None


def batch_norm_backward(dy, x, scale, mean, variance, epsilon=1e-3, *, offset=None, data_format="NHWC",
                        is_training=True, activation=None, side_input=None, batch_weights=None,
                        renorm_r=None, renorm_d=None):
    """Gradients of ``y = act((x − mean)/sqrt(variance + eps)·scale + offset + side_input)``.

    ``mean``/``variance`` are the statistics the forward pass normalized
    with: the batch's mean and *biased* variance when ``is_training`` (the
    gradient then flows through them), the running ones otherwise (constants).
    The activation's derivative is fused: the pre-activation is recomputed
    from ``x`` (and ``offset``, ``side_input``), never stored. With
    ``renorm_r``/``renorm_d`` the forward was batch renormalization,
    ``((x − mean)/σ·r + d)·scale + offset``, with r and d held constant.
    ``batch_weights`` ([N]) are the forward's frequency weights.

    Per-channel sums of dy' and dy'·(x − mean), their merge, and one
    elementwise pass for dx (and d side_input): three launches, plus one
    small one here to fold the given statistics (``BatchNorm.backward``
    reuses its forward's and skips it).

    In inference the mean and variance are inputs like any other, and their
    gradients come back too (per channel, from the same sums:
    ``dmean = −scale·invstd·Σ dy′``, ``dvariance = −½·scale·invstd³·Σ dy′(x − mean)``,
    with renorm's r in the scale).

    Returns:
        [`BatchNormGrads`][BatchNormGrads] ``(dx, dscale, doffset, dside_input, dmean, dvariance)``;
        ``dscale``/``doffset`` (and ``dmean``/``dvariance``) in the accumulation dtype, ``dside_input``
        None when there is no side input.
    """
    func = "batch_norm_backward"
    if batch_weights is None and renorm_r is None and renorm_d is None:
        out = _backward_fast(dy, x, scale, mean, variance, epsilon, offset, data_format, is_training, activation,
                             side_input)
        if out is not None:
            return out
    dy, x, scale, mean, variance, offset, side_input, batch_weights, renorm_r, renorm_d = take_dlpack(
        func, dy=dy, x=x, scale=scale, mean=mean, variance=variance, offset=offset, side_input=side_input,
        batch_weights=batch_weights, renorm_r=renorm_r, renorm_d=renorm_d)
    check_float_input(func, "dy", dy)
    check_float_input(func, "x", x)
    backend = select(func, "x", x, dy=dy, scale=scale, mean=mean, variance=variance, offset=offset,
                     side_input=side_input, batch_weights=batch_weights, renorm_r=renorm_r, renorm_d=renorm_d)
    dy, x, scale, mean, variance, offset, side_input, batch_weights, renorm_r, renorm_d = readable_all(
        func, dy=dy, x=x, scale=scale, mean=mean, variance=variance, offset=offset, side_input=side_input,
        batch_weights=batch_weights, renorm_r=renorm_r, renorm_d=renorm_d)
    xp = backend.xp
    if tuple(dy.shape) != tuple(x.shape):
        raise arg_error(ValueError, func, "dy", f"x's shape {tuple(x.shape)}", f"shape {tuple(dy.shape)}")
    if dy.dtype != x.dtype:
        raise arg_error(TypeError, func, "dy", f"x's dtype {x.dtype}", f"dtype {dy.dtype}")
    eps = check_positive_epsilon(func, "epsilon", epsilon)
    act = activations.get(activation, func)
    plan = plan_for_channels(x.shape, data_format, func)
    acc = _dtypes.acc_dtype(x.dtype)
    check_side_input(func, side_input, x)
    p = lambda name, v, req=False: channel_param(func, name, v, plan, xp, acc, required=req)  # noqa: E731
    gamma, beta = p("scale", scale), p("offset", offset)
    m, v = p("mean", mean, True), p("variance", variance, True)
    r, d = p("renorm_r", renorm_r), p("renorm_d", renorm_d)
    if (r is None) != (d is None):
        raise arg_error(ValueError, func, "renorm_d" if d is None else "renorm_r", "renorm_r and renorm_d together", "only one of them")
    if is_training:
        check_training_batch(func, plan, x)
    weights = None
    if batch_weights is not None:
        w = as_like(func, "batch_weights", batch_weights, x, xp)
        if w.ndim != 1 or w.shape[0] != x.shape[0]:
            raise arg_error(ValueError, func, "batch_weights", f"shape ({x.shape[0]},)", f"shape {tuple(w.shape)}")
        weights = make_weights(func, "batch_weights", w, x.shape, plan, xp, acc)
    return _backward(backend, plan, dy, x, gamma, beta, m, v, r, d, weights, eps, act, side_input, is_training, xp,
                     acc)


def _backward_fast(dy, x, scale, mean, variance, epsilon, offset, data_format, is_training, activation, side_input):
    """batch_norm_backward for arguments that need no conversion (None: take the ordinary path).

    Only checks that the ordinary path makes in the same order, so a call
    gives the same result or error either way.
    """
    backend = fast_select(x, (dy, scale, mean, variance, offset, side_input))
    if backend is None or not _dtypes.is_supported_float(x.dtype) or dy.dtype != x.dtype or dy.shape != x.shape:
        return None
    if type(epsilon) is not float or not 0.0 <= epsilon < math.inf:
        return None
    if type(activation) is str:  # a known name (an unknown one: the ordinary path's error)
        activation = activations.by_name(activation)
        if activation is None:
            return None
    elif activation is not None and not isinstance(activation, activations.Activation):
        return None
    plan = plan_for_channels(x.shape, data_format, "batch_norm_backward")
    acc = _dtypes.acc_dtype(x.dtype)
    c = plan.channels
    if mean is None or variance is None or (is_training and plan.per_channel == 0):
        return None
    if not (plain_vector(scale, c, acc) and plain_vector(offset, c, acc) and plain_vector(mean, c, acc)
            and plain_vector(variance, c, acc) and plain_like(side_input, x)):
        return None
    if (backend.info is None and plan.perm is None and _direct.takes(x) and dy.flags.c_contiguous
            and _native.takes_act(activation) and (side_input is None or side_input.flags.c_contiguous)):
        training = bool(is_training)
        dx, dgamma, dbeta, dside, invstd, fscale, hcoef = _direct.backward(
            dy, x, plan, scale, offset, mean, variance, epsilon, activation, side_input, training,
            side_input is not None)
        dmean = dvar = None
        if not training:  # as _backward
            g1 = 1 if scale is None else scale
            dmean = -fscale * dbeta
            dvar = -0.5 * g1 * invstd * invstd * (dgamma - hcoef * dbeta)
        return BatchNormGrads(dx, dgamma, dbeta, dside, dmean, dvar)
    return _backward(backend, plan, dy, x, scale, offset, mean, variance, None, None, None, epsilon, activation,
                     side_input, is_training, backend.xp, acc)


def _backward(backend, plan, dy, x, gamma, beta, m, v, r, d, weights, eps, act, side_input, is_training, xp, acc):
    """batch_norm_backward on checked arguments (per-channel (C,) vectors in ``acc``)."""
    if backend.info is not None and r is None and weights is None and _lc._enabled:
        out = _replayed(backend, plan, dy, x, gamma, beta, m, v, eps, act, side_input, bool(is_training), acc)
        if out is not None:
            return out
    fold = Fold(eps, gamma, beta)
    if backend.info is None and r is None and 0 < x.size <= _small.LIMIT:
        stats = _small.given_stats(m, v, eps, gamma, beta, acc)
    else:
        stats = backend.finalize(None, acc, fold, given=(m, v))
    if r is not None:
        # y = ((x - mean)·invstd·r + d)·gamma + beta, with r and d constants
        g1 = 1 if gamma is None else gamma
        stats.r, stats.d = r, d
        stats.gcoef = r * stats.invstd
        stats.hcoef = d
        stats.scale = stats.gcoef * g1
        stats.shift = d * g1 + (0 if beta is None else beta)
    stats.count = _counts(plan, weights, xp, acc) if weights is not None else _count_vector(backend, plan, acc)
    x3, dy3 = plan.view3(x), plan.view3(dy)
    side3 = None if side_input is None else plan.view3(side_input)
    ctx = ForwardContext(backend, plan, acc, x3, side3, act, bool(is_training), fold, stats, None, None, weights,
                         x.dtype, None if side3 is None else side3.dtype)
    dx3, dgamma, dbeta, dside3 = bn_backward(ctx, dy3, side_input is not None)
    dmean = dvar = None
    if not is_training:
        # dbeta = S1, dgamma = gcoef·S2 + hcoef·S1 with gcoef = r·invstd: recover gcoef·S2
        g1 = 1 if gamma is None else gamma
        dmean = -stats.scale * dbeta
        dvar = -0.5 * g1 * stats.invstd * stats.invstd * (dgamma - stats.hcoef * dbeta)
    return BatchNormGrads(plan.unview3(dx3), dgamma, dbeta, None if dside3 is None else plan.unview3(dside3),
                          dmean, dvar)


def _replayed(backend, plan, dy, x, gamma, beta, m, v, eps, act, side_input, training, acc):
    """The call on a kernel backend as one launch program (folding the given statistics and the
    backward), recorded on its signature's second call; None: run the ordinary code."""
    x3, dy3 = plan.view3(x), plan.view3(dy)
    side3 = None if side_input is None else plan.view3(side_input)
    key = ("batch_norm_backward", one_launch_enabled(), training, x3.shape, x3.strides, dy3.strides, x3.dtype, acc,
           alignment_of(x3), alignment_of(dy3), None if side3 is None else (side3.strides, alignment_of(side3)),
           eps, None if act is None else (act.kernel_id, act.alpha), gamma is None, beta is None)
    prog = _lc.lookup(backend, key)
    if prog is _lc.UNCACHEABLE:
        return None
    count = _count_vector(backend, plan, acc)
    inputs = [dy3, x3, side3, gamma, beta, m, v, count]
    if prog is not None:
        dx3, dgamma, dbeta, dside3, scale, invstd, hcoef = prog.run(inputs)
    else:
        if not _lc.may_record(backend, ("batch_norm_backward", x3.shape)):
            return None
        rec = _lc.Recording(backend)
        with rec:
            fold = Fold(eps, gamma, beta)
            stats = rec.backend.finalize(None, acc, fold, given=(m, v))
            stats.count = count
            ctx = ForwardContext(rec.backend, plan, acc, x3, side3, act, training, fold, stats, None, None, None,
                                 x.dtype, None if side3 is None else side3.dtype)
            dx3, dgamma, dbeta, dside3 = _bn_backward(ctx, dy3, side3 is not None, rec.backend)
        scale, invstd, hcoef = stats.scale, stats.invstd, stats.hcoef
        _lc.store(backend, key, rec.program(inputs, [dx3, dgamma, dbeta, dside3, scale, invstd, hcoef],
                                            keyed_alignment=(0, 1, 2)))
    dmean = dvar = None
    if not training:
        g1 = 1 if gamma is None else gamma
        dmean = -scale * dbeta
        dvar = -0.5 * g1 * invstd * invstd * (dgamma - hcoef * dbeta)
    return BatchNormGrads(plan.unview3(dx3), dgamma, dbeta, None if dside3 is None else plan.unview3(dside3),
                          dmean, dvar)


def _count_vector(backend, plan, acc):
    """The unweighted per-channel count, one constant array per (C, n, dtype) and backend (read only:
    a launch program takes it as an input)."""
    cache = backend.__dict__.get("_count_vectors")
    if cache is None:
        cache = backend.__dict__["_count_vectors"] = {}
    k = (plan.channels, plan.per_channel, acc)
    c = cache.get(k)
    if c is None:
        c = backend.xp.full(plan.channels, plan.per_channel, dtype=acc)
        if isinstance(c, np.ndarray):
            c.flags.writeable = False
        if len(cache) >= 64:
            cache.clear()
        cache[k] = c
    return c


def _counts(plan, weights, xp, acc):
    """Per-channel sample count (or weight total) of the forward statistics."""
    if weights is None:
        return xp.full(plan.channels, plan.per_channel, dtype=acc)
    if weights.kind == "outer":
        total = weights.values.sum() * (weights.divisor * plan.inner)
        return xp.full(plan.channels, 0, dtype=acc) + total.astype(acc)
    return weights.values.sum(axis=(0, 2)).astype(acc)
