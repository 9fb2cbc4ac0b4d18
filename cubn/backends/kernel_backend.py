"""The primitives of ``backends.base`` as CUDA kernel launches.

One orchestration for two launchers: ``CupyLauncher`` (NVRTC, the GPU) and
``EmulatedLauncher`` (the same .cu built by g++, run on CPU threads). They
differ only in ``get`` / ``launch`` / ``device_info``; launch configurations,
buffers and kernel sequences are all decided here, so the emulator runs
exactly the launches the GPU gets. Nothing here reads a device value back on
the host: every statistic stays on the device between launches.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..kernels import registry
from .base import BackwardCoeffs, Partials, RawAffine, Stats, Sums

REDUCE_THREADS = 256
ELEMENTWISE_THREADS = 256
FINALIZE_THREADS = 128
CHANNELS_PER_FINALIZE_BLOCK = FINALIZE_THREADS // 32
BLOCKS_PER_SM = 2048 // REDUCE_THREADS  # resident 256-thread blocks per SM at full occupancy
REDUCE_WAVES = 2
ELEMENTWISE_WAVES = 4
MIN_VECTORS_PER_THREAD = 4  # below this a reduction thread's setup dominates
PERSIST_THREADS = 512       # CUBN_PERSIST_THREADS in persistent.cu


def persist_items(dtype, channels_last: bool) -> int:
    """Vectors each thread of the one-launch kernel keeps in registers
    (PersistItems in persistent.cu)."""
    return 4 if channels_last and np.dtype(dtype).itemsize != 4 else 8


def bwd_persist_items(dtype, vec: int) -> int:
    """Vectors each thread of the one-launch backward keeps (BwdItems)."""
    if np.dtype(dtype).itemsize == 8:
        return 4
    return 8 if vec == 1 else 16 // vec


def persistent_enabled() -> bool:
    """The one-launch training forward is on unless ``CUBN_PERSISTENT=0``
    (benchmarks set it to time the three-launch path on the same shapes)."""
    return os.environ.get("CUBN_PERSISTENT", "1") != "0"


def _ptr(a) -> int:
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]  # works for ml_dtypes' bfloat16 too
    return a.data.ptr


def _aligned(nbytes: int, *arrays) -> bool:
    return all(a is None or _ptr(a) % nbytes == 0 for a in arrays)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class _ClConfig:
    """Launch shape of a channels-last reduction over a (rows, cols) matrix."""

    def __init__(self, fold, cols, rows, vec, bx, by, gx, gy):
        self.fold, self.cols, self.rows, self.vec = fold, cols, rows, vec
        self.block = (bx, by, 1)
        self.grid = (gx, gy, 1)
        self.nsplit = gy


class _CfConfig:
    def __init__(self, vec, nsplit, chunk, channels):
        self.vec, self.nsplit, self.chunk = vec, nsplit, chunk
        self.grid = (channels * nsplit, 1, 1)
        self.block = (REDUCE_THREADS, 1, 1)


class KernelBackend:
    def __init__(self, launcher):
        self.launcher = launcher
        self.xp = launcher.xp
        self.name = launcher.name
        self.info = launcher.device_info()

    # ------------------------------------------------------------------
    def _launch(self, variant, grid, block, shared, args):
        self.launcher.launch(self.launcher.get(variant), grid, block, shared, args)

    def _target_blocks(self, waves):
        return self.info.multiprocessor_count * BLOCKS_PER_SM * waves

    @staticmethod
    def _vec(dtype, divisible_by, arrays, widths=None):
        """Widest access (elements, among ``widths``: default every width) that
        divides ``divisible_by`` with all arrays aligned."""
        size = np.dtype(dtype).itemsize
        widths = registry.vector_widths(dtype) if widths is None else widths
        for v in sorted(widths, reverse=True):
            if divisible_by % v == 0 and _aligned(v * size, *arrays):
                return v
        return 1

    def _cl_config(self, plan, dtype, arrays, allow_fold=True):
        C, outer = plan.channels, plan.outer
        vmax = registry.vector_widths(dtype)[-1]
        fold = 1
        if allow_fold and C // vmax < 32:
            # Fold k outer rows into one matrix row so a warp spans >= 32 vectors.
            base = vmax // math.gcd(C, vmax)  # smallest k with k*C % vmax == 0
            want = max(1, -(-32 * vmax // C))
            k = base
            best = 1
            while k <= max(want, base) * 4 and k <= outer:
                if outer % k == 0:
                    best = k
                    if k >= want:
                        break
                k += base
            fold = best
        cols, rows = fold * C, outer // fold
        vec = self._vec(dtype, cols, arrays)
        cv = cols // vec
        bx = min(32, _pow2_at_least(cv))
        by = REDUCE_THREADS // bx
        gx = -(-cv // bx)
        gy_needed = -(-rows // (by * MIN_VECTORS_PER_THREAD))
        gy = max(1, min(-(-self._target_blocks(REDUCE_WAVES) // gx), gy_needed, 65535))
        return _ClConfig(fold, cols, rows, vec, bx, by, gx, gy)

    def _cf_config(self, plan, dtype, arrays):
        C, L = plan.channels, plan.outer * plan.inner
        vec = self._vec(dtype, plan.inner, arrays)
        per_block_min = REDUCE_THREADS * vec * MIN_VECTORS_PER_THREAD
        nsplit = max(1, min(-(-self._target_blocks(REDUCE_WAVES) // C), -(-L // per_block_min)))
        chunk = -(-L // nsplit)
        chunk = -(-chunk // vec) * vec
        nsplit = max(1, -(-L // chunk)) if L else 1
        return _CfConfig(vec, nsplit, chunk, C)

    def _elementwise_grid(self, n, vec):
        nvec = -(-n // vec)
        blocks = max(1, min(-(-nvec // ELEMENTWISE_THREADS), self._target_blocks(ELEMENTWISE_WAVES)))
        return (blocks, 1, 1), (ELEMENTWISE_THREADS, 1, 1)

    # -- statistics -------------------------------------------------------
    def welford_partials(self, plan, x3, acc, weights=None, kernel=None) -> Partials:
        """Per-block Welford partials. ``kernel(layout, wmode, vec)`` picks
        another registered instantiation of the moments kernels (the
        preprocessing API uses it for integer inputs and float64 partials)."""
        xp = self.xp
        kernel = kernel or (lambda layout, wmode, vec: registry.moments(x3.dtype, layout, wmode, vec))
        wmode, wvals, wdiv = 0, None, 1
        if weights is not None:
            wmode = 1 if weights.kind == "outer" else 2
            wvals, wdiv = weights.values, weights.divisor
        dt = x3.dtype
        if plan.channels_last:
            cfg = self._cl_config(plan, dt, (x3,), allow_fold=weights is None)
            shape = (cfg.nsplit, cfg.cols)
            pc, pm, p2 = xp.empty(shape, acc), xp.empty(shape, acc), xp.empty(shape, acc)
            shared = 3 * cfg.block[0] * cfg.block[1] * cfg.vec * acc.itemsize
            self._launch(
                kernel("cl", wmode, cfg.vec), cfg.grid, cfg.block, shared,
                (x3, np.int64(cfg.rows), np.int32(cfg.cols), wvals, np.int64(wdiv), pc, pm, p2),
            )
            return Partials(pc, pm, p2, cfg.fold)
        cfg = self._cf_config(plan, dt, (x3,))
        shape = (cfg.nsplit, plan.channels)
        pc, pm, p2 = xp.empty(shape, acc), xp.empty(shape, acc), xp.empty(shape, acc)
        self._launch(
            kernel("cf", wmode, cfg.vec), cfg.grid, cfg.block, 0,
            (x3, np.int64(plan.outer), np.int32(plan.channels), np.int64(plan.inner), np.int32(cfg.nsplit),
             np.int64(cfg.chunk), wvals, np.int64(wdiv), pc, pm, p2),
        )
        return Partials(pc, pm, p2, 1)

    def finalize(self, partials, acc, fold, update=None, given=None) -> Stats:
        xp = self.xp
        if partials is not None:
            C = partials.count.shape[1] // partials.fold
        else:
            C = given[0].shape[0]
        o = self._stats_buffers(xp, C, acc, fold)
        nparts, pfold = (partials.count.shape[0], partials.fold) if partials is not None else (0, 1)
        args = (
            np.int32(C), np.int32(nparts), np.int32(pfold),
            *(partials[:3] if partials is not None else (None, None, None)),
            *(given if partials is None else (None, None)),
            *self._finalize_args(fold, update, acc, o, with_stats=partials is not None),
        )
        self._launch(registry.finalize_kernel("cubn_bn_finalize", acc),
                     (-(-C // CHANNELS_PER_FINALIZE_BLOCK), 1, 1), (FINALIZE_THREADS, 1, 1), 0, args)
        if partials is None:
            count, (mean, var) = xp.zeros(C, acc), given
        else:
            count, mean, var = o["count"], o["mean"], o["var"]
        return Stats(count, mean, var, o["invstd"], o["scale"], o["shift"], o["g"], o["h"], o["r"], o["d"])

    def merge_partials(self, partials, acc) -> Partials:
        """One (count, mean, M2) per channel: Partials of shape (1, C)."""
        C = partials.count.shape[1] // partials.fold
        buf = self.xp.empty((3, C), acc)
        self._launch(registry.finalize_kernel("cubn_merge_partials", acc),
                     (-(-C // CHANNELS_PER_FINALIZE_BLOCK), 1, 1), (FINALIZE_THREADS, 1, 1), 0,
                     (np.int32(C), np.int32(partials.count.shape[0]), np.int32(partials.fold), *partials[:3],
                      buf[0], buf[1], buf[2]))
        return Partials(buf[0:1], buf[1:2], buf[2:3], 1)

    def merge_sums(self, sums, acc) -> Sums:
        C = sums.s1.shape[1] // sums.fold
        buf = self.xp.empty((2, C), acc)
        self._launch(registry.finalize_kernel("cubn_merge_sums", acc),
                     (-(-C // CHANNELS_PER_FINALIZE_BLOCK), 1, 1), (FINALIZE_THREADS, 1, 1), 0,
                     (np.int32(C), np.int32(sums.s1.shape[0]), np.int32(sums.fold), sums.s1, sums.s2, buf[0], buf[1]))
        return Sums(buf[0:1], buf[1:2], 1)

    def _finalize_args(self, fold, update, acc, o, with_stats=True):
        """CUBN_FINALIZE_PARAMS (finalize.cuh): the fold, the outputs ``o``, the update."""
        a = acc.type
        rn = fold.renorm if fold is not None else None
        return (
            a(fold.eps if fold is not None else 0.0),
            *((fold.gamma, fold.beta, fold.adj_scale, fold.adj_bias) if fold is not None else (None,) * 4),
            *((rn.renorm_mean, rn.renorm_stddev) if rn is not None else (None, None)),
            a(rn.rmin if rn else 0.0), a(rn.rmax if rn else np.inf), a(rn.dmax if rn else np.inf),
            *((o["count"], o["mean"], o["var"]) if with_stats else (None, None, None)),
            o["invstd"], o["scale"], o["shift"], o["g"], o["h"], o["r"], o["d"],
            *self._update_args(update, acc),
        )

    @staticmethod
    def _stats_buffers(xp, C, acc, fold):
        buf = xp.empty((3 if fold is None else 10, C), acc)  # one allocation for every output
        o = dict(count=buf[0], mean=buf[1], var=buf[2], invstd=None, scale=None, shift=None, g=None, h=None, r=None, d=None)
        if fold is not None:
            o.update(invstd=buf[3], scale=buf[4], shift=buf[5], g=buf[6], h=buf[7])
            if fold.renorm is not None:
                o.update(r=buf[8], d=buf[9])
        return o

    @staticmethod
    def _update_args(u, acc):
        a = acc.type
        if u is None:
            return (a(0), np.int32(0), None, None, None, None, None, a(1), a(0), None, None, None)
        return (
            a(u.a), np.int32(1 if u.bessel else 0), u.mean_in, u.mean_out, u.var_in, u.var_out,
            u.zd_biased, a(u.zd_factor), a(u.renorm_a), u.renorm_mean, u.renorm_stddev, u.moving_stddev,
        )

    def moving_update(self, stats, acc, u) -> None:
        C = stats.mean.shape[0]
        args = (np.int32(C), stats.mean, stats.var, stats.count, acc.type(u.eps), *self._update_args(u, acc))
        self._launch(registry.finalize_kernel("cubn_bn_update", acc), (-(-C // 128), 1, 1), (128, 1, 1), 0, args)

    # -- elementwise -------------------------------------------------------
    def normalize(self, plan, x3, affine, side3, act, acc, out_dtype):
        xp, a = self.xp, acc.type
        y3 = xp.empty(x3.shape, out_dtype)
        n = x3.size
        if n == 0:
            return y3
        dt = x3.dtype
        vmax = registry.vector_widths(dt)[-1]
        vec = vmax if _aligned(vmax * dt.itemsize, x3, side3, y3) else 1
        raw = isinstance(affine, RawAffine)
        if raw:
            p = (affine.mean, affine.var, affine.gamma, affine.beta)
            eps = affine.eps
        else:
            p = (affine.mean, affine.scale, affine.shift, None)
            eps = 0.0
        grid, block = self._elementwise_grid(n, vec)
        self._launch(
            registry.normalize(dt, act.kernel_id if act else 0, vec, raw), grid, block, 0,
            (x3, side3, y3, np.int64(n), np.int32(plan.channels), np.int64(plan.inner), *p,
             a(eps), a(act.alpha if act else 0.0)),
        )
        return y3

    # -- the one-launch training forward ---------------------------------------
    def _persist_config(self, plan, dtype, arrays, items_for=None):
        """``(vec, grid, block)`` when every channel fits in one block's register
        cache (persistent.cu), else None. ``items_for(vec)``: vectors per
        thread (default: the training forward's)."""
        if plan.outer == 0 or plan.channels == 0:
            return None
        items_for = items_for or (lambda vec: persist_items(dtype, plan.channels_last))
        widths = (1, registry.vector_widths(dtype)[-1])  # the registered ones
        if not plan.channels_last:
            vec = self._vec(dtype, plan.inner, arrays, widths)
            items = items_for(vec)
            nvec = -(-plan.outer * plan.inner // vec)
            if nvec > PERSIST_THREADS * items:
                return None
            threads = max(32, _pow2_at_least(-(-nvec // items)))
            return vec, (plan.channels, 1, 1), (threads, 1, 1)
        # Channels last: a block owns bx vectors of columns and every row; keep
        # bx >= 2 (32-byte row segments) so that the loads stay coalesced.
        vec = self._vec(dtype, plan.channels, arrays, widths)
        items = items_for(vec)
        cv = plan.channels // vec
        by = _pow2_at_least(-(-plan.outer // items))
        bx = min(32, _pow2_at_least(cv))
        while bx * by > PERSIST_THREADS and bx > 2:
            bx //= 2
        if bx * by > PERSIST_THREADS or (bx < 2 and cv >= 2):
            return None
        return vec, (-(-cv // bx), 1, 1), (bx, by, 1)

    def train_forward_persistent(self, plan, x3, acc, fold, update, side3, act):
        """Training forward in one launch (statistics, finalize with the
        moving update, normalize + add + activation) when every channel's data
        fits in one block's registers; ``(y3, Stats)``, or None when it does
        not fit (the caller then runs the three-launch path)."""
        if not persistent_enabled():
            return None
        xp, a = self.xp, acc.type
        dt = x3.dtype
        cfg = self._persist_config(plan, dt, (x3, side3))  # before allocating: the fallback pays nothing
        if cfg is None:
            return None
        vec, grid, block = cfg
        y3 = xp.empty(x3.shape, dt)
        if not _aligned(vec * dt.itemsize, y3):
            return None
        C = plan.channels
        o = self._stats_buffers(xp, C, acc, fold)
        if plan.channels_last:
            shared = (block[1] + 3) * block[0] * vec * acc.itemsize
        else:
            shared = 67 * acc.itemsize
        self._launch(
            registry.train_persistent(dt, act.kernel_id if act else 0, vec, plan.channels_last), grid, block, shared,
            (x3, side3, y3, np.int64(plan.outer), np.int32(C), np.int64(plan.inner), a(act.alpha if act else 0.0),
             *self._finalize_args(fold, update, acc, o)),
        )
        stats = Stats(o["count"], o["mean"], o["var"], o["invstd"], o["scale"], o["shift"], o["g"], o["h"], o["r"], o["d"])
        return y3, stats

    def backward_persistent(self, plan, dy3, x3, side3, stats, act, acc, training, want_dside, out_dtype, side_dtype):
        """The unweighted backward in one launch when every channel's x and dy'
        fit in one block's registers: ``(dx3, dgamma, dbeta, dside3)``, or None
        (the caller then runs sums, finalize and apply)."""
        if not persistent_enabled() or np.dtype(out_dtype) != x3.dtype:
            return None
        if want_dside and np.dtype(side_dtype) != x3.dtype:
            return None
        xp, a = self.xp, acc.type
        dt = x3.dtype
        side = side3 if act is not None else None
        cfg = self._persist_config(plan, dt, (dy3, x3, side), lambda vec: bwd_persist_items(dt, vec))
        if cfg is None:  # decided before allocating: the fallback pays nothing
            return None
        vec, grid, block = cfg
        dx3 = xp.empty(x3.shape, dt)
        dside3 = xp.empty(x3.shape, dt) if want_dside else None
        if not _aligned(vec * dt.itemsize, dx3, dside3):
            return None
        C = plan.channels
        out = xp.empty((2, C), acc)
        if plan.channels_last:
            shared = (2 * block[1] + 2) * block[0] * vec * acc.itemsize
        else:
            shared = 66 * acc.itemsize
        self._launch(
            registry.bwd_persistent(dt, act.kernel_id if act else 0, vec, plan.channels_last), grid, block, shared,
            (dy3, x3, side, dx3, dside3, np.int64(plan.outer), np.int32(C), np.int64(plan.inner),
             stats.mean, stats.scale, stats.shift, stats.count, stats.invstd, stats.gcoef, stats.hcoef,
             np.int32(1 if training else 0), a(act.alpha if act else 0.0), out[0], out[1]),
        )
        return dx3, out[0], out[1], dside3

    # -- backward -----------------------------------------------------------
    def backward_partials(self, plan, dy3, x3, side3, affine, act, acc):
        xp, a = self.xp, acc.type
        dt = x3.dtype
        act_id = act.kernel_id if act else 0
        alpha = a(act.alpha if act else 0.0)
        side = side3 if act is not None else None
        coeff = (affine.mean, affine.scale, affine.shift)
        if plan.channels_last:
            cfg = self._cl_config(plan, dt, (dy3, x3, side))
            shape = (cfg.nsplit, cfg.cols)
            s1, s2 = xp.empty(shape, acc), xp.empty(shape, acc)
            shared = 2 * cfg.block[0] * cfg.block[1] * cfg.vec * acc.itemsize
            self._launch(
                registry.bwd_reduce(dt, "cl", act_id, cfg.vec), cfg.grid, cfg.block, shared,
                (dy3, x3, side, np.int64(cfg.rows), np.int32(cfg.cols), np.int32(plan.channels), *coeff, alpha, s1, s2),
            )
            return Sums(s1, s2, cfg.fold)
        cfg = self._cf_config(plan, dt, (dy3, x3, side))
        shape = (cfg.nsplit, plan.channels)
        s1, s2 = xp.empty(shape, acc), xp.empty(shape, acc)
        self._launch(
            registry.bwd_reduce(dt, "cf", act_id, cfg.vec), cfg.grid, cfg.block, 0,
            (dy3, x3, side, np.int64(plan.outer), np.int32(plan.channels), np.int64(plan.inner),
             np.int32(cfg.nsplit), np.int64(cfg.chunk), *coeff, alpha, s1, s2),
        )
        return Sums(s1, s2, 1)

    def backward_finalize(self, sums, stats, acc, training):
        xp = self.xp
        C = sums.s1.shape[1] // sums.fold
        buf = xp.empty((4, C), acc)
        self._launch(
            registry.finalize_kernel("cubn_bwd_finalize", acc),
            (-(-C // CHANNELS_PER_FINALIZE_BLOCK), 1, 1), (FINALIZE_THREADS, 1, 1), 0,
            (np.int32(C), np.int32(sums.s1.shape[0]), np.int32(sums.fold), sums.s1, sums.s2,
             stats.count, stats.invstd, stats.scale, stats.gcoef, stats.hcoef, np.int32(1 if training else 0),
             buf[0], buf[1], buf[2], buf[3]),
        )
        return BackwardCoeffs(buf[0], buf[1], buf[2], buf[3])

    def backward_apply(self, plan, dy3, x3, side3, affine, act, coeffs, weights, acc, want_dside, out_dtype, side_dtype):
        xp, a = self.xp, acc.type
        dt = x3.dtype
        dx3 = xp.empty(x3.shape, out_dtype)
        dside3 = xp.empty(x3.shape, side_dtype) if want_dside else None
        n = x3.size
        if n == 0:
            return dx3, dside3
        side = side3 if act is not None else None
        vmax = registry.vector_widths(dt)[-1]
        vec = vmax if _aligned(vmax * dt.itemsize, dy3, x3, side, dx3, dside3) else 1
        wmode, wvals, wdiv = 0, None, 1
        if weights is not None:
            wmode = 1 if weights.kind == "outer" else 2
            wvals, wdiv = weights.values, weights.divisor
        grid, block = self._elementwise_grid(n, vec)
        act_id = act.kernel_id if act else 0
        self._launch(
            registry.bwd_apply(dt, act_id, vec), grid, block, 0,
            (dy3, x3, side, dx3, dside3, np.int64(n), np.int32(plan.channels), np.int64(plan.inner),
             affine.mean, affine.scale, affine.shift, coeffs.k1, coeffs.k2, wvals, np.int32(wmode), np.int64(wdiv),
             a(act.alpha if act else 0.0)),
        )
        return dx3, dside3
