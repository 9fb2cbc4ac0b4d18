"""Adversarial data through the training forward and backward on every path:
the NumPy backend, the one-launch kernels (one_launch.cu) and the three-launch
path (statistics, finalize, normalize; sums, finalize, apply), each against
float64 references written here from the formulas, never from cubn's output.

Shapes are small enough for the one-launch path on the emulated backend (the
test checks that it ran); ``train_backend`` runs the kernel backends both
ways. Non-finite values must come out where the float64 formulas put them
(NaN, +Inf, -Inf alike), confined to their channel.
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from conftest import TOL

EPS = 1e-3
DECAY = 0.9
# (data_format, shape): channels first (one block per channel) and channels
# last with 16-byte and scalar columns, all inside the one-launch cache.
SHAPES = [("NCHW", (6, 4, 8, 12)), ("NHWC", (5, 7, 9, 8)), ("NHWC", (300, 6))]
IDS = ["NCHW", "NHWC", "NC-scalar-columns"]


def _axes(x, fmt):
    ax = x.ndim - 1 if fmt == "NHWC" else 1
    return ax, tuple(a for a in range(x.ndim) if a != ax)


def _b(v, x, ax):
    shape = [1] * x.ndim
    shape[ax] = -1
    return np.reshape(v, shape)


ACT = {None: (lambda z: z, lambda z: np.ones_like(z)),
       "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2)}


def reference(x, dy, g, b, fmt, act=None):
    """float64 forward, statistics, one moving update from (0, 1), backward."""
    with np.errstate(all="ignore"):
        x = np.asarray(x, np.float64)
        dy = np.asarray(dy, np.float64)
        ax, axes = _axes(x, fmt)
        n = x.size // x.shape[ax]
        mean = x.mean(axis=axes)
        var = ((x - _b(mean, x, ax)) ** 2).mean(axis=axes)
        invstd = 1.0 / np.sqrt(var + EPS)
        xhat = (x - _b(mean, x, ax)) * _b(invstd, x, ax)
        z = xhat * _b(g, x, ax) + _b(b, x, ax)
        f, fp = ACT[act]
        y = f(z)
        unbiased = var * n / max(n - 1, 1)
        mm = 0.0 - (0.0 - mean) * (1 - DECAY)
        mv = 1.0 - (1.0 - unbiased) * (1 - DECAY)
        d = dy * fp(z)
        dbeta = d.sum(axis=axes)
        dgamma = (d * xhat).sum(axis=axes)
        dx = _b(g * invstd, x, ax) * (d - d.mean(axis=axes, keepdims=True)
                                      - xhat * (d * xhat).mean(axis=axes, keepdims=True))
    return dict(y=y, mean=mean, var=unbiased, moving_mean=mm, moving_variance=mv, dx=dx, dgamma=dgamma, dbeta=dbeta)


def run(backend, x, dy, g, b, fmt, act=None, launches=None):
    """The same quantities from cubn: fused_batch_norm, then a BatchNorm layer step and its backward."""
    gx, bx = backend.asarray(g), backend.asarray(b)
    xb, dyb = backend.asarray(x), backend.asarray(dy)
    if launches is not None:
        launches.clear()
    y, bm, bv = cubn.fused_batch_norm(xb, gx, bx, epsilon=EPS, data_format=fmt, activation=act)
    forward_launches = list(launches) if launches is not None else None
    bn = cubn.BatchNorm(decay=DECAY, scale=True, epsilon=EPS, activation_fn=act, data_format=fmt,
                        updates_collections=None, unbiased_moving_variance=True,
                        param_initializers={"gamma": np.asarray(g), "beta": np.asarray(b)})
    bn(xb, is_training=True)
    if launches is not None:
        launches.clear()
    dx = bn.backward(dyb)
    backward_launches = list(launches) if launches is not None else None
    v, gr = bn.variables, bn.gradients
    out = dict(y=y, mean=bm, var=bv, moving_mean=v["moving_mean"], moving_variance=v["moving_variance"], dx=dx,
               dgamma=gr["gamma"], dbeta=gr["beta"])
    return {k: backend.to_numpy(a).astype(np.float64) for k, a in out.items()}, forward_launches, backward_launches


def same_nonfinite(got, want, what):
    for name, f in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        assert np.array_equal(f(got), f(want)), f"{what}: {name} at {np.argwhere(f(got) != f(want))[:5].tolist()}"


def check(got, want, dtype="float32", floor=1.0):
    """Non-finite patterns exactly; finite values within TOL of the scale of the data."""
    for k, w in want.items():
        a = got[k]
        assert a.shape == w.shape, (k, a.shape, w.shape)
        same_nonfinite(a, w, k)
        fin = np.isfinite(w)
        if fin.any():
            scale = max(floor, float(np.max(np.abs(w[fin]))))
            err = float(np.max(np.abs(a[fin] - w[fin]))) / scale
            assert err <= TOL[dtype], f"{k}: relative error {err:.3g} > {TOL[dtype]}"


def _on_one_launch(backend):
    from cubn._options import one_launch_enabled

    return backend.name != "numpy" and one_launch_enabled()


def _expect_one_launch(backend, fwd, bwd):
    if _on_one_launch(backend) and backend.name == "emulated":
        assert fwd == ["cubn_bn_train_one_launch"], fwd
        assert bwd == ["cubn_bn_bwd_one_launch"], bwd


def _params(c, rng):
    return rng.uniform(0.5, 1.5, c).astype(np.float32), rng.uniform(-1, 1, c).astype(np.float32)


def _channel_index(x, fmt, c, index):
    """Index of element ``index`` (flat, within channel c's elements) in x."""
    ax, _ = _axes(x, fmt)
    others = [s for i, s in enumerate(x.shape) if i != ax]
    pos = list(np.unravel_index(index, others))
    pos.insert(ax, c)
    return tuple(pos)


NONFINITE = {"nan": [np.nan], "inf": [np.inf], "-inf": [-np.inf], "inf_and_-inf": [np.inf, -np.inf],
             "nan_and_inf": [np.nan, np.inf]}


# (values, where the first goes, activation): ``first`` puts it where the kernels take their pivot from
NONFINITE_CASES = [("nan", "first", None), ("inf", "inside", "tanh"), ("-inf", "first", None),
                   ("inf_and_-inf", "inside", "tanh"), ("nan_and_inf", "inside", None), ("inf", "first", "tanh")]


@pytest.mark.parametrize("kind,where,act", NONFINITE_CASES, ids=["-".join(map(str, c)) for c in NONFINITE_CASES])
@pytest.mark.parametrize("fmt,shape", SHAPES, ids=IDS)
def test_nonfinite_values_stay_in_their_channel(train_backend, emulated_launches, request, rng, fmt, shape, act,
                                                kind, where):
    """NaN, +Inf, -Inf in one channel: that channel's outputs, statistics,
    moving statistics and gradients are what the float64 formulas give (NaN,
    or a mean of +-Inf), the other channels are untouched."""
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = x.shape[-1] if fmt == "NHWC" else x.shape[1]
    bad = int(rng.integers(c))
    per_channel = x.size // c
    spots = [0] if where == "first" else []
    spots += list(rng.choice(np.arange(1, per_channel), len(NONFINITE[kind]) - len(spots), replace=False))
    for v, i in zip(NONFINITE[kind], spots):
        x[_channel_index(x, fmt, bad, i)] = v
    g, b = _params(c, rng)
    got, fwd, bwd = run(train_backend, x, dy, g, b, fmt, act, emulated_launches)
    _expect_one_launch(train_backend, fwd, bwd)
    want = reference(x, dy, g, b, fmt, act)
    check(got, want)
    ax, _ = _axes(x, fmt)
    assert np.isnan(np.take(got["y"], bad, axis=ax)).all()
    keep = np.arange(c) != bad
    for k in ("y", "dx"):
        assert np.isfinite(np.compress(keep, got[k], axis=ax)).all(), k


@pytest.mark.parametrize("fmt,shape", SHAPES, ids=IDS)
def test_nan_through_relu(train_backend, rng, fmt, shape):
    """relu(NaN) is NaN (NumPy's maximum): the NaN channel stays NaN after the activation."""
    x = rng.standard_normal(shape).astype(np.float32)
    c = x.shape[-1] if fmt == "NHWC" else x.shape[1]
    x[_channel_index(x, fmt, 1, 5)] = np.nan
    g, b = _params(c, rng)
    y, _, _ = cubn.fused_batch_norm(train_backend.asarray(x), train_backend.asarray(g), train_backend.asarray(b),
                                    epsilon=EPS, data_format=fmt, activation="relu")
    ax, _ = _axes(x, fmt)
    assert np.isnan(np.take(train_backend.to_numpy(y), 1, axis=ax)).all()


@pytest.mark.parametrize("value", [1e4 + 0.1, -3.7, 1e7 + 1])
@pytest.mark.parametrize("fmt,shape", SHAPES, ids=IDS)
def test_a_channel_of_equal_values_normalizes_to_beta(train_backend, emulated_launches, rng, fmt, shape, value):
    """Its mean is the value, its variance 0, and y is beta exactly (not one
    rounding of the mean times 1/sqrt(eps) away from it)."""
    x = rng.standard_normal(shape).astype(np.float32)
    c = x.shape[-1] if fmt == "NHWC" else x.shape[1]
    ax, _ = _axes(x, fmt)
    idx = [slice(None)] * x.ndim
    idx[ax] = 2
    x[tuple(idx)] = np.float32(value)
    g, b = _params(c, rng)
    dy = rng.standard_normal(shape).astype(np.float32)
    got, fwd, bwd = run(train_backend, x, dy, g, b, fmt, None, emulated_launches)
    _expect_one_launch(train_backend, fwd, bwd)
    assert np.all(np.take(got["y"], 2, axis=ax) == np.float64(b[2]))
    assert got["mean"][2] == np.float64(np.float32(value)) and got["var"][2] == 0.0
    check(got, reference(x, dy, g, b, fmt), floor=1.0)


def _f32_two_pass(x, g, b, fmt):
    """NumPy's float32 two-pass: the accuracy the kernels must at least reach."""
    ax, axes = _axes(x, fmt)
    m = x.mean(axis=axes, dtype=np.float32)
    v = ((x - _b(m, x, ax)) ** 2).mean(axis=axes, dtype=np.float32)
    y = (x - _b(m, x, ax)) * _b((g / np.sqrt(v + np.float32(EPS))).astype(np.float32), x, ax) + _b(b, x, ax)
    return m.astype(np.float64), v.astype(np.float64), y.astype(np.float64)


@pytest.mark.parametrize("std", [1.0, 1e-2])
@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5, -1e6, 1e7])
@pytest.mark.parametrize("fmt,shape", SHAPES[:2], ids=IDS[:2])
def test_large_offsets_are_as_accurate_as_a_float32_two_pass(train_backend, emulated_launches, request, rng, fmt,
                                                             shape, offset, std):
    """float32 data at an offset: the error of the mean, the variance and y
    against the float64 truth of the float32 input is no worse than NumPy's
    float32 two-pass (within one rounding of the float32 result)."""
    x = (offset + std * rng.standard_normal(shape)).astype(np.float32)
    c = x.shape[-1] if fmt == "NHWC" else x.shape[1]
    g, b = _params(c, rng)
    dy = rng.standard_normal(shape).astype(np.float32)
    got, fwd, bwd = run(train_backend, x, dy, g, b, fmt, None, emulated_launches)
    _expect_one_launch(train_backend, fwd, bwd)
    want = reference(x, dy, g, b, fmt)
    n = x.size // c
    m_np, v_np, y_np = _f32_two_pass(x, g, b, fmt)
    v_np = v_np * n / (n - 1)  # the unbiased batch variance, as cubn returns it
    # per quantity, the largest error over the channels: cubn's against the
    # two-pass's (the mean: or one ulp; the variance and y: plus 2^-19
    # relative, a few float32 roundings)
    ulp_mean = np.spacing(np.abs(want["mean"]).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got["mean"] - want["mean"]) - np.maximum(np.abs(m_np - want["mean"]), ulp_mean)) <= 0, (
        got["mean"] - want["mean"], m_np - want["mean"])
    # (at 1e7 a spread of 0.01 quantizes to one value: variance 0, which must come out exactly)
    rel = lambda a: np.max(np.abs(a - want["var"]) / np.where(want["var"] > 0, want["var"], 1.0))  # noqa: E731
    assert rel(got["var"]) <= rel(v_np) + 2.0**-19, (rel(got["var"]), rel(v_np))
    ys = np.max(np.abs(want["y"]))
    err_y, err_np = np.max(np.abs(got["y"] - want["y"])) / ys, np.max(np.abs(y_np - want["y"])) / ys
    assert err_y <= err_np + 2.0**-19, (err_y, err_np)


