"""The primitives of ``backends.base`` as CUDA kernel launches.

One orchestration for two launchers: ``CupyLauncher`` (NVRTC, the GPU) and
``EmulatedLauncher`` (the same .cu built by g++, run on CPU threads). They
differ only in ``get`` / ``launch`` / ``device_info``; launch configurations,
buffers and kernel sequences are all decided here, so the emulator runs
exactly the launches the GPU gets. Nothing here reads a device value back on
the host: every statistic stays on the device between launches.
"""
from __future__ import annotations

import functools
import math

from .. import _dtypes
from ..kernels import registry as R
from ..kernels.registry import ELEMENTWISE_THREADS, FINALIZE_THREADS, REDUCE_THREADS
from ..kernels.spec import element
from . import occupancy as _occupancy
from ._memory import aligned as _aligned, persistent as _memory_persistent
from .kernel_preprocessing import KernelPreprocessing
from .base import BackwardCoeffs, Partials, RawAffine, Stats, Sums

FINALIZE_ROW_BYTES = 32  # a finalize block reads this much of each partial row: one sector
BLOCKS_PER_SM = 2048 // REDUCE_THREADS  # resident 256-thread blocks per SM at full occupancy (registers unknown)
REDUCE_WAVES = 2
ELEMENTWISE_WAVES = 4
WHOLE_WAVE_FILL = 0.95  # an elementwise grid's last wave is at least this full when the period allows
_INT32_LIMIT = 2**31
MIN_VECTORS_PER_THREAD = 4  # below this a reduction thread's setup dominates
# Partials per channel the statistics kernels leave (PyTorch caps its split at
# 128): finalize merges them with a block of walkers, so its serial chain is
# MAX_PARTIALS / walkers, while ~1 wave of reduction blocks still fills the GPU.
MAX_PARTIALS = 1024
# The fused statistics' last block merges its group's partials alone (256
# threads): at most this many (channels x partials per channel), so each
# thread merges a handful; blocks loop over more rows instead.
FUSED_MAX_MERGES = 2048
SECTOR_BYTES = 32  # a fused channels-last group reads at least this much of each row


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class _ClConfig:
    """Launch shape of a channels-last reduction over a (rows, cols) matrix."""

    def __init__(self, fold, cols, rows, vec, bx, by, gx, gy):
        self.fold, self.cols, self.rows, self.vec = fold, cols, rows, vec
        self.block = (bx, by, 1)
        self.grid = (gx, gy, 1)
        self.nsplit = gy
        # moments.cu merges a block's folded columns per channel: its partials
        # are (gy, gx * C) with fold gx; unfolded, (gy, cols) with fold 1
        self.partial_fold = gx if fold > 1 else 1


class _CfConfig:
    def __init__(self, vec, nsplit, chunk, channels):
        self.vec, self.nsplit, self.chunk = vec, nsplit, chunk
        self.grid = (channels * nsplit, 1, 1)
        self.block = (REDUCE_THREADS, 1, 1)


