"""The NumPy backend's compiled loops (``cubn.backends.numpy_native``).

Each primitive the loops take -- statistics, normalization (ReLU, residual
add), the backward's sums and apply -- against float64 formulas written
here, and against the NumPy code they replace (``numpy_native.disabled()``),
on the three layouts (rows, short runs, long runs in pieces) and adversarial
data; results bitwise independent of the thread count; the build cache's
faults (a truncated object, no compiler, ``CUBN_NATIVE=0``).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cubn
from cubn import activations
from cubn.backends import numpy_native as native
from cubn.backends.base import Affine, BackwardCoeffs
from cubn.backends.numpy_backend import NumpyBackend

HAVE_CXX = shutil.which(os.environ.get("CXX") or "c++") is not None or shutil.which("g++") is not None
needs_loops = pytest.mark.skipif(not (HAVE_CXX and native.build()), reason=f"compiled loops: {native.status()}")

# (outer, C, inner): rows (channels last) with C small, odd and wide, rows left over;
# short runs (NCHW 7x7; shorter than one vector of lanes, one lane over, whole
# vectors); many short runs (a lane's sum across runs must stay two-level:
# added straight across 20000 runs, quantized float64 variances were 400 ulps
# off); long runs; runs cut in pieces
SHAPES = [
    (3001, 3, 1), (1537, 64, 1), (129, 257, 1), (20, 6, 97), (16, 48, 49), (700, 5, 3), (40, 30, 9), (30, 20, 24),
    (20000, 2, 3), (5, 3, 4099), (2, 3, 70001),
]
DTYPES = [np.float32, np.float64]
KINDS = ["plain", "offset 1e4", "offset 1e7", "quantized", "nonfinite", "equal channel", "far pivot"]


def _data(rng, shape, dt, kind):
    x = rng.standard_normal(shape) * 2
    if kind == "offset 1e4":
        x += 1e4
    elif kind == "offset 1e7":
        x = x * 0.5 + 1e7
    elif kind == "quantized":
        x = np.round(x * 4) / 4 + 300
    elif kind == "nonfinite":
        x[-1, 0, -1] = np.nan
        x[0, 1, 0] = np.inf  # a channel's first element: its pivot
        if shape[1] > 2:
            x[shape[0] // 2, 2, 0] = -np.inf
        if shape[1] > 3:  # mid-run: inside the overlap of a short run's last vector step
            x[1, 3, shape[2] // 2] = np.nan
    elif kind == "equal channel":
        x[:, 1, :] = 7.25
    elif kind == "far pivot":
        x[: max(1, shape[0] // 8)] += 1e5  # the first rows (the pivot's sample) far from the rest
    return x.astype(dt)


def _truth(x3):
    x = x3.astype(np.longdouble)
    with np.errstate(invalid="ignore"):
        m = x.mean(axis=(0, 2))
        v = ((x - m[None, :, None]) ** 2).mean(axis=(0, 2))
    return m.astype(np.float64), v.astype(np.float64)


def _tol(dt):
    return dict(rtol=2e-6, atol=0) if dt == np.float32 else dict(rtol=1e-12, atol=0)


def _assert_close(actual, expected, scale, dt, what):
    """Close relative to ``scale`` (per channel); NaN exactly where expected, Inf equal."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    bad = ~np.isfinite(expected)
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), (what, actual[bad], expected[bad])
    np.testing.assert_array_equal(actual[bad & ~np.isnan(expected)], expected[bad & ~np.isnan(expected)], what)
    ok = ~bad
    eps = np.finfo(dt).eps
    err = np.abs(actual[ok] - expected[ok]) / np.maximum(np.broadcast_to(scale, actual.shape)[ok], 1e-300)
    assert err.max(initial=0) <= 64 * eps, (what, err.max(initial=0) / eps)


@needs_loops
def test_loops_are_in_use_wherever_a_compiler_is():
    assert native.available(), native.status()
    assert native.status().startswith("in use")


