"""The preprocessing primitives of the NumPy backend (a mixin of ``NumpyBackend``).

The preprocessing API (``cubn.preprocessing``: RunningMoments, Standardizer,
normalize_images) is a client of the backends like the ops: it calls these
four primitives, which the kernel backend implements as launches
(``kernel_preprocessing.py``). The arithmetic of the affine map is the
kernels' own, operation for operation (see ``preprocess.cu``), so integer
and 16-bit inputs give bit-identical results on every backend.
"""
from __future__ import annotations

import numpy as np

from .._welford import chan_merge
from .base import Partials


class NumpyPreprocessing:
    """``input_partials``, ``merge_into_state``, ``affine_map``, ``affine_transpose`` in NumPy."""

    def input_partials(self, plan, x3, acc, weights=None) -> Partials:
        """Welford partials of a preprocessing input (uint8, uint16 or a float dtype) in ``acc``."""
        if acc == np.float64 and weights is None and plan.channels_last and x3.shape[0] > 0:
            return _columns_f64(x3)
        return self.welford_partials(plan, x3, acc, weights)

    def merge_into_state(self, partials, acc, state) -> None:
        """Fold a batch's partials into ``state`` ((3, C) float64: count, mean, M2), in place."""
        merged = self.merge_partials(partials, acc)
        n, m, s = chan_merge(state[0], state[1], state[2], *(np.asarray(p[0], np.float64) for p in merged[:3]))
        state[0], state[1], state[2] = n, m, s

    def affine_map(self, x3, a, d, out_dtype, inverse):
        """``y = (x - a[c]) / d[c]`` (``inverse``: ``x * d[c] + a[c]``) over an (outer, C, inner) view.

        ``a``, ``d``: (C,) arrays in the arithmetic dtype (``_dtypes.compute_dtype``).
        """
        return _affine(x3, a[None, :, None], d[None, :, None], out_dtype, inverse)

    def affine_transpose(self, x3, channel_last, a, d, out_dtype, inverse):
        """[`affine_map`][affine_map] of a (B, P, Q) view, written as (B, Q, P): NHWC <-> NCHW.

        The channel is q (``channel_last``: P = H*W, Q = C) or p (P = C, Q = H*W).
        """
        ab = a[None, None, :] if channel_last else a[None, :, None]
        db = d[None, None, :] if channel_last else d[None, :, None]
        return np.ascontiguousarray(_affine(x3, ab, db, out_dtype, inverse).transpose(0, 2, 1))


def _affine(x3, ab, db, out_dtype, inverse):
    """The kernels' exact operations, vectorized: one temporary in the arithmetic dtype."""
    A = ab.dtype
    out_dtype = np.dtype(out_dtype)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore", under="ignore"):
        # The ufuncs convert x exactly, as astype(A) would.
        if inverse:
            y = np.multiply(x3, db, dtype=A)
            y += ab
        else:
            y = np.subtract(x3, ab, dtype=A)
            y /= db
        if A == np.float64 and out_dtype.itemsize == 2:
            y = y.astype(np.float32)  # 16-bit outputs round from float32, as in the kernels
        return y.astype(out_dtype, copy=False)


def _columns_f64(x3) -> Partials:
    """Two-pass float64 statistics of the columns of an (N, C) matrix, without transposing it.

    The NumPy backend's own primitive copies the data into per-channel rows
    first (for pairwise sums in the accumulation dtype); in float64 plain
    column sums are accurate enough (n·eps ~ 1e-10 at n = 1e6), and skipping
    the copy halves the memory traffic of ``Standardizer.fit`` on the CPU.
    """
    xr = x3.reshape(x3.shape[0], x3.shape[1])
    n = xr.shape[0]
    with np.errstate(invalid="ignore", over="ignore"):
        mean = np.add.reduce(xr, axis=0, dtype=np.float64) / n
        d = np.subtract(xr, mean, dtype=np.float64)
        m2 = np.einsum("ij,ij->j", d, d)
    return Partials(np.full((1, xr.shape[1]), float(n)), mean[None, :], m2[None, :], 1)