class KernelBackend(KernelPreprocessing):
    def __init__(self, launcher):
        self.launcher = launcher
        self.xp = launcher.xp
        self.name = launcher.name
        self.info = launcher.device_info()
        self._limits = _occupancy.limits_for(getattr(self.info, "compute_capability", None))
        self._per_sm: dict = {}
        self._counter_buffers: dict = {}  # stream key -> the fused statistics' counters

    # ------------------------------------------------------------------
    def _launch(self, variant, grid, block, shared, **args):
        """Launch ``variant`` with its arguments by name (the spec orders and converts them)."""
        self.launcher.launch(self.launcher.get(variant), grid, block, shared, variant.args(**args))

    def _blocks_per_sm(self, variant, threads, shared=0):
        """Resident blocks per SM of ``variant`` launched with ``threads`` per block
        and ``shared`` bytes of dynamic shared memory (cubn/backends/occupancy.py);
        the old assumption of full thread occupancy when ``variant`` is None."""
        if variant is None:
            return BLOCKS_PER_SM * REDUCE_THREADS // threads
        key = (variant, threads, shared)
        n = self._per_sm.get(key)
        if n is None:
            get = getattr(self.launcher, "get", None)
            kernel = get(variant) if get is not None and self.launcher.name == "cupy" else None
            regs, static = _occupancy.variant_resources(variant, getattr(self.info, "compute_capability", None),
                                                        kernel)
            n = self._per_sm[key] = max(1, self._limits.blocks_per_sm(threads, regs, static + shared))
        return n

    def _target_blocks(self, waves, variant=None, threads=REDUCE_THREADS, shared=0):
        """Blocks in ``waves`` whole waves of ``variant`` (its real occupancy at
        ``threads`` per block and ``shared`` dynamic bytes; without a variant,
        8 resident 256-thread blocks per SM)."""
        return self.info.multiprocessor_count * self._blocks_per_sm(variant, threads, shared) * waves

    @staticmethod
    def _vec(dtype, divisible_by, arrays, widths=None):
        """Widest access (elements, among ``widths``: default every width) that
        divides ``divisible_by`` with all arrays aligned."""
        size = _dtypes.itemsize(dtype)
        widths = _dtypes.vector_widths(dtype) if widths is None else widths
        for v in sorted(widths, reverse=True):
            if divisible_by % v == 0 and _aligned(v * size, *arrays):
                return v
        return 1

    def _cl_config(self, plan, dtype, arrays, allow_fold=True, merged=False, variant_of=None, shared_of=None,
                   fused=False, acc_itemsize=4):
        """``merged``: the kernel merges a block's folded columns (moments.cu), so a channel has
        gy * gx partials, not gy * fold; the split count is capped to keep them <= MAX_PARTIALS.
        ``variant_of(vec)`` / ``shared_of(vec, block_threads)``: the variant launched and its
        dynamic shared bytes, so the split fills whole waves at its real occupancy."""
        C, outer = plan.channels, plan.outer
        vmax = _dtypes.vector_widths(dtype)[-1]
        itemsize = _dtypes.itemsize(dtype)
        fold = 1
        if fused and C * itemsize >= SECTOR_BYTES:
            allow_fold = False  # narrow column groups of whole sectors instead (see below)
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
        variant = variant_of(vec) if variant_of is not None else None
        shared = shared_of(vec, REDUCE_THREADS) if shared_of is not None else 0
        if fused and fold == 1:
            # Narrow column groups: the last block of a group merges width x gy partials in
            # chunks of finalize's channels per block, and a wave of blocks needs gy >= wave *
            # width / C, so the merge grows with the square of the width: the narrowest width
            # that is one such chunk (FINALIZE_ROW_BYTES of accumulators) and a sector of each row.
            width = max(FINALIZE_ROW_BYTES // acc_itemsize, -(-SECTOR_BYTES // itemsize))
            bx = min(bx, max(1, width // vec))
        by = REDUCE_THREADS // bx
        gx = -(-cv // bx)
        gy_needed = -(-rows // (by * MIN_VECTORS_PER_THREAD))
        target = self._target_blocks(REDUCE_WAVES, variant, REDUCE_THREADS, shared)
        gy = max(1, min(-(-target // gx), gy_needed, 65535))
        gy = max(1, min(gy, MAX_PARTIALS // (gx if merged and fold > 1 else fold)))
        if fused:
            # One wave at the variant's occupancy is enough blocks in flight (Little's law), and
            # every partial more lengthens the last block's merge: a group's last block merges
            # channels x partials <= FUSED_MAX_MERGES (and <= MAX_PARTIALS per channel).
            wave = self._target_blocks(1, variant, REDUCE_THREADS, shared)
            per_block = gx if fold > 1 else 1  # partials per channel a row of blocks leaves
            group_channels = C if fold > 1 else min(bx * vec, cols)
            cap = min(MAX_PARTIALS, FUSED_MAX_MERGES // group_channels) // per_block
            gy = max(1, min(gy_needed, wave // gx, cap, 65535))
        return _ClConfig(fold, cols, rows, vec, bx, by, gx, gy)

    def _cf_config(self, plan, dtype, arrays, variant_of=None, fused=False):
        C, L = plan.channels, plan.outer * plan.inner
        vec = self._vec(dtype, plan.inner, arrays)
        per_block_min = REDUCE_THREADS * vec * MIN_VECTORS_PER_THREAD
        target = self._target_blocks(REDUCE_WAVES, variant_of(vec) if variant_of is not None else None)
        # at most ``target`` blocks (rounding up would start a nearly empty extra wave)
        if fused:
            # whole waves (a wave at the variant's occupancy is enough in flight), and at most
            # FUSED_MAX_MERGES partials for the channel's last block
            wave = self._target_blocks(1, variant_of(vec) if variant_of is not None else None)
            nsplit = max(1, min(wave // C, -(-L // per_block_min), FUSED_MAX_MERGES, MAX_PARTIALS))
        else:
            nsplit = max(1, min(target // C, -(-L // per_block_min), MAX_PARTIALS))
        chunk = -(-L // nsplit)
        chunk = -(-chunk // vec) * vec
        nsplit = max(1, -(-L // chunk)) if L else 1
        return _CfConfig(vec, nsplit, chunk, C)

    def _elementwise_grid(self, n, vec, variant=None, period=None):
        """Grid and block of a grid-stride elementwise launch over ``n`` elements
        in vectors of ``vec``, ``ELEMENTWISE_WAVES`` waves at the variant's
        occupancy. ``period`` (elements; C * inner): the kernel keeps each
        thread's channels from its first vector (elementwise.cuh), so the grid's
        stride in elements is a multiple of it, or the grid has a thread for
        every vector."""
        nvec = -(-n // vec)
        cover = max(1, -(-nvec // ELEMENTWISE_THREADS))
        wave = self.info.multiprocessor_count * self._blocks_per_sm(variant, ELEMENTWISE_THREADS)
        target = wave * ELEMENTWISE_WAVES
        if cover <= target:
            blocks = cover
        elif period is None:
            blocks = target
        else:
            blocks = _periodic_blocks(period // math.gcd(period, ELEMENTWISE_THREADS * vec), wave, cover)
        return (blocks, 1, 1), (ELEMENTWISE_THREADS, 1, 1)

    def _elementwise_variant(self, spec, plan, n, vec, dtype, weighted=False, **targs):
        """The position mode and index width of an elementwise variant
        (elementwise.cuh) with its grid: ``(variant, grid, block)``."""
        if weighted:
            pos = R.POS_ELEMENT
        elif vec == 1 or plan.inner % vec == 0:
            pos = R.POS_CHANNEL  # every vector inside one channel
        else:
            pos = R.POS_PATTERN
        T = element(dtype)
        period = None if weighted else plan.channels * plan.inner
        if not weighted and n < _INT32_LIMIT:
            # 32-bit indices when nothing the loop forms (up to n + its stride) can overflow
            narrow = spec.variant(T=T, VEC=vec, POS=pos, IDX32=1, **targs)
            grid, block = self._elementwise_grid(n, vec, narrow, period)
            if n + grid[0] * block[0] * vec + vec < _INT32_LIMIT:
                return narrow, grid, block
        wide = spec.variant(T=T, VEC=vec, POS=pos, IDX32=0, **targs)
        return (wide, *self._elementwise_grid(n, vec, wide, period))

    @staticmethod
    def _per_channel_grid(C, itemsize=4):
        """Finalize-style launches: blocks of bx consecutive channels (one sector of each
        partial row) by FINALIZE_THREADS / bx walkers over the partials."""
        bx = min(max(1, FINALIZE_ROW_BYTES // itemsize), _pow2_at_least(C))
        return (-(-C // bx), 1, 1), (bx, FINALIZE_THREADS // bx, 1)

    # -- statistics -------------------------------------------------------
    def welford_partials(self, plan, x3, acc, weights=None) -> Partials:
        """Per-block Welford partials of ``x3`` accumulated in ``acc``.

        Any registered (data dtype, accumulation) pair: the ops' (16-bit
        floats in float32, float32 and float64 in themselves) run moments.cu;
        integers and float32 with float64 partials (the preprocessing
        statistics) run the same kernels instantiated in preprocess.cu.
        """
        cfg, pfold, variant, shared, base = self._statistics_launch(plan, x3, acc, weights)
        buf = self.xp.empty((4, cfg.nsplit, plan.channels * pfold), acc)  # one allocation: count, mean, M2, pivot
        pc, pm, p2, pivot = buf[0], buf[1], buf[2], buf[3]
        self._launch(variant, cfg.grid, cfg.block, shared, **base, p_count=pc, p_mean=pm, p_m2=p2, p_pivot=pivot)
        return Partials(pc, pm, p2, pfold, pivot, weights is not None)

    def fused_statistics(self, plan, x3, acc, weights, fold, update) -> Stats | None:
        """Statistics, finalize and moving update in one launch (moments.cu's fused kernels: the last
        block of each channel group merges its partials as ``finalize`` would, so the results are
        bitwise those of ``finalize(welford_partials(...))``); None where the pair has no fused
        kernel (the preprocessing's accumulations)."""
        if R.moments_kernels(x3.dtype, acc)[0] is not R.MOMENTS_CL:
            return None
        C = plan.channels
        cfg, pfold, variant, shared, base = self._statistics_launch(plan, x3, acc, weights, fused=True)
        groups = (cfg.grid[0] if cfg.fold == 1 else 1) if plan.channels_last else C
        counters = self._counters(groups)
        buf = self.xp.empty((4, cfg.nsplit, C * pfold), acc)
        o = self._stats_buffers(self.xp, C, acc, fold)
        self._launch(variant, cfg.grid, cfg.block, shared, **base, p_count=buf[0], p_mean=buf[1], p_m2=buf[2],
                     p_pivot=buf[3], counters=counters, weighted=int(weights is not None),
                     **self._finalize_args(fold, update, o))
        return Stats(o["count"], o["mean"], o["var"], o["invstd"], o["scale"], o["shift"], o["g"], o["h"], o["r"],
                     o["d"])

    def _counters(self, n):
        """A zeroed uint32 buffer of at least ``n`` counters for the fused statistics, allocated
        once per backend (device) and stream and left zero by every launch, so no call clears it.
        Allocated with the launcher's own array module and marked persistent, so a recorded launch
        program keeps this very buffer."""
        key = getattr(self.launcher, "stream_key", lambda: None)()
        cache = self._counter_buffers
        buf = cache.get(key)
        if buf is None or buf.size < n:
            size = max(1024, _pow2_at_least(n))
            buf = self.launcher.xp.zeros(size, "uint32")
            _memory_persistent(buf)
            cache[key] = buf
        return buf

    def _statistics_launch(self, plan, x3, acc, weights, fused=False):
        """The statistics launch of ``x3``: ``(cfg, partial fold, variant, dynamic shared bytes,
        the data arguments)``. The ops' pairs (those with fused kernels) take the fused grid
        either way, so the partials -- and, merged in finalize's order, the statistics -- of
        the fused launch and of ``welford_partials`` (SyncBatchNorm's exchange) are the same."""
        cl_kernel, cf_kernel = R.moments_kernels(x3.dtype, acc)
        sized = cl_kernel is R.MOMENTS_CL  # sized as the fused launch
        if fused:
            cl_kernel, cf_kernel = R.MOMENTS_CL_FUSED, R.MOMENTS_CF_FUSED
        grid_cl, grid_cf = (R.MOMENTS_CL_FUSED, R.MOMENTS_CF_FUSED) if sized else (cl_kernel, cf_kernel)
        T = element(x3.dtype, acc)
        wmode, wvals, wdiv = 0, None, 1
        if weights is not None:
            wmode = 1 if weights.kind == "outer" else 2
            wvals, wdiv = weights.values, weights.divisor
        dt = x3.dtype
        C = plan.channels
        if plan.channels_last:
            cfg = self._cl_config(plan, dt, (x3,), allow_fold=weights is None, merged=True,
                                  variant_of=lambda vec: grid_cl.variant(T=T, WMODE=wmode, VEC=vec),
                                  shared_of=lambda vec, threads: 3 * threads * vec * acc.itemsize, fused=sized,
                                  acc_itemsize=acc.itemsize)
            shared = 3 * cfg.block[0] * cfg.block[1] * cfg.vec * acc.itemsize
            variant = cl_kernel.variant(T=T, WMODE=wmode, VEC=cfg.vec)
            base = dict(x=x3, rows=cfg.rows, cols=cfg.cols, C=C, w=wvals, wdiv=wdiv)
            return cfg, cfg.partial_fold, variant, shared, base
        cfg = self._cf_config(plan, dt, (x3,), variant_of=lambda vec: grid_cf.variant(T=T, WMODE=wmode, VEC=vec),
                              fused=sized)
        variant = cf_kernel.variant(T=T, WMODE=wmode, VEC=cfg.vec)
        base = dict(x=x3, outer=plan.outer, C=C, inner=plan.inner, nsplit=cfg.nsplit, chunk=cfg.chunk, w=wvals,
                    wdiv=wdiv)
        return cfg, 1, variant, 0, base

    def finalize(self, partials, acc, fold, update=None, given=None) -> Stats:
        xp = self.xp
        if partials is not None:
            C = partials.count.shape[1] // partials.fold
        else:
            C = given[0].shape[0]
        o = self._stats_buffers(xp, C, acc, fold)
        if partials is not None:
            inputs = dict(nparts=partials.count.shape[0], fold=partials.fold, p_count=partials.count,
                          p_mean=partials.mean, p_m2=partials.m2, pivot=partials.pivot,
                          weighted=int(bool(partials.weighted)))
        else:
            inputs = dict(given_mean=given[0], given_var=given[1])
        grid, block = self._per_channel_grid(C, acc.itemsize)
        self._launch(R.BN_FINALIZE.variant(A=element(acc)), grid, block, 0, C=C, **inputs,
                     **self._finalize_args(fold, update, o, with_stats=partials is not None))
        if partials is None:
            count, (mean, var) = xp.zeros(C, acc), given
        else:
            count, mean, var = o["count"], o["mean"], o["var"]
        return Stats(count, mean, var, o["invstd"], o["scale"], o["shift"], o["g"], o["h"], o["r"], o["d"])

    def merge_partials(self, partials, acc) -> Partials:
        """One (count, mean - pivot, M2, pivot) per channel: Partials of shape (1, C), rows of one
        (4, C) buffer (what SyncBatchNorm exchanges)."""
        C = partials.count.shape[1] // partials.fold
        buf = self.xp.empty((4, C), acc)
        grid, block = self._per_channel_grid(C, acc.itemsize)
        self._launch(R.MERGE_PARTIALS.variant(A=element(acc)), grid, block, 0,
                     C=C, nparts=partials.count.shape[0], fold=partials.fold, p_count=partials.count,
                     p_mean=partials.mean, p_m2=partials.m2, pivot=partials.pivot, o_count=buf[0], o_mean=buf[1],
                     o_m2=buf[2], o_pivot=buf[3])
        return Partials(buf[0:1], buf[1:2], buf[2:3], 1, buf[3:4], partials.weighted)

    def merge_sums(self, sums, acc) -> Sums:
        C = sums.s1.shape[1] // sums.fold
        buf = self.xp.empty((2, C), acc)
        grid, block = self._per_channel_grid(C, acc.itemsize)
        self._launch(R.MERGE_SUMS.variant(A=element(acc)), grid, block, 0,
                     C=C, nparts=sums.s1.shape[0], fold=sums.fold, s1p=sums.s1, s2p=sums.s2, o1=buf[0], o2=buf[1])
        return Sums(buf[0:1], buf[1:2], 1)

    def _finalize_args(self, fold, update, o, with_stats=True):
        """The named finalize arguments (finalize.cuh's CUBN_FINALIZE_PARAMS): the fold, the
        outputs ``o``, the update; what is not named is NULL or the spec's default."""
        args = dict(o_invstd=o["invstd"], o_scale=o["scale"], o_shift=o["shift"], o_g=o["g"], o_h=o["h"],
                    o_r=o["r"], o_d=o["d"])
        if with_stats:
            args.update(o_count=o["count"], o_mean=o["mean"], o_var=o["var"])
        if fold is not None:
            args.update(eps=fold.eps, gamma=fold.gamma, beta=fold.beta, adj_scale=fold.adj_scale,
                        adj_bias=fold.adj_bias)
            rn = fold.renorm
            if rn is not None:
                args.update(renorm_mean=rn.renorm_mean, renorm_std=rn.renorm_stddev, rmin=rn.rmin, rmax=rn.rmax,
                            dmax=rn.dmax)
        if update is not None:
            args.update(self._update_args(update))
        return args

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
    def _update_args(u):
        """The named moving-update arguments of a [`MovingUpdate`][MovingUpdate]."""
        return dict(upd_a=u.a, bessel=1 if u.bessel else 0, mm_in=u.mean_in, mm_out=u.mean_out, mv_in=u.var_in,
                    mv_out=u.var_out, zd_biased=u.zd_biased, zd_factor=u.zd_factor, renorm_a=u.renorm_a,
                    rn_mean_io=u.renorm_mean, rn_std_io=u.renorm_stddev, moving_std_io=u.moving_stddev)

    def moving_update(self, stats, acc, u) -> None:
        C = stats.mean.shape[0]
        self._launch(R.BN_UPDATE.variant(A=element(acc)), (-(-C // FINALIZE_THREADS), 1, 1), (FINALIZE_THREADS, 1, 1),
                     0, C=C, mean=stats.mean, var=stats.var, count=stats.count, eps=u.eps, **self._update_args(u))

    # -- elementwise -------------------------------------------------------
    def normalize(self, plan, x3, affine, side3, act, acc, out_dtype):
        xp = self.xp
        y3 = xp.empty(x3.shape, out_dtype)
        n = x3.size
        if n == 0:
            return y3
        dt = x3.dtype
        vmax = _dtypes.vector_widths(dt)[-1]
        vec = vmax if _aligned(vmax * dt.itemsize, x3, side3, y3) else 1
        raw = isinstance(affine, RawAffine)
        if raw:
            p = dict(p1=affine.var, p2=affine.gamma, p3=affine.beta, eps=affine.eps)
        else:
            p = dict(p1=affine.scale, p2=affine.shift)
        variant, grid, block = self._elementwise_variant(R.NORMALIZE, plan, n, vec, dt,
                                                         ACT=act.kernel_id if act else 0, RAW=int(raw),
                                                         SIDE=int(side3 is not None))
        self._launch(variant, grid, block, 0, x=x3, side=side3, y=y3, n=n, C=plan.channels, inner=plan.inner,
                     mean=affine.mean, **p, alpha=act.alpha if act else 0.0)
        return y3

    # -- the one-launch path (the launch decided by one_launch.decide) ---------
    def train_forward_one_launch(self, launch, plan, x3, acc, fold, update, side3, act):
        """The training forward in one launch -- statistics, finalize with the
        moving update, normalize + add + activation -- with every channel's
        data in one block's registers: ``(y3, Stats)``."""
        xp = self.xp
        dt = x3.dtype
        y3 = xp.empty(x3.shape, dt)
        o = self._stats_buffers(xp, plan.channels, acc, fold)
        v = R.TRAIN_ONE_LAUNCH.variant(T=element(dt), ACT=act.kernel_id if act else 0, VEC=launch.vec,
                                       CL=int(plan.channels_last), ITEMS=launch.items)
        self._launch(v, launch.grid, launch.block, launch.shared_bytes, x=x3, side=side3, y=y3, outer=plan.outer,
                     C=plan.channels, inner=plan.inner, alpha=act.alpha if act else 0.0,
                     **self._finalize_args(fold, update, o))
        stats = Stats(o["count"], o["mean"], o["var"], o["invstd"], o["scale"], o["shift"], o["g"], o["h"], o["r"], o["d"])
        return y3, stats

    def backward_one_launch(self, launch, plan, dy3, x3, side3, stats, act, acc, training, want_dside):
        """The unweighted backward in one launch, every channel's x and dy' in
        one block's registers: ``(dx3, dgamma, dbeta, dside3)`` (dx and d side
        in the data's dtype)."""
        xp = self.xp
        dt = x3.dtype
        dx3 = xp.empty(x3.shape, dt)
        dside3 = xp.empty(x3.shape, dt) if want_dside else None
        out = xp.empty((2, plan.channels), acc)
        v = R.BWD_ONE_LAUNCH.variant(T=element(dt), ACT=act.kernel_id if act else 0, VEC=launch.vec,
                                     CL=int(plan.channels_last), ITEMS=launch.items)
        self._launch(v, launch.grid, launch.block, launch.shared_bytes, dy=dy3, x=x3,
                     side=side3 if act is not None else None, dx=dx3, dside=dside3, outer=plan.outer,
                     C=plan.channels, inner=plan.inner, mean=stats.mean, scale=stats.scale, shift=stats.shift,
                     count=stats.count, invstd=stats.invstd, gcoef=stats.gcoef, hcoef=stats.hcoef,
                     training=1 if training else 0, alpha=act.alpha if act else 0.0, dgamma=out[0], dbeta=out[1])
        return dx3, out[0], out[1], dside3

    # -- backward -----------------------------------------------------------
    def backward_partials(self, plan, dy3, x3, side3, affine, act, acc):
        xp = self.xp
        dt = x3.dtype
        T, act_id = element(dt), act.kernel_id if act else 0
        alpha = act.alpha if act else 0.0
        side = side3 if act is not None else None
        coeff = dict(mean=affine.mean, scale=affine.scale, shift=affine.shift)
        if plan.channels_last:
            variant_of = lambda vec: R.BWD_REDUCE_CL.variant(T=T, ACT=act_id, VEC=vec)  # noqa: E731
            shared_of = lambda vec, threads: 2 * threads * vec * acc.itemsize  # noqa: E731
            cfg = self._whole_waves(self._cl_config(plan, dt, (dy3, x3, side), merged=True, variant_of=variant_of,
                                                    shared_of=shared_of), variant_of, shared_of)
            # backward.cu sums a block's folded columns per channel, as moments.cu merges them
            buf = xp.empty((2, cfg.nsplit, plan.channels * cfg.partial_fold), acc)
            s1, s2 = buf[0], buf[1]
            shared = 2 * cfg.block[0] * cfg.block[1] * cfg.vec * acc.itemsize
            self._launch(R.BWD_REDUCE_CL.variant(T=T, ACT=act_id, VEC=cfg.vec), cfg.grid, cfg.block, shared,
                         dy=dy3, x=x3, side=side, rows=cfg.rows, cols=cfg.cols, C=plan.channels, **coeff,
                         alpha=alpha, p_s1=s1, p_s2=s2)
            return Sums(s1, s2, cfg.partial_fold)
        cfg = self._cf_config(plan, dt, (dy3, x3, side),
                              variant_of=lambda vec: R.BWD_REDUCE_CF.variant(T=T, ACT=act_id, VEC=vec))
        shape = (cfg.nsplit, plan.channels)
        s1, s2 = xp.empty(shape, acc), xp.empty(shape, acc)
        self._launch(R.BWD_REDUCE_CF.variant(T=T, ACT=act_id, VEC=cfg.vec), cfg.grid, cfg.block, 0,
                     dy=dy3, x=x3, side=side, outer=plan.outer, C=plan.channels, inner=plan.inner,
                     nsplit=cfg.nsplit, chunk=cfg.chunk, **coeff, alpha=alpha, p_s1=s1, p_s2=s2)
        return Sums(s1, s2, 1)

    def _whole_waves(self, cfg, variant_of, shared_of):
        """``cfg`` with its split count cut to whole waves when its grid spans
        more than one with the last part-filled (the partials' cap or the
        rounding of ``gy`` leave one; the idle SMs of a last wave stretch an
        equal-work grid by ``ceil(waves) / waves``)."""
        gx, gy = cfg.grid[0], cfg.grid[1]
        threads = cfg.block[0] * cfg.block[1]
        wave = self._target_blocks(1, variant_of(cfg.vec), threads, shared_of(cfg.vec, threads))
        blocks = gx * gy
        if blocks <= wave or blocks % wave == 0:
            return cfg
        whole = max(1, (blocks // wave) * wave // gx)
        bx, by = cfg.block[0], cfg.block[1]
        return _ClConfig(cfg.fold, cfg.cols, cfg.rows, cfg.vec, bx, by, gx, whole)

    def backward_finalize(self, sums, stats, acc, training):
        xp = self.xp
        C = sums.s1.shape[1] // sums.fold
        buf = xp.empty((4, C), acc)
        grid, block = self._per_channel_grid(C)
        self._launch(R.BWD_FINALIZE.variant(A=element(acc)), grid, block, 0,
                     C=C, nparts=sums.s1.shape[0], fold=sums.fold, s1p=sums.s1, s2p=sums.s2, count=stats.count,
                     invstd=stats.invstd, scale=stats.scale, g=stats.gcoef, h=stats.hcoef,
                     training=1 if training else 0, dgamma=buf[0], dbeta=buf[1], k1=buf[2], k2=buf[3])
        return BackwardCoeffs(buf[0], buf[1], buf[2], buf[3])

    def backward_apply(self, plan, dy3, x3, side3, affine, act, coeffs, weights, acc, want_dside, out_dtype, side_dtype):
        xp = self.xp
        dt = x3.dtype
        dx3 = xp.empty(x3.shape, out_dtype)
        dside3 = xp.empty(x3.shape, side_dtype) if want_dside else None
        n = x3.size
        if n == 0:
            return dx3, dside3
        side = side3 if act is not None else None
        vmax = _dtypes.vector_widths(dt)[-1]
        vec = vmax if _aligned(vmax * dt.itemsize, dy3, x3, side, dx3, dside3) else 1
        wmode, wvals, wdiv = 0, None, 1
        if weights is not None:
            wmode = 1 if weights.kind == "outer" else 2
            wvals, wdiv = weights.values, weights.divisor
        variant, grid, block = self._elementwise_variant(R.BWD_APPLY, plan, n, vec, dt, weighted=wmode != 0,
                                                         ACT=act.kernel_id if act else 0)
        self._launch(variant, grid, block, 0, dy=dy3, x=x3, side=side, dx=dx3, dside=dside3, n=n, C=plan.channels,
                     inner=plan.inner,
                     mean=affine.mean, scale=affine.scale, shift=affine.shift, k1=coeffs.k1, k2=coeffs.k2,
                     w=wvals, wmode=wmode, wdiv=wdiv, alpha=act.alpha if act else 0.0)
        return dx3, dside3


def _periodic_blocks(q, wave, cover):
    """Blocks of an elementwise grid: a multiple of ``q``, or ``cover`` (a
    thread for every vector) when that is fewer."""
    return min(cover, _periodic_multiple(q, wave))


@functools.lru_cache(maxsize=4096)
def _periodic_multiple(q, wave):
    """The multiple of ``q`` that fills whole waves of ``wave`` blocks to
    ``WHOLE_WAVE_FILL``, trying ``ELEMENTWISE_WAVES`` waves first, then the
    counts nearest it; else the multiple nearest ``ELEMENTWISE_WAVES`` waves."""
    for w in sorted(range(1, 2 * ELEMENTWISE_WAVES + 1), key=lambda w: (abs(w - ELEMENTWISE_WAVES), -w)):
        b = (w * wave // q) * q
        if b and b >= WHOLE_WAVE_FILL * w * wave:
            return b
    return max(1, round(ELEMENTWISE_WAVES * wave / q)) * q