@needs_loops
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_statistics_match_the_float64_truth_and_the_numpy_code(rng, shape, dt, kind):
    x3 = _data(rng, shape, dt, kind)
    acc = np.dtype(dt)
    assert native.accepts(x3, acc)
    mean, m2 = native.statistics(x3, acc)
    n = shape[0] * shape[2]
    tm, tv = _truth(x3)
    sd = np.sqrt(np.where(np.isfinite(tv), tv, 0))
    # the mean to within a few ulps of its magnitude, the variance a few ulps of itself
    _assert_close(mean, tm, np.abs(tm) + sd, dt, "mean")
    _assert_close(m2 / n, tv, np.where(tv > 0, tv, 1), dt, "var")
    with native.disabled():
        p = NumpyBackend().welford_partials(None, x3, acc)
    st = NumpyBackend().finalize(p, acc, None)
    assert np.array_equal(np.isnan(st.mean), np.isnan(mean)) and np.array_equal(np.isnan(st.var), np.isnan(m2))
    fin = np.isfinite(st.var)
    np.testing.assert_allclose(m2[fin] / n, st.var[fin], **dict(rtol=1e-5 if dt == np.float32 else 1e-11, atol=0))


@needs_loops
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("act, side", [(None, False), ("relu", False), ("relu", True), (None, True)])
def test_normalize_matches_its_formula(rng, shape, dt, act, side):
    acc = np.dtype(dt)
    c = shape[1]
    x3 = _data(rng, shape, dt, "offset 1e4")
    x3[0, 0, 0] = np.nan
    s3 = rng.standard_normal(shape).astype(dt) if side else None
    m = (1e4 + rng.standard_normal(c)).astype(dt)
    k = rng.uniform(-2, 2, c).astype(dt)
    h = rng.standard_normal(c).astype(dt)
    a = activations.get(act, "test")
    y = NumpyBackend().normalize(None, x3, Affine(m, k, h), s3, a, acc, acc)
    xd = x3.astype(np.float64)
    z = (xd - m[None, :, None]) * k[None, :, None] + h[None, :, None]
    if side:
        z += s3
    if act:
        z = np.where(z < 0, 0, z)  # NaN stays NaN
    scale = np.abs(k)[None, :, None] * 4 + np.abs(z) + 1
    _assert_close(y, z, scale, dt, "y")
    with native.disabled():
        y0 = NumpyBackend().normalize(None, x3, Affine(m, k, h), s3, a, acc, acc)
    _assert_close(y, y0, scale, dt, "y against the NumPy code")


@needs_loops
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("act, side", [(None, False), ("relu", False), ("relu", True)])
def test_backward_sums_and_apply_match_their_formulas(rng, shape, dt, act, side):
    acc = np.dtype(dt)
    c = shape[1]
    n = shape[0] * shape[2]
    x3 = _data(rng, shape, dt, "offset 1e4")
    dy3 = rng.standard_normal(shape).astype(dt)
    dy3[-1, -1, -1] = np.inf  # Inf times a ReLU mask of 0 is NaN, as np.multiply gives
    s3 = rng.standard_normal(shape).astype(dt) if side else None
    tm, tv = _truth(x3)
    m = tm.astype(dt)
    inv = (1 / np.sqrt(tv + 1e-3)).astype(dt)
    k = (inv * rng.uniform(0.5, 2, c)).astype(dt)
    h = rng.standard_normal(c).astype(dt)
    a = activations.get(act, "test")
    be = NumpyBackend()
    sums = be.backward_partials(None, dy3, x3, s3, Affine(m, k, h), a, acc)
    xd, dyd = x3.astype(np.float64), dy3.astype(np.float64)
    xm = xd - m.astype(np.float64)[None, :, None]
    if act:
        # the ReLU's mask is the forward's: where the (compiled) normalization gave y > 0 (a float64
        # pre-activation could fall on the other side of 0 where it is within a rounding of it)
        mask = be.normalize(None, x3, Affine(m, k, h), s3, a, acc, acc) > 0
        with np.errstate(invalid="ignore"):
            dyp = dyd * mask
    else:
        dyp = dyd
    with np.errstate(invalid="ignore"):
        s1, s2 = dyp.sum(axis=(0, 2)), (dyp * xm).sum(axis=(0, 2))
    absum = np.abs(np.where(np.isfinite(dyp), dyp, 0)).sum(axis=(0, 2))
    _assert_close(sums.s1[0], s1, absum + 1, dt, "s1")
    _assert_close(sums.s2[0], s2, (absum + 1) * (np.abs(xm).max(axis=(0, 2)) + 1), dt, "s2")
    with native.disabled():
        ref = be.backward_partials(None, dy3, x3, s3, Affine(m, k, h), a, acc)
    # the NumPy code's mask may differ from the loops' at pre-activations within a rounding of 0
    fin = np.isfinite(s1)
    np.testing.assert_allclose(sums.s1[0][fin], ref.s1[0][fin], rtol=0, atol=4 * np.abs(dyd[np.isfinite(dyd)]).max())
    assert np.array_equal(np.isfinite(sums.s1[0]), np.isfinite(ref.s1[0]))
    k1 = (rng.standard_normal(c) * 0.1).astype(dt)
    k2 = (rng.standard_normal(c) * 0.1).astype(dt)
    coeffs = BackwardCoeffs(np.zeros(c, dt), np.zeros(c, dt), k1, k2)
    dx, dside = be.backward_apply(None, dy3, x3, s3, Affine(m, k, h), a, coeffs, None, acc, side, acc, acc)
    want = dyp * k[None, :, None] - (xm * k2[None, :, None] + k1[None, :, None])
    scale = np.abs(dyp * k[None, :, None]) + np.abs(xm * k2[None, :, None]) + np.abs(k1)[None, :, None] + 1
    _assert_close(dx, want, np.where(np.isfinite(scale), scale, 1), dt, "dx")
    if side:
        _assert_close(dside, dyp, np.abs(np.where(np.isfinite(dyp), dyp, 0)) + 1, dt, "dside")


