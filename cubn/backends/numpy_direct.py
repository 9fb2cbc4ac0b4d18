"""Small calls of the public ops straight to the compiled loops' direct calls.

Below ``numpy_native.TASK_BYTES`` an op of the NumPy backend runs as one C
call in the calling thread. At (8, 16) that call takes about a microsecond,
while the route to it -- the small path's routing, the loops' wrappers and
their checks, the conversions, the fold of given statistics in NumPy, the
warning state around a division -- took several. Once an op has checked its
arguments (the ``cubn._fast`` predicates) and found them in the loops' form
(float32/float64, C-contiguous, no transpose), these functions allocate the
outputs and make that one call: the same C functions on the same arrays as
the longer route, so the same bits (``tests/test_numpy_direct.py`` compares
them with ``numpy_native.disabled()`` and with the direct route switched
off).
"""
from __future__ import annotations

import numpy as np

from . import numpy_native as _native

_DT = _native._DT_INDEX
_RATIO = _native.FAR_PIVOT_RATIO
_local = _native._local


def takes(x) -> bool:
    """The direct calls are built and on in this thread, and ``x`` (a plain ndarray: ``fast_select``
    passed it) is a non-empty C-contiguous float32/float64 array that runs in one thread."""
    return (_native._calls is not None and x.dtype in _DT and x.flags.c_contiguous
            and 0 < x.nbytes < _native.TASK_BYTES and not getattr(_local, "off", False)
            and not getattr(_local, "direct_off", False))


class disabled(_native.ThreadSwitch):
    """Within ``with numpy_direct.disabled():`` (this thread) the ops take their longer route to the
    same C calls (for tests)."""

    flag = "direct_off"


def _block(plan, itemsize):
    return _native._plan_block(plan.outer, plan.channels, plan.inner, itemsize)


def moments(x, plan, keepdims):
    """``(mean, var)`` of ``x`` reduced as ``plan`` says (``plan.perm`` None, channels > 0)."""
    acc = x.dtype
    c = plan.channels
    mean, var = np.empty(c, acc), np.empty(c, acc)
    block = _block(plan, x.itemsize)
    _native._calls.moments(_DT[acc], x, block[1], _RATIO[acc], mean, var)
    shape = plan.keepdims_shape if keepdims else plan.stat_shape
    return mean.reshape(shape), var.reshape(shape)


def _flags(side, act, out_nbytes):
    return ((1 if side is not None else 0) | (2 if act is not None else 0)
            | (8 if out_nbytes >= _native.STREAM_BYTES else 0))


def fused_train(x, plan, gamma, beta, side, act, eps, f, mean_in, var_in):
    """fused_batch_norm's training call: ``(y, batch_mean, batch_var)``, the variance Bessel-corrected,
    both blended with ``mean_in``/``var_in`` when ``f != 1``."""
    acc = x.dtype
    c = plan.channels
    y = np.empty(x.shape, acc)
    mean, var, invstd, shift, m, v = (np.empty(c, acc) for _ in range(6))
    scale = invstd if gamma is None else np.empty(c, acc)
    block = _block(plan, x.itemsize)
    blend = f != 1.0
    _native._calls.train(_DT[acc], _flags(side, act, y.nbytes), x, side, y, block[1], _RATIO[acc], eps, gamma, beta,
                         mean, var, invstd, scale, shift, f, 1, mean_in if blend else None,
                         var_in if blend else None, m, v)
    return y, m, v


def infer(x, plan, gamma, beta, mean, var, side, act, eps):
    """fused_batch_norm's inference: ``y`` from the given statistics."""
    acc = x.dtype
    c = plan.channels
    y = np.empty(x.shape, acc)
    scale, shift = np.empty(c, acc), np.empty(c, acc)
    _native._calls.infer(_DT[acc], _flags(side, act, y.nbytes), x, side, y, plan.outer, c, plan.inner,
                         _native._width(c), eps, gamma, beta, mean, var, scale, shift)
    return y


def backward(dy, x, plan, gamma, beta, mean, var, eps, act, side, training, want_dside):
    """batch_norm_backward from given statistics: ``(dx, dgamma, dbeta, dside, invstd, scale, hcoef)``,
    the last three the fold's (for the inference gradients of mean and variance)."""
    acc = x.dtype
    c = plan.channels
    dx = np.empty(x.shape, acc)
    dside = write = None
    if want_dside:
        dside = dy if act is None else np.empty(x.shape, acc)
        write = None if act is None else dside
    work = np.empty(8 * c, acc)  # invstd, scale, shift, hcoef, count, S2, k1, k2
    dgamma, dbeta = np.empty(c, acc), np.empty(c, acc)
    flags = _flags(side, act, dx.nbytes) | (4 if write is not None else 0)
    block = _block(plan, x.itemsize)
    _native._calls.backward_given(_DT[acc], flags, dy, x, side, dx, write, block[1], 1 if training else 0, eps, mean,
                                  var, gamma, beta, work, dgamma, dbeta)
    invstd = work[:c]
    return dx, dgamma, dbeta, dside, invstd, invstd if gamma is None else work[c:2 * c], work[3 * c:4 * c]
