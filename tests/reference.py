"""Float64 references every backend is checked against (one implementation)."""
from __future__ import annotations

import math

import numpy as np

try:
    from scipy.special import erf as _erf
except ImportError:  # pragma: no cover
    _erf = np.vectorize(math.erf)


def act(name, z, alpha=None):
    if name is None:
        return z
    a = {"leaky_relu": 0.2, "elu": 1.0}.get(name, 0.0) if alpha is None else alpha
    if name == "relu":
        return np.maximum(z, 0)
    if name == "relu6":
        return np.clip(z, 0, 6)
    if name == "leaky_relu":
        return np.where(z > 0, z, a * z)
    if name == "elu":
        return np.where(z > 0, z, a * np.expm1(np.minimum(z, 0)))
    if name == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if name == "tanh":
        return np.tanh(z)
    if name == "gelu":
        return 0.5 * z * (1 + _erf(z / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    if name in ("silu", "swish"):
        return z / (1 + np.exp(-z))
    raise KeyError(name)


def moments(x, axes, weights=None, keepdims=False):
    x = np.asarray(x, np.float64)
    if weights is None:
        m = x.mean(axis=tuple(axes), keepdims=True)
        v = ((x - m) ** 2).mean(axis=tuple(axes), keepdims=True)
    else:
        w = np.broadcast_to(np.asarray(weights, np.float64), x.shape)
        sw = w.sum(axis=tuple(axes), keepdims=True)
        xz = np.where(w != 0, x, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            m = (w * xz).sum(axis=tuple(axes), keepdims=True) / sw
            v = (w * np.where(w != 0, xz - m, 0) ** 2).sum(axis=tuple(axes), keepdims=True) / sw
    if not keepdims:
        m, v = np.squeeze(m, axis=tuple(axes)), np.squeeze(v, axis=tuple(axes))
    return m, v


def channel_axis(ndim, data_format):
    if ndim == 2:
        return 1
    return ndim - 1 if data_format in ("NHWC", "NDHWC") else 1


def bcast(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, np.float64).reshape(shape)


def batch_norm(x, mean, var, offset, scale, eps, axis, activation=None, side=None, alpha=None):
    x = np.asarray(x, np.float64)
    nd = x.ndim
    z = (x - bcast(mean, nd, axis)) / np.sqrt(bcast(var, nd, axis) + eps)
    if scale is not None:
        z = z * bcast(scale, nd, axis)
    if offset is not None:
        z = z + bcast(offset, nd, axis)
    if side is not None:
        z = z + np.asarray(side, np.float64)
    return act(activation, z, alpha)


def reduce_axes(ndim, axis):
    return tuple(a for a in range(ndim) if a != axis)


def batch_norm_grads(x, dy, gamma, eps, axis, training=True, mean=None, var=None):
    """float64 ``(dx, dgamma, dbeta)`` of ``y = gamma·(x − mean)/sqrt(var + eps) + beta``.

    Training: mean/var are the batch's (biased), and the gradient flows
    through them: ``dx = gamma·invstd·(dy − mean(dy) − xhat·mean(dy·xhat))``.
    Inference: the given mean/var are constants, ``dx = gamma·invstd·dy``.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    nd = x.ndim
    axes = reduce_axes(nd, axis)
    if training:
        mean, var = moments(x, axes)
    invstd = 1.0 / np.sqrt(bcast(var, nd, axis) + eps)
    xhat = (x - bcast(mean, nd, axis)) * invstd
    g = bcast(gamma, nd, axis)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    if training:
        dx = g * invstd * (dy - dy.mean(axis=axes, keepdims=True) - xhat * (dy * xhat).mean(axis=axes, keepdims=True))
    else:
        dx = g * invstd * dy
    return dx, dgamma, dbeta