@needs_loops
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("act, side", [(None, False), ("relu", True)])
def test_streamed_outputs_equal_plain_stores(rng, monkeypatch, shape, dt, act, side):
    """Large outputs are written with non-temporal stores, a vector at a time: the same values, to the
    last bit, as the plain loops write, into aligned and misaligned outputs (here every size streams)."""
    acc = np.dtype(dt)
    c = shape[1]
    x3 = _data(rng, shape, dt, "nonfinite")
    dy3 = rng.standard_normal(shape).astype(dt)
    s3 = rng.standard_normal(shape).astype(dt) if side else None
    m, k, h, k1, k2 = (rng.standard_normal(c).astype(dt) for _ in range(5))
    a = activations.get(act, "test")
    outputs = {}
    for stream in (False, True):
        monkeypatch.setattr(native, "STREAM_BYTES", 0 if stream else 1 << 62)
        for skew in (0, 1, 3):  # the outputs' first element this many elements past an aligned start
            bufs = [np.full(x3.size + skew, -99, dt) for _ in range(3)]
            y, dx, ds = (b[skew:].reshape(shape) for b in bufs)
            native.normalize(x3, s3, y, m, k, h, a, acc)
            native.backward_apply(dy3, x3, s3, dx, ds if side else None, (m, k, h), m, k1, k2, a, acc)
            assert all((b[:skew] == -99).all() for b in bufs)  # nothing written before the outputs
            outputs[stream, skew] = (y, dx, ds if side else None)
    for skew in (0, 1, 3):
        for plain, streamed in zip(outputs[False, skew], outputs[True, skew]):
            if plain is not None:
                assert np.array_equal(plain, streamed, equal_nan=True)


@needs_loops
@pytest.mark.parametrize("layout", ["rows", "short", "runs"])
def test_results_do_not_depend_on_the_thread_count(rng, layout):
    shape = {"rows": (40000, 24, 1), "short": (600, 40, 49), "runs": (3, 5, 200003)}[layout]
    acc = np.dtype(np.float32)
    x3 = (rng.standard_normal(shape) * 3 + 1e3).astype(np.float32)
    dy3 = rng.standard_normal(shape).astype(np.float32)
    c = shape[1]
    aff = Affine(np.full(c, 1e3, np.float32), rng.uniform(0.5, 2, c).astype(np.float32),
                 rng.standard_normal(c).astype(np.float32))
    relu = activations.get("relu", "test")
    be = NumpyBackend()
    results = []
    old = cubn.get_num_threads()
    try:
        for threads in (1, 2, 3):
            cubn.set_num_threads(threads)
            st = native.statistics(x3, acc)
            sums = be.backward_partials(None, dy3, x3, None, aff, relu, acc)
            y = be.normalize(None, x3, aff, None, relu, acc, acc)
            results.append((*st, sums.s1, sums.s2, y))
    finally:
        cubn.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


