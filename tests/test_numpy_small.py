"""The NumPy backend's small path (``cubn.backends.numpy_small``).

Two checks: the whole-call functions give the primitives' results bit for
bit (the same arithmetic in fewer NumPy calls), and the public ops that take
them agree with float64 formulas of their own on adversarial small inputs.
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from cubn import activations
from cubn._dtypes import acc_dtype
from cubn.backends import numpy_direct
from cubn.backends import numpy_small as ns
from cubn.backends.base import Affine, Fold, MovingUpdate, RawAffine
from cubn.backends.numpy_backend import NumpyBackend

from conftest import BF16

DTYPES = [np.float16, np.float32, np.float64] + ([BF16] if BF16 is not None else [])
SHAPES = [(8, 16, 1), (4, 3, 5), (1, 7, 1), (2, 1, 9), (16, 4, 2)]


def _same(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    assert np.array_equal(a.astype(np.float64), b.astype(np.float64), equal_nan=True), what


def _adversarial(rng, shape, dt, kind):
    x3 = rng.standard_normal(shape) * 3
    if kind == "offset":
        x3 += 1e4
    elif kind == "nonfinite":
        x3[0, 0, 0] = np.inf  # a channel's pivot
        x3[-1, -1, -1] = np.nan
        if shape[1] > 2:
            x3[:, 2, :] = 5.0  # all equal
    return x3.astype(dt)


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["plain", "offset", "nonfinite"])
def test_whole_calls_are_the_primitives_bit_for_bit(rng, dt, shape, kind):
    be = NumpyBackend()
    acc = acc_dtype(dt)
    c = shape[1]
    x3 = _adversarial(rng, shape, dt, kind)
    dy = rng.standard_normal(shape).astype(dt)
    side = rng.standard_normal(shape).astype(dt)
    g, b = rng.uniform(0.5, 2, c).astype(acc), rng.standard_normal(c).astype(acc)
    if kind == "nonfinite":
        g[0] = np.nan
    mi, vi = rng.standard_normal(c).astype(acc), rng.uniform(1, 2, c).astype(acc)
    with np.errstate(all="ignore"):
        st = be.finalize(be.welford_partials(None, x3, acc), acc, None)
        m, v = ns.moments(x3, acc)
        _same(m, st.mean, "mean")
        _same(v, st.var, "var")
        for act in (None, activations.get("relu", "t"), activations.get("tanh", "t")):
            for gg, bb, sd in ((g, b, None), (None, None, side), (None, b, None), (g, None, side)):
                mo, vo = mi.copy(), vi.copy()
                st = be.finalize(be.welford_partials(None, x3, acc), acc, Fold(1e-3, gg, bb),
                                 MovingUpdate(a=0.1, bessel=True, mean_in=mo, mean_out=mo, var_in=vo, var_out=vo))
                y_ref = be.normalize(None, x3, Affine(st.mean, st.scale, st.shift), sd, act, acc, x3.dtype)
                mo2, vo2 = mi.copy(), vi.copy()
                y, st2 = ns.train(x3, acc, 1e-3, gg, bb, sd, act, x3.dtype,
                                  MovingUpdate(a=0.1, bessel=True, mean_in=mo2, mean_out=mo2, var_in=vo2, var_out=vo2))
                _same(y, y_ref, "y")
                _same(mo2, mo, "moving mean")
                _same(vo2, vo, "moving variance")
                for f in ("count", "mean", "var", "invstd", "scale", "shift", "gcoef", "hcoef"):
                    _same(getattr(st2, f), getattr(st, f), f)
                nm, nv = np.empty(c, acc), np.empty(c, acc)
                be.finalize(be.welford_partials(None, x3, acc), acc, Fold(1e-3, gg, bb),
                            MovingUpdate(a=0.1, bessel=True, mean_in=mi, mean_out=nm, var_in=vi, var_out=nv))
                y3, m3, v3 = ns.fused_train(x3, acc, 1e-3, gg, bb, sd, act, 0.1, mi, vi)
                _same(y3, y_ref, "fused y")
                _same(m3, nm, "fused mean")
                _same(v3, nv, "fused variance")
                yi_ref = be.normalize(None, x3, RawAffine(mi, vi, gg, bb, 1e-3), sd, act, acc, x3.dtype)
                _same(ns.infer(x3, acc, 1e-3, gg, bb, mi, vi, sd, act), yi_ref, "inference y")
                for training in (True, False):
                    stb = st if training else be.finalize(None, acc, Fold(1e-3, gg, bb), given=(mi, vi))
                    if not training:
                        gs = ns.given_stats(mi, vi, 1e-3, gg, bb, acc)
                        for f in ("mean", "var", "invstd", "scale", "shift", "gcoef", "hcoef"):
                            _same(getattr(gs, f), getattr(stb, f), f"given {f}")
                    aff = Affine(stb.mean, stb.scale, stb.shift)
                    co = be.backward_finalize(be.backward_partials(None, dy, x3, sd, aff, act, acc), stb, acc, training)
                    dx, ds = be.backward_apply(None, dy, x3, sd, aff, act, co, None, acc, True, x3.dtype, x3.dtype)
                    got = ns.backward(dy, x3, sd, stb, act, acc, training, True, x3.dtype, x3.dtype)
                    _same(got[0], dx, "dx")
                    _same(got[1], co.dgamma, "dgamma")
                    _same(got[2], co.dbeta, "dbeta")
                    _same(got[3], ds, "dside")


@pytest.fixture
def small_calls(monkeypatch):
    """Counts the calls of the small path's entry points, with the ops' direct route to the compiled
    loops off (it takes float32/float64 calls past this path: tests/test_numpy_direct.py)."""
    with numpy_direct.disabled():
        yield from _counting(monkeypatch)


def _counting(monkeypatch):
    count = {}
    for name in ("moments", "train", "fused_train", "infer", "backward"):
        real = getattr(ns, name)

        def spy(*a, _real=real, _name=name, **k):
            count[_name] = count.get(_name, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(ns, name, spy)
    yield count


def _ref(x, g, b, eps):
    x = x.astype(np.float64)
    mean, var = x.mean(0), x.var(0)
    return mean, var, (x - mean) / np.sqrt(var + eps) * g + b


@pytest.mark.parametrize("kind", ["offset", "nan channel", "all equal", "batch of one"])
def test_small_ops_match_float64_formulas(rng, small_calls, kind):
    n, c = (1, 6) if kind == "batch of one" else (8, 6)
    x = rng.standard_normal((n, c)) * 2
    if kind == "offset":
        x += 1e4
    elif kind == "nan channel":
        x[3, 1] = np.nan
    elif kind == "all equal":
        x[:, 2] = 7.25
    x = x.astype(np.float32)
    g, b = rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    rm, rv = rng.standard_normal(c).astype(np.float32), rng.uniform(1, 2, c).astype(np.float32)
    mean, var, y_ref = _ref(x, g, b, 1e-3)
    tol = dict(rtol=3e-5, atol=3e-5 * (1e4 if kind == "offset" else 1))
    # at an offset of 1e4 the float32 mean itself is off by up to half an ulp (5e-4): y by that times 1/std
    ytol = dict(rtol=1e-4, atol=2e-3 if kind == "offset" else 1e-4)
    m, v = cubn.moments(x, [0])
    np.testing.assert_allclose(m, mean, **tol)
    np.testing.assert_allclose(v, var, rtol=3e-5, atol=3e-5)
    y, bm, bv = cubn.fused_batch_norm(x, g, b, rm, rv, 1e-3, exponential_avg_factor=0.25)
    np.testing.assert_allclose(y, y_ref, **ytol)
    np.testing.assert_allclose(bm, rm - (rm - mean) * 0.25, **tol)
    np.testing.assert_allclose(bv, rv - (rv - var * n / max(n - 1, 1)) * 0.25, rtol=1e-4, atol=1e-4)
    yi = cubn.fused_batch_norm(x, g, b, rm, rv, 1e-3, is_training=False, activation="relu")[0]
    yi_ref = np.maximum((x.astype(np.float64) - rm) / np.sqrt(rv + 1e-3) * g + b, 0)
    np.testing.assert_allclose(yi, yi_ref, rtol=1e-5, atol=1e-5 * (1e4 if kind == "offset" else 1))
    # the backward of the training forward, float64
    # The reference takes the statistics the kernel is given: at an offset of
    # 1e4 the float32 mean is half an ulp (5e-4) from the float64 one, which
    # moves dx by up to g/var * 5e-4 * dgamma/n, past any fair tolerance.
    dy = rng.standard_normal((n, c)).astype(np.float32)
    m32, v32 = mean.astype(np.float32), var.astype(np.float32)
    grads = cubn.batch_norm_backward(dy, x, g, m32, v32, 1e-3, offset=b)
    xd, dyd = x.astype(np.float64), dy.astype(np.float64)
    xhat = (xd - m32.astype(np.float64)) / np.sqrt(v32.astype(np.float64) + 1e-3)
    dbeta, dgamma = dyd.sum(0), (dyd * xhat).sum(0)
    dx = g / np.sqrt(v32.astype(np.float64) + 1e-3) * (dyd - dbeta / n - xhat * dgamma / n)
    np.testing.assert_allclose(grads.dx, dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads.doffset, dbeta, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads.dscale, dgamma, rtol=1e-3, atol=1e-3)
    assert small_calls == {"moments": 1, "fused_train": 1, "infer": 1, "backward": 1}


def test_layer_calls_take_the_small_path_and_follow_the_state(rng, small_calls):
    x = (rng.standard_normal((10, 4)) + 3).astype(np.float32)
    bn = cubn.BatchNorm(scale=True, decay=0.5, updates_collections=None)
    for _ in range(3):
        bn(x)
    bn.variables["gamma"][...] = 2.0  # in place: the next call reads it
    bn.variables["moving_mean"][...] = 1.0
    bn.epsilon = 0.25                 # assigned: the layer's plans are dropped
    mm = bn.variables["moving_mean"].astype(np.float64)
    mean, var, y_ref = _ref(x, 2.0, 0.0, 0.25)
    y = bn(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.variables["moving_mean"], mm - (mm - mean) * 0.5, rtol=1e-6, atol=1e-6)
    for _ in range(2):
        y = bn(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert small_calls["train"] == 6
    assert bn.num_batches_tracked == 6


def test_inputs_the_ordinary_checks_convert_reach_the_same_results(rng):
    x = (rng.standard_normal((8, 5)) * 4 + 100).astype(np.float32)
    g = rng.uniform(0.5, 2, 5).astype(np.float32)
    want = cubn.fused_batch_norm(x, g, None)
    swapped = x.astype(x.dtype.newbyteorder())
    strided = np.repeat(x, 2, axis=1)[:, ::2]
    raw = np.zeros(x.nbytes + 2, np.uint8)
    misaligned = raw[2:].view(np.float32).reshape(x.shape)
    misaligned[...] = x
    for xi in (swapped, strided, misaligned):
        got = cubn.fused_batch_norm(xi, g, None)
        for a, w in zip(got, want):
            np.testing.assert_array_equal(a, w)
    m, v = cubn.moments(np.zeros((0, 3), np.float32), [0])  # nothing to reduce: NaN
    assert np.isnan(m).all() and np.isnan(v).all()
