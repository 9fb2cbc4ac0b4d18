"""Accuracy and special values of the statistics kernels (moments, weighted
moments, finalize/merge, the preprocessing statistics, SyncBatchNorm's merge).

The yardstick is NumPy's float32 pairwise two-pass on the same data: every
backend must be at least as accurate as it, measured against the float64
truth of the same float32 input. Data classes: large offsets with small
spreads (where a float32 running mean loses the digits the spread needs),
float32-quantized data, NaN/Inf in one channel.
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from cubn import _dtypes
from cubn._backend import get_backend
from cubn._plan import plan_for_reduction
from cubn.layers.sync_batch_norm import _Exchange
from cubn.distributed import Communicator

EPS32 = float(np.finfo(np.float32).eps)
OFFSETS = [1e3, 1e4, 1e6, 1e7]
STDS = [1.0, 1e-1, 1e-2]
# (shape, reduced axes): channels last (folded small C, and wider C) and channels first
LAYOUTS = {
    "NC": ((6000, 3), (0,)),
    "NHWC": ((16, 8, 8, 24), (0, 1, 2)),
    "NCHW": ((12, 3, 16, 20), (0, 2, 3)),
}


def _data(rng, shape, axes, offset, std, quantized=False):
    """float32 data: per channel offset * (1 + small jitter) + std * N(0, 1)."""
    ch = [a for a in range(len(shape)) if a not in axes]
    cshape = [shape[a] if a in ch else 1 for a in range(len(shape))]
    centre = offset * (1 + 0.01 * rng.standard_normal(cshape))
    x = centre + std * rng.standard_normal(shape)
    if quantized:  # a quarter of the spread: many ties, few distinct values
        q = std / 4
        x = np.round(x / q) * q
    return x.astype(np.float32)


def _truth(x, axes, w=None):
    x64 = x.astype(np.float64)
    if w is None:
        m = x64.mean(axes)
        return m, ((x64 - np.expand_dims(m, axes)) ** 2).mean(axes)
    w64 = np.broadcast_to(w, x.shape).astype(np.float64)
    sw = w64.sum(axes)
    m = (w64 * x64).sum(axes) / sw
    return m, (w64 * (x64 - np.expand_dims(m, axes)) ** 2).sum(axes) / sw


def _rows(a, axes):
    """Each channel's data as one contiguous row (NumPy sums contiguous rows pairwise)."""
    kept = [d for d in range(a.ndim) if d not in axes]
    t = np.ascontiguousarray(np.transpose(a, kept + list(axes)))
    return t.reshape(int(np.prod([a.shape[d] for d in kept])), -1), [a.shape[d] for d in kept]


def _two_pass32(x, axes, w=None):
    """NumPy's float32 pairwise two-pass, per channel: the accuracy every backend must reach."""
    r, kshape = _rows(x, axes)
    if w is None:
        m = r.mean(1, dtype=np.float32)
        d = r - m[:, None]
        return m.reshape(kshape), (d * d).mean(1, dtype=np.float32).reshape(kshape)
    wr, _ = _rows(np.broadcast_to(w, x.shape).astype(np.float32), axes)
    sw = wr.sum(1, dtype=np.float32)
    m = (wr * r).sum(1, dtype=np.float32) / sw
    d = r - m[:, None]
    return m.reshape(kshape), ((wr * d * d).sum(1, dtype=np.float32) / sw).reshape(kshape)


def _err(a, b):
    return np.abs(np.asarray(a, np.float64) - b)


def _rel(a, b):
    return _err(a, b) / np.abs(b)


def _bound(x, axes, w, truth):
    """Per channel, absolute: max(2 x the two-pass error, a few ulps of the truth) for the mean
    and the variance (an all-equal channel: exactly 0 wherever the two-pass gets 0)."""
    tm, tv = truth
    nm, nv = _two_pass32(x, axes, w)
    return (np.maximum(2 * _err(nm, tm), 4 * EPS32 * np.abs(tm)),
            np.maximum(2 * _err(nv, tv), 8 * EPS32 * np.abs(tv)))


