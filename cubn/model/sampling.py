"""Which blocks of a grid a traced launch runs, and what each one stands for.

Blocks of one launch are independent, so a launch's traffic is the sum of
its blocks' traffic. Running a whole H100 grid through the CPU emulator is
slow (a warp shuffle costs tens of microseconds, a 256-thread barrier about a
millisecond), so a traced launch runs a sample and extrapolates *per block
role*: blocks whose work differs only by an offset (same loop trip counts,
same tails) share a role; each role's sampled blocks stand for all of its
blocks. Roles come from the grid position (first / interior / last along each
axis) refined, for the kernels whose work split the launch planner knows, by
the loop trip counts of the block's first and last thread:

* grid-stride elementwise kernels (``n`` elements, ``VEC`` per access):
  the number of iterations of the block's first and last thread;
* channels-first reductions (``nsplit`` blocks per channel): first, interior
  or last chunk of its channel (the last chunk is shorter);
* channels-last reductions (``rows`` split over ``gridDim.y`` row blocks):
  the number of rows the block's first and last row of threads visit.

Every role is sampled at its first and last member (and ``extra`` random
ones); [`spread`][spread] later says whether the samples of a role agreed
exactly, which is what makes the extrapolation exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplePolicy:
    """``full_below``: grids of at most this many blocks run whole (exact).
    ``extra``: random members sampled per role besides its first and last."""

    full_below: int = 64
    extra: int = 0
    seed: int = 0


EVERY_BLOCK = SamplePolicy(full_below=1 << 62)


def _ceil_div(a, b):
    return -(-a // b)


def _trip_counts(first, step, end):
    """Iterations of ``for (i = first; i < end; i += step)``, vectorized, >= 0."""
    return np.maximum(0, _ceil_div(end - first, step))


def role_keys(kernel: str, template: dict, grid, block, named: dict) -> np.ndarray:
    """One integer row per block (x fastest, as the emulator runs them)."""
    gx, gy, gz = grid
    total = gx * gy * gz
    lin = np.arange(total, dtype=np.int64)
    bx, by, bz = (lin % gx), (lin // gx) % gy, lin // (gx * gy)

    def edge(c, g):
        return np.where(c == 0, 0, np.where(c == g - 1, 2, 1)) if g > 1 else np.zeros_like(c)

    cols = [edge(bx, gx), edge(by, gy), edge(bz, gz)]
    threads = block[0] * block[1] * block[2]
    if "n" in named and kernel in ("cubn_normalize", "cubn_bwd_apply"):
        vec = int(template["VEC"])
        nvec = _ceil_div(int(named["n"]), vec)
        stride = gx * threads
        cols += [_trip_counts(lin * threads, stride, nvec), _trip_counts(lin * threads + threads - 1, stride, nvec)]
    elif "nsplit" in named and kernel.removesuffix("_fused").endswith("_cf"):
        s = bx % int(named["nsplit"])
        cols += [edge(s, int(named["nsplit"]))]
    elif "rows" in named and kernel.removesuffix("_fused").endswith("_cl"):
        rows, step = int(named["rows"]), gy * block[1]
        cols += [_trip_counts(by * block[1], step, rows), _trip_counts(by * block[1] + block[1] - 1, step, rows)]
    return np.stack(cols, axis=1)


def choose(kernel, template, grid, block, named, policy: SamplePolicy):
    """``(blocks, weights, role_of_sample, roles)``: the sampled block indices
    (rows of x, y, z), how many blocks each stands for, its role number, and
    the number of roles."""
    gx, gy, gz = grid
    total = gx * gy * gz
    lin = np.arange(total, dtype=np.int64)
    if total <= policy.full_below:
        chosen = lin
        weights = np.ones(total)
        role_of = lin.copy()  # every block stands for itself: exact
        nroles = total
    else:
        keys = role_keys(kernel, template, grid, block, named)
        _, role = np.unique(keys, axis=0, return_inverse=True)
        role = role.reshape(-1)
        nroles = int(role.max()) + 1
        rng = np.random.default_rng(policy.seed)
        chosen, weights, role_of = [], [], []
        for r in range(nroles):
            members = lin[role == r]
            pick = {int(members[0]), int(members[-1])}
            if policy.extra and len(members) > 2:
                pick.update(int(m) for m in rng.choice(members[1:-1], min(policy.extra, len(members) - 2), replace=False))
            pick = sorted(pick)
            chosen += pick
            weights += [len(members) / len(pick)] * len(pick)
            role_of += [r] * len(pick)
        order = np.argsort(chosen, kind="stable")
        chosen = np.asarray(chosen, dtype=np.int64)[order]
        weights = np.asarray(weights)[order]
        role_of = np.asarray(role_of, dtype=np.int64)[order]
    blocks = np.stack([chosen % gx, (chosen // gx) % gy, chosen // (gx * gy)], axis=1).astype(np.uint32)
    return blocks, weights, role_of, nroles


def spread(values: np.ndarray, role_of: np.ndarray) -> float:
    """Largest relative difference between samples of one role (0: they all
    agree, so the extrapolation of this quantity is exact)."""
    worst = 0.0
    for r in np.unique(role_of):
        v = values[role_of == r]
        if len(v) > 1:
            hi, lo = float(v.max()), float(v.min())
            if hi > 0:
                worst = max(worst, (hi - lo) / hi)
    return worst
