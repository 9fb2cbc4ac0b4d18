"""batch_norm_backward: float64 finite differences of an independent reference
forward, on every backend, for every activation, layout, weighted and renorm case."""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from conftest import ALL_DTYPES, assert_close, np_dtype
import reference as ref

ACTIVATIONS = [None, "relu", "relu6", "leaky_relu", "elu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu"]
EPS = 1e-3


def ref_forward(x, gamma, beta, side, *, axis, training, mean=None, var=None, w=None, r=None, d=None, act=None):
    """Reference y (float64) with batch statistics (training) or given ones."""
    nd = x.ndim
    axes = ref.reduce_axes(nd, axis)
    if training:
        wb = None if w is None else w.reshape((-1,) + (1,) * (nd - 1))
        mean, var = ref.moments(x, axes, weights=wb)
    xhat = (x - ref.bcast(mean, nd, axis)) / np.sqrt(ref.bcast(var, nd, axis) + EPS)
    if r is not None:
        xhat = xhat * ref.bcast(r, nd, axis) + ref.bcast(d, nd, axis)
    z = xhat * ref.bcast(gamma, nd, axis) + ref.bcast(beta, nd, axis)
    if side is not None:
        z = z + side
    return ref.act(act, z)


def numeric_grads(f, arrays, h=1e-6):
    """Central differences of the scalar f(*arrays) w.r.t. each array."""
    out = []
    for k, a in enumerate(arrays):
        if a is None:
            out.append(None)
            continue
        g = np.zeros_like(a)
        it = np.nditer(a, flags=["multi_index"])
        for _ in it:
            idx = it.multi_index
            args_p = [b.copy() if b is not None else None for b in arrays]
            args_m = [b.copy() if b is not None else None for b in arrays]
            args_p[k][idx] += h
            args_m[k][idx] -= h
            g[idx] = (f(*args_p) - f(*args_m)) / (2 * h)
        out.append(g)
    return out


CASES = [("NHWC", (3, 2, 2, 3)), ("NCHW", (3, 3, 2, 2)), ("NHWC", (5, 4)), ("NCHW", (2, 3, 1, 2, 2))]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("data_format,shape", CASES)
@pytest.mark.parametrize("mode", ["training", "inference", "weighted", "renorm"])
def test_gradients_match_finite_differences(train_backend, rng, activation, data_format, shape, mode):
    backend = train_backend
    nd = len(shape)
    axis = ref.channel_axis(nd, data_format)
    c = shape[axis]
    x = 1.5 + rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    side = rng.standard_normal(shape) if activation is not None else None
    dy = rng.standard_normal(shape)
    training = mode != "inference"
    w = rng.random(shape[0]) + 0.2 if mode == "weighted" else None
    r = rng.random(c) + 0.5 if mode == "renorm" else None
    d = rng.standard_normal(c) * 0.3 if mode == "renorm" else None
    given_m, given_v = (rng.standard_normal(c), rng.random(c) + 0.5) if not training else (None, None)
    kw = dict(axis=axis, training=training, mean=given_m, var=given_v, w=w, r=r, d=d, act=activation)

    def loss(x_, g_, b_, s_):
        return float(np.sum(dy * ref_forward(x_, g_, b_, s_, **kw)))

    nx, ng, nb, ns = numeric_grads(loss, [x, gamma, beta, side])
    if training:
        wb = None if w is None else w.reshape((-1,) + (1,) * (nd - 1))
        m, v = ref.moments(x, ref.reduce_axes(nd, axis), weights=wb)
    else:
        m, v = given_m, given_v
    A = backend.asarray
    g = cubn.batch_norm_backward(A(dy), A(x), A(gamma), A(m), A(v), EPS, offset=A(beta), data_format=data_format,
                                 is_training=training, activation=activation, side_input=A(side),
                                 batch_weights=A(w), renorm_r=A(r), renorm_d=A(d))
    assert_close(backend.to_numpy(g.dx), nx, "float32", what="dx")
    assert_close(backend.to_numpy(g.dscale), ng, "float32", what="dscale")
    assert_close(backend.to_numpy(g.doffset), nb, "float32", what="doffset")
    if side is not None:
        assert_close(backend.to_numpy(g.dside_input), ns, "float32", what="dside_input")
    else:
        assert g.dside_input is None


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("data_format,shape", [("NHWC", (6, 5, 4, 3)), ("NHWC", (4, 3, 2, 64)), ("NCHW", (4, 5, 7, 7)),
                                               ("NCHW", (3, 4, 8, 8)), ("NHWC", (40, 24))])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_low_precision_backward_matches_float64(train_backend, rng, dtype, data_format, shape, activation):
    """16/32-bit inputs (float32 accumulation) against the float64 computation of the same gradients."""
    backend = train_backend
    nd = len(shape)
    axis = ref.channel_axis(nd, data_format)
    c = shape[axis]
    dt = np_dtype(dtype)
    x = (0.5 + rng.standard_normal(shape)).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    side = rng.standard_normal(shape).astype(dt) if activation else None
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    m, v = ref.moments(x, ref.reduce_axes(nd, axis))
    kw = dict(offset=beta, data_format=data_format, activation=activation)
    pd = np.float64 if dtype == "float64" else np.float32
    gamma, beta = gamma.astype(pd).astype(np.float64), beta.astype(pd).astype(np.float64)
    m, v = m.astype(pd).astype(np.float64), v.astype(pd).astype(np.float64)
    want = cubn.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64), gamma, m, v, EPS,
                                    side_input=None if side is None else side.astype(np.float64), **kw)
    A = backend.asarray
    pd = np.float64 if dtype == "float64" else np.float32  # parameters in the accumulation dtype
    got = cubn.batch_norm_backward(A(dy), A(x), A(gamma.astype(pd)), A(m.astype(pd)),
                                   A(v.astype(pd)), EPS, side_input=A(side),
                                   **{**kw, "offset": A(beta.astype(pd))})
    assert got.dx.dtype == dt
    scale = np.abs(want.dx).max()
    assert_close(backend.to_numpy(got.dx).astype(np.float64), want.dx, dtype, scale=scale, what="dx")
    assert_close(backend.to_numpy(got.dscale), want.dscale, dtype, scale=np.abs(want.dscale).max() + 1, what="dscale")
    assert_close(backend.to_numpy(got.doffset), want.doffset, dtype, scale=np.abs(want.doffset).max() + 1, what="doffset")