def test_inputs_the_loops_do_not_take_fall_back(rng):
    x = (rng.standard_normal((64, 300)) + 5).astype(np.float32)
    acc = np.dtype(np.float32)
    assert not native.accepts(x.T.reshape(300, 64, 1)[:, :, :], acc) or x.T.flags.c_contiguous
    assert not native.accepts(x.astype(">f4").reshape(64, 300, 1), acc)  # byte order: the NumPy code
    assert not native.accepts(x.astype(np.float16).reshape(64, 300, 1), np.dtype(np.float32))
    # small: the loops with the direct calls (a C call is then cheaper than a few ufuncs), else numpy_small's
    assert native.accepts(x[:8, :8].copy().reshape(8, 8, 1), acc) == (native._calls is not None)
    assert not native.accepts(np.empty((0, 8, 1), np.float32), acc)  # empty: the NumPy code, always
    # and the public ops agree on them with the loops' inputs
    for v in (x.T, x.astype(">f4"), x[:, ::2]):
        m, var = cubn.moments(v, [0])
        xd = np.asarray(v, np.float64)
        np.testing.assert_allclose(m, xd.mean(0), rtol=1e-6)
        np.testing.assert_allclose(var, xd.var(0), rtol=1e-5)


@needs_loops
@pytest.mark.parametrize("fmt, shape", [("NHWC", (16, 9, 9, 24)), ("NCHW", (12, 16, 7, 7)), ("NCHW", (2, 3, 64, 64)),
                                         ("NC", (4096, 40))])
def test_public_ops_agree_with_and_without_the_loops(rng, fmt, shape):
    x = (rng.standard_normal(shape) * 2 + 1e4).astype(np.float32)
    c = shape[1] if fmt == "NCHW" else shape[-1]
    df = "NCHW" if fmt == "NCHW" else "NHWC"
    g, b = rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    side = rng.standard_normal(shape).astype(np.float32)

    def run():
        y, bm, bv = cubn.fused_batch_norm(x, g, b, data_format=df)
        yr = cubn.fused_batch_norm(x, g, b, data_format=df, side_input=side, activation="relu")[0]
        yi = cubn.fused_batch_norm(x, g, b, bm * 0 + 1e4, bv * 0 + 4, data_format=df, is_training=False,
                                   side_input=side, activation="relu")[0]
        st = cubn.moments(x, [0, 2, 3] if fmt == "NCHW" else list(range(len(shape) - 1)))
        gr = cubn.batch_norm_backward(dy, x, g, bm.astype(np.float32), (bv * 0 + st[1]).astype(np.float32), 1e-3,
                                      offset=b, data_format=df)
        return y, yr, yi, bm, bv, gr.dx, gr.dscale, gr.doffset

    with_loops = run()
    with native.disabled():
        without = run()
    for a, b_, what in zip(with_loops, without, ["y", "y relu", "y inference", "mean", "var", "dx", "dscale", "doffset"]):
        a, b_ = np.asarray(a, np.float64), np.asarray(b_, np.float64)
        np.testing.assert_allclose(a, b_, rtol=2e-4, atol=2e-4 * (np.abs(b_).max() + 1), err_msg=what)


