"""Preprocessing: RunningMoments against the float64 truth,
Standardizer against scikit-learn itself, and the fused image transform
against a NumPy reference (bit for bit), on every backend."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cubn
import reference
from cubn._backend import get_backend
from cubn.preprocessing import NotFittedError, RunningMoments, Standardizer, normalize_images
from conftest import BF16, backend_skip_reason, np_dtype

sklearn_pre = pytest.importorskip("sklearn.preprocessing")
StandardScaler = sklearn_pre.StandardScaler

# scikit-learn's own weighted variance of a constant feature can come out
# slightly negative, and it warns taking its square root: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning:sklearn")


def _float_data(rng, shape, dtype, loc=2.0, spread=3.0):
    return (loc + spread * rng.standard_normal(shape)).astype(np_dtype(dtype))


def _int_data(rng, shape, dtype):
    hi = 256 if dtype == "uint8" else 65536
    return rng.integers(0, hi, shape).astype(dtype)


def _data(rng, shape, dtype, **kw):
    return _int_data(rng, shape, dtype) if dtype.startswith("uint") else _float_data(rng, shape, dtype, **kw)


def _truth(x, axes, w=None):
    """float64 mean / population variance over ``axes`` (w broadcast to x): the shared reference."""
    return reference.moments(x, tuple(np.atleast_1d(axes)), weights=w)


# Relative tolerance of streamed statistics per input dtype (float32
# accumulation for everything but float64).
RTOL = {"uint8": 2e-6, "uint16": 2e-6, "float16": 2e-6, "bfloat16": 2e-6, "float32": 2e-5, "float64": 1e-12}


def _check_stats(rm, backend, x, axes, w=None, dtype="float64"):
    m, v = _truth(x, axes, w)
    got_m, got_v = backend.to_numpy(rm.mean), backend.to_numpy(rm.var)
    scale = max(1.0, float(np.max(np.abs(m))))
    assert np.max(np.abs(got_m - m)) <= RTOL[dtype] * scale * 4, "mean"
    np.testing.assert_allclose(got_v, v, rtol=RTOL[dtype] * 50, atol=RTOL[dtype] * scale * 4, err_msg="var")
    np.testing.assert_allclose(backend.to_numpy(rm.std), np.sqrt(v), rtol=RTOL[dtype] * 50,
                               atol=RTOL[dtype] * scale * 4)


def _splits(rng, n, k):
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(k - 1, n - 1), replace=False)) if n > 1 else []
    return np.split(np.arange(n), cuts)


# ---------------------------------------------------------------------------
# RunningMoments
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("shape,axis", [
    ((37, 5), 0), ((9, 3, 4, 4), (0, 2, 3)), ((6, 4, 5, 3), (0, 1, 2)), ((5, 6, 7), None), ((8, 3, 5), (0, 1)),
])
def test_running_moments_batches(backend, rng, dtype, shape, axis):
    x = _data(rng, shape, dtype)
    rm = RunningMoments(axis=axis)
    assert rm.mean is None and rm.count == 0
    for idx in _splits(rng, shape[0], 4):
        rm.update(backend.asarray(x[idx]))
    axes = tuple(range(len(shape))) if axis is None else ((axis,) if isinstance(axis, int) else axis)
    _check_stats(rm, backend, x, axes, dtype=dtype)
    n = np.prod([shape[a] for a in axes])
    np.testing.assert_array_equal(backend.to_numpy(rm.count), np.full(rm.shape, n, np.float64))
    assert rm.mean.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert rm.shape == tuple(s for a, s in enumerate(shape) if a not in axes)


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
@pytest.mark.parametrize("kind", ["batch", "full", "column"])
def test_running_moments_weighted(backend, rng, dtype, kind):
    shape = (24, 3, 5)
    x = _data(rng, shape, dtype)
    if kind == "batch":
        w = rng.random(shape[0])
        w[rng.integers(shape[0])] = 0.0
        wb = w[:, None, None]
    elif kind == "full":
        w = rng.random(shape) * (rng.random(shape) > 0.3)
        wb = w
    else:
        w = rng.random((shape[0], 1, shape[2]))
        wb = w
    rm = RunningMoments(axis=(0, 2))
    for idx in _splits(rng, shape[0], 3):
        rm.update(backend.asarray(x[idx]), backend.asarray(w[idx]))
    _check_stats(rm, backend, x, (0, 2), wb, dtype=dtype)
    np.testing.assert_allclose(backend.to_numpy(rm.count), np.broadcast_to(wb, shape).sum(axis=(0, 2)), rtol=1e-6)


def test_running_moments_merge(backend, rng):
    x = _float_data(rng, (40, 6), "float64", loc=-7.0)
    parts = [RunningMoments() for _ in range(3)]
    for i, idx in enumerate(_splits(rng, 40, 6)):
        parts[i % 3].update(backend.asarray(x[idx]))
    total = RunningMoments().merge(parts[0]).merge(parts[1])
    total.merge(parts[2]).merge(RunningMoments())  # an empty accumulator changes nothing
    _check_stats(total, backend, x, (0,))
    # merging a copy of itself doubles the counts and keeps mean and variance
    twice = parts[0].copy().merge(parts[0])
    np.testing.assert_allclose(backend.to_numpy(twice.count), 2 * backend.to_numpy(parts[0].count))
    np.testing.assert_allclose(backend.to_numpy(twice.mean), backend.to_numpy(parts[0].mean), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(twice.var), backend.to_numpy(parts[0].var), rtol=1e-12)


def test_running_moments_large_offset(backend, rng):
    """float32 data at 1e4 + N(0, 1): the variance keeps 1e-4 relative accuracy over a stream."""
    x = (1e4 + rng.standard_normal((600, 4))).astype(np.float32)
    rm = RunningMoments()
    for idx in _splits(rng, 600, 12):
        rm.update(backend.asarray(x[idx]))
    _, v = _truth(x, (0,))
    np.testing.assert_allclose(backend.to_numpy(rm.var), v, rtol=1e-4)


def test_running_moments_edge_cases(backend, rng):
    x = _float_data(rng, (10, 4), "float32")
    rm = RunningMoments(axis=0, dtype="float64")
    rm.update(backend.asarray(x[:0]))  # an empty batch fixes shape and device, adds nothing
    assert rm.shape == (4,)
    assert np.isnan(backend.to_numpy(rm.mean)).all() and np.isnan(backend.to_numpy(rm.var)).all()
    rm.update(backend.asarray(x), backend.asarray(np.zeros((10, 1)) + np.array([[0.0, 1, 1, 1]])))
    m = backend.to_numpy(rm.mean)
    assert m.dtype == np.float64 and np.isnan(m[0]) and np.isfinite(m[1:]).all()  # zero total weight: NaN
    rm.reset()
    assert rm.shape is None and rm.var is None
    rm.update(backend.asarray(x[:, :2]))  # after reset a new shape is fine
    assert rm.shape == (2,)


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_running_moments_launches(rng, dtype, emulated_launches):
    """On a kernel backend an update is two launches: the partials, then the merge into the state."""
    names = emulated_launches
    x = _data(rng, (16, 4, 3), dtype)
    rm = RunningMoments(axis=(0, 1))
    with cubn.use_backend("emulated"):
        rm.update(x)
        assert names == ["cubn_moments_cl", "cubn_rm_merge"]
        names.clear()
        rm.update(x, rng.random(16))
        assert len(names) == 2
        names.clear()
        rm.merge(rm.copy())
        assert names == ["cubn_rm_merge"]


def _merge_tree(rng, accs):
    """Merge accumulators pairwise in a random tree."""
    accs = list(accs)
    while len(accs) > 1:
        i, j = sorted(rng.choice(len(accs), size=2, replace=False))
        b = accs.pop(j)
        a = accs.pop(i)
        accs.append(a.merge(b) if rng.random() < 0.5 else b.merge(a))
    return accs[0]


def _property_check(backend_name, seed, n, f, loc, nbatches, weighted, dtype):
    rng = np.random.default_rng(seed)
    x = (loc + rng.standard_normal((n, f)) * rng.uniform(0.1, 10)).astype(dtype)
    w = rng.random(n) * (rng.random(n) > 0.2) if weighted else None
    batches = _splits(rng, n, nbatches)
    order = rng.permutation(len(batches))
    ctx = cubn.use_backend(backend_name)
    with ctx:
        accs = []
        for k in order:
            idx = batches[k]
            acc = RunningMoments(axis=0)
            acc.update(x[idx], None if w is None else w[idx])
            accs.append(acc)
        rm = _merge_tree(rng, accs)
        seq = RunningMoments(axis=0)
        for k in order:
            seq.update(x[batches[k]], None if w is None else w[batches[k]])
    m, v = _truth(x, (0,), None if w is None else w[:, None])
    live = np.isfinite(m)
    scale = max(1.0, abs(loc))
    tol = 1e-12 if dtype == "float64" else 2e-5
    for acc in (rm, seq):
        am, av = acc.mean, acc.var
        assert np.array_equal(np.isfinite(am), live)
        assert np.max(np.abs(am[live] - m[live]), initial=0) <= tol * scale * 4
        vs = np.maximum(v[live], 1e-300)
        err = np.abs(av[live] - v[live]) / np.maximum(vs, (tol * scale) ** 2 * 1e3)
        assert np.max(err, initial=0) <= (1e-9 if dtype == "float64" else 1e-3)


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(max_examples=60, **_SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 80), f=st.integers(1, 5), loc=st.floats(-1e4, 1e4),
       nbatches=st.integers(1, 10), weighted=st.booleans())
def test_running_moments_property_numpy(seed, n, f, loc, nbatches, weighted):
    """Any split, order and merge tree gives the float64 truth (float64 data)."""
    _property_check("numpy", seed, n, f, loc, nbatches, weighted, "float64")


@settings(max_examples=5, **_SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), f=st.integers(1, 4), loc=st.floats(-1e3, 1e3),
       nbatches=st.integers(1, 5), weighted=st.booleans(), dtype=st.sampled_from(["float32", "float64"]))
def test_running_moments_property_emulated(seed, n, f, loc, nbatches, weighted, dtype):
    if backend_skip_reason("emulated"):
        pytest.skip(backend_skip_reason("emulated"))
    _property_check("emulated", seed, n, f, loc, nbatches, weighted, dtype)


def test_running_moments_errors(backend, rng):
    x = backend.asarray(_float_data(rng, (6, 4), "float32"))
    with pytest.raises(TypeError, match="RunningMoments.update: argument 'batch'.*uint8.*int32"):
        RunningMoments().update(backend.asarray(rng.integers(0, 9, (6, 4)).astype(np.int32)))
    with pytest.raises(TypeError, match="'batch'.*numpy.ndarray or cupy.ndarray"):
        RunningMoments().update([[1.0, 2.0]])
    rm = RunningMoments().update(x)
    with pytest.raises(ValueError, match="'batch'.*kept axes have shape \\(4,\\)"):
        rm.update(backend.asarray(_float_data(rng, (6, 5), "float32")))
    with pytest.raises(ValueError, match="'batch'.*rank-2"):
        rm.update(backend.asarray(_float_data(rng, (6, 4, 1), "float32")))
    with pytest.raises(ValueError, match="'weights'.*broadcastable"):
        rm.update(x, backend.asarray(rng.random(5)))
    with pytest.raises(TypeError, match="RunningMoments: argument 'axis'"):
        RunningMoments(axis="rows")
    with pytest.raises(ValueError, match="'axis'.*\\[-2, 2\\)"):
        RunningMoments(axis=3).update(x)
    with pytest.raises(ValueError, match="'axis'.*repeated"):
        RunningMoments(axis=(0, -2)).update(x)
    with pytest.raises(ValueError, match="RunningMoments: argument 'dtype'"):
        RunningMoments(dtype="int32")
    with pytest.raises(TypeError, match="RunningMoments.merge: argument 'other'"):
        rm.merge(np.zeros(4))
    other = RunningMoments().update(backend.asarray(_float_data(rng, (3, 5), "float32")))
    with pytest.raises(ValueError, match="'other'.*shape \\(4,\\)"):
        rm.merge(other)
    with pytest.raises(ValueError, match="'other'.*axes"):
        RunningMoments(axis=1).update(x).merge(rm)


# ---------------------------------------------------------------------------
# Standardizer against scikit-learn
# ---------------------------------------------------------------------------
def _sk_compare(ours, theirs, backend, rtol=1e-11):
    m2 = 0.0 if theirs.mean_ is None else float(np.max(theirs.mean_ ** 2))
    for att in ("mean_", "var_", "scale_"):
        a, b = getattr(ours, att), getattr(theirs, att)
        if b is None:
            assert a is None, att
            continue
        a = backend.to_numpy(a)
        assert a.dtype == np.float64, att
        # a variance's rounding error scales with mean**2 (a constant feature may get ~1e-32, not 0)
        atol = rtol * max(float(np.max(np.abs(b))), m2 if att == "var_" else 0.0)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=att)
    # sklearn documents an int, or a float sum of weights after weighted fits
    # (1.9 returns float64 even unweighted); the value is what must match.
    n_ours, n_theirs = ours.n_samples_seen_, theirs.n_samples_seen_
    assert isinstance(n_ours, np.integer) != ours._weighted, n_ours
    np.testing.assert_allclose(n_ours, n_theirs, rtol=max(rtol, 1e-12))  # sklearn sums float32 weights in float32
    assert ours.n_features_in_ == theirs.n_features_in_


def _features(rng, n, f):
    """Random features of varied scale and offset, a constant one among them."""
    x = rng.standard_normal((n, f)) * rng.uniform(0.01, 100, f) + rng.uniform(-1e3, 1e3, f)
    x[:, rng.integers(f)] = rng.uniform(-5, 5)
    return x


@pytest.mark.parametrize("params", [{}, {"with_mean": False}, {"with_std": False},
                                    {"with_mean": False, "with_std": False}])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_standardizer_matches_sklearn(backend, rng, params, weighted, dtype):
    X = _features(rng, int(rng.integers(20, 60)), int(rng.integers(1, 7))).astype(dtype)
    sw = rng.random(X.shape[0]) * 2 if weighted else None
    ours = Standardizer(**params).fit(backend.asarray(X), sample_weight=backend.asarray(sw))
    theirs = StandardScaler(**params).fit(X, sample_weight=sw)
    rtol = 1e-11 if dtype == "float64" else 2e-6
    _sk_compare(ours, theirs, backend, rtol)
    Xt = rng.standard_normal(X.shape).astype(dtype) * 50
    t_ours = backend.to_numpy(ours.transform(backend.asarray(Xt)))
    t_theirs = theirs.transform(Xt)
    assert t_ours.dtype == t_theirs.dtype
    np.testing.assert_allclose(t_ours, t_theirs, rtol=rtol * 10, atol=rtol * 10 * np.max(np.abs(t_theirs)))
    inv = backend.to_numpy(ours.inverse_transform(backend.asarray(t_theirs)))
    np.testing.assert_allclose(inv, theirs.inverse_transform(t_theirs), rtol=rtol * 10,
                               atol=rtol * 10 * np.max(np.abs(Xt)))
    ft = backend.to_numpy(Standardizer(**params).fit_transform(backend.asarray(X), sample_weight=backend.asarray(sw)))
    np.testing.assert_allclose(ft, theirs.transform(X), rtol=rtol * 10, atol=rtol * 10 * np.max(np.abs(X)) + 1e-12)


def test_standardizer_float32_transform_is_sklearns_bitwise(backend, rng):
    """On float32, sklearn computes (x - f32(mean_)) / f32(scale_) in float32: so do we, exactly."""
    X = _features(rng, 50, 5).astype(np.float32)
    ours, theirs = Standardizer().fit(backend.asarray(X)), StandardScaler().fit(X)
    assert np.array_equal(np.float32(backend.to_numpy(ours.mean_)), np.float32(theirs.mean_))
    assert np.array_equal(backend.to_numpy(ours.transform(backend.asarray(X))), theirs.transform(X))


@pytest.mark.parametrize("weighted", [False, True])
def test_standardizer_partial_fit_sequence(backend, rng, weighted):
    X = _features(rng, 90, 4)
    sw = rng.random(90) if weighted else None
    ours, theirs = Standardizer(), StandardScaler()
    for idx in _splits(rng, 90, 6):
        w = None if sw is None else sw[idx]
        ours.partial_fit(backend.asarray(X[idx]), sample_weight=backend.asarray(w))
        theirs.partial_fit(X[idx], sample_weight=w)
        _sk_compare(ours, theirs, backend)
    # fit forgets the earlier batches, as in sklearn
    ours.fit(backend.asarray(X[:30]))
    theirs.fit(X[:30])
    _sk_compare(ours, theirs, backend)


def test_standardizer_mixed_weighting_and_scalar_weight(backend, rng):
    X = _features(rng, 40, 3)
    ours, theirs = Standardizer(), StandardScaler()
    ours.partial_fit(backend.asarray(X[:20]))
    theirs.partial_fit(X[:20])
    ours.partial_fit(backend.asarray(X[20:]), sample_weight=2.5)
    theirs.partial_fit(X[20:], sample_weight=np.full(20, 2.5))
    _sk_compare(ours, theirs, backend)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float16"])
def test_standardizer_narrow_inputs(backend, rng, dtype):
    """uint8/uint16/float16 in: statistics as sklearn's on the same values, float32 out by default for integers."""
    X = _data(rng, (64, 5), dtype) if dtype != "float16" else _float_data(rng, (64, 5), "float16", loc=10.0)
    sw = rng.random(64)
    ours = Standardizer().fit(backend.asarray(X), sample_weight=backend.asarray(sw))
    theirs = StandardScaler().fit(X.astype(np.float64), sample_weight=sw)
    _sk_compare(ours, theirs, backend, rtol=2e-6)
    y = backend.to_numpy(ours.transform(backend.asarray(X)))
    assert y.dtype == (np.float16 if dtype == "float16" else np.float32)
    atol = 5e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(y, theirs.transform(X.astype(np.float64)), rtol=0, atol=atol)
    y64 = backend.to_numpy(Standardizer(out_dtype="float64").fit(backend.asarray(X)).transform(backend.asarray(X)))
    assert y64.dtype == np.float64
    np.testing.assert_allclose(y64, StandardScaler().fit_transform(X.astype(np.float64)), atol=1e-5)