# Channels-last shapes for the backward sums: folded small C (1, 3, odd 5),
# a batch of one, several column blocks and split rows, unfolded wide C.
CL_SHAPES = [(2, 33, 17, 3), (3, 16, 16, 1), (1, 9, 9, 5), (4, 8, 8, 64), (2, 6, 6, 160), (6000, 3)]


def _cl_case(rng, shape, offset, equal_channel):
    x = offset + rng.standard_normal(shape)
    if equal_channel:
        x[..., 0] = offset + 0.25  # one all-equal channel: variance 0
    x = x.astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[-1]
    gamma = rng.standard_normal(c).astype(np.float32)
    axes = tuple(range(len(shape) - 1))
    m, v = ref.moments(x.astype(np.float64), axes)
    return x, dy, gamma, m.astype(np.float32), v.astype(np.float32)


def _grads_at(x, dy, gamma, m, v):
    """float64 training gradients of channels-last data evaluated at the given
    statistics (as the kernels are: the float32 mean of offset data is not
    the exact one, and the gradient is taken about the one passed)."""
    x, dy, m, v = (np.asarray(a, np.float64) for a in (x, dy, m, v))
    axes = tuple(range(x.ndim - 1))
    invstd = 1.0 / np.sqrt(v + EPS)
    xhat = (x - m) * invstd
    db = dy.sum(axis=axes)
    dg = (dy * xhat).sum(axis=axes)
    n = x.size // x.shape[-1]
    dx = np.asarray(gamma, np.float64) * invstd * (dy - db / n - xhat * dg / n)
    return dx, dg, db


@pytest.mark.parametrize("shape", CL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e7])
@pytest.mark.parametrize("equal_channel", [False, True], ids=["spread", "equal-channel"])
def test_channels_last_backward_sums_against_float64(train_backend, rng, shape, offset, equal_channel):
    """The channels-last backward (sums merged per channel inside a block) on
    float32 data at large offsets against the float64 gradients of the same
    float32 inputs and statistics; run twice, bitwise the same."""
    backend = train_backend
    x, dy, gamma, m, v = _cl_case(rng, shape, offset, equal_channel)
    nd = len(shape)
    want_dx, want_dg, want_db = _grads_at(x, dy, gamma, m, v)
    A = backend.asarray
    runs = [cubn.batch_norm_backward(A(dy), A(x), A(gamma), A(m), A(v), EPS, data_format="NHWC") for _ in range(2)]
    got = runs[0]
    # the sums against the sums of their terms' magnitudes (their condition)
    axes = tuple(range(nd - 1))
    xhat = (x - m.astype(np.float64)) / np.sqrt(v.astype(np.float64) + EPS)
    mag_g = np.abs(dy * xhat).sum(axis=axes).max() or 1.0  # 0: every channel all-equal
    mag_b = np.abs(dy.astype(np.float64)).sum(axis=axes).max()
    assert_close(backend.to_numpy(got.dx), want_dx, "float32", scale=np.abs(want_dx).max(), what="dx")
    assert_close(backend.to_numpy(got.dscale), want_dg, "float32", scale=mag_g, what="dscale")
    assert_close(backend.to_numpy(got.doffset), want_db, "float32", scale=mag_b, what="doffset")
    for a, b in zip(runs[0][:3], runs[1][:3]):
        assert backend.to_numpy(a).tobytes() == backend.to_numpy(b).tobytes()


@pytest.mark.parametrize("shape", CL_SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_channels_last_backward_sums_non_finite_as_on_numpy(train_backend, rng, shape, bad):
    """A NaN/Inf in one channel's dy: that channel's gradients are non-finite,
    the others' unchanged, as on the NumPy backend."""
    x, dy, gamma, m, v = _cl_case(rng, shape, 1e4, False)
    dy.reshape(-1, shape[-1])[len(dy.reshape(-1, shape[-1])) // 2, shape[-1] - 1] = bad
    with cubn.use_backend("numpy"):
        want = cubn.batch_norm_backward(dy, x, gamma, m, v, EPS, data_format="NHWC")
    A = train_backend.asarray
    got = cubn.batch_norm_backward(A(dy), A(x), A(gamma), A(m), A(v), EPS, data_format="NHWC")
    for name, g, w in zip(("dx", "dscale", "doffset"), got[:3], want[:3]):
        g, w = np.asarray(train_backend.to_numpy(g), np.float64), np.asarray(w, np.float64)
        assert np.array_equal(np.isfinite(g), np.isfinite(w)), name
        assert not np.isfinite(w).all()
        fin = np.isfinite(w)
        if fin.any():
            assert_close(g[fin], w[fin], "float32", scale=np.abs(w[fin]).max() + 1, what=name)
