"""Forward ops on every backend against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from conftest import ALL_DTYPES, assert_close, np_dtype
import reference as ref

ACTIVATIONS = [None, "relu", "relu6", "leaky_relu", "elu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu"]

# (data_format, shape): channels last with folding (C=3), without (C=64),
# odd C, channels first with odd inner (7x7) and with aligned inner, ranks 2-5.
LAYOUTS = [
    ("NHWC", (4, 5, 6, 3)),
    ("NHWC", (2, 3, 4, 64)),
    ("NHWC", (3, 5, 7)),
    ("NCHW", (3, 5, 7, 7)),
    ("NCHW", (2, 4, 8, 8)),
    ("NCHW", (6, 10)),
    ("NCHW", (2, 3, 2, 3, 4)),
    ("NHWC", (2, 2, 3, 4, 8)),
]


def _data(rng, shape, dtype, loc=0.5, spread=2.0):
    return (loc + spread * rng.standard_normal(shape)).astype(np_dtype(dtype))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape,axes", [
    ((4, 5, 6, 3), (0, 1, 2)), ((3, 5, 7, 7), (0, 2, 3)), ((40, 6), (0,)), ((5, 6, 7), (1,)),
    ((4, 3, 5), (0, 2)), ((3, 4, 5), (0, 1, 2)), ((3, 4), ()), ((6, 2, 300), (0, 2)),
])
@pytest.mark.parametrize("keepdims", [False, True])
def test_moments(backend, rng, dtype, shape, axes, keepdims):
    x = _data(rng, shape, dtype, loc=3.0)
    m, v = cubn.moments(backend.asarray(x), axes, keepdims=keepdims)
    rm, rv = ref.moments(x, axes, keepdims=keepdims)
    assert m.dtype == x.dtype and v.dtype == x.dtype
    assert_close(backend.to_numpy(m), rm, dtype, what="mean")
    assert_close(backend.to_numpy(v), rv, dtype, what="variance")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape,axes,wshape", [
    ((6, 4, 5, 3), (0, 1, 2), "batch"), ((6, 3, 4, 4), (0, 2, 3), "batch"), ((30, 5), (0,), "batch"),
    ((6, 3, 4, 4), (0, 2, 3), "full"), ((5, 4, 3), (0, 1), "full"), ((4, 6, 5), (0, 2), (4, 1, 5)),
])
def test_weighted_moments(backend, rng, dtype, shape, axes, wshape):
    x = _data(rng, shape, dtype, loc=-2.0)
    if wshape == "batch":
        w = rng.random(shape[0])
        w[rng.integers(shape[0])] = 0.0
        wb = w.reshape((-1,) + (1,) * (len(shape) - 1))
    elif wshape == "full":
        w = rng.random(shape) * (rng.random(shape) > 0.2)
        wb = w
    else:
        w = rng.random(wshape)
        wb = w
    m, v = cubn.weighted_moments(backend.asarray(x), axes, backend.asarray(w))
    rm, rv = ref.moments(x, axes, weights=wb)
    assert_close(backend.to_numpy(m), rm, dtype, what="weighted mean")
    assert_close(backend.to_numpy(v), rv, dtype, what="weighted variance")


def test_weighted_moments_zero_weight_channel(backend, rng):
    x = _data(rng, (8, 4, 3), "float32")
    w = rng.random((8, 4, 1)) + 0.1
    w[:, 2] = 0.0  # channel 2 has no weight at all
    x[0, 2, 1] = np.inf  # and an Inf where the weight is zero: skipped
    m, v = cubn.weighted_moments(backend.asarray(x), (0, 2), backend.asarray(w))
    m, v = backend.to_numpy(m), backend.to_numpy(v)
    if backend.name == "numpy" and np.isnan(m[2]):
        pytest.xfail("the NumPy backend's div_no_nan for a zero weight sum is a separate change")
    # weights summing to 0: mean 0 and variance 0, as tf.nn.weighted_moments (div_no_nan)
    assert m[2] == 0 and v[2] == 0
    keep = [0, 1, 3]
    rm, rv = ref.moments(x[:, keep], (0, 2), weights=w[:, keep])
    assert_close(m[keep], rm, "float32")
    assert_close(v[keep], rv, "float32")


def test_large_offset_is_exact_where_naive_formula_fails(train_backend, rng):
    """CONTRACT §2: 1e4 + N(0,1) in float32 keeps 1e-4 relative error; E[x²]−E[x]² loses all digits."""
    backend = train_backend
    x = (1e4 + rng.standard_normal((64, 16, 16, 8))).astype(np.float32)
    m, v = cubn.moments(backend.asarray(x), (0, 1, 2))
    tm, tv = ref.moments(x, (0, 1, 2))
    m, v = backend.to_numpy(m), backend.to_numpy(v)
    assert np.max(np.abs(m / tm - 1)) < 1e-4
    assert np.max(np.abs(v / tv - 1)) < 1e-4
    # The naive one-pass formula on the same data, in the same precision:
    naive = (x * x).mean(axis=(0, 1, 2), dtype=np.float32) - x.mean(axis=(0, 1, 2), dtype=np.float32) ** 2
    assert np.max(np.abs(naive / tv - 1)) > 0.5


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("data_format,shape", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_batch_normalization(backend, rng, dtype, data_format, shape, activation):
    x = _data(rng, shape, dtype)
    ax = ref.channel_axis(len(shape), data_format)
    c = shape[ax]
    mean, var = rng.standard_normal(c), rng.random(c) + 0.5
    offset, scale = rng.standard_normal(c), rng.standard_normal(c)
    y = cubn.batch_normalization(backend.asarray(x), backend.asarray(mean), backend.asarray(var),
                                 backend.asarray(offset), backend.asarray(scale), 1e-3,
                                 activation=activation, data_format=data_format)
    assert y.dtype == x.dtype and y.shape == x.shape
    r = ref.batch_norm(x, mean, var, offset, scale, 1e-3, ax, activation)
    assert_close(backend.to_numpy(y), r, dtype, what="y")


def test_batch_normalization_tf_broadcasting(backend, rng):
    """Without data_format, parameters broadcast as in TensorFlow (keepdims shapes too)."""
    x = _data(rng, (3, 4, 5, 6), "float32")
    mean, var = ref.moments(x, (0, 2), keepdims=True)  # shape (1, 4, 1, 6): not a single axis
    y = cubn.batch_normalization(backend.asarray(x), backend.asarray(mean.astype(np.float32)),
                                 backend.asarray(var.astype(np.float32)), None, 2.0, 1e-5)
    r = (x - mean) / np.sqrt(var + 1e-5) * 2.0
    assert_close(backend.to_numpy(y), r, "float32")
    y2 = cubn.batch_normalization(backend.asarray(x), 1.5, 4.0, 0.5, None, 0.0)
    assert_close(backend.to_numpy(y2), (x - 1.5) / 2.0 + 0.5, "float32")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("data_format,shape", LAYOUTS)
@pytest.mark.parametrize("with_side", [False, True])
def test_fused_batch_norm_training(train_backend, rng, dtype, data_format, shape, with_side):
    backend = train_backend
    x = _data(rng, shape, dtype, loc=1.0)
    ax = ref.channel_axis(len(shape), data_format)
    c = shape[ax]
    scale, offset = rng.standard_normal(c), rng.standard_normal(c)
    side = _data(rng, shape, dtype) if with_side else None
    y, bm, bv = cubn.fused_batch_norm(backend.asarray(x), backend.asarray(scale), backend.asarray(offset),
                                      epsilon=1e-3, data_format=data_format, activation="relu",
                                      side_input=backend.asarray(side))
    axes = ref.reduce_axes(len(shape), ax)
    m, v = ref.moments(x, axes)
    n = x.size // c
    acc = "float64" if dtype == "float64" else "float32"
    assert bm.dtype == np.dtype(acc) and bv.dtype == np.dtype(acc)
    assert_close(backend.to_numpy(bm), m, dtype, what="batch_mean")
    assert_close(backend.to_numpy(bv), v * n / max(n - 1, 1), dtype, what="batch_var (Bessel)")
    r = ref.batch_norm(x, m, v, offset, scale, 1e-3, ax, "relu", side=side)
    assert_close(backend.to_numpy(y), r, dtype, what="y")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("factor", [0.0, 0.3, 1.0])
def test_fused_batch_norm_exponential_avg_factor(train_backend, rng, dtype, factor):
    backend = train_backend
    x = _data(rng, (6, 4, 5, 3), dtype)
    old_m, old_v = rng.standard_normal(3).astype(np.float32), (rng.random(3) + 0.5).astype(np.float32)
    y, bm, bv = cubn.fused_batch_norm(backend.asarray(x), None, None, backend.asarray(old_m), backend.asarray(old_v),
                                      exponential_avg_factor=factor)
    m, v = ref.moments(x, (0, 1, 2))
    n = x.size // 3
    assert_close(backend.to_numpy(bm), (1 - factor) * old_m + factor * m, dtype)
    assert_close(backend.to_numpy(bv), (1 - factor) * old_v + factor * v * n / (n - 1), dtype)
    assert_close(backend.to_numpy(y), ref.batch_norm(x, m, v, None, None, 1e-3, 3), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("data_format,shape", LAYOUTS[:5])
@pytest.mark.parametrize("activation", [None, "elu", "gelu"])
def test_fused_batch_norm_inference(backend, rng, dtype, data_format, shape, activation):
    x = _data(rng, shape, dtype)
    ax = ref.channel_axis(len(shape), data_format)
    c = shape[ax]
    scale, offset = rng.standard_normal(c), rng.standard_normal(c)
    mean, var = rng.standard_normal(c), rng.random(c) + 0.1
    side = _data(rng, shape, dtype)
    y, m_out, v_out = cubn.fused_batch_norm(
        backend.asarray(x), backend.asarray(scale), backend.asarray(offset), backend.asarray(mean),
        backend.asarray(var), epsilon=1e-3, data_format=data_format, is_training=False,
        activation=activation, side_input=backend.asarray(side))
    r = ref.batch_norm(x, mean, var, offset, scale, 1e-3, ax, activation, side=side)
    assert_close(backend.to_numpy(y), r, dtype, what="y")
    assert_close(backend.to_numpy(m_out), mean, "float64" if dtype == "float64" else "float32")


@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_activation_alpha(backend, rng, activation):
    x = _data(rng, (5, 4, 3, 8), "float32")
    act = getattr(cubn.activations, activation)(0.37)
    y, _, _ = cubn.fused_batch_norm(backend.asarray(x), activation=act)
    m, v = ref.moments(x, (0, 1, 2))
    assert_close(backend.to_numpy(y), ref.batch_norm(x, m, v, None, None, 1e-3, 3, activation, alpha=0.37), "float32")


def test_unaligned_and_noncontiguous_inputs(backend, rng):
    """Views that are not 16-byte aligned or not contiguous take the scalar path."""
    base = _data(rng, (1 + 5 * 4 * 6 * 8,), "float32")
    x = base[1:].reshape(5, 4, 6, 8)  # contiguous, misaligned by 4 bytes
    xt = _data(rng, (8, 6, 4, 5), "float32").T  # not contiguous
    for arr in (x, xt):
        y, bm, bv = cubn.fused_batch_norm(backend.asarray(arr), data_format="NHWC")
        m, v = ref.moments(arr, (0, 1, 2))
        assert_close(backend.to_numpy(bm), m, "float32")
        assert_close(backend.to_numpy(y), ref.batch_norm(arr, m, v, None, None, 1e-3, 3), "float32")


def test_many_blocks_per_channel(backend, rng):
    """Big enough that the kernels split each channel over several blocks (and fold rows)."""
    for shape, fmt in (((16, 3, 32, 32), "NCHW"), ((64, 16, 16, 3), "NHWC"), ((4096, 24), "NHWC")):
        x = _data(rng, shape, "float32", loc=50.0)
        y, bm, bv = cubn.fused_batch_norm(backend.asarray(x), data_format=fmt, activation="silu")
        ax = ref.channel_axis(len(shape), fmt)
        m, v = ref.moments(x, ref.reduce_axes(len(shape), ax))
        assert_close(backend.to_numpy(bm), m, "float32", what=f"mean {shape}")
        assert_close(backend.to_numpy(y), ref.batch_norm(x, m, v, None, None, 1e-3, ax, "silu"), "float32")


def test_nan_and_inf_stay_in_their_channel(train_backend, rng):
    backend = train_backend
    x = _data(rng, (6, 5, 4, 4), "float32")
    x[2, 1, 0, 3] = np.nan
    x[4, 3, 2, 2] = np.inf
    y, bm, bv = cubn.fused_batch_norm(backend.asarray(x), data_format="NCHW")
    bm, bv, y = backend.to_numpy(bm), backend.to_numpy(bv), backend.to_numpy(y)
    bad = [1, 3]
    good = [0, 2, 4]
    assert not np.isfinite(bm[bad]).any() or not np.isfinite(bv[bad]).any()
    assert np.isfinite(bm[good]).all() and np.isfinite(bv[good]).all()
    assert np.isfinite(y[:, good]).all()
    assert not np.isfinite(y[:, bad]).all(axis=(0, 2, 3)).any()
