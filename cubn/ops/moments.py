"""``moments`` and ``weighted_moments``: tf.nn.moments / tf.nn.weighted_moments."""
from __future__ import annotations

import numpy as np

from .. import _dtypes
from .. import _launch_cache as _lc
from .._backend import fast_select, select, take_dlpack
from ..backends import numpy_direct as _direct
from ..backends import numpy_mid as _mid
from ..backends import numpy_small as _small
from ..backends._memory import alignment_of
from .._checks import arg_error, check_float_input, describe
from .._memory import readable
from .._plan import plan_for_reduction
from .._args import as_like, make_weights
from ..backends import base as _base


def _reduce(func, x, axes, keepdims, weights_arg=None, weights_name="weights"):
    if weights_arg is None:
        backend = fast_select(x, ())
        if backend is not None and _dtypes.is_supported_float(x.dtype):
            plan = plan_for_reduction(x.shape, axes, func)
            if backend.info is None and plan.perm is None and plan.channels and _direct.takes(x):
                return _direct.moments(x, plan, keepdims)
            return _moments(backend, plan, x, keepdims)
    x, weights_arg = take_dlpack(func, x=x, **{weights_name: weights_arg})
    check_float_input(func, "x", x)
    backend = select(func, "x", x, **({weights_name: weights_arg} if weights_arg is not None else {}))
    x, weights_arg = readable(func, "x", x), readable(func, weights_name, weights_arg)
    xp = backend.xp
    plan = plan_for_reduction(x.shape, axes, func)
    if weights_arg is None:
        return _moments(backend, plan, x, keepdims)
    acc = _dtypes.acc_dtype(x.dtype)
    out_shape = plan.keepdims_shape if keepdims else plan.stat_shape
    if plan.channels == 0:
        empty = xp.empty(out_shape, dtype=x.dtype)
        return empty, empty.copy()
    weights = None
    x3 = plan.view3(x)
    if plan.per_channel > 0:
        w = as_like(func, weights_name, weights_arg, x, xp)
        weights = make_weights(func, weights_name, w, x.shape, plan, xp, acc)
    else:  # nothing to weigh: div_no_nan(0, 0), as TF
        as_like(func, weights_name, weights_arg, x, xp)
        return xp.zeros(out_shape, dtype=x.dtype), xp.zeros(out_shape, dtype=x.dtype)
    return _stats(backend, plan, x3, acc, weights, x.dtype, out_shape)


def _moments(backend, plan, x, keepdims):
    """Unweighted moments of a readable ``x``; a kernel backend replays the launch program of the signature."""
    acc = _dtypes.acc_dtype(x.dtype)
    out_shape = plan.keepdims_shape if keepdims else plan.stat_shape
    if plan.channels == 0:
        empty = backend.xp.empty(out_shape, dtype=x.dtype)
        return empty, empty.copy()
    x3 = plan.view3(x)
    if backend.info is None and _small.whole(x3):
        mean, var = _small.moments(x3, acc)
        return mean.astype(x.dtype, copy=False).reshape(out_shape), var.astype(x.dtype, copy=False).reshape(out_shape)
    if backend.info is None or not _lc._enabled:
        return _stats(backend, plan, x3, acc, None, x.dtype, out_shape)
    key = ("moments", x3.shape, x3.strides, x3.dtype, alignment_of(x3), out_shape)
    prog = _lc.lookup(backend, key)
    if prog is not None and prog is not _lc.UNCACHEABLE:
        mean, var = prog.run((x3,))
        return mean, var
    if prog is None and _lc.may_record(backend, ("moments", x3.shape)):
        rec = _lc.Recording(backend)
        with rec:
            mean, var = _stats(rec.backend, plan, x3, acc, None, x.dtype, out_shape)
        _lc.store(backend, key, rec.program([x3], [mean, var], keyed_alignment=(0,)))
        return mean, var
    return _stats(backend, plan, x3, acc, None, x.dtype, out_shape)


def _stats(backend, plan, x3, acc, weights, dtype, out_shape):
    if weights is None and backend.info is None:
        lp = _mid.plan(x3, acc)
        if lp is not None:
            mean, var = _mid.moments(backend, x3, acc, lp)
            return mean.astype(dtype, copy=False).reshape(out_shape), var.astype(dtype, copy=False).reshape(out_shape)
    stats = _base.statistics(backend, plan, x3, acc, weights)
    mean = stats.mean.astype(dtype, copy=False).reshape(out_shape)
    var = stats.var.astype(dtype, copy=False).reshape(out_shape)
    return mean, var


def moments(x, axes, *, keepdims=False, shift=None, name=None, keep_dims=None):
    """Mean and population variance of ``x`` over ``axes`` (``tf.nn.moments``).

    Welford per thread and Chan merges on the GPU; two-pass on NumPy. Both
    stay exact where ``E[x²] − E[x]²`` cancels catastrophically (data with
    a large offset). Accumulates in float32 for 16-bit inputs and in the
    input's precision otherwise; results have ``x``'s dtype.

    Args:
        x: float array (numpy or cupy), any rank.
        axes: the axes to reduce (ints; negative allowed).
        keepdims: keep the reduced axes with length 1.
        shift: accepted for TensorFlow compatibility and unused (as in TF 2).
        name: accepted for TensorFlow compatibility and unused.
        keep_dims: deprecated TF 1 alias of ``keepdims``.

    Returns:
        ``(mean, variance)``. A reduction over zero elements gives NaN.
    """
    if keep_dims is not None:
        keepdims = bool(keep_dims)
    return _reduce("moments", x, axes, keepdims)


