"""The NumPy backend's one-chunk path (``cubn.backends.numpy_mid``).

Whole calls on arrays of one chunk give the chunked primitives' results bit
for bit (the same NumPy calls on the same chunk, fewer around them), through
the public ops, on adversarial inputs and for any thread count; and the path
is taken where it should be.
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from cubn._plan import plan_for_channels
from cubn.backends import numpy_mid as nm
from cubn.backends.numpy_backend import NumpyBackend, _pivot_sample

from conftest import BF16
from cubn.backends import numpy_native


@pytest.fixture(autouse=True)
def numpy_code():
    """The one-task path runs where the compiled loops do not (16-bit data, no compiler):
    these tests compare it with the NumPy primitives, the loops off."""
    with numpy_native.disabled():
        yield

DTYPES = [np.float16, np.float32, np.float64] + ([BF16] if BF16 is not None else [])
# (shape, data_format): NC, channels last (grouped rows), NCHW (rows of whole feature maps)
CASES = [((1024, 64), "NHWC"), ((300, 40), "NHWC"), ((8, 14, 14, 64), "NHWC"), ((8, 64, 14, 14), "NCHW"),
         ((3, 5, 40, 3), "NHWC"), ((2, 7, 33, 31), "NCHW"), ((256, 1024), "NHWC"), ((384, 1024), "NHWC")]


def _same(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert np.array_equal(a64, b64, equal_nan=True), what
    num = ~np.isnan(a64)
    assert np.array_equal(np.signbit(a64[num]), np.signbit(b64[num])), (what, "signs of zeros")


def _data(rng, shape, dt, kind, ch):
    x = rng.standard_normal(shape) * 3
    if kind == "offset":
        big = 1e6 if np.dtype(dt).itemsize > 2 else 1e4  # (16-bit floats end at 65504)
        x += 1e4 + big * (np.arange(shape[ch]) % 3).reshape([-1 if a == ch else 1 for a in range(len(shape))])
    elif kind == "nonfinite":
        idx = [0] * len(shape)
        x[tuple(idx)] = np.inf  # a channel's first element (in the pivot sample)
        x.reshape(-1)[-1] = np.nan
        sl = [slice(None)] * len(shape)
        sl[ch] = 2
        x[tuple(sl)] = 5.0  # all equal
    x = x.astype(dt)
    if kind == "farpivot":  # each channel's pivot sample far from the rest: the statistics are redone about the mean
        _pivot_sample(_x3(x, ch))[...] = 100.0
    return x


def _x3(x, ch):
    return plan_for_channels(x.shape, "NCHW" if ch == 1 and x.ndim > 2 else "NHWC", "t").view3(x)


def _calls(x, dy, side, g, b, rm, rv, fmt, ax):
    axes = tuple(a for a in range(x.ndim) if a != ax)
    out = {"moments": cubn.moments(x, axes), "f=1": cubn.fused_batch_norm(x, g, b, None, None, 1e-3, fmt)}
    for act in (None, "relu", "tanh"):
        for gg, bb, sd in ((g, b, None), (None, None, side), (g, None, side)):
            key = (act, gg is None, bb is None, sd is None)
            out[("train",) + key] = cubn.fused_batch_norm(x, gg, bb, rm, rv, 1e-3, fmt, exponential_avg_factor=0.1,
                                                          activation=act, side_input=sd)
            out[("infer",) + key] = cubn.fused_batch_norm(x, gg, bb, rm, rv, 1e-3, fmt, is_training=False,
                                                          activation=act, side_input=sd)
            for training in (True, False):
                out[("backward", training) + key] = tuple(cubn.batch_norm_backward(
                    dy, x, gg, out[("train",) + key][1] if training else rm, rv, 1e-3, offset=bb, data_format=fmt,
                    is_training=training, activation=act, side_input=sd))
    layer = cubn.BatchNorm(data_format=fmt, scale=True, updates_collections=None)
    y = layer(x, is_training=True)
    dx = layer.backward(dy)
    out["layer"] = (y, dx, *(np.array(v) for v in layer.gradients.values()))
    return out


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,fmt", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["plain", "offset", "nonfinite", "farpivot"])
def test_one_chunk_calls_are_the_primitives_bit_for_bit(rng, monkeypatch, dt, shape, fmt, kind):
    ax = 1 if fmt == "NCHW" else len(shape) - 1
    c = shape[ax]
    acc = np.float64 if dt == np.float64 else np.float32
    x = _data(rng, shape, dt, kind, ax)
    dy = rng.standard_normal(shape).astype(dt)
    side = rng.standard_normal(shape).astype(dt)
    g, b = rng.uniform(0.5, 2, c).astype(acc), rng.standard_normal(c).astype(acc)
    if kind == "nonfinite":
        g[1] = np.nan
    rm, rv = rng.standard_normal(c).astype(acc), rng.uniform(1, 2, c).astype(acc)
    taken = {"n": 0}
    real = nm.plan

    def counting(x3, a):
        p = real(x3, a)
        taken["n"] += p is not None
        return p

    monkeypatch.setattr(nm, "plan", counting)
    got = {}
    for threads in (1, 2, 3):
        cubn.set_num_threads(threads)
        got[threads] = _calls(x, dy, side, g, b, rm.copy(), rv.copy(), fmt, ax)
    monkeypatch.setattr(nm, "ENABLED", False)
    try:
        want = _calls(x, dy, side, g, b, rm.copy(), rv.copy(), fmt, ax)
    finally:
        cubn.set_num_threads(None)
    lay = nm._panel(*_x3(x, ax).shape, np.dtype(acc).itemsize)
    assert (taken["n"] > 0) == (lay is not None)  # (on one thread at least)
    for threads, out in got.items():
        for k, v in want.items():
            vs = v if isinstance(v, tuple) else (v,)
            gs = out[k] if isinstance(out[k], tuple) else (out[k],)
            assert len(vs) == len(gs)
            for i, (a, bb) in enumerate(zip(gs, vs)):
                _same(a, bb, (threads, k, i))


def test_which_shapes_take_the_one_chunk_path():
    f32, f64 = 4, 8
    assert nm._panel(1024, 64, 1, f32) is not None           # NC, 256 KiB
    assert nm._panel(1024, 64, 1, f64) is not None           # 512 KiB: one chunk of float64
    assert nm._panel(8 * 14 * 14, 64, 1, f32) is not None    # channels last
    assert nm._panel(8, 64, 196, f32) is not None            # NCHW, whole feature maps per row
    assert nm._panel(8, 64, 196, f64) is not None            # two chunks, one reduction task
    assert nm._panel(1024, 512, 1, f32) is not None          # 2 MiB: 4 chunks, one task
    assert nm._panel(4096, 256, 1, f32) is None              # 4 MiB: two tasks, chunked
    assert nm._panel(2, 64, 4096, f32) is None               # long runs: the runs layout


@pytest.mark.parametrize("shape,ch", [((8, 14, 14, 64), 3), ((8, 64, 14, 14), 1)])
def test_far_pivot_takes_the_primitives_second_pass(rng, shape, ch):
    x = _data(rng, shape, np.float32, "farpivot", ch)
    x3 = _x3(x, ch)
    lp = nm.plan(x3, np.dtype(np.float32))
    assert lp is not None and nm._partials(*lp, x3, np.dtype(np.float32)) is None
    mean, var = nm.moments(NumpyBackend(), x3, np.dtype(np.float32), lp)
    x64 = x3.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2)), rtol=1e-5)


# Below a few MiB the fixed buffers of a call (parameter rows and column sums as wide as a
# row, float64 merges) are a larger part of the input than a quarter (the chunked path's
# too); 16-bit inputs add NumPy's casting buffers, a fixed 64-100 KiB, and are not bounded here.
# An NCHW input of 8 rows of whole feature maps: each row-wide buffer is an eighth of it.
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,fmt,bound", [((1024, 64), "NHWC", 0.375), ((256, 1024), "NHWC", 0.375),
                                             ((8, 64, 14, 14), "NCHW", 1.25)], ids=str)
def test_peak_memory_beyond_outputs(rng, dt, shape, fmt, bound):
    from test_numpy_backend import _peak_beyond_outputs

    ax = 1 if fmt == "NCHW" else len(shape) - 1
    c = shape[ax]
    axes = tuple(a for a in range(len(shape)) if a != ax)
    x = rng.standard_normal(shape).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    acc = np.float64 if dt == np.float64 else np.float32
    g, b = np.ones(c, acc), np.zeros(c, acc)
    mean, var = np.zeros(c, acc), np.ones(c, acc)
    cubn.set_num_threads(1)  # (several chunks take the path on one thread)
    try:
        assert nm.plan(_x3(x, ax), np.dtype(acc)) is not None
        ops = {
            "moments": lambda: cubn.moments(x, axes),
            "training": lambda: cubn.fused_batch_norm(x, g, b, mean, var, data_format=fmt, exponential_avg_factor=0.1),
            "inference": lambda: cubn.fused_batch_norm(x, g, b, mean, var, data_format=fmt, is_training=False),
            "BN+add+ReLU": lambda: cubn.fused_batch_norm(x, g, b, data_format=fmt, activation="relu", side_input=dy),
            "backward": lambda: tuple(cubn.batch_norm_backward(dy, x, g, mean, var, data_format=fmt, activation="relu",
                                                               side_input=x)),
        }
        for name, f in ops.items():
            extra = _peak_beyond_outputs(f)
            assert extra <= bound * x.nbytes, f"{name}: {extra / x.nbytes:.3f}x the input beyond the outputs"
    finally:
        cubn.set_num_threads(None)


@pytest.mark.parametrize("k", range(1, 18))
def test_running_pairwise_is_the_tree(rng, k):
    parts = [rng.standard_normal(5).astype(np.float32) * 10.0 ** rng.integers(-3, 4) for _ in range(k)]
    p = nm._Pairwise()
    for v in parts:
        p.add(v)
    _same(p.total(), nm.tiles._pairwise(list(parts)), k)
