"""Frequency weights at their edges: weights summing to zero, negative weights,
all-zero sample weights. Expected values follow the peers' own formulas:

- ``tf.nn.weighted_moments`` (tensorflow/python/ops/nn_impl.py) divides with
  ``div_no_nan``: a channel whose weights sum to 0 has mean 0 and variance 0;
  ``tf.nn.moments`` of an empty reduction is NaN (0/0 in reduce_mean).
- scikit-learn's ``_check_sample_weight`` refuses all-zero sample weights
  ("Sample weights must contain at least one non-zero number").
Negative frequency weights are refused everywhere (TensorFlow does not check).
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from cubn.preprocessing import RunningMoments, Standardizer
from conftest import np_dtype


def _div_no_nan(a, b):
    return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def _tf_weighted_moments(x, axes, w):
    """tf.nn.weighted_moments in float64: div_no_nan for the mean and the variance."""
    x = x.astype(np.float64)
    w = np.broadcast_to(w.astype(np.float64), x.shape)
    sw = w.sum(axis=axes)
    mean = _div_no_nan((w * x).sum(axis=axes), sw)
    dev = x - np.expand_dims(mean, axes)
    var = _div_no_nan((w * dev * dev).sum(axis=axes), sw)
    return mean, var


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_weights_summing_to_zero_give_zero_moments(backend, rng, dtype, layout):
    n, c, inner = int(rng.integers(2, 9)), 5, int(rng.integers(1, 7))
    x = (rng.standard_normal((n, c, inner)) * 3 + rng.normal(0, 100)).astype(np_dtype(dtype))
    w = rng.random((n, c, inner)) + 0.1
    dead = rng.choice(c, size=2, replace=False)
    w[:, dead, :] = 0
    x[0, dead[0], 0] = np.nan  # under a zero weight: must not spread
    if layout == "channels_last":
        x, w, axes = x.transpose(0, 2, 1).copy(), w.transpose(0, 2, 1).copy(), (0, 1)
    else:
        axes = (0, 2)
    m, v = cubn.weighted_moments(backend.asarray(x), axes, backend.asarray(w.astype(np_dtype(dtype))))
    m, v = backend.to_numpy(m).astype(np.float64), backend.to_numpy(v).astype(np.float64)
    em, ev = _tf_weighted_moments(x, axes, w.astype(np_dtype(dtype)))
    np.testing.assert_array_equal(m[dead], 0)
    np.testing.assert_array_equal(v[dead], 0)
    tol = {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2}[dtype]
    np.testing.assert_allclose(m, em, rtol=tol, atol=tol * (1 + np.abs(em).max()))
    np.testing.assert_allclose(v, ev, rtol=tol * 10, atol=tol * 10 * (1 + ev.max()))


def test_all_zero_batch_weights_vector(backend, rng):
    x = rng.standard_normal((6, 4, 3)).astype(np.float32)
    m, v = cubn.weighted_moments(backend.asarray(x), [0, 1], backend.asarray(np.zeros(6, np.float32)))
    np.testing.assert_array_equal(backend.to_numpy(m), 0)
    np.testing.assert_array_equal(backend.to_numpy(v), 0)


def test_empty_unweighted_reduction_is_nan(backend):
    m, v = cubn.moments(backend.asarray(np.zeros((0, 3), np.float32)), [0])
    assert np.isnan(backend.to_numpy(m)).all() and np.isnan(backend.to_numpy(v)).all()


def test_empty_weighted_reduction_is_zero(backend):
    # tf.nn.weighted_moments of nothing: div_no_nan(0, 0) = 0
    x = np.zeros((0, 3), np.float32)
    m, v = cubn.weighted_moments(backend.asarray(x), [0], backend.asarray(x))
    np.testing.assert_array_equal(backend.to_numpy(m), 0)
    np.testing.assert_array_equal(backend.to_numpy(v), 0)


def test_layer_with_zero_batch_weights_moves_toward_zero(train_backend, rng):
    """tf.contrib's batch_norm takes its batch statistics from weighted_moments: zero
    batch weights give mean 0 and variance 0, normalized as (x - 0) / sqrt(0 + eps)."""
    x = rng.standard_normal((8, 5, 5, 4)).astype(np.float32) + 3
    eps, decay = 1e-3, 0.9
    bn = cubn.BatchNorm(decay=decay, epsilon=eps, updates_collections=None, center=True, scale=False)
    y = backend_get(train_backend, bn(train_backend.asarray(x), is_training=True,
                                      batch_weights=train_backend.asarray(np.zeros(8, np.float32))))
    np.testing.assert_allclose(y, x / np.sqrt(eps), rtol=1e-5)
    mm = train_backend.to_numpy(bn.variables["moving_mean"])
    np.testing.assert_allclose(mm, 0.0, atol=1e-7)  # decay * 0 + (1 - decay) * 0
    mv = train_backend.to_numpy(bn.variables["moving_variance"])
    assert np.isfinite(mv).all()
    np.testing.assert_allclose(mv, decay * 1.0, rtol=1e-6)  # from the initial 1 toward 0


def test_fully_masked_channel_gives_zero_statistics(train_backend, rng):
    x = rng.standard_normal((4, 6, 3)).astype(np.float32)
    mask = np.ones((4, 6, 3), bool)
    mask[..., 1] = False
    bn = cubn.BatchNorm(updates_collections=None, scale=False, center=False, epsilon=1e-3)
    y = train_backend.to_numpy(bn(train_backend.asarray(x), is_training=True, mask=train_backend.asarray(mask)))
    np.testing.assert_allclose(y[..., 1], x[..., 1] / np.sqrt(1e-3), rtol=1e-5)
    assert np.isfinite(train_backend.to_numpy(bn.variables["moving_mean"])).all()


def backend_get(b, y):
    return b.to_numpy(y)


@pytest.mark.parametrize("where", ["weighted_moments", "batch_weights", "running_moments", "standardizer"])
def test_negative_weights_are_refused(backend, rng, where):
    x = rng.standard_normal((5, 3)).astype(np.float32)
    w = rng.random(5).astype(np.float32) + 0.5
    w[rng.integers(5)] = -float(rng.random() + 0.1)
    X, W = backend.asarray(x), backend.asarray(w)
    with pytest.raises(ValueError) as e:
        if where == "weighted_moments":
            cubn.weighted_moments(X, [0], W)
        elif where == "batch_weights":
            cubn.BatchNorm(updates_collections=None)(X, is_training=True, batch_weights=W)
        elif where == "running_moments":
            RunningMoments(axis=0).update(X, W[:, None])
        else:
            Standardizer().fit(X, sample_weight=W)
    msg = str(e.value)
    assert "non-negative" in msg and ("weights" in msg or "sample_weight" in msg), msg


def test_negative_weights_leave_running_moments_unchanged(backend, rng):
    x = rng.standard_normal((5, 3))
    rm = RunningMoments(axis=0, dtype="float64")
    rm.update(backend.asarray(x))
    before = backend.to_numpy(rm.mean).copy(), backend.to_numpy(rm.var).copy()
    with pytest.raises(ValueError):
        rm.update(backend.asarray(x), backend.asarray(np.array([[1.0], [-1.0], [1.0], [1.0], [1.0]])))
    np.testing.assert_array_equal(backend.to_numpy(rm.mean), before[0])
    np.testing.assert_array_equal(backend.to_numpy(rm.var), before[1])


@pytest.mark.parametrize("data_format", [None, "NHWC", "NCHW"])
def test_standardizer_refuses_all_zero_sample_weight(backend, rng, data_format):
    shape = (6, 3) if data_format is None else (6, 4, 4, 3) if data_format == "NHWC" else (6, 3, 4, 4)
    X = backend.asarray(rng.standard_normal(shape).astype(np.float32))
    with pytest.raises(ValueError, match="at least one non-zero"):
        Standardizer(data_format=data_format).fit(X, sample_weight=backend.asarray(np.zeros(6, np.float32)))


def test_standardizer_all_zero_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.preprocessing")
    X = np.random.default_rng().standard_normal((5, 2))
    with pytest.raises(ValueError, match="at least one non-zero") as theirs:
        sklearn.StandardScaler().fit(X, sample_weight=np.zeros(5))
    with pytest.raises(ValueError, match="at least one non-zero"):
        Standardizer().fit(X, sample_weight=np.zeros(5))
    assert "non-zero" in str(theirs.value)


def test_dask_weighted_moments_follow_weighted_moments(rng):
    da = pytest.importorskip("dask.array")
    import cubn.dask
    x = rng.standard_normal((12, 4))
    w = rng.random((12, 4)) + 0.1
    w[:, 2] = 0
    m, v = cubn.dask.moments(da.from_array(x, chunks=(4, 4)), 0, weights=da.from_array(w, chunks=(4, 4)))
    em, ev = _tf_weighted_moments(x, (0,), w)
    np.testing.assert_allclose(m.compute(), em, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v.compute(), ev, rtol=1e-12, atol=1e-12)
    wneg = w.copy()
    wneg[3, 0] = -1
    m, v = cubn.dask.moments(da.from_array(x, chunks=(4, 4)), 0, weights=da.from_array(wneg, chunks=(4, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        m.compute()