def weighted_moments(x, axes, weights=None, *, keepdims=False, frequency_weights=None, name=None, keep_dims=None):
    """Frequency-weighted mean and variance (``tf.nn.weighted_moments``).

    ``mean = sum(w·x) / sum(w)`` and ``variance = sum(w·(x − mean)²) / sum(w)``.

    Args:
        x: float array (numpy or cupy).
        axes: the axes to reduce.
        weights: non-negative weights broadcastable to ``x`` (a negative one
            is a ``ValueError``); a 1-D vector of
            length ``x.shape[0]`` is one weight per batch item. Elements with
            weight 0 are skipped, so an Inf/NaN there does not spread.
            (``frequency_weights=`` is TensorFlow's name for the same.)
        keepdims: keep the reduced axes with length 1.

    Returns:
        ``(mean, variance)`` in ``x``'s dtype. A channel whose weights sum to
        zero gets mean 0 and variance 0, as in TensorFlow (``div_no_nan``).
    """
    func = "weighted_moments"
    if frequency_weights is not None:
        if weights is not None:
            raise arg_error(TypeError, func, "frequency_weights", "only one of weights / frequency_weights", "both")
        weights, wname = frequency_weights, "frequency_weights"
    else:
        wname = "weights"
    if weights is None:
        raise arg_error(TypeError, func, "weights", "an array broadcastable to x", "None")
    if keep_dims is not None:
        keepdims = bool(keep_dims)
    return _reduce(func, x, axes, keepdims, weights, wname)


def sufficient_statistics(x, axes, shift=None, keepdims=False, name=None, keep_dims=None):
    """``tf.nn.sufficient_statistics``: ``(count, mean_ss, variance_ss, shift)``.

    ``count`` is the number of values reduced into each statistic (a 0-d
    array of ``x``'s dtype), ``mean_ss = Σ (x − shift)`` and
    ``variance_ss = Σ (x − shift)²`` over ``axes`` (``shift`` None: Σ x and
    Σ x²). TensorFlow sums the raw values; cubn derives both sums from its
    Welford moments, ``n·(mean − shift)`` and ``M2 + n·(mean − shift)²``, so
    the squares keep their digits when |mean| ≫ std. ``shift`` (subtracted
    first, as TF does) is returned as given, for [`normalize_moments`][normalize_moments].

    Args:
        x: float array (numpy or cupy).
        axes: the axes to reduce.
        shift: None, a number, or an array broadcastable to ``x``.
        keepdims: keep the reduced axes with length 1.
        keep_dims: deprecated TF 1 alias of ``keepdims``.
    """
    func = "sufficient_statistics"
    if keep_dims is not None:
        keepdims = bool(keep_dims)
    check_float_input(func, "x", x)
    backend = select(func, "x", x, shift=shift)
    xp = backend.xp
    plan = plan_for_reduction(x.shape, axes, func)
    acc = _dtypes.acc_dtype(x.dtype)
    out_shape = plan.keepdims_shape if keepdims else plan.stat_shape
    out_dtype = x.dtype
    count = xp.asarray(plan.per_channel, dtype=out_dtype)
    if shift is not None:
        s = as_like(func, "shift", shift, x, xp)
        try:
            np.broadcast_shapes(tuple(s.shape), tuple(x.shape))
        except ValueError:
            raise arg_error(ValueError, func, "shift", f"a shape broadcastable to x's {tuple(x.shape)}",
                            f"shape {tuple(s.shape)}") from None
        # subtract first, as TF does: the shifted values are small when the shift is near the mean,
        # so their sums keep the digits that the moments of x itself (|mean| >> std) would not
        x = x.astype(acc) - s.reshape((1,) * (x.ndim - s.ndim) + tuple(s.shape)).astype(acc)
    if plan.channels == 0 or plan.per_channel == 0:
        zeros = xp.zeros(out_shape, dtype=out_dtype)
        return count, zeros, zeros.copy(), shift
    stats = _base.statistics(backend, plan, plan.view3(x), acc)
    n = acc.type(plan.per_channel)
    # Σ(x − s) = n·mean and Σ(x − s)² = M2 + n·mean² from the Welford moments (M2 never cancels)
    m_ss = n * stats.mean
    v_ss = stats.var * n + n * stats.mean * stats.mean
    return count, m_ss.astype(out_dtype).reshape(out_shape), v_ss.astype(out_dtype).reshape(out_shape), shift


def normalize_moments(counts, mean_ss, variance_ss, shift, name=None):
    """``tf.nn.normalize_moments``: mean and variance from sufficient statistics.

    ``mean = mean_ss / counts + shift`` and
    ``variance = variance_ss / counts − (mean_ss / counts)²`` (TF's formula;
    ``shift`` None means 0). Elementwise on the arrays' own library.
    """
    func = "normalize_moments"
    for arg, v in (("mean_ss", mean_ss), ("variance_ss", variance_ss)):
        if not hasattr(v, "dtype"):
            raise arg_error(TypeError, func, arg, "an array (numpy or cupy)", describe(v))
    backend = select(func, "mean_ss", mean_ss, variance_ss=variance_ss, counts=counts, shift=shift)
    xp = backend.xp
    with np.errstate(invalid="ignore", divide="ignore"):
        divisor = 1 / xp.asarray(counts, dtype=mean_ss.dtype)
        shifted_mean = mean_ss * divisor
        mean = shifted_mean if shift is None else shifted_mean + xp.asarray(shift, dtype=mean_ss.dtype)
        variance = variance_ss * divisor - shifted_mean * shifted_mean
    return mean, variance
