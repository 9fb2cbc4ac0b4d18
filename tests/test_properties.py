"""Hypothesis property tests: random shapes, axes and weights (zeros included)
against the float64 truth; and the primitive merges every backend shares."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cubn
from conftest import assert_close, backend_skip_reason
import reference as ref

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


@st.composite
def shape_and_axes(draw):
    shape = draw(shapes)
    axes = draw(st.lists(st.integers(0, len(shape) - 1), unique=True, max_size=len(shape)))
    return shape, tuple(axes)


def _settings(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _run(backend_name, fn):
    reason = backend_skip_reason(backend_name)
    if reason:
        pytest.skip(reason)
    if backend_name == "emulated":
        with cubn.use_backend("emulated"):
            return fn()
    return fn()


@pytest.mark.parametrize("backend_name,n", [("numpy", 150), ("emulated", 12)])
def test_moments_property(backend_name, n):
    @_settings(n)
    @given(sa=shape_and_axes(), seed=st.integers(0, 2**32 - 1), loc=st.floats(-1e3, 1e3), dtype=st.sampled_from(["float32", "float64"]))
    def check(sa, seed, loc, dtype):
        shape, axes = sa
        x = (loc + np.random.default_rng(seed).standard_normal(shape)).astype(dtype)
        m, v = _run(backend_name, lambda: cubn.moments(x, axes))
        rm, rv = ref.moments(x, axes)
        # Welford rounds its running mean at the data's magnitude: errors scale with |loc|·std
        assert_close(m, rm, dtype, scale=max(1.0, abs(loc)))
        assert_close(v, rv, dtype, scale=max(1.0, 0.1 * abs(loc)))

    check()


@pytest.mark.parametrize("backend_name,n", [("numpy", 150), ("emulated", 12)])
def test_weighted_moments_property(backend_name, n):
    @_settings(n)
    @given(sa=shape_and_axes(), seed=st.integers(0, 2**32 - 1), zero_frac=st.floats(0, 1), batch=st.booleans())
    def check(sa, seed, zero_frac, batch):
        shape, axes = sa
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(shape)
        wshape = (shape[0],) if batch and len(shape) > 1 else shape
        w = rng.random(wshape) * (rng.random(wshape) >= zero_frac)
        wb = w.reshape((-1,) + (1,) * (len(shape) - 1)) if w.shape != shape else w
        m, v = _run(backend_name, lambda: cubn.weighted_moments(x, axes, w))
        rm, rv = ref.moments(x, axes, weights=wb)
        # channels whose weights are all zero: 0 and 0 (tf.nn.weighted_moments' div_no_nan);
        # the data has no NaN, so the reference's NaN marks exactly those channels
        dead = np.isnan(rm)
        assert not np.isnan(m).any() and not np.isnan(v).any()
        assert (m[dead] == 0).all() and (v[dead] == 0).all()
        assert_close(m, np.nan_to_num(rm), "float64", scale=1.0)
        assert_close(v, np.nan_to_num(rv), "float64", scale=1.0)

    check()


@pytest.mark.parametrize("backend_name,n", [("numpy", 80), ("emulated", 8)])
def test_fused_batch_norm_property(backend_name, n):
    @_settings(n)
    @given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=5).map(tuple), seed=st.integers(0, 2**32 - 1),
           fmt=st.sampled_from(["NHWC", "NCHW"]), act=st.sampled_from([None, "relu", "tanh", "silu"]))
    def check(shape, seed, fmt, act):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(shape) * 3 + 1
        ax = ref.channel_axis(len(shape), fmt)
        c = shape[ax]
        g, b = rng.standard_normal(c), rng.standard_normal(c)
        y, bm, bv = _run(backend_name, lambda: cubn.fused_batch_norm(x, g, b, data_format=fmt, activation=act))
        m, v = ref.moments(x, ref.reduce_axes(len(shape), ax))
        assert_close(y, ref.batch_norm(x, m, v, b, g, 1e-3, ax, act), "float64")

    check()


@pytest.mark.parametrize("name", ["numpy", "emulated"])
def test_merge_primitives_agree_with_statistics(name, rng):
    """merge_partials / merge_sums (SyncBatchNorm's exchange) give one triple per channel."""
    from cubn._backend import get_backend
    from cubn._plan import plan_for_channels

    reason = backend_skip_reason(name)
    if reason:
        pytest.skip(reason)
    b = get_backend(name)
    acc = np.dtype(np.float64)
    for shape, fmt in (((64, 4, 4, 3), "NHWC"), ((8, 3, 32, 32), "NCHW")):
        x = rng.standard_normal(shape) + 5
        plan = plan_for_channels(shape, fmt, "t")
        p = b.merge_partials(b.welford_partials(plan, plan.view3(x), acc), acc)
        ax = ref.channel_axis(4, fmt)
        m, v = ref.moments(x, ref.reduce_axes(4, ax))
        n = x.size // shape[ax]
        assert p.count.shape == (1, shape[ax])
        assert_close(p.count[0], np.full(shape[ax], n), "float64")
        # means relative to the channel's pivot where the backend shifts by one
        assert_close(p.mean[0] + (0 if p.pivot is None else p.pivot[0]), m, "float64")
        assert_close(p.m2[0] / n, v, "float64")