@needs_loops
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
def test_fold_and_moving_round_as_the_numpy_formulas(rng, dt):
    """The training forward's per-channel steps in C, bit for bit the NumPy formulas (one rounding per
    operation, no fused multiply-add): invstd, scale, shift; the Bessel-corrected, blended moving statistics."""
    from cubn.backends import numpy_small

    acc = np.dtype(dt)
    c = 64
    lib = native._lib
    for trial in range(40):
        m2 = np.abs(rng.standard_normal(c)) * 10.0 ** rng.integers(-6, 6, c)
        m2[:3] = (0.0, 1e-30, np.inf)
        m2 = m2.astype(dt)
        n = int(rng.choice([1, 2, 3, 1000, (1 << 25) + 1, 123457]))
        eps = float(rng.choice([0.0, 1e-3, 1e-5, 0.1]))
        gamma = None if trial % 4 == 0 else rng.standard_normal(c).astype(dt)
        beta = None if trial % 3 == 0 else rng.standard_normal(c).astype(dt)
        if gamma is not None:
            gamma[:3] = (np.inf, np.nan, -0.0)
        if beta is not None:
            beta[3:5] = (-0.0, np.nan)
        with np.errstate(all="ignore"):
            var_ref = np.divide(m2, n)
            want = numpy_small._fold(var_ref, eps, gamma, beta, acc)
        var = m2.copy()
        invstd, shift = np.empty(c, acc), np.empty(c, acc)
        scale = invstd if gamma is None else np.empty(c, acc)
        lib["fold", acc](c, n, native.pointer(var), eps, native._opt(gamma), native._opt(beta),
                         native.pointer(invstd), native.pointer(scale), native.pointer(shift))
        for got, ref, what in zip((var, invstd, scale, shift), (var_ref, *want), ("var", "invstd", "scale", "shift")):
            assert got.tobytes() == np.asarray(ref, acc).tobytes(), (what, trial)
        mean = rng.standard_normal(c).astype(dt) * 100
        a = float(rng.choice([0.0, 0.1, 0.3, 1.0]))
        bessel = bool(trial % 2)
        mean_in = rng.standard_normal(c).astype(dt) if trial % 5 else None
        var_in = np.abs(rng.standard_normal(c)).astype(dt) if trial % 5 else None
        with np.errstate(all="ignore"):
            ref_m, ref_v = numpy_small._moving(mean, var, n, acc, a, bessel, mean_in, None, var_in, None)
        out_m = mean_in.copy() if mean_in is not None else np.empty(c, acc)  # in place where there is an in
        out_v = var_in.copy() if var_in is not None else np.empty(c, acc)
        lib["moving", acc](c, n, a, int(bessel), native.pointer(mean), native.pointer(var),
                           native._opt(out_m if mean_in is not None else None),
                           native._opt(out_v if var_in is not None else None), native.pointer(out_m),
                           native.pointer(out_v))
        assert out_m.tobytes() == ref_m.tobytes() and out_v.tobytes() == ref_v.tobytes(), trial


@needs_loops
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
def test_backward_coefficients_round_as_the_numpy_formulas(rng, dt):
    from cubn.backends import numpy_small
    from cubn.backends.base import Stats

    acc = np.dtype(dt)
    c = 48
    for trial in range(30):
        vec = [(rng.standard_normal(c) * 10.0 ** rng.integers(-4, 4, c)).astype(dt) for _ in range(7)]
        s1, s2, gcoef, hcoef, scale, invstd, _ = vec
        count = rng.choice([0.0, 1.0, 3.0, 1000.0, 2.0 ** 25 + 1], c).astype(dt)
        s1[:2] = (np.inf, np.nan)
        gcoef[2] = -0.0
        stats = Stats(count, None, None, invstd, scale, None, gcoef, hcoef)
        training = bool(trial % 2)
        with np.errstate(all="ignore"):
            want = numpy_small._coefficients(stats, s1, s2, training)
        got = [np.empty(c, acc) for _ in range(3)]
        native._lib["bwd_coefficients", acc](c, int(training), *(native.pointer(v) for v in (
            s1, s2, gcoef, hcoef, count, scale, invstd, *got)))
        for g_, w, what in zip(got, want, ("dgamma", "k1", "k2")):
            assert g_.tobytes() == np.asarray(w, acc).tobytes(), (what, trial)


@needs_loops
@pytest.mark.parametrize("shape, fmt", [((40000, 24), "NHWC"), ((300, 40, 7, 7), "NCHW"), ((3, 5, 200003), "NCHW"),
                                        ((70, 9, 9, 64), "NHWC")], ids=str)
def test_training_forward_does_not_depend_on_the_thread_count(rng, shape, fmt):
    """One thread runs the whole training forward as one C call; more threads run its parts on the pool:
    the outputs, the batch statistics and a layer's moving statistics are the same to the last bit."""
    x = (rng.standard_normal(shape) * 3 + 1e3).astype(np.float32)
    side = rng.standard_normal(shape).astype(np.float32)
    c = shape[1] if fmt == "NCHW" else shape[-1]
    g, b = rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    rm, rv = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    results = []
    old = cubn.get_num_threads()
    try:
        for threads in (1, 2, 3):
            cubn.set_num_threads(threads)
            out = list(cubn.fused_batch_norm(x, g, b, rm, rv, data_format=fmt, exponential_avg_factor=0.3))
            out += cubn.fused_batch_norm(x, g, None, data_format=fmt, side_input=side, activation="relu")
            out.append(cubn.fused_batch_norm(x, g, b, rm, rv, data_format=fmt, is_training=False)[0])
            out.append(cubn.fused_batch_norm(x, None, b, rm, rv, data_format=fmt, is_training=False,
                                             side_input=side, activation="relu")[0])
            bn = cubn.BatchNorm(scale=True, decay=0.9, data_format=fmt, updates_collections=None,
                                param_initializers={"gamma": g, "beta": b})
            for _ in range(2):
                out.append(bn(x, is_training=True))
            out.append(bn.backward(side))
            out += [bn.gradients["gamma"], bn.gradients["beta"]]
            grads = cubn.batch_norm_backward(side, x, g, rm, rv, 1e-3, offset=b, data_format=fmt, activation="relu",
                                             side_input=side)
            out += [grads.dx, grads.dscale, grads.doffset]
            out += [bn.variables["moving_mean"], bn.variables["moving_variance"]]
            results.append([np.asarray(o).copy() for o in out])
    finally:
        cubn.set_num_threads(old)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert a.tobytes() == b_.tobytes()