def _data(kind, shape, rng):
    if kind == "normal":
        return rng.standard_normal(shape)
    if kind == "quantized":  # few distinct values, many ties
        return np.round(rng.standard_normal(shape) * 2) / 2 + 100
    if kind == "zeros":
        return np.zeros(shape)
    if kind == "negative":
        return -np.abs(rng.standard_normal(shape)) * 1e3 - 5e3
    if kind == "offset":
        return 1e4 + 1e-2 * rng.standard_normal(shape)
    raise AssertionError(kind)


DATA_CASES = [(kind, fmt, shape) for kind in ("normal", "quantized", "zeros", "negative", "offset")
              for fmt, shape in SHAPES]
DATA_CASES += [("normal", "NCHW", (1, 3, 7, 9)), ("normal", "NHWC", (1, 1, 1, 12)), ("offset", "NHWC", (1, 8))]


@pytest.mark.parametrize("kind,fmt,shape", DATA_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_data_classes_on_every_path(train_backend, emulated_launches, rng, fmt, shape, kind):
    """Forward, statistics, moving statistics and gradients within the
    dtype's tolerance of the float64 formulas, for every path (a batch of one
    row: variance 0, y = beta)."""
    x = _data(kind, shape, rng).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = x.shape[-1] if fmt == "NHWC" else x.shape[1]
    g, b = _params(c, rng)
    got, fwd, bwd = run(train_backend, x, dy, g, b, fmt, "tanh", emulated_launches)
    _expect_one_launch(train_backend, fwd, bwd)
    want = reference(x, dy, g, b, fmt, "tanh")
    if kind == "offset":
        # 1e4 + N(0, 0.01) in float32 is quantized at ulp(1e4) / 0.01 = 0.1 of its spread: every path's
        # float32 mean carries that much of it into x - mean (the offset test measures the statistics)
        for k in want:
            same_nonfinite(got[k], want[k], k)
            scale = max(1.0, float(np.max(np.abs(want[k]))))
            assert np.max(np.abs(got[k] - want[k])) / scale <= 0.2, k
    else:
        check(got, want)
    if kind == "zeros" or x.size == c:
        assert np.all(got["y"] == np.tanh(_b(b, x, _axes(x, fmt)[0]).astype(np.float32)).astype(np.float64)) or \
            np.allclose(got["y"], want["y"], rtol=0, atol=2e-7)


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_non_contiguous_views(train_backend, emulated_launches, rng, fmt):
    """A strided view (every other image, a slice of the width) computes what its copy does."""
    big = (rng.standard_normal((12, 6, 10, 8)) * 3 + 7).astype(np.float32)
    if fmt == "NHWC":
        big = np.ascontiguousarray(big.transpose(0, 2, 3, 1))
        x = big[::2, :, 1:7, :]
    else:
        x = big[::2, :, :, 1:7]
    assert not x.flags.c_contiguous
    dy = rng.standard_normal(x.shape).astype(np.float32)
    c = x.shape[-1] if fmt == "NHWC" else x.shape[1]
    g, b = _params(c, rng)
    got, fwd, bwd = run(train_backend, x, dy, g, b, fmt, "tanh", emulated_launches)
    _expect_one_launch(train_backend, fwd, bwd)
    check(got, reference(np.ascontiguousarray(x), dy, g, b, fmt, "tanh"))
