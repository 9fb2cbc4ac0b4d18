"""The preprocessing primitives as kernel launches (a mixin of ``KernelBackend``).

The same four primitives as ``numpy_preprocessing.py``, on preprocess.cu's
kernels (and moments.cu's, instantiated there for integer inputs and for
float32 data with float64 partials). Launch configurations are decided
here, once for the CuPy and the emulated launcher.
"""
from __future__ import annotations

from .. import _dtypes
from ..kernels import registry as R
from ..kernels.spec import element
from ._memory import aligned as _aligned
from .base import Partials

TILE_BYTES = 16 * 1024  # shared memory staging one transpose tile
TRANSPOSE_BLOCKS_PER_SM = 8 * 4


def _tile(P: int, Q: int, A_size: int) -> tuple:
    """(TP, TQ) of a transpose tile that fits TILE_BYTES of staged values."""
    budget = TILE_BYTES // A_size
    if Q <= 32:  # a few channels of many pixels: whole rows
        return max(32, (budget // (Q | 1)) // 32 * 32), Q
    if P <= 32:  # a few channels, each a long run of pixels
        tq = max(32, ((budget // P) - 1) // 32 * 32)
        return P, min(tq, Q)
    return max(32, (budget // 33) // 32 * 32), 32


class KernelPreprocessing:
    """``input_partials``, ``merge_into_state``, ``affine_map``, ``affine_transpose`` as launches."""

    def input_partials(self, plan, x3, acc, weights=None) -> Partials:
        """Welford partials of a preprocessing input (uint8, uint16 or a float dtype) in ``acc``:
        ``welford_partials`` takes every registered (dtype, accumulation) pair."""
        return self.welford_partials(plan, x3, acc, weights)

    def merge_into_state(self, partials, acc, state) -> None:
        """Fold a batch's partials into ``state`` ((3, C) float64), in place: one
        ``cubn_rm_merge`` launch, no host synchronization."""
        C = partials.count.shape[1] // partials.fold
        if C == 0:
            return
        grid, block = self._per_channel_grid(C, acc.itemsize)
        self._launch(R.RM_MERGE.variant(A=element(acc)), grid, block, 0,
                     C=C, nparts=partials.count.shape[0], fold=partials.fold, p_count=partials.count,
                     p_mean=partials.mean, p_m2=partials.m2, pivot=partials.pivot, s_count=state[0],
                     s_mean=state[1], s_m2=state[2])

    def affine_map(self, x3, a, d, out_dtype, inverse):
        """``y = (x - a[c]) / d[c]`` (or ``x * d[c] + a[c]``) over a contiguous (outer, C, inner)
        view, elementwise with 16-byte vectors where aligned: one launch."""
        y3 = self.xp.empty(x3.shape, out_dtype)
        n = x3.size
        if n == 0:
            return y3
        tin, tout = _dtypes.name_of(x3.dtype), _dtypes.name_of(y3.dtype)
        vmax = R.affine_vec(tin, tout)
        vec = vmax if _aligned(vmax * x3.dtype.itemsize, x3) and _aligned(vmax * y3.dtype.itemsize, y3) else 1
        grid, block = self._elementwise_grid(n, vec)
        v = R.PP_AFFINE.variant(Tin=element(tin), Tout=element(tout), INVERSE=int(inverse), VEC=vec)
        self._launch(v, grid, block, 0, x=x3, y=y3, n=n, C=x3.shape[1], inner=x3.shape[2], a=a, d=d)
        return y3

    def affine_transpose(self, x3, channel_last, a, d, out_dtype, inverse):
        """[`affine_map`][affine_map] of a contiguous (B, P, Q) view written as (B, Q, P), through shared
        memory tiles (coalesced reads and writes): one launch."""
        B, P, Q = x3.shape
        y3 = self.xp.empty((B, Q, P), out_dtype)
        if x3.size == 0:
            return y3
        tin, tout = _dtypes.name_of(x3.dtype), _dtypes.name_of(y3.dtype)
        A_size = _dtypes.compute_dtype(tin, tout).itemsize
        tp, tq = _tile(P, Q, A_size)
        vmax = R.transpose_vec(tin)
        if tq == Q:
            fits = (P * Q) % vmax == 0 and (tp * Q) % vmax == 0
        else:
            fits = Q % vmax == 0 and tq % vmax == 0
        vec = vmax if fits and _aligned(vmax * x3.dtype.itemsize, x3) else 1
        ntiles = B * (-(-P // tp)) * (-(-Q // tq))
        grid = (max(1, min(ntiles, self.info.multiprocessor_count * TRANSPOSE_BLOCKS_PER_SM)), 1, 1)
        v = R.PP_TRANSPOSE.variant(Tin=element(tin), Tout=element(tout), CH_Q=int(channel_last),
                                   INVERSE=int(inverse), VEC=vec)
        self._launch(v, grid, (R.TRANSPOSE_THREADS, 1, 1), tp * (tq | 1) * A_size,
                     x=x3, y=y3, B=B, P=P, Q=Q, TP=tp, TQ=tq, a=a, d=d)
        return y3