def _child(code, env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)


_CHILD = """
    import numpy as np, cubn
    from cubn.backends import numpy_native as native
    x = (np.random.default_rng(1).standard_normal((5000, 8)) + 1e3).astype(np.float32)
    m, v = cubn.moments(x, [0])
    xd = x.astype(np.float64)
    assert np.allclose(m, xd.mean(0), rtol=1e-6) and np.allclose(v, xd.var(0), rtol=1e-5), (m, v)
    print(native.status())
"""


@needs_loops
def test_a_damaged_cached_build_is_rebuilt(tmp_path):
    env = dict(os.environ, CUBN_CACHE_DIR=str(tmp_path))
    first = _child(_CHILD, env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().startswith("in use")
    for pattern in ("native_loops-*.so", "native_calls-*.so"):  # the loops, then the direct-call extension
        objects = list(pathlib.Path(tmp_path, "native").glob(pattern))
        if pattern.startswith("native_calls") and "direct calls" not in first.stdout:
            continue  # not built here (its reason is in the status line, checked where it is built)
        assert len(objects) == 1, (pattern, objects)
        data = objects[0].read_bytes()
        objects[0].write_bytes(data[: len(data) // 3])  # truncated, as a full disk or a killed copy leaves it
        second = _child(_CHILD, env)
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == first.stdout.strip()
        assert objects[0].read_bytes() == data or len(objects[0].read_bytes()) > len(data) // 3


def test_without_a_compiler_or_when_disabled_the_numpy_code_runs(tmp_path):
    env = dict(os.environ, CUBN_CACHE_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"),
               PATH=str(tmp_path))
    out = _child(_CHILD, env)
    assert out.returncode == 0, out.stderr
    assert "not in use" in out.stdout and "compiler" in out.stdout
    out = _child(_CHILD, dict(os.environ, CUBN_CACHE_DIR=str(tmp_path), CUBN_NATIVE="0"))
    assert out.returncode == 0, out.stderr
    assert "not in use: disabled by CUBN_NATIVE=0" in out.stdout
    assert not list(pathlib.Path(tmp_path).glob("native/*.so"))


@needs_loops
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(3001, 3, 1), (16, 48, 49), (5, 3, 4099)], ids=str)
def test_a_pivot_far_from_the_mean_costs_no_precision(rng, monkeypatch, shape, dt):
    # Q - S^2/n about a pivot 1e6 standard deviations away cancels all but a few digits of M2
    # (1e-4 relative in double); the statistics are summed again about the mean found
    x3 = (rng.standard_normal(shape) * 2 + 50).astype(dt)
    tm, tv = _truth(x3)
    far = tm + 1e6 * np.sqrt(tv)
    monkeypatch.setattr(native, "_pivots", lambda x, width, acc: np.tile(far, width // shape[1]))
    mean, m2 = native.statistics(x3, np.dtype(dt))
    _assert_close(mean, tm, np.abs(tm) + np.sqrt(tv), dt, "mean")
    _assert_close(m2 / (shape[0] * shape[2]), tv, tv, dt, "var")


# -- direct calls (native_calls.c) ------------------------------------------------------------------
HAVE_PYTHON_H = (pathlib.Path(__import__("sysconfig").get_paths()["include"]) / "Python.h").exists()


@needs_loops
def test_direct_calls_are_built_wherever_python_headers_are():
    if not HAVE_PYTHON_H:
        assert native._calls is None and "Python.h" in native.status()
        return
    assert native._calls is not None, native.status()
    assert "direct calls" in native.status()


def _serial_outputs(rng, shape, dt):
    """Every one-thread C call (statistics, training forward with moving statistics, inference, backward) on
    fresh data with a NaN channel and an offset, and their outputs."""
    acc = np.dtype(dt)
    c = shape[1]
    x3 = (rng.standard_normal(shape) * 2 + 1e3).astype(dt)
    x3[0, c - 1, 0] = np.nan
    dy3 = rng.standard_normal(shape).astype(dt)
    side3 = rng.standard_normal(shape).astype(dt)
    g, b, mi, vi = (rng.uniform(0.5, 2, c).astype(dt) for _ in range(4))
    mo, vo = np.empty(c, dt), np.empty(c, dt)
    out = list(native.statistics(x3, acc))
    out += [o for o in native.forward(x3, side3, activations.get("relu", "t"), acc, 1e-3, g, b, True, 0.3, True,
                                      mi, vi, mo, vo) if o is not None] + [mo, vo]
    out.append(native.infer(x3, side3, None, acc, 1e-3, g, b, mi, vi))
    dx3, ds3 = np.empty_like(x3), np.empty_like(x3)
    st = type("S", (), dict(mean=out[0], scale=g, shift=b, gcoef=vi, hcoef=mi, count=np.full(c, 7.0, dt),
                            invstd=g))()
    out += list(native.backward(dy3, x3, side3, dx3, ds3, st, activations.get("relu", "t"), acc, True)) + [dx3, ds3]
    return out


@needs_loops
@pytest.mark.skipif(not HAVE_PYTHON_H, reason="no Python headers: the ctypes calls are the only ones")
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(200, 24, 1), (30, 10, 49), (3, 2, 5000), (8, 16, 1)], ids=str)
def test_direct_calls_give_the_ctypes_calls_results(rng, monkeypatch, shape, dt):
    """The extension passes the same arguments as the ctypes calls: the same bits, every output."""
    assert native._calls is not None, native.status()
    seed = int(rng.integers(1 << 31))
    direct = _serial_outputs(np.random.default_rng(seed), shape, dt)
    monkeypatch.setattr(native, "_calls", None)
    via_ctypes = _serial_outputs(np.random.default_rng(seed), shape, dt)
    assert len(direct) == len(via_ctypes) == 15
    for k, (a, b) in enumerate(zip(direct, via_ctypes)):
        assert a.tobytes() == b.tobytes(), k


@needs_loops
@pytest.mark.skipif(not HAVE_PYTHON_H, reason="no Python headers: the ctypes calls are the only ones")
def test_direct_calls_reject_what_is_not_an_array():
    calls = native._calls
    assert calls is not None, native.status()
    x = np.zeros((8, 16, 1), np.float32)
    m = np.zeros(16, np.float32)
    block = native._plan_block(8, 16, 1, 4)
    with pytest.raises(TypeError, match="NumPy array or None, got list"):
        calls.stats(0, [0.0] * 128, block[1], 1e4, m, m)
    with pytest.raises(TypeError, match="takes 6 arguments"):
        calls.stats(0, x, block[1], 1e4, m)
    with pytest.raises(ValueError, match="kind is 0"):
        calls.stats(2, x, block[1], 1e4, m, m)
    calls.stats(0, x, block[1], 1e4, m, m.copy())  # and the right call runs


def test_without_python_headers_or_when_disabled_the_ctypes_calls_run(tmp_path):
    env = dict(os.environ, CUBN_CACHE_DIR=str(tmp_path), CUBN_NATIVE_CALLS="0")
    out = _child(_CHILD, env)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("in use"):
        assert "ctypes calls (disabled by CUBN_NATIVE_CALLS=0)" in out.stdout
        assert not list(pathlib.Path(tmp_path).glob("native/native_calls-*"))
    code = ("import sysconfig; real = sysconfig.get_paths; "
            f"sysconfig.get_paths = lambda *a, **k: dict(real(*a, **k), include={str(tmp_path)!r})\n" + textwrap.dedent(_CHILD))
    out = _child(code, dict(os.environ, CUBN_CACHE_DIR=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("in use"):
        assert "ctypes calls (Python's headers (Python.h) are not installed)" in out.stdout