def _check(got, x, axes, w, what):
    truth = _truth(x, axes, w)
    bm, bv = _bound(x, axes, w, truth)
    em, ev = _err(got[0], truth[0]), _err(got[1], truth[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        rm, rv = np.nanmax(em / np.abs(truth[0])), np.nanmax(ev / np.abs(truth[1]))
        nm, nv = _two_pass32(x, axes, w)
        pm, pv = np.nanmax(_rel(nm, truth[0])), np.nanmax(_rel(nv, truth[1]))
    assert np.all(em <= bm), f"{what}: mean error {rm:.2e} (two-pass {pm:.2e})"
    assert np.all(ev <= bv), f"{what}: variance error {rv:.2e} (two-pass {pv:.2e})"


@pytest.fixture(params=["numpy", "emulated"])
def name(request):
    return request.param


def _moments(name, x, axes, w=None):
    with cubn.use_backend(name):
        if w is None:
            return cubn.moments(x, axes)
        return cubn.weighted_moments(x, axes, w)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("offset", OFFSETS)
def test_moments_at_large_offsets(name, rng, layout, offset):
    shape, axes = LAYOUTS[layout]
    for std in STDS:
        for quantized in (False, True):
            x = _data(rng, shape, axes, offset, std, quantized)
            _check(_moments(name, x, axes), x, axes, None, f"{name} {layout} offset {offset:g} std {std:g}"
                   f"{' quantized' if quantized else ''}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["outer", "full"])
def test_weighted_moments_at_large_offsets(name, rng, layout, kind):
    shape, axes = LAYOUTS[layout]
    for offset in OFFSETS:
        for std in STDS:
            x = _data(rng, shape, axes, offset, std)
            wshape = (shape[0],) + (1,) * (len(shape) - 1) if kind == "outer" else shape
            w = rng.random(wshape) * (rng.random(wshape) > 0.2)
            w = np.where(np.broadcast_to(w, shape).sum(axes, keepdims=True) > 0, w, 1.0) if kind == "full" else w
            _check(_moments(name, x, axes, w.astype(np.float32)), x, axes, w.astype(np.float32),
                   f"{name} {layout} {kind} weights offset {offset:g} std {std:g}")


@pytest.mark.parametrize("offset", [1e4, 1e6, 1e7])
def test_batch_norm_statistics_at_large_offsets(name, rng, offset):
    """The training forward's batch statistics and moving update (three-launch path)."""
    shape, axes = LAYOUTS["NHWC"]
    for std in STDS:
        x = _data(rng, shape, axes, offset, std)
        with cubn.use_backend(name), cubn.use_one_launch(False):
            bn = cubn.BatchNorm(decay=0.0, updates_collections=None)
            bn(x)
            # from zero moving statistics, decay 0 moves them exactly onto the batch's
            # (from the default 1, 1 - (1 - v) would cost v's digits in the update itself)
            for k in ("moving_mean", "moving_variance"):
                bn.variables[k][...] = 0
            bn(x)
            got = np.asarray(bn.variables["moving_mean"]), np.asarray(bn.variables["moving_variance"])
        n = x.size // x.shape[-1]
        tm, tv = _truth(x, axes)
        bm, bv = _bound(x, axes, None, (tm, tv))
        assert np.all(_err(got[0], tm) <= bm), (offset, std)
        tu = tv * n / (n - 1)  # the moving variance is Bessel-corrected
        assert np.all(_err(got[1], tu) <= bv * n / (n - 1) + 2 * EPS32 * tu), (offset, std)


class _Ranks(Communicator):
    """allgather hands back every simulated rank's rows (this rank's first)."""

    name = "ranks"

    def __init__(self, rows):
        self.rows = rows
        self.size = len(rows)

    def allgather(self, a, timeout=None):
        return np.stack([a] + self.rows[1:]).reshape(len(self.rows), -1)

    def allreduce(self, a, timeout=None):  # pragma: no cover - unused here
        raise AssertionError


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_sync_batch_norm_merge_at_large_offsets(rng, layout):
    """Ranks' triples merged relative to one common pivot: the whole batch's
    statistics as accurate as one rank's, at offsets where exchanging plain
    float32 means would lose the spread."""
    shape, axes = LAYOUTS[layout]
    ranks = 4
    for offset in (1e4, 1e6, 1e7):
        for std in (1.0, 1e-2):
            x = _data(rng, (ranks * shape[0],) + shape[1:], axes, offset, std)
            with cubn.use_backend("emulated"), cubn.use_one_launch(False):
                b = get_backend("emulated")
                acc = np.dtype(np.float32)
                parts, rows = [], []
                for r in range(ranks):
                    xs = x[r * shape[0]:(r + 1) * shape[0]]
                    plan = plan_for_reduction(xs.shape, axes, "test")
                    p = b.welford_partials(plan, plan.view3(xs), acc)
                    parts.append(p)
                    m = b.merge_partials(p, acc)
                    rows.append(np.concatenate([m.count, m.mean, m.m2, m.pivot]).reshape(-1))
                got = _Exchange(_Ranks(rows), 1).partials(b, parts[0], acc)
                stats = b.finalize(got, acc, fold=None)
            _check((stats.mean, stats.var), x, axes, None, f"sync {layout} offset {offset:g} std {std:g}")


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_running_moments_at_large_offsets(rng, dtype):
    """The preprocessing statistics on the kernel path (RunningMoments, two
    batches): at least as accurate as the float32 two-pass of the whole stream."""
    name = "emulated"
    shape, axes = (64, 8, 8, 3), (0, 1, 2)
    for offset, std in ((6e4, 1.0), (6e4, 20.0)) if dtype == "uint16" else ((1e6, 1e-2), (1e7, 1.0), (1e4, 1e-2)):
        x = _data(rng, shape, axes, offset, std)
        if dtype == "uint16":
            x = np.clip(np.round(x), 0, 65535).astype(np.uint16)
        with cubn.use_backend(name):
            rm = cubn.RunningMoments(axis=axes)
            rm.update(x[:32])
            rm.update(x[32:])
            got = np.asarray(rm.mean), np.asarray(rm.var)
        _check(got, x.astype(np.float32), axes, None, f"{name} RunningMoments {dtype} offset {offset:g} std {std:g}")


# -- NaN / Inf ----------------------------------------------------------------
def _special(rng, layout):
    shape, axes = LAYOUTS[layout]
    x = _data(rng, shape, axes, 10.0, 1.0)
    ch = [a for a in range(len(shape)) if a not in axes][0]

    def put(c, value, k):
        idx = [rng.integers(0, s) for s in shape]
        idx[ch] = c
        for _ in range(k):
            idx = [rng.integers(0, s) for s in shape]
            idx[ch] = c
            x[tuple(idx)] = value

    put(0, np.nan, 1)
    put(1, np.inf, 3)
    if shape[ch] > 2:
        put(2, -np.inf, 2)
        put(2, np.inf, 1)  # Inf - Inf: NaN
    return x, axes


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_finite_values_propagate_as_on_numpy(rng, layout):
    x, axes = _special(rng, layout)
    a = _moments("numpy", x, axes)
    b = _moments("emulated", x, axes)
    for u, v, what in zip(a, b, ("mean", "variance")):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        np.testing.assert_array_equal(np.isnan(v), np.isnan(u), err_msg=what)
        np.testing.assert_array_equal(np.isposinf(v), np.isposinf(u), err_msg=what)
        np.testing.assert_array_equal(np.isneginf(v), np.isneginf(u), err_msg=what)
        fin = np.isfinite(u)
        np.testing.assert_allclose(v[fin], u[fin], rtol=1e-5)
    # confined to their channel: the finite channels are the truth's
    tm, tv = _truth(x, axes)
    fin = np.isfinite(tm)
    assert fin.sum() == len(fin) - (3 if x.shape[-1 if layout != "NCHW" else 1] > 2 else 2)
    np.testing.assert_allclose(np.asarray(b[0])[fin], tm[fin], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(b[1])[fin], tv[fin], rtol=1e-4)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_non_finite_values_reach_the_moving_statistics_as_on_numpy(rng, layout):
    shape, _ = LAYOUTS[layout]
    x, axes = _special(rng, layout)
    out = []
    for name in ("numpy", "emulated"):
        with cubn.use_backend(name), cubn.use_one_launch(False):
            bn = cubn.BatchNorm(decay=0.9, data_format=layout, updates_collections=None, renorm=True)
            bn(x)
            out.append([np.asarray(bn.variables[k], np.float64) for k in sorted(bn.variables)])
    for k, (u, v) in enumerate(zip(*out)):
        np.testing.assert_array_equal(np.isnan(v), np.isnan(u), err_msg=str(k))
        np.testing.assert_array_equal(np.isinf(v), np.isinf(u), err_msg=str(k))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_weight_zero_hides_non_finite_values(rng, layout):
    shape, axes = LAYOUTS[layout]
    x = _data(rng, shape, axes, 5.0, 1.0)
    w = (rng.random(shape) + 0.1).astype(np.float32)
    x.reshape(-1)[::97] = np.nan
    w.reshape(-1)[::97] = 0
    m, v = _moments("emulated", x, axes, w)
    tm, tv = _truth(np.where(w > 0, x, 0), axes, w)
    np.testing.assert_allclose(m, tm, rtol=1e-5)
    np.testing.assert_allclose(v, tv, rtol=1e-4)


# -- weights summing to zero ------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["outer", "full"])
def test_zero_weight_channel_is_zero_on_the_kernels(rng, layout, kind):
    """A channel whose weights sum to 0: mean 0 and variance 0 (tf.nn.weighted_moments'
    div_no_nan); the other channels are untouched."""
    shape, axes = LAYOUTS[layout]
    ch = [a for a in range(len(shape)) if a not in axes][0]
    x = _data(rng, shape, axes, 1e4, 1.0)
    w = (rng.random(shape) + 0.1).astype(np.float32)
    sl = [slice(None)] * len(shape)
    sl[ch] = 1
    w[tuple(sl)] = 0
    x[tuple(sl)] = 7e5  # large data under weight 0: must not leak into the merge
    m, v = _moments("emulated", x, axes, w)
    m, v = np.asarray(m), np.asarray(v)
    assert m[1] == 0 and v[1] == 0
    keep = [c for c in range(shape[ch]) if c != 1]
    tm, tv = _truth(x, axes, w)
    np.testing.assert_allclose(m[keep], tm[keep], rtol=1e-6)
    np.testing.assert_allclose(v[keep], tv[keep], rtol=1e-3)


def test_a_zero_weight_partial_never_carries_a_mean(rng):
    """Partials of weight 0 (blocks whose rows all have weight 0) merged with
    live ones: the merge skips them, whatever their mean holds."""
    shape, axes = (20000, 2), (0,)
    x = _data(rng, shape, axes, 1e6, 1e-2)
    w = np.zeros(shape[0], np.float32)
    w[-300:] = 1  # only the last blocks carry weight
    m, v = _moments("emulated", x, axes, w[:, None])
    tm, tv = _truth(x[-300:], axes)
    bm, bv = _bound(x[-300:], axes, None, (tm, tv))
    assert np.all(_err(m, tm) <= bm) and np.all(_err(v, tv) <= bv)
