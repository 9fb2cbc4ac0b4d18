"""Regularizers for ``param_regularizers`` (tf.contrib.layers names and scales).

A regularizer is a callable ``loss = reg(w)`` that also has
``reg.gradient(w)``: the layer adds the gradient to ``bn.gradients`` in
``backward``. A plain callable without ``gradient`` is accepted for the loss
but the layer refuses ``backward`` with a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass

from ._checks import arg_error


def _scale(func, name, v):
    try:
        s = float(v)
    except (TypeError, ValueError):
        raise arg_error(TypeError, func, name, "a float", repr(v)) from None
    if s < 0:
        raise arg_error(ValueError, func, name, "a float >= 0", repr(v))
    return s


@dataclass(frozen=True)
class L1L2:
    l1: float = 0.0
    l2: float = 0.0

    def __call__(self, w):
        # tf.contrib: l1 = scale * sum|w|, l2 = scale * sum(w^2) / 2
        loss = 0.0
        if self.l1:
            loss = loss + self.l1 * abs(w).sum()
        if self.l2:
            loss = loss + self.l2 * 0.5 * (w * w).sum()
        return loss

    def gradient(self, w):
        g = w * 0
        if self.l1:
            g = g + self.l1 * (w > 0) - self.l1 * (w < 0)
        if self.l2:
            g = g + self.l2 * w
        return g


def l1_regularizer(scale):
    """``scale * sum(|w|)``."""
    return L1L2(l1=_scale("l1_regularizer", "scale", scale))


def l2_regularizer(scale):
    """``scale * sum(w**2) / 2`` (tf.nn.l2_loss times scale)."""
    return L1L2(l2=_scale("l2_regularizer", "scale", scale))


def l1_l2_regularizer(scale_l1=1.0, scale_l2=1.0):
    return L1L2(l1=_scale("l1_l2_regularizer", "scale_l1", scale_l1), l2=_scale("l1_l2_regularizer", "scale_l2", scale_l2))
