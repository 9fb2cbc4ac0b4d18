"""The one decision point of the one-launch path.

[`decide`][decide] is a pure function: from the plan, the data and
accumulation dtypes, the device's limits, the alignment of the arrays and
what the caller allows, it returns the launch of the one-launch kernel
(one_launch.cu) or None -- then the three-launch path runs (statistics,
finalize, normalize; or sums, finalize, apply). It is decided before
anything is allocated, so the three-launch path pays nothing for the
question. Outputs are allocated by the backend with at least 16-byte
alignment (NumPy's allocator; CuPy's memory pool gives 256), so only the
inputs' alignment is asked.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import _dtypes
from ..kernels import registry as R

FORWARD, BACKWARD = "forward", "backward"


@dataclass(frozen=True)
class OneLaunch:
    """How to launch a one-launch kernel."""

    kind: str          # FORWARD or BACKWARD
    vec: int           # elements per access (1, or one 16-byte vector)
    items: int         # vectors each thread keeps in registers (the ITEMS template argument)
    grid: tuple
    block: tuple
    shared_bytes: int


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def decide(kind, plan, dtype, acc, device, alignment, *, enabled=True, weighted=False, distributed=False,
           same_dtypes=True) -> OneLaunch | None:
    """The one-launch launch for ``plan``, or None for the three-launch path.

    Args:
        kind: ``FORWARD`` (training forward) or ``BACKWARD``.
        plan: the (outer, C, inner) plan of the tensor.
        dtype: the data dtype; ``acc``: the accumulation dtype.
        device: the device's limits (``base.DeviceInfo``); None (no device,
            the NumPy backend): no one-launch path.
        alignment: the byte alignment every input shares (``_memory.alignment``).
        enabled: the scoped option (``cubn.use_one_launch``).
        weighted: weighted statistics (forward) or a weighted training
            backward: the one-launch kernels are unweighted.
        distributed: statistics or sums exchanged between processes
            (SyncBatchNorm): the exchange sits between the launches.
        same_dtypes: the outputs have the data's dtype (the kernels write T).
    """
    if not enabled or weighted or distributed or not same_dtypes or device is None:
        return None
    if plan.outer == 0 or plan.channels == 0:
        return None
    itemsize = _dtypes.itemsize(dtype)
    acc_size = _dtypes.itemsize(acc)
    threads = min(R.ONE_LAUNCH_THREADS, device.max_threads_per_block)
    widths = (_dtypes.vector_widths(dtype)[-1], 1)  # the registered ones, widest first
    cl = plan.channels_last
    divisible_by = plan.channels if cl else plan.inner
    vec = next(v for v in widths if divisible_by % v == 0 and (v * itemsize <= alignment or v == 1))

    if kind == FORWARD:
        choices = R.one_launch_items(dtype, cl, vec)  # registered caches, ascending: the smallest that fits
    else:
        choices = (R.one_launch_backward_items(dtype, vec),)
    if not cl:
        nvec = -(-plan.outer * plan.inner // vec)
        items = next((i for i in choices if nvec <= threads * i), None)
        if items is None:
            return None
        grid, block = (plan.channels, 1, 1), (max(32, _pow2_at_least(-(-nvec // items))), 1, 1)
        # block_sum2 scratch (64 values) and the channel's values (pivot, mean, rest, scale, shift;
        # the backward: k1, k2)
        shared = (69 if kind == FORWARD else 66) * acc_size
    else:
        if kind == FORWARD and plan.outer * plan.channels >= 2**31:
            return None  # the channels-last forward indexes rows with 32-bit offsets
        # A block owns bx vectors of columns and every row; keep bx >= 2
        # (32-byte row segments) so that the loads stay coalesced.
        cv = plan.channels // vec
        for items in choices:
            by = _pow2_at_least(-(-plan.outer // items))
            bx = min(32, _pow2_at_least(cv))
            while bx * by > threads and bx > 2:
                bx //= 2
            if bx * by <= threads and not (bx < 2 and cv >= 2):
                break
        else:
            return None
        grid, block = (-(-cv // bx), 1, 1), (bx, by, 1)
        # the tree over ty ([by][width], twice for the backward) and the per-column values
        rows = by + 3 if kind == FORWARD else 2 * by + 2
        shared = rows * bx * vec * acc_size
    if shared > device.max_shared_memory_per_block:
        return None
    return OneLaunch(kind, vec, items, grid, block, shared)
