"""What the benchmark suite measures: shapes, ops, and the rotating inputs of one case."""
from __future__ import annotations

import math

import numpy as np

from .. import _dtypes

# (layout, shape): NCHW/NHWC 4-D shapes come in pairs with the same data.
SUITE = [
    ("NCHW", (32, 64, 112, 112)), ("NHWC", (32, 112, 112, 64)),
    ("NCHW", (256, 64, 56, 56)), ("NHWC", (256, 56, 56, 64)),
    ("NCHW", (256, 256, 14, 14)), ("NHWC", (256, 14, 14, 256)),
    ("NCHW", (64, 2048, 7, 7)), ("NHWC", (64, 7, 7, 2048)),
    ("NCHW", (16, 3, 512, 512)), ("NHWC", (16, 512, 512, 3)),
    ("NCHW", (20, 6, 65536)),
    ("NC", (65536, 1024)), ("NC", (1024, 64)),
]
QUICK = [SUITE[2], SUITE[3], SUITE[10], SUITE[11], SUITE[12]]
OPS = ("moments", "bn_train", "bn_infer", "bn_relu", "bn_add_relu", "backward")
ONE_LAUNCH_OPS = ("bn_train", "bn_relu", "bn_add_relu", "backward")  # the ops with a one-launch path
DTYPES = ("float32", "float16", "bfloat16")
EPS = 1e-3
MOMENTUM = 0.1
L2_FLUSH_BYTES = 128 << 20     # rotate inputs over at least this much memory
ROTATION_CAP_BYTES = 3 << 30


def channel_axis(layout, ndim):
    return ndim - 1 if layout in ("NHWC", "NC") else 1


def reduce_axes(layout, ndim):
    ax = channel_axis(layout, ndim)
    return tuple(a for a in range(ndim) if a != ax)


def resolve_dtype(name):
    """The NumPy dtype of a dtype name, or None when the array library lacks it (bfloat16 without ml_dtypes)."""
    return _dtypes.TABLE[name].numpy


class Inputs:
    """Rotating input sets for one (layout, shape, dtype) on one device."""

    def __init__(self, xp, layout, shape, dtype, seed=0):
        self.xp, self.layout, self.shape = xp, layout, tuple(shape)
        self.dtype = np.dtype(dtype)
        n = math.prod(shape)
        nbytes = n * self.dtype.itemsize
        self.k = int(max(2, min(64, math.ceil(L2_FLUSH_BYTES / max(nbytes, 1)))))
        self.k = max(1, min(self.k, ROTATION_CAP_BYTES // max(3 * nbytes, 1)))
        c = shape[channel_axis(layout, len(shape))]
        self.c = c
        rs = np.random.default_rng(seed)
        acc = np.float64 if self.dtype == np.float64 else np.float32

        def rand(scale=1.0, loc=0.0):
            if xp is np:
                return (loc + scale * rs.standard_normal(shape)).astype(self.dtype)
            r = xp.random.RandomState(int(rs.integers(1 << 31)))
            return (loc + scale * r.standard_normal(shape, dtype=xp.float32)).astype(self.dtype)

        self.x = [rand(2.0, 1.0) for _ in range(self.k)]
        self.dy = [rand() for _ in range(min(self.k, 2))]
        self.side = [rand() for _ in range(min(self.k, 2))]
        self.gamma = xp.asarray(rs.uniform(0.5, 1.5, c).astype(acc))
        self.beta = xp.asarray(rs.standard_normal(c).astype(acc))
        self.rmean = xp.asarray(rs.standard_normal(c).astype(acc))
        self.rvar = xp.asarray(rs.uniform(0.5, 2.0, c).astype(acc))
        self.nbytes = nbytes

    def release(self):
        self.x = self.dy = self.side = None
