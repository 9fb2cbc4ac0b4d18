"""tf.nn ops, ported from TensorFlow's ``tensorflow/python/ops/nn_batchnorm_test.py``
(BatchNormalizationTest, SufficientStatisticsTest, NormalizeMomentsTest, MomentsTest),
``nn_fused_batchnorm_test.py`` (BatchNormalizationTest) and ``nn_impl.py``'s formulas.

Expected values: NumPy in float64 with TF's formulas; gradients against finite
differences of those formulas (TF's tests use ``gradient_checker``) or PyTorch's
autograd where installed.
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from conftest import assert_close
import reference as ref


# nn_batchnorm_test.py SufficientStatisticsTest._npSuffStats
def _np_suff_stats(x, axes, shift, keep_dims):
    axis = tuple(axes)
    if shift is not None:
        m_ss = np.sum(x - shift, axis=axis, keepdims=keep_dims)
        v_ss = np.sum((x - shift) ** 2, axis=axis, keepdims=keep_dims)
    else:
        m_ss = np.sum(x, axis=axis, keepdims=keep_dims)
        v_ss = np.sum(x * x, axis=axis, keepdims=keep_dims)
    count = np.prod([x.shape[d] for d in axes])
    return count, m_ss, v_ss


# nn_batchnorm_test.py SufficientStatisticsTest.testSuffStats (shapes, axes, shift, keep_dims)
@pytest.mark.parametrize("shape,axes", [((4, 3, 5), [0, 2]), ((2, 3, 4, 5), [1]), ((6, 4), [0, 1])])
@pytest.mark.parametrize("has_shift", [False, True])
@pytest.mark.parametrize("keep_dims", [False, True])
def test_sufficient_statistics(backend, rng, shape, axes, has_shift, keep_dims):
    x = (rng.random(shape) * 4 + 1).astype(np.float64)
    kept = tuple(n if a not in axes else 1 for a, n in enumerate(shape))
    shift = rng.random(kept) if has_shift else None
    count, m_ss, v_ss, got_shift = cubn.sufficient_statistics(backend.asarray(x), axes, shift=backend.asarray(shift),
                                                             keepdims=keep_dims)
    n, m_want, v_want = _np_suff_stats(x, axes, shift, keep_dims)
    assert float(backend.to_numpy(count)) == n
    assert_close(backend.to_numpy(m_ss), m_want, "float64")
    assert_close(backend.to_numpy(v_ss), v_want, "float64")
    assert (got_shift is None) == (shift is None)


def test_sufficient_statistics_keeps_digits_at_large_offset(backend, rng):
    """cubn derives Σ(x − s)² from Welford moments, so the shifted sums stay exact where raw sums would not."""
    x = (1e4 + rng.standard_normal((64, 3))).astype(np.float32)
    shift = np.full(3, 1e4, np.float32)
    _, m_ss, v_ss, _ = cubn.sufficient_statistics(backend.asarray(x), [0], shift=backend.asarray(shift))
    x64 = x.astype(np.float64)
    # float32 moments at offset 1e4 carry ~1e-4 relative error; the raw sum of squares (~6e9) would carry none
    np.testing.assert_allclose(backend.to_numpy(v_ss), ((x64 - 1e4) ** 2).sum(0), rtol=1e-3)


# nn_batchnorm_test.py NormalizeMomentsTest.testNormalizeMoments (_npNormalizeMoments)
@pytest.mark.parametrize("has_shift", [False, True])
def test_normalize_moments(backend, rng, has_shift):
    counts = np.ones(1) * 5.0
    mean_ss, variance_ss = rng.random(3), rng.random(3) + 1
    shift = rng.random(3) if has_shift else None
    mean, var = cubn.normalize_moments(backend.asarray(counts), backend.asarray(mean_ss), backend.asarray(variance_ss),
                                       backend.asarray(shift))
    want_mean = mean_ss / counts + (shift if has_shift else 0)
    want_var = variance_ss / counts - (mean_ss / counts) ** 2
    np.testing.assert_allclose(backend.to_numpy(mean), want_mean, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(var), want_var, rtol=1e-12)


# The pair as nn_impl.moments composes them: normalize_moments(*sufficient_statistics(x)) == moments(x)
def test_sufficient_statistics_then_normalize_moments_is_moments(backend, rng):
    x = (3 + 2 * rng.standard_normal((10, 4, 3))).astype(np.float64)
    mean, var = cubn.normalize_moments(*cubn.sufficient_statistics(backend.asarray(x), [0, 1],
                                                                   shift=backend.asarray(np.full(3, 3.0))))
    assert_close(backend.to_numpy(mean), x.mean((0, 1)), "float64")
    assert_close(backend.to_numpy(var), x.var((0, 1)), "float64")


# nn_batchnorm_test.py MomentsTest (keep_dims, several axes) and nn_impl.moments' population variance
@pytest.mark.parametrize("shape,axes", [((5, 4, 3), [0]), ((2, 3, 4, 5), [0, 2, 3]), ((7,), [0])])
@pytest.mark.parametrize("keep_dims", [False, True])
def test_moments(backend, rng, shape, axes, keep_dims):
    x = (rng.standard_normal(shape) * 3 + 100).astype(np.float32)
    m, v = cubn.moments(backend.asarray(x), axes, keepdims=keep_dims)
    wm, wv = ref.moments(x, axes, keepdims=keep_dims)
    assert_close(backend.to_numpy(m), wm, "float32", scale=100)
    np.testing.assert_allclose(backend.to_numpy(v), wv, rtol=1e-4)


# nn_impl.weighted_moments: sum(w·x)/sum(w) and sum(w·(x − mean)²)/sum(w)
def test_weighted_moments(backend, rng):
    x = rng.standard_normal((6, 4, 3))
    w = rng.random((6, 1, 1))
    m, v = cubn.weighted_moments(backend.asarray(x), [0, 1], backend.asarray(w))
    wm, wv = ref.moments(x, (0, 1), weights=w)
    assert_close(backend.to_numpy(m), wm, "float64")
    assert_close(backend.to_numpy(v), wv, "float64")


def _num_grad(f, a, eps=1e-6):
    """Central finite differences of the scalar f at a (float64)."""
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + eps
        hi = f()
        a[i] = old - eps
        lo = f()
        a[i] = old
        g[i] = (hi - lo) / (2 * eps)
    return g


# nn_batchnorm_test.py BatchNormalizationTest.testBatchNorm (_npBatchNorm) and testBatchNormGradImpl:
# gradients w.r.t. x, m, v, beta and gamma, here with parameters of several broadcast shapes
@pytest.mark.parametrize("param_shape", [(3,), (1, 1, 3), (4, 3)])
@pytest.mark.parametrize("scale_after_normalization", [True, False])
def test_batch_normalization_gradients(backend, rng, param_shape, scale_after_normalization):
    x = rng.standard_normal((5, 4, 3)) + 2
    m = rng.standard_normal(param_shape)
    v = rng.random(param_shape) + 0.5
    beta = rng.standard_normal(param_shape)
    gamma = rng.standard_normal(param_shape) if scale_after_normalization else None
    dy = rng.standard_normal(x.shape)
    eps = 1e-3
    y = cubn.batch_normalization(backend.asarray(x), backend.asarray(m), backend.asarray(v), backend.asarray(beta),
                                 backend.asarray(gamma), eps)

    def np_bn():  # _npBatchNorm
        out = (x - m) / np.sqrt(v + eps)
        if gamma is not None:
            out = out * gamma
        return out + beta

    assert_close(backend.to_numpy(y), np_bn(), "float64")
    g = cubn.batch_normalization_backward(backend.asarray(dy), backend.asarray(x), backend.asarray(m),
                                          backend.asarray(v), backend.asarray(beta), backend.asarray(gamma), eps)
    loss = lambda: float((np_bn() * dy).sum())  # noqa: E731
    for name, got, arr in (("dx", g.dx, x), ("dmean", g.dmean, m), ("dvariance", g.dvariance, v),
                           ("doffset", g.doffset, beta), ("dscale", g.dscale, gamma)):
        if arr is None:
            assert got is None
            continue
        want = _num_grad(loss, arr)
        assert backend.to_numpy(got).shape == arr.shape, name
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_batch_normalization_gradients_with_activation_and_scalars(backend, rng):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    x = rng.standard_normal((6, 3, 2, 2))
    dy = rng.standard_normal(x.shape)
    m, v, beta = rng.standard_normal(3), rng.random(3) + 0.5, 0.25
    g = cubn.batch_normalization_backward(backend.asarray(dy), backend.asarray(x), backend.asarray(m),
                                          backend.asarray(v), beta, 2.0, 1e-3, activation="relu", data_format="NCHW")
    T = lambda a: torch.tensor(np.asarray(a, np.float64), requires_grad=True)  # noqa: E731
    tx, tm, tv, tb, ts = T(x), T(m), T(v), T(beta), T(2.0)
    r = lambda t: t.reshape(1, 3, 1, 1)  # noqa: E731
    ty = torch.relu(ts * (tx - r(tm)) / torch.sqrt(r(tv) + 1e-3) + tb)
    ty.backward(torch.tensor(dy))
    for got, t in ((g.dx, tx), (g.dmean, tm), (g.dvariance, tv), (g.doffset, tb), (g.dscale, ts)):
        np.testing.assert_allclose(backend.to_numpy(got), t.grad.numpy(), rtol=1e-9, atol=1e-10)
    assert np.shape(backend.to_numpy(g.doffset)) == () and np.shape(backend.to_numpy(g.dscale)) == ()


# nn_batchnorm_test.py BatchNormalizationTest.testBatchNormArbitraryShapes
def test_batch_norm_with_global_normalization_arbitrary_shapes(backend, rng):
    for x_shape, param_shape in (((3, 2, 4, 34, 53), (2, 4, 34, 53)), ((8, 2), (2,)), ((5, 6, 7), (7,))):
        x = rng.random(x_shape)
        m, v, beta, gamma = (rng.random(param_shape) for _ in range(4))
        y = cubn.batch_normalization(backend.asarray(x), backend.asarray(m), backend.asarray(v), backend.asarray(beta),
                                     backend.asarray(gamma), 1e-3)
        assert_close(backend.to_numpy(y), (x - m) / np.sqrt(v + 1e-3) * gamma + beta, "float64")
    # the TF 1 op: gamma only with scale_after_normalization
    x = rng.random((4, 3))
    m, v, beta, gamma = (rng.random(3) for _ in range(4))
    y = cubn.batch_norm_with_global_normalization(backend.asarray(x), backend.asarray(m), backend.asarray(v),
                                                  backend.asarray(beta), backend.asarray(gamma), 1e-3, False)
    assert_close(backend.to_numpy(y), (x - m) / np.sqrt(v + 1e-3) + beta, "float64")


# nn_fused_batchnorm_test.py BatchNormalizationTest._test_training / _training_ref
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("factor", [1.0, 0.6])
def test_fused_batch_norm_training(train_backend, rng, fmt, factor):
    x = (rng.standard_normal((3, 4, 5, 6)) * 2 + 1).astype(np.float32)
    c = 6 if fmt == "NHWC" else 4
    axis = 3 if fmt == "NHWC" else 1
    scale, offset = rng.random(c).astype(np.float32), rng.random(c).astype(np.float32)
    old_mean, old_var = rng.random(c).astype(np.float32), rng.random(c).astype(np.float32)
    y, mean, var = cubn.fused_batch_norm(train_backend.asarray(x), train_backend.asarray(scale),
                                         train_backend.asarray(offset), train_backend.asarray(old_mean),
                                         train_backend.asarray(old_var), epsilon=0.001, data_format=fmt,
                                         exponential_avg_factor=factor)
    axes = ref.reduce_axes(4, axis)
    bm, bv = ref.moments(x, axes)
    want_y = ref.batch_norm(x, bm, bv, offset, scale, 0.001, axis)
    n = x.size / c
    corrected = bv * n / (n - 1)  # _training_ref: the returned variance is Bessel-corrected
    assert_close(train_backend.to_numpy(y), want_y, "float32")
    assert_close(train_backend.to_numpy(mean), (1 - factor) * old_mean + factor * bm, "float32")
    assert_close(train_backend.to_numpy(var), (1 - factor) * old_var + factor * corrected, "float32")


# nn_fused_batchnorm_test.py BatchNormalizationTest._test_inference / _inference_ref
def test_fused_batch_norm_inference(backend, rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    scale, offset, mean, var = (rng.random(5).astype(np.float32) for _ in range(4))
    y, m, v = cubn.fused_batch_norm(backend.asarray(x), backend.asarray(scale), backend.asarray(offset),
                                    backend.asarray(mean), backend.asarray(var), epsilon=0.001, is_training=False)
    assert_close(backend.to_numpy(y), ref.batch_norm(x, mean, var, offset, scale, 0.001, 3), "float32")
    np.testing.assert_array_equal(backend.to_numpy(m), mean)
    np.testing.assert_array_equal(backend.to_numpy(v), var)


# nn_fused_batchnorm_test.py BatchNormalizationTest._test_gradient (is_training=False) and the given-statistics
# gradients: dmean = -scale·invstd·Σdy, dvariance = -½·scale·invstd³·Σdy·(x - mean)
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_fused_batch_norm_inference_gradients(backend, rng, fmt):
    x = (rng.standard_normal((4, 3, 2, 5)) + 1).astype(np.float64)
    axis = 3 if fmt == "NHWC" else 1
    c = x.shape[axis]
    scale, offset, mean = rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c)
    var = rng.random(c) + 0.5
    dy = rng.standard_normal(x.shape)
    eps = 1e-3
    g = cubn.batch_norm_backward(backend.asarray(dy), backend.asarray(x), backend.asarray(scale), backend.asarray(mean),
                                 backend.asarray(var), eps, offset=backend.asarray(offset), data_format=fmt,
                                 is_training=False)
    axes = ref.reduce_axes(4, axis)

    def loss():
        return float((ref.batch_norm(x, mean, var, offset, scale, eps, axis) * dy).sum())

    for name, got, arr in (("dx", g.dx, x), ("dscale", g.dscale, scale), ("doffset", g.doffset, offset),
                           ("dmean", g.dmean, mean), ("dvariance", g.dvariance, var)):
        np.testing.assert_allclose(backend.to_numpy(got), _num_grad(loss, arr), rtol=1e-6, atol=1e-6, err_msg=name)
    invstd = 1 / np.sqrt(var + eps)
    b = lambda a: ref.bcast(a, 4, axis)  # noqa: E731
    np.testing.assert_allclose(backend.to_numpy(g.dmean), -scale * invstd * dy.sum(axes), rtol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(g.dvariance),
                               -0.5 * scale * invstd ** 3 * (dy * (x - b(mean))).sum(axes), rtol=1e-10)
    gt = cubn.batch_norm_backward(backend.asarray(dy), backend.asarray(x), backend.asarray(scale),
                                  backend.asarray(mean), backend.asarray(var), eps, data_format=fmt)
    assert gt.dmean is None and gt.dvariance is None  # training: the statistics are the batch's


# Gradients of nn_impl.moments / weighted_moments w.r.t. x (TF's autodiff of mean and squared difference)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_moments_gradients(backend, rng, weighted, dtype):
    x = (rng.standard_normal((5, 4, 3)) * 2 + 3).astype(dtype)
    w = rng.random((5, 1, 1)) if weighted else None
    if weighted:
        w[1] = 0.0
    dm, dv = rng.standard_normal(3), rng.standard_normal(3)
    x64 = x.astype(np.float64)

    def loss():
        mm, vv = ref.moments(x64, (0, 1), weights=w)
        return float((mm * dm).sum() + (vv * dv).sum())

    if weighted:
        got = cubn.weighted_moments_backward(backend.asarray(dm), backend.asarray(dv), backend.asarray(x), [0, 1],
                                             backend.asarray(w))
    else:
        got = cubn.moments_backward(backend.asarray(dm), backend.asarray(dv), backend.asarray(x), [0, 1])
    assert got.dtype == x.dtype
    tol = 1e-6 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(backend.to_numpy(got), _num_grad(loss, x64), rtol=tol, atol=tol)
    only_mean = cubn.moments_backward(backend.asarray(dm), None, backend.asarray(x), [0, 1])
    np.testing.assert_allclose(backend.to_numpy(only_mean), np.broadcast_to(dm / 20, x.shape), rtol=1e-5)