@pytest.mark.parametrize("fmt,out_fmt,shape", [
    ("NHWC", "NCHW", (4, 6, 5, 3)), ("NCHW", "NHWC", (3, 3, 4, 5)), ("NHWC", None, (3, 4, 5, 2)),
    ("NCHW", None, (2, 4, 3, 3)), ("NDHWC", "NCDHW", (2, 2, 3, 4, 3)),
])
@pytest.mark.parametrize("out_dtype", ["float16", "float32"])
def test_standardizer_images(backend, rng, fmt, out_fmt, shape, out_dtype):
    """uint8 images: per-channel statistics, then one fused uint8 -> out_dtype (+ layout) pass."""
    x = _int_data(rng, shape, "uint8")
    ch = len(shape) - 1 if fmt in ("NHWC", "NDHWC") else 1
    w = rng.random(shape[0])
    s = Standardizer(data_format=fmt, out_format=out_fmt, out_dtype=out_dtype)
    k = shape[0] // 2
    s.fit(backend.asarray(x[:k]), sample_weight=backend.asarray(w[:k]))
    s.partial_fit(backend.asarray(x[k:]), sample_weight=backend.asarray(w[k:]))
    pix = np.moveaxis(x, ch, -1).reshape(-1, shape[ch])
    wpix = np.repeat(w, pix.shape[0] // shape[0])
    ref = StandardScaler().fit(pix.astype(np.float64), sample_weight=wpix)
    np.testing.assert_allclose(backend.to_numpy(s.mean_), ref.mean_, rtol=2e-6)
    np.testing.assert_allclose(backend.to_numpy(s.var_), ref.var_, rtol=2e-5)
    np.testing.assert_allclose(s.n_samples_seen_, ref.n_samples_seen_, rtol=1e-6)
    y = backend.to_numpy(s.transform(backend.asarray(x)))
    out_last = (out_fmt or fmt) in ("NHWC", "NDHWC")
    expect = ref.transform(pix.astype(np.float64)).reshape(np.moveaxis(x, ch, -1).shape)
    expect = expect if out_last else np.moveaxis(expect, -1, 1)
    assert y.dtype == np.dtype(out_dtype) and y.shape == expect.shape
    np.testing.assert_allclose(y.astype(np.float64), expect, atol=4e-3 if out_dtype == "float16" else 1e-5)
    back = backend.to_numpy(s.inverse_transform(backend.asarray(y)))
    assert back.shape == x.shape and back.dtype == y.dtype
    np.testing.assert_allclose(back.astype(np.float64), x, atol=0.6 if out_dtype == "float16" else 1e-3)


def test_standardizer_scale_rules(backend, rng):
    X = _features(rng, 30, 4)
    X[:, 1] = 3.0  # zero variance: scale 1, as sklearn
    s = Standardizer().fit(backend.asarray(X))
    assert backend.to_numpy(s.scale_)[1] == 1.0
    e = Standardizer(epsilon=0.5).fit(backend.asarray(X))
    np.testing.assert_allclose(backend.to_numpy(e.scale_), np.sqrt(X.var(axis=0) + 0.5), rtol=1e-12)


def test_standardizer_sklearn_protocol(rng):
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.utils.validation import check_is_fitted

    s = Standardizer(with_mean=False, out_dtype="float32")
    assert s.get_params()["with_mean"] is False and s.get_params()["out_dtype"] == "float32"
    assert repr(s) == "Standardizer(out_dtype='float32', with_mean=False)"
    c = clone(s)
    assert c is not s and c.get_params() == s.get_params()
    assert s.set_params(with_std=False) is s and s.with_std is False
    assert not hasattr(Standardizer(), "mean_")
    X = rng.standard_normal((80, 3))
    y = (X[:, 0] + 0.1 * rng.standard_normal(80) > 0).astype(int)
    pipe = make_pipeline(Standardizer(), LogisticRegression()).fit(X, y, standardizer__sample_weight=rng.random(80))
    check_is_fitted(pipe[0])
    assert pipe.score(X, y) > 0.8
    assert list(pipe[0].get_feature_names_out()) == ["x0", "x1", "x2"]
    # array-likes as in sklearn: lists of ints become float64
    lst = Standardizer().fit([[0, 0], [0, 0], [1, 1], [1, 1]])
    np.testing.assert_array_equal(lst.mean_, [0.5, 0.5])
    np.testing.assert_array_equal(lst.transform([[2, 2]]), [[3.0, 3.0]])


def test_standardizer_errors(backend, rng):
    X = backend.asarray(_features(rng, 10, 3))
    s = Standardizer()
    with pytest.raises(NotFittedError, match="not fitted"):
        s.transform(X)
    with pytest.raises(AttributeError):
        _ = s.mean_
    # other integers become float64, as in StandardScaler
    ints = Standardizer().fit(backend.asarray(np.arange(12, dtype=np.int32).reshape(4, 3)))
    np.testing.assert_allclose(backend.to_numpy(ints.mean_), [4.5, 5.5, 6.5])
    s.fit(X)
    with pytest.raises(ValueError, match="X has 4 features, but Standardizer is expecting 3 features"):
        s.partial_fit(backend.asarray(_features(rng, 5, 4)))
    with pytest.raises(ValueError, match="X has 2 features, but Standardizer is expecting 3 features"):
        s.transform(backend.asarray(_features(rng, 5, 2)))
    with pytest.raises(ValueError, match="'X'.*2-D array.*data_format"):
        s.fit(backend.asarray(np.zeros((2, 3, 4))))
    with pytest.raises(ValueError, match=r"0 sample\(s\) \(shape=\(0, 3\)\) while a minimum of 1 is required"):
        s.fit(backend.asarray(np.zeros((0, 3))))
    assert s.n_samples_seen_ == 10  # a refused fit leaves the earlier one in place
    with pytest.raises(ValueError, match=r"sample_weight.*\(10,\)"):
        Standardizer().fit(X, sample_weight=backend.asarray(np.ones(9)))
    with pytest.raises(ValueError, match="Standardizer.partial_fit: argument 'out_dtype'"):
        Standardizer(out_dtype="int8").fit(X)
    with pytest.raises(ValueError, match="argument 'data_format'.*'NHWC'"):
        Standardizer(data_format="HWCN").fit(X)
    with pytest.raises(ValueError, match="argument 'out_format'"):
        Standardizer(data_format="NHWC", out_format="CHWN").fit(backend.asarray(np.zeros((2, 3, 4, 3))))
    with pytest.raises(ValueError, match="argument 'out_format'.*None when data_format is None"):
        Standardizer(out_format="NCHW").fit(X)
    with pytest.raises(ValueError, match="argument 'epsilon'"):
        Standardizer(epsilon=-1.0).fit(X)
    with pytest.raises(TypeError, match="argument 'with_mean'.*bool"):
        Standardizer(with_mean="yes").fit(X)
    with pytest.raises(ValueError, match="Invalid parameter 'with_man'"):
        Standardizer().set_params(with_man=True)
    with pytest.raises(TypeError, match="inverse_transform: argument 'X'.*uint8"):
        s.inverse_transform(backend.asarray(np.zeros((2, 3), np.uint8)))


# ---------------------------------------------------------------------------
# normalize_images: exact against the NumPy reference
# ---------------------------------------------------------------------------
def _ref_normalize(x, mean, std, scale, out_dtype, in_last, out_last):
    """The documented arithmetic, independently: (x - mean/scale) / (std/scale), rounded once."""
    A = np.float64 if "float64" in (np.dtype(x.dtype).name, np.dtype(out_dtype).name) else np.float32
    c = x.shape[-1] if in_last or x.ndim == 2 else x.shape[1]
    a = (np.asarray(mean, np.float64) / scale * np.ones(c)).astype(A)
    d = (np.asarray(std, np.float64) / scale * np.ones(c)).astype(A)
    xa = np.moveaxis(x, -1 if in_last or x.ndim == 2 else 1, -1).astype(A)
    with np.errstate(all="ignore"):
        y = (xa - a) / d
    if A == np.float64 and np.dtype(out_dtype).itemsize == 2:
        y = y.astype(np.float32)
    y = y.astype(out_dtype)
    return y if out_last or x.ndim == 2 else np.moveaxis(y, -1, 1)


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


IN_DTYPES = ["uint8", "uint16", "float16", "bfloat16", "float32", "float64"]
OUT_DTYPES = ["float16", "bfloat16", "float32", "float64"]


@pytest.mark.parametrize("in_dtype", IN_DTYPES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("fmt,out_fmt,shape", [
    ("NHWC", "NCHW", (2, 8, 16, 3)),    # whole-row tiles, 16-byte vectors
    ("NHWC", "NCHW", (3, 5, 7, 3)),     # odd sizes: scalar loads
    ("NCHW", "NHWC", (2, 3, 9, 16)),    # few channels, long pixel runs
    ("NHWC", "NHWC", (2, 5, 6, 4)),
    ("NCHW", "NCHW", (2, 3, 5, 8)),
])
def test_normalize_images_exact(backend, rng, in_dtype, out_dtype, fmt, out_fmt, shape):
    if "bfloat16" in (in_dtype, out_dtype) and BF16 is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    x = _data(rng, shape, in_dtype, loc=100.0, spread=60.0)
    c = shape[-1] if fmt == "NHWC" else shape[1]
    mean = rng.uniform(0.2, 0.6, c)
    std = rng.uniform(0.1, 0.3, c)
    scale = 1 / 255 if in_dtype == "uint8" else 1 / 97.0
    y = normalize_images(backend.asarray(x), mean.tolist(), tuple(std), scale=scale, out_dtype=np_dtype(out_dtype),
                         data_format=fmt, out_format=out_fmt)
    ref = _ref_normalize(x, mean, std, scale, np_dtype(out_dtype), fmt == "NHWC", out_fmt == "NHWC")
    y = backend.to_numpy(y)
    assert y.dtype == np_dtype(out_dtype) and y.shape == ref.shape
    np.testing.assert_array_equal(_bits(y), _bits(ref))


@pytest.mark.parametrize("shape,fmt,out_fmt", [
    ((3, 5, 40), "NHWC", "NCHW"),       # 40 channels: 32-wide tiles (rank 3)
    ((2, 33, 4, 9), "NCHW", "NHWC"),    # P > 32 and Q < 32 the other way
    ((2, 4, 4, 1), "NHWC", "NCHW"),     # one channel: the same bytes, elementwise kernel
    ((7, 5), "NHWC", "NCHW"),           # rank 2: (N, C) has one layout
    ((2, 3, 2, 3, 4), "NCDHW", "NDHWC"),
])
def test_normalize_images_shapes(backend, rng, shape, fmt, out_fmt):
    x = _int_data(rng, shape, "uint16")
    in_last = fmt in ("NHWC", "NDHWC")
    c = shape[-1] if in_last or len(shape) == 2 else shape[1]
    mean, std = rng.uniform(1e3, 3e4, c), rng.uniform(1e3, 1e4, c)
    y = backend.to_numpy(normalize_images(backend.asarray(x), mean, std, data_format=fmt, out_format=out_fmt))
    ref = _ref_normalize(x, mean, std, 1.0, np.float32, in_last, out_fmt in ("NHWC", "NDHWC"))
    np.testing.assert_array_equal(y, ref)


def test_normalize_images_vectors_are_used(rng):
    """The aligned uint8 NHWC -> NCHW case reads 16-byte vectors; an odd one falls back to scalars."""
    if backend_skip_reason("emulated"):
        pytest.skip(backend_skip_reason("emulated"))
    backend = get_backend("emulated")
    seen = []
    real = backend.launcher.launch

    def recording(kernel, grid, block, shared, args):
        seen.append(kernel.name_expression)
        return real(kernel, grid, block, shared, args)

    with cubn.use_backend("emulated"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend.launcher, "launch", recording)
        normalize_images(_int_data(rng, (2, 8, 16, 3), "uint8"), 100.0, 50.0)
        normalize_images(_int_data(rng, (2, 3, 5, 3), "uint8"), 100.0, 50.0, out_format="NHWC")
    assert seen == ["cubn_pp_transpose<unsigned char, float, 1, 0, 16>", "cubn_pp_affine<unsigned char, float, 0, 4>"]


def test_normalize_images_torchvision_semantics(backend, rng):
    """scale=1/255 with ImageNet statistics: within a few float32 ulps of (x/255 - mean)/std."""
    x = _int_data(rng, (2, 6, 7, 3), "uint8")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    y = backend.to_numpy(normalize_images(backend.asarray(x), mean, std, scale=1 / 255))
    tv = ((x.astype(np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(y, tv, rtol=0, atol=4 * np.finfo(np.float32).eps * 4)


def test_normalize_images_errors(backend, rng):
    x = backend.asarray(_int_data(rng, (2, 4, 4, 3), "uint8"))
    with pytest.raises(TypeError, match="normalize_images: argument 'images'.*int32"):
        normalize_images(backend.asarray(np.zeros((2, 4, 4, 3), np.int32)), 0.0, 1.0)
    with pytest.raises(TypeError, match="argument 'images'.*numpy.ndarray or cupy.ndarray"):
        normalize_images([[1, 2, 3]], 0.0, 1.0)
    with pytest.raises(ValueError, match="argument 'out_dtype'.*'float16'"):
        normalize_images(x, 0.0, 1.0, out_dtype="uint8")
    with pytest.raises(ValueError, match="argument 'data_format'"):
        normalize_images(x, 0.0, 1.0, data_format="HWCN")
    with pytest.raises(ValueError, match="argument 'out_format'"):
        normalize_images(x, 0.0, 1.0, out_format="CNHW")
    with pytest.raises(ValueError, match="argument 'data_format'.*rank-5"):
        normalize_images(x, 0.0, 1.0, data_format="NDHWC")
    with pytest.raises(ValueError, match="argument 'mean'.*3 values"):
        normalize_images(x, [0.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="argument 'std'.*nonzero"):
        normalize_images(x, 0.0, [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="argument 'scale'"):
        normalize_images(x, 0.0, 1.0, scale=0.0)
    with pytest.raises(TypeError, match="argument 'scale'"):
        normalize_images(x, 0.0, 1.0, scale="x")
    with pytest.raises(ValueError, match="argument 'images'.*rank 2 to 5"):
        normalize_images(backend.asarray(np.zeros(5, np.uint8)), 0.0, 1.0)


# ---------------------------------------------------------------------------
# Host/device mixing (needs a GPU)
# ---------------------------------------------------------------------------
def test_mixing_numpy_and_cupy_is_refused(rng):
    if not cubn.gpu_available():
        pytest.skip("no CUDA device: " + cubn._backend.gpu_status())
    import cupy as cp

    x = _float_data(rng, (8, 3), "float32")
    rm = RunningMoments().update(cp.asarray(x))
    with pytest.raises(TypeError, match="'batch' is on the host.*running state"):
        rm.update(x)
    with pytest.raises(TypeError, match="'batch'.*'weights'"):
        RunningMoments().update(cp.asarray(x), np.ones(8))
    with pytest.raises(TypeError, match="'self'.*'other'"):
        rm.merge(RunningMoments().update(x))
    s = Standardizer().fit(cp.asarray(x))
    with pytest.raises(TypeError, match="'X' is on the host"):
        s.partial_fit(x)
    with pytest.raises(TypeError, match="'X' is on the host.*fitted statistics"):
        s.transform(x)
    with pytest.raises(TypeError, match="'sample_weight'"):
        Standardizer().fit(cp.asarray(x), sample_weight=np.ones(8))
    with pytest.raises(TypeError, match="'images'.*'mean'"):
        normalize_images(cp.asarray(x), np.zeros(3), 1.0)
