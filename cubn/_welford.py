"""Welford triples and Chan's merge on the host, for any array module.

A triple ``(count, mean, M2)`` summarizes data exactly enough to merge:
two triples combine with Chan, Golub & LeVeque's pairwise formula, never
through ``E[x²] − E[x]²``. The same arithmetic as ``chan_merge`` in
``kernels/common.cuh``; used by the NumPy backend, ``RunningMoments`` and the
dask reductions (NumPy or CuPy arrays alike), and the one place that turns a
triple into a mean and a variance on the host.
"""
from __future__ import annotations

import sys

import numpy as np


def _namespace(a):
    """The array module of ``a`` (numpy, or cupy for a cupy.ndarray), without importing anything."""
    root = type(a).__module__.split(".")[0]
    return np if root == "numpy" else sys.modules.get(root, np)


def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two sets of Welford triples elementwise (Chan, Golub & LeVeque 1979).

    ``n = n_a + n_b``, ``mean = mean_a + delta * n_b / n``,
    ``M2 = M2_a + M2_b + delta**2 * n_a * n_b / n`` with
    ``delta = mean_b - mean_a``; where ``n == 0`` the result is ``a``.
    """
    xp = _namespace(n_a)
    with np.errstate(all="ignore"):  # Inf/NaN in the data propagate to their feature, quietly
        n = n_a + n_b
        live = n > 0
        fb = xp.where(live, n_b / xp.where(live, n, 1), 0)
        delta = mean_b - mean_a
        return n, mean_a + delta * fb, m2_a + m2_b + delta * delta * n_a * fb


def tree_merge(count, mean, m2):
    """Merge triples stacked along axis 0 in a fixed balanced tree (reproducible order)."""
    xp = _namespace(count)
    while count.shape[0] > 1:
        if count.shape[0] % 2:
            count, mean, m2 = (xp.concatenate([a, xp.zeros_like(a[:1])]) for a in (count, mean, m2))
        count, mean, m2 = chan_merge(count[0::2], mean[0::2], m2[0::2], count[1::2], mean[1::2], m2[1::2])
    return count[0], mean[0], m2[0]


def mean_or_nan(count, mean):
    """The mean of each triple; NaN where it holds nothing (count 0)."""
    xp = _namespace(count)
    return xp.where(count > 0, mean, np.nan)


def variance(count, m2):
    """The population variance ``M2 / count`` of each triple (M2 clipped at 0); NaN where count is 0."""
    xp = _namespace(count)
    live = count > 0
    with np.errstate(all="ignore"):
        return xp.where(live, xp.maximum(m2, 0) / xp.where(live, count, 1), np.nan)
