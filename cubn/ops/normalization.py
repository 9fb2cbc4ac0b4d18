"""Normalization ops: tf.nn.batch_normalization, fused_batch_norm, and the
training forward/backward pair the layers are built on."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _dtypes, activations
from .._backend import fast_select, is_array, select, take_dlpack
from .._checks import arg_error, check_float_input, check_positive_epsilon, describe
from .._memory import readable, readable_all
from .._options import one_launch_enabled
from .._plan import channel_axis, plan_for_channels, plan_for_kept_axes
from ..backends import numpy_direct as _direct
from ..backends import numpy_mid as _mid
from ..backends import numpy_native as _native
from ..backends import numpy_small as _small
from ..backends import one_launch
from .. import _launch_cache as _lc
from ..backends._memory import alignment_of
from ..backends import base as _base
from ..backends.base import Affine, Fold, MovingUpdate, RawAffine, Stats
from .._args import channel_param
from .._fast import plain_like, plain_vector


# ---------------------------------------------------------------------------
# The forward/backward pair (layers and the public ops both use these)
# ---------------------------------------------------------------------------
@dataclass
class ForwardContext:
    """What a backward pass needs from its forward pass."""

    backend: Any
    plan: Any
    acc: Any
    x3: Any
    side3: Any
    act: Any
    training: bool
    fold: Fold
    stats: Any = None          # backends.base.Stats (None until needed in inference)
    exchange: Any = None       # SyncBatchNorm's cross-process exchange (training only)
    given: tuple | None = None  # (mean, var) used in inference
    weights: Any = None
    x_dtype: Any = None
    side_dtype: Any = None


def bn_forward(backend, plan, x3, acc, *, training, fold, update=None, given=None,
               weights=None, side3=None, act=None, exchange=None, cacheable=True):
    """``y3 = act(normalize(x3) + side3)``; returns ``(y3, ForwardContext)``.

    Training: statistics of ``x3`` (weighted by ``weights``), optional moving
    update in the same finalize launch: 3 launches; 1 launch on the kernel
    backends when every channel fits in one block's registers (unweighted,
    not distributed, allowed by ``cubn.use_one_launch``: the one-launch path,
    chosen by ``backends.one_launch.decide``). Inference: ``given =
    (mean, var)`` folded inside the normalize launch: 1 launch.

    ``exchange`` (SyncBatchNorm) sits between the statistics and finalize:
    ``exchange.partials(backend, partials, acc)`` returns the partials of the
    whole distributed batch, and the context keeps it for the backward sums.

    On a kernel backend a repeated signature replays its launch program
    (``cubn._launch_cache``); ``cacheable=False`` says the scalars change
    from call to call (a cumulative average's 1/t), so a program would not
    be reused.
    """
    if backend.info is None:
        if (weights is None and exchange is None and fold.adj_scale is None and fold.adj_bias is None
                and fold.renorm is None and _small.plain_update(update) and _small.whole(x3, side3, act)
                and (training or all(getattr(g, "dtype", None) == acc for g in given))):
            return _small_forward(backend, plan, x3, acc, training, fold, update, given, side3, act)
    elif cacheable and exchange is None and weights is None and _lc._enabled:
        key = _forward_key(backend, x3, acc, training, fold, update, given, side3, act)
        if key is not None:
            prog = _lc.lookup(backend, key)
            if prog is None or prog is not _lc.UNCACHEABLE:
                inputs = _forward_inputs(x3, side3, fold, update, given)
                ctx = ForwardContext(backend, plan, acc, x3, side3, act, training, fold, weights=None,
                                     x_dtype=x3.dtype, side_dtype=None if side3 is None else side3.dtype)
                if prog is not None:
                    outs = prog.run(inputs)
                    if training:
                        ctx.stats = Stats(*outs[1:])
                    else:
                        ctx.given = given
                    return outs[0], ctx
                return _record_forward(key, backend, plan, x3, acc, training, fold, update, given, side3, act, inputs)
    return _bn_forward(backend, plan, x3, acc, training, fold, update, given, weights, side3, act, exchange)


def _small_forward(backend, plan, x3, acc, training, fold, update, given, side3, act):
    """bn_forward on the NumPy backend for a small x3 (``backends.numpy_small``: the same results)."""
    sdt = None if side3 is None else side3.dtype
    if training:
        y3, stats = _small.train(x3, acc, fold.eps, fold.gamma, fold.beta, side3, act, x3.dtype, update)
        return y3, ForwardContext(backend, plan, acc, x3, side3, act, True, fold, stats, None, None, None, x3.dtype,
                                  sdt)
    y3 = _small.infer(x3, acc, fold.eps, fold.gamma, fold.beta, given[0], given[1], side3, act)
    return y3, ForwardContext(backend, plan, acc, x3, side3, act, False, fold, None, None, given, None, x3.dtype, sdt)


_STATS_FIELDS = ("count", "mean", "var", "invstd", "scale", "shift", "gcoef", "hcoef", "r", "d")


def _act_key(act):
    return None if act is None else (act.kernel_id, act.alpha)


def _forward_key(backend, x3, acc, training, fold, update, given, side3, act):
    """What a training or inference forward's launches depend on (None: not cached)."""
    if fold.adj_scale is not None or fold.adj_bias is not None or fold.renorm is not None:
        return None
    if update is not None:
        u = update
        if u.renorm_mean is not None or u.moving_stddev is not None or u.renorm_stddev is not None:
            return None
        ukey = (u.a, u.bessel, u.zd_factor, u.eps, u.mean_in is None, u.var_in is None, u.zd_biased is None,
                u.mean_in is u.mean_out, u.var_in is u.var_out, u.mean_out is None, u.var_out is None)
    else:
        ukey = None
    side = None if side3 is None else (side3.shape, side3.strides, side3.dtype, alignment_of(side3))
    return ("forward", one_launch_enabled(), training, x3.shape, x3.strides, x3.dtype, alignment_of(x3),
            acc, _act_key(act), side, fold.eps, fold.gamma is None, fold.beta is None, ukey,
            None if given is None else (given[0] is None, given[1] is None))


def _forward_inputs(x3, side3, fold, update, given):
    u = update
    return [x3, side3, fold.gamma, fold.beta,
            None if u is None else u.mean_in, None if u is None else u.mean_out,
            None if u is None else u.var_in, None if u is None else u.var_out,
            None if u is None else u.zd_biased,
            None if given is None else given[0], None if given is None else given[1]]


def _record_forward(key, backend, plan, x3, acc, training, fold, update, given, side3, act, inputs):
    if not _lc.may_record(backend, ("forward", x3.shape)):
        return _bn_forward(backend, plan, x3, acc, training, fold, update, given, None, side3, act, None)
    rec = _lc.Recording(backend)
    with rec:
        y3, ctx = _bn_forward(rec.backend, plan, x3, acc, training, fold, update, given, None, side3, act, None)
    ctx.backend = backend
    outs = [y3] + ([getattr(ctx.stats, f) for f in _STATS_FIELDS] if training else [])
    _lc.store(backend, key, rec.program(inputs, outs, keyed_alignment=(0, 1), aliases=((4, 5), (6, 7))))
    return y3, ctx


def _bn_forward(backend, plan, x3, acc, training, fold, update, given, weights, side3, act, exchange):
    ctx = ForwardContext(backend, plan, acc, x3, side3, act, training, fold, weights=weights,
                         x_dtype=x3.dtype, side_dtype=None if side3 is None else side3.dtype,
                         exchange=exchange if training else None)
    info = backend.info
    if info is None and weights is None and exchange is None:
        lp = _mid.plan(x3, acc)
        if lp is not None and _mid.fits(side3):
            y3, stats = _mid.forward(backend, lp, x3, acc, training, fold, update, given, side3, act)
            if training:
                ctx.stats = stats
            else:
                ctx.given = given
            return y3, ctx
    if training:
        launch = None
        if info is not None:  # the NumPy backend has no one-launch path: no addresses to ask
            launch = one_launch.decide(one_launch.FORWARD, plan, x3.dtype, acc, info,
                                       min(alignment_of(x3), alignment_of(side3)),
                                       enabled=one_launch_enabled(), weighted=weights is not None,
                                       distributed=exchange is not None)
        if launch is not None:
            y3, ctx.stats = backend.train_forward_one_launch(launch, plan, x3, acc, fold, update, side3, act)
            return y3, ctx
        if exchange is None:
            ctx.stats = _base.statistics(backend, plan, x3, acc, weights, fold, update)
        else:  # the ranks exchange partials: statistics and finalize stay apart
            partials = exchange.partials(backend, backend.welford_partials(plan, x3, acc, weights), acc)
            ctx.stats = backend.finalize(partials, acc, fold, update)
        affine = Affine(ctx.stats.mean, ctx.stats.scale, ctx.stats.shift)
    else:
        ctx.given = given
        affine = RawAffine(given[0], given[1], fold.gamma, fold.beta, fold.eps)
    y3 = backend.normalize(plan, x3, affine, side3, act, acc, x3.dtype)
    return y3, ctx


def bn_backward(ctx: ForwardContext, dy3, want_dside: bool):
    """Gradients of [`bn_forward`][bn_forward]: ``(dx3, dgamma, dbeta, dside3)``.

    Sums, finalize, apply: 3 launches; 1 on the kernel backends when every
    channel's x and dy' fit in one block's registers (unweighted or
    inference, not distributed: the one-launch path, as in [`bn_forward`][bn_forward]).

    dgamma/dbeta are the gradients of gamma (the scale) and beta (the offset)
    as the forward used them; r, d and the adjustment are constants. A
    repeated signature on a kernel backend replays its launch program.
    """
    b = ctx.backend
    if b.info is None:
        if ctx.exchange is None and (ctx.weights is None or not ctx.training) and (
                (_small.fits(ctx.x3) and dy3.flags.c_contiguous) or _small.whole(ctx.x3, ctx.side3, ctx.act, dy3)):
            stats = ctx.stats
            if stats is None:  # inference forward: fold the given statistics now
                stats = ctx.stats = b.finalize(None, ctx.acc, ctx.fold, given=ctx.given)
            return _small.backward(dy3, ctx.x3, ctx.side3, stats, ctx.act, ctx.acc, ctx.training, want_dside,
                                   ctx.x_dtype, ctx.side_dtype or ctx.x_dtype)
    elif ctx.exchange is None and (ctx.weights is None or not ctx.training) and _lc._enabled:
        key = _backward_key(ctx, dy3, want_dside)
        if key is not None:
            prog = _lc.lookup(b, key)
            if prog is None or prog is not _lc.UNCACHEABLE:
                stats = ctx.stats
                if stats is None:
                    fold, given = ctx.fold, ctx.given
                    inputs = [dy3, ctx.x3, ctx.side3, fold.gamma, fold.beta, given[0], given[1]]
                else:
                    inputs = [dy3, ctx.x3, ctx.side3, stats.count, stats.mean, stats.var, stats.invstd,
                              stats.scale, stats.shift, stats.gcoef, stats.hcoef, stats.r, stats.d]
                if prog is not None:
                    outs = prog.run(inputs)
                    if stats is None:
                        ctx.stats = Stats(*outs[4:])
                    return outs[0], outs[1], outs[2], outs[3]
                if _lc.may_record(b, ("backward", dy3.shape)):
                    had_stats = stats is not None
                    rec = _lc.Recording(b)
                    with rec:  # (the context itself keeps its backend: other threads may use it meanwhile)
                        out = _bn_backward(ctx, dy3, want_dside, rec.backend)
                    outs = list(out) + ([] if had_stats else [getattr(ctx.stats, f) for f in _STATS_FIELDS])
                    _lc.store(b, key, rec.program(inputs, outs, keyed_alignment=(0, 1, 2)))
                    return out
    return _bn_backward(ctx, dy3, want_dside)


def _backward_key(ctx, dy3, want_dside):
    stats = ctx.stats
    if stats is None:
        fold = ctx.fold
        if fold.adj_scale is not None or fold.adj_bias is not None or fold.renorm is not None:
            return None
        skey = (None, fold.eps, fold.gamma is None, fold.beta is None)
    else:
        s = stats
        skey = (s.count is None, s.mean is None, s.var is None, s.invstd is None, s.scale is None, s.shift is None,
                s.gcoef is None, s.hcoef is None, s.r is None, s.d is None)
    side3 = ctx.side3
    side = None if side3 is None else (side3.shape, side3.strides, side3.dtype, alignment_of(side3))
    x3 = ctx.x3
    return ("backward", one_launch_enabled(), ctx.training, want_dside, dy3.shape, dy3.strides,
            dy3.dtype, alignment_of(dy3), x3.shape, x3.strides, x3.dtype, alignment_of(x3), ctx.acc,
            _act_key(ctx.act), side, ctx.x_dtype, ctx.side_dtype, skey)


def _bn_backward(ctx, dy3, want_dside, b=None):
    if b is None:
        b = ctx.backend
    acc = ctx.acc
    stats = ctx.stats
    if stats is None:  # inference forward: fold the given statistics now
        stats = ctx.stats = b.finalize(None, acc, ctx.fold, given=ctx.given)
    if b.info is None and ctx.exchange is None and (ctx.weights is None or not ctx.training):
        lp = _mid.plan(ctx.x3, acc)
        if lp is not None and _mid.fits(dy3, ctx.side3):
            return _mid.backward(b, lp, dy3, ctx.x3, ctx.side3, stats, ctx.act, acc, ctx.training, want_dside,
                                 ctx.x_dtype, ctx.side_dtype or ctx.x_dtype)
    side = ctx.side3 if ctx.act is not None else None  # the side input matters only under an activation
    launch = None
    if b.info is not None:
        same = np.dtype(ctx.x_dtype) == ctx.x3.dtype and (
            not want_dside or np.dtype(ctx.side_dtype or ctx.x_dtype) == ctx.x3.dtype)
        launch = one_launch.decide(one_launch.BACKWARD, ctx.plan, ctx.x3.dtype, acc, b.info,
                                   min(alignment_of(dy3), alignment_of(ctx.x3), alignment_of(side)),
                                   enabled=one_launch_enabled(), weighted=ctx.weights is not None and ctx.training,
                                   distributed=ctx.exchange is not None, same_dtypes=same)
    if launch is not None:
        return b.backward_one_launch(launch, ctx.plan, dy3, ctx.x3, ctx.side3, stats, ctx.act, acc, ctx.training,
                                     want_dside)
    affine = Affine(stats.mean, stats.scale, stats.shift)
    sums = b.backward_partials(ctx.plan, dy3, ctx.x3, ctx.side3, affine, ctx.act, acc)
    if ctx.exchange is not None:  # sums over the whole distributed batch
        sums = ctx.exchange.sums(b, sums, acc)
    coeffs = b.backward_finalize(sums, stats, acc, ctx.training)
    dx3, dside3 = b.backward_apply(
        ctx.plan, dy3, ctx.x3, ctx.side3, affine, ctx.act, coeffs,
        ctx.weights if ctx.training else None, acc, want_dside, ctx.x_dtype,
        ctx.side_dtype or ctx.x_dtype,
    )
    return dx3, coeffs.dgamma, coeffs.dbeta, dside3


# ---------------------------------------------------------------------------
# Checks shared by the public ops
# ---------------------------------------------------------------------------
def check_side_input(func, side_input, x):
    if side_input is None:
        return
    if not is_array(side_input):
        raise arg_error(TypeError, func, "side_input", "an array like x", describe(side_input))
    if tuple(side_input.shape) != tuple(x.shape):
        raise arg_error(ValueError, func, "side_input", f"shape {tuple(x.shape)} (x's shape)", f"shape {tuple(side_input.shape)}")
    if np.dtype(side_input.dtype) != np.dtype(x.dtype):
        raise arg_error(TypeError, func, "side_input", f"dtype {np.dtype(x.dtype).name} (x's dtype)", f"dtype {np.dtype(side_input.dtype).name}")


def check_training_batch(func, plan, x):
    if plan.per_channel == 0:
        raise arg_error(
            ValueError, func, "x", "at least one element per channel to compute training statistics",
            f"an empty batch of shape {tuple(x.shape)}",
        )


# ---------------------------------------------------------------------------
# tf.nn.batch_normalization
# ---------------------------------------------------------------------------
def batch_normalization(x, mean, variance, offset, scale, variance_epsilon, *, activation=None,
                        data_format=None, name=None):
    """``act(scale · (x − mean) / sqrt(variance + eps) + offset)`` (``tf.nn.batch_normalization``).

    One kernel launch. ``mean``, ``variance``, ``offset`` and ``scale``
    broadcast against ``x`` as in TensorFlow (a 1-D vector lines up with the
    last axis); with ``data_format="NCHW"`` a 1-D vector lines up with axis 1
    instead. ``offset``/``scale`` may be None. The parameters may vary along
    any block of axes (per channel, per feature map, ...).

    Args:
        x: float array (numpy or cupy).
        mean: statistics, broadcastable to ``x``.
        variance: likewise.
        offset: beta, broadcastable to ``x``, or None.
        scale: gamma, broadcastable to ``x``, or None.
        variance_epsilon: small float added to the variance.
        activation: None, a name or a ``cubn.activations`` object, fused.
        data_format: None (TensorFlow broadcasting), ``"NHWC"`` or ``"NCHW"``.

    Returns:
        An array like ``x``.
    """
    func = "batch_normalization"
    x, mean, variance, offset, scale = take_dlpack(func, x=x, mean=mean, variance=variance, offset=offset, scale=scale)
    check_float_input(func, "x", x)
    params = {"mean": mean, "variance": variance, "offset": offset, "scale": scale}
    backend = select(func, "x", x, **params)
    x = readable(func, "x", x)
    params = dict(zip(params, readable_all(func, **params)))
    xp = backend.xp
    eps, act, acc, plan, p, _, _ = batch_normalization_args(func, x, params, variance_epsilon, activation,
                                                            data_format, xp)
    if x.size == 0:
        return xp.empty_like(x)
    raw = RawAffine(p["mean"], p["variance"], p.get("scale"), p.get("offset"), eps)
    y3 = backend.normalize(plan, plan.view3(x), raw, None, act, acc, x.dtype)
    return plan.unview3(y3)


def batch_normalization_args(func, x, params, variance_epsilon, activation, data_format, xp):
    """The checked arguments of ``batch_normalization`` (and of its backward):
    ``(eps, act, acc, plan, per-channel params, params at x's rank, block shape)``."""
    eps = check_positive_epsilon(func, "variance_epsilon", variance_epsilon)
    act = activations.get(activation, func)
    acc = _dtypes.acc_dtype(x.dtype)
    for req in ("mean", "variance"):
        if params[req] is None:
            raise arg_error(TypeError, func, req, "an array or a number", "None")
    return (eps, act, acc) + per_channel_params(func, x, params, data_format, xp, acc)


def per_channel_params(func, x, params, data_format, xp, acc):
    """tf.nn.batch_normalization's broadcasting: ``params`` (name -> value or None)
    -> ``(plan, {name: (C,) array}, {name: value at x's rank}, block shape)``.

    The "channels" are the block of axes the parameters vary on.
    """
    ndim = x.ndim
    ch_axis = None
    if data_format is not None and ndim >= 2:
        ch_axis = channel_axis(ndim, data_format, func)
    # Bring every parameter to x's rank, then find the block of axes they vary on.
    shaped = {}
    for k, v in params.items():
        if v is None:
            continue
        a = v if is_array(v) else np.asarray(v)
        if a.dtype.kind not in "fiu" and not _dtypes.is_supported_float(a.dtype):
            raise arg_error(TypeError, func, k, "a real-valued array or number", describe(v))
        if a.ndim > ndim:
            raise arg_error(ValueError, func, k, f"at most {ndim} dimensions (x's rank)", f"shape {tuple(a.shape)}")
        if ch_axis is not None and a.ndim == 1 and a.shape[0] != 1:
            shp = [1] * ndim
            shp[ch_axis] = a.shape[0]
            a = a.reshape(shp)
        else:
            a = a.reshape((1,) * (ndim - a.ndim) + tuple(a.shape))
        for ax, (n, m) in enumerate(zip(a.shape, x.shape)):
            if n not in (1, m):
                raise arg_error(
                    ValueError, func, k, f"a shape broadcastable to x's {tuple(x.shape)}",
                    f"shape {tuple(v.shape) if hasattr(v, 'shape') else np.shape(v)}",
                )
        shaped[k] = a
    varying = sorted({ax for a in shaped.values() for ax, n in enumerate(a.shape) if n != 1})
    kept = tuple(range(varying[0], varying[-1] + 1)) if varying else ()
    plan = plan_for_kept_axes(x.shape, kept)
    block = tuple(x.shape[a] for a in kept)

    def per_channel(a):
        idx = tuple(slice(None) if ax in kept else 0 for ax in range(ndim))
        v = a[idx]
        v = xp.asarray(v) if not is_array(v) else v
        return xp.ascontiguousarray(xp.broadcast_to(v, block), dtype=acc).reshape(plan.channels)

    p = {k: per_channel(a) for k, a in shaped.items()}
    return plan, p, shaped, block


def batch_norm_with_global_normalization(t, m, v, beta, gamma, variance_epsilon, scale_after_normalization,
                                         *, data_format=None, name=None):
    """TF 1's ``tf.nn.batch_norm_with_global_normalization``:
    ``batch_normalization`` with gamma applied only when
    ``scale_after_normalization``."""
    return batch_normalization(t, m, v, beta, gamma if scale_after_normalization else None,
                               variance_epsilon, data_format=data_format)


# ---------------------------------------------------------------------------
# tf.compat.v1.nn.fused_batch_norm (+ residual add and activation)
# ---------------------------------------------------------------------------
def fused_batch_norm(x, scale=None, offset=None, mean=None, variance=None, epsilon=1e-3, data_format="NHWC",
                     is_training=True, exponential_avg_factor=1.0, activation=None, side_input=None, name=None):
    """Batch normalization in one call: ``(y, batch_mean, batch_var)``.

    Training: ``y`` is normalized with the batch's mean and biased variance;
    the returned ``batch_var`` is Bessel-corrected (n/(n−1)), as in
    TensorFlow; with ``exponential_avg_factor`` f ≠ 1 the returned statistics
    are ``(1−f)·given + f·batch`` (``mean`` and ``variance`` required).
    Inference: ``y`` uses the given ``mean``/``variance``, returned unchanged.
    ``side_input`` (a residual, same shape and dtype as ``x``) is added
    before ``activation``, as cuDNN's BN+add+activation does.

    Three kernel launches in training (statistics, finalize, normalize), one
    in inference. Statistics come back in the accumulation dtype (float32
    for 16-bit ``x``), as TensorFlow returns them.

    Args:
        x: float array of rank 2 to 5.
        scale: gamma, shape (C,), or None (ones).
        offset: beta, shape (C,), or None (zeros).
        mean: (C,) statistics for inference, or the previous running
            values when ``exponential_avg_factor != 1``.
        variance: likewise.
        epsilon: added to the variance.
        data_format: ``"NHWC"`` (channels last) or ``"NCHW"``; a rank-2
            input is (N, C) either way.
        is_training: batch statistics (True) or the given ones (False).
        exponential_avg_factor: f in [0, 1].
        activation: None, a name or a ``cubn.activations`` object, fused.
        side_input: None or an array like ``x``.

    Returns:
        ``(y, batch_mean, batch_var)``.
    """
    func = "fused_batch_norm"
    backend = fast_select(x, (scale, offset, mean, variance, side_input))
    if backend is not None:
        out = _fused_fast(func, backend, x, scale, offset, mean, variance, epsilon, data_format, is_training,
                          exponential_avg_factor, activation, side_input)
        if out is not None:
            return out
    x, scale, offset, mean, variance, side_input = take_dlpack(
        func, x=x, scale=scale, offset=offset, mean=mean, variance=variance, side_input=side_input)
    check_float_input(func, "x", x)
    backend = select(func, "x", x, scale=scale, offset=offset, mean=mean, variance=variance, side_input=side_input)
    x, scale, offset, mean, variance, side_input = readable_all(
        func, x=x, scale=scale, offset=offset, mean=mean, variance=variance, side_input=side_input)
    xp = backend.xp
    eps = check_positive_epsilon(func, "epsilon", epsilon)
    f = float(exponential_avg_factor)
    if not 0.0 <= f <= 1.0:
        raise arg_error(ValueError, func, "exponential_avg_factor", "a float in [0, 1]", repr(exponential_avg_factor))
    act = activations.get(activation, func)
    plan = plan_for_channels(x.shape, data_format, func)
    acc = _dtypes.acc_dtype(x.dtype)
    gamma = channel_param(func, "scale", scale, plan, xp, acc)
    beta = channel_param(func, "offset", offset, plan, xp, acc)
    given_mean = channel_param(func, "mean", mean, plan, xp, acc)
    given_var = channel_param(func, "variance", variance, plan, xp, acc)
    check_side_input(func, side_input, x)
    if is_training:
        check_training_batch(func, plan, x)
        if f != 1.0 and (given_mean is None or given_var is None):
            missing = "mean" if given_mean is None else "variance"
            raise arg_error(ValueError, func, missing, "the running statistics when exponential_avg_factor != 1", "None")
    else:
        for k, v in (("mean", given_mean), ("variance", given_var)):
            if v is None:
                raise arg_error(ValueError, func, k, "an array of shape (C,) when is_training=False", "None")
    return _fused(backend, plan, x, acc, gamma, beta, given_mean, given_var, side_input, eps, f, act, is_training)


def _fused_fast(func, backend, x, scale, offset, mean, variance, epsilon, data_format, is_training, f, activation,
                side_input):
    """fused_batch_norm for arguments that need no conversion (None: take the ordinary path).

    Runs only checks that cannot fail differently from the ordinary path's
    (those come first there too), so a call gives the same result or error either way.
    """
    if not _dtypes.is_supported_float(x.dtype):
        return None
    if type(epsilon) is not float or not 0.0 <= epsilon < math.inf:
        return None
    if type(f) is not float or not 0.0 <= f <= 1.0:
        return None
    if type(activation) is str:  # a known name (an unknown one: the ordinary path's error)
        activation = activations.by_name(activation)
        if activation is None:
            return None
    elif activation is not None and not isinstance(activation, activations.Activation):
        return None
    plan = plan_for_channels(x.shape, data_format, func)
    acc = _dtypes.acc_dtype(x.dtype)
    c = plan.channels
    if not (plain_vector(scale, c, acc) and plain_vector(offset, c, acc) and plain_vector(mean, c, acc)
            and plain_vector(variance, c, acc) and plain_like(side_input, x)):
        return None
    if is_training:
        if plan.per_channel == 0 or (f != 1.0 and (mean is None or variance is None)):
            return None
    elif mean is None or variance is None:
        return None
    if (backend.info is None and plan.perm is None and _direct.takes(x) and _native.takes_act(activation)
            and (side_input is None or side_input.flags.c_contiguous)):
        if is_training:
            return _direct.fused_train(x, plan, scale, offset, side_input, activation, epsilon, f, mean, variance)
        return _direct.infer(x, plan, scale, offset, mean, variance, side_input, activation, epsilon), mean, variance
    return _fused(backend, plan, x, acc, scale, offset, mean, variance, side_input, epsilon, f, activation,
                  is_training)


def _fused(backend, plan, x, acc, gamma, beta, given_mean, given_var, side_input, eps, f, act, is_training):
    """fused_batch_norm on checked arguments: per-channel (C,) vectors in ``acc``.

    On a kernel backend the whole call -- its two statistics outputs
    included -- replays the launch program of its signature.
    """
    x3 = plan.view3(x)
    side3 = None if side_input is None else plan.view3(side_input)
    if backend.info is None and _small.whole(x3, side3, act):
        if is_training:
            y3, m, v = _small.fused_train(x3, acc, eps, gamma, beta, side3, act, f, given_mean, given_var)
        else:
            y3, m, v = _small.infer(x3, acc, eps, gamma, beta, given_mean, given_var, side3, act), given_mean, given_var
        return y3.reshape(plan.shape) if plan.perm is None else plan.unview3(y3), m, v
    if backend.info is None or not _lc._enabled or (not is_training and x.size == 0):
        y3, m, v = _fused_run(backend, plan, x3, acc, gamma, beta, given_mean, given_var, side3, eps, f, act,
                              is_training)
        return plan.unview3(y3), m, v
    key = ("fused", one_launch_enabled(), is_training, x3.shape, x3.strides, x3.dtype, alignment_of(x3),
           acc, None if act is None else (act.kernel_id, act.alpha),
           None if side3 is None else (side3.strides, alignment_of(side3)), eps, f,
           gamma is None, beta is None, given_mean is None, given_var is None)
    inputs = [x3, side3, gamma, beta, given_mean, given_var]
    prog = _lc.lookup(backend, key)
    if prog is not None and prog is not _lc.UNCACHEABLE:
        y3, m, v = prog.run(inputs)
        return y3.reshape(plan.shape) if plan.perm is None else plan.unview3(y3), m, v
    if prog is None and _lc.may_record(backend, ("fused", x3.shape)):
        rec = _lc.Recording(backend)
        with rec:
            y3, m, v = _fused_run(rec.backend, plan, x3, acc, gamma, beta, given_mean, given_var, side3, eps, f,
                                  act, is_training)
        _lc.store(backend, key, rec.program(inputs, [y3, m, v], keyed_alignment=(0, 1)))
    else:
        y3, m, v = _fused_run(backend, plan, x3, acc, gamma, beta, given_mean, given_var, side3, eps, f, act,
                              is_training)
    return plan.unview3(y3), m, v


def _fused_run(backend, plan, x3, acc, gamma, beta, given_mean, given_var, side3, eps, f, act, is_training):
    """``(y3, mean, var)`` of fused_batch_norm (no launch program)."""
    xp = backend.xp
    fold = Fold(eps, gamma, beta)
    if is_training:
        new_mean = xp.empty(plan.channels, acc)
        new_var = xp.empty(plan.channels, acc)
        upd = MovingUpdate(a=f, bessel=True, mean_in=given_mean if f != 1.0 else None, mean_out=new_mean,
                           var_in=given_var if f != 1.0 else None, var_out=new_var)
        y3, _ = _bn_forward(backend, plan, x3, acc, True, fold, upd, None, None, side3, act, None)
        return y3, new_mean, new_var
    if x3.size == 0:
        return xp.empty_like(x3), given_mean, given_var
    y3, _ = _bn_forward(backend, plan, x3, acc, False, fold, None, (given_mean, given_var), None, side3, act, None)
    return y3, given_mean, given_var
