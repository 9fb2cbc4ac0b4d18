"""Adversarial data for the ops and layer features added for the peers' semantics:
sufficient_statistics, the gradients of batch_normalization / moments, ghost batches,
masks and the cumulative average. NumPy and the kernels (emulated) must agree on all
of it, and both must match float64 references."""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from conftest import np_dtype
import reference as ref


def _cases(rng, dtype):
    """(name, x of shape (N, 4, 3)) pairs: NaN, Inf, large offset, quantized, all-equal channel, batch of one."""
    base = rng.standard_normal((6, 4, 3))
    out = {"plain": base, "offset": 1e4 + base, "quantized": np.round(base * 2) / 2}
    nan = base.copy()
    nan[1, 2, 0] = np.nan
    out["nan"] = nan
    inf = base.copy()
    inf[0, 0, 1] = np.inf
    out["inf"] = inf
    eq = base.copy()
    eq[..., 2] = 3.25
    out["all_equal"] = eq
    out["batch_of_one"] = base[:1]
    return {k: v.astype(np_dtype(dtype)) for k, v in out.items()}


def _agree(a, b, rtol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_array_equal(np.isinf(a), np.isinf(b))
    fin = np.isfinite(b)
    np.testing.assert_allclose(a[fin], b[fin], rtol=rtol, atol=rtol * max(1.0, np.abs(b[fin]).max(initial=0)))


def _both(f):
    with cubn.use_backend("numpy"):
        a = f()
    with cubn.use_backend("emulated"):
        b = f()
    return a, b


@pytest.fixture
def emulated(kernel_backend):
    if kernel_backend.name != "emulated":
        pytest.skip("compares the emulated kernels with NumPy")
    return kernel_backend


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_sufficient_statistics_adversarial(emulated, rng, dtype):
    for name, x in _cases(rng, dtype).items():
        shift = np.asarray(x[0, 0], np.float64) if np.isfinite(x[0, 0]).all() else None
        got_np, got_em = _both(lambda: cubn.sufficient_statistics(x, [0, 1], shift=None if shift is None else shift.astype(x.dtype)))
        x64 = x.astype(np.float64)
        s = 0 if shift is None else shift.astype(x.dtype).astype(np.float64)
        with np.errstate(invalid="ignore"):
            want_m, want_v = (x64 - s).sum((0, 1)), ((x64 - s) ** 2).sum((0, 1))
        rtol = {"float64": 1e-9, "float32": 2e-4, "float16": 5e-3}[dtype]
        for a, b in zip(got_np[1:3], got_em[1:3]):
            _agree(a, b, rtol)
        if name not in ("inf",):  # Inf - Inf: TF's raw sums give NaN where the moments give NaN too
            _agree(got_np[1], want_m, rtol if name != "offset" else 1e-2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradients_adversarial(emulated, rng, dtype):
    for name, x in _cases(rng, dtype).items():
        dy = rng.standard_normal(x.shape).astype(x.dtype)
        m, v = rng.standard_normal(3).astype(x.dtype), (rng.random(3) + 0.5).astype(x.dtype)
        gn, ge = _both(lambda: cubn.batch_normalization_backward(dy, x, m, v, 0.5, m * 0 + 2, 1e-3))
        rtol = 1e-9 if dtype == "float64" else 1e-4
        for a, b in zip(gn, ge):
            _agree(a, b, rtol)
        dm, dv = rng.standard_normal(3), rng.standard_normal(3)
        an, ae = _both(lambda: cubn.moments_backward(dm, dv, x, [0, 1]))
        # at offset 1e4 the backends' float32 means differ by an ulp of 1e4 (~1e-3), and so does x - mean
        _agree(an, ae, rtol if name != "offset" or dtype == "float64" else 2e-2)
        mean, _ = ref.moments(x, (0, 1), keepdims=True)
        n = x.shape[0] * x.shape[1]
        with np.errstate(invalid="ignore"):
            want = dm / n + dv * 2 * (x.astype(np.float64) - mean) / n
        if name != "offset":
            _agree(an, want, 10 * rtol)


def test_gradients_non_contiguous_views(backend, rng):
    big = rng.standard_normal((8, 6, 6))
    x = big[::2, :, ::2]  # strided in two axes
    dy = rng.standard_normal(x.shape)
    assert not x.flags.c_contiguous
    g = cubn.moments_backward(backend.asarray(np.ones(3)), None, backend.asarray(x), [0, 1])
    np.testing.assert_allclose(backend.to_numpy(g), np.full(x.shape, 1 / 24), rtol=1e-12)
    h = cubn.batch_normalization_backward(backend.asarray(dy), backend.asarray(x), 0.0, 1.0, None, None, 0.0)
    np.testing.assert_allclose(backend.to_numpy(h.dx), dy, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(h.dmean), -dy.sum(), rtol=1e-10)


def test_empty_inputs(backend):
    x = np.zeros((0, 3))
    c, m, v, _ = cubn.sufficient_statistics(backend.asarray(x), [0])
    assert float(backend.to_numpy(c)) == 0 and backend.to_numpy(m).tolist() == [0, 0, 0]
    assert backend.to_numpy(cubn.moments_backward(backend.asarray(np.ones(3)), None, backend.asarray(x), [0])).shape == (0, 3)
    g = cubn.batch_normalization_backward(backend.asarray(x), backend.asarray(x), np.zeros(3), np.ones(3), None, None, 1e-3)
    assert backend.to_numpy(g.dmean).tolist() == [0, 0, 0]


@pytest.mark.parametrize("case", ["nan", "offset", "all_equal", "quantized"])
def test_ghost_batches_and_masks_agree(emulated, rng, case):
    x = _cases(rng, "float32")[case][:, :, :2].reshape(6, 4, 2)
    mask = rng.random((6, 4)) > 0.25
    mask[0] = True

    def run(kind):
        if kind == "ghost":
            bn = cubn.BatchNorm(decay=0.5, virtual_batch_size=3, updates_collections=None)
            y = bn(x)
        elif kind == "mask":
            bn = cubn.BatchNorm(decay=0.5, updates_collections=None)
            y = bn(x, mask=mask)
        else:
            bn = cubn.BatchNorm(decay=None, updates_collections=None)
            bn(x)
            y = bn(x[::-1].copy())
        dx = bn.backward(np.ones_like(y))
        return y, dx, bn.variables["moving_mean"], bn.variables["moving_variance"]

    for kind in ("ghost", "mask", "cumulative"):
        a, b = _both(lambda: run(kind))
        for u, w in zip(a, b):
            _agree(u, w, 2e-4 if case != "offset" else 2e-2)  # float32 at 1e4: x̂ carries ~eps32·1e4
