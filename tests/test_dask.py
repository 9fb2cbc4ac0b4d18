"""cubn.dask: moments, RunningMoments and Standardizer over
dask arrays, as dask's own tree reduction of Welford triples; equal to the
in-memory results on the threaded scheduler and on a 2-process LocalCluster."""
from __future__ import annotations

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import cubn  # noqa: E402
import reference  # noqa: E402
import cubn.dask as cdask  # noqa: E402
from cubn.preprocessing import RunningMoments, Standardizer  # noqa: E402


def _truth(x, axes, w=None):
    return reference.moments(x, tuple(np.atleast_1d(axes)), weights=w)


def _random_chunks(rng, n, k):
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(k, n) - 1, replace=False))
    return tuple(int(c) for c in np.diff(np.concatenate([[0], cuts, [n]])))


@pytest.fixture
def threads():
    with dask.config.set(scheduler="threads"):
        yield


@pytest.mark.parametrize("shape,axes", [((60, 5), (0,)), ((12, 3, 8, 4), (0, 1, 2)), ((10, 4, 6, 6), (0, 2, 3)),
                                        ((9, 7, 5), None), ((20, 6), (1,))])
@pytest.mark.parametrize("split_every", [None, 2])
def test_moments_equal_in_memory(threads, rng, shape, axes, split_every):
    x = (3.0 + 2.0 * rng.standard_normal(shape))
    chunks = tuple(_random_chunks(rng, n, 3) for n in shape)
    dx = da.from_array(x, chunks=chunks)
    m, v = cdask.moments(dx, axes, split_every=split_every)
    assert isinstance(m, da.Array) and m.dtype == np.float64
    m, v = dask.compute(m, v)
    ax = tuple(range(len(shape))) if axes is None else axes
    rm, rv = _truth(x, ax)
    np.testing.assert_allclose(m, rm, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v, rv, rtol=1e-12)
    im, iv = cubn.moments(x, list(ax))
    np.testing.assert_allclose(m, im, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v, iv, rtol=1e-12)


def test_moments_is_a_dask_reduction(rng):
    """The graph is dask's reduction (chunk, combine and aggregate layers), and one tree serves mean and var."""
    dx = da.from_array(rng.standard_normal((64, 3)), chunks=(4, 3))
    m, v = cdask.moments(dx, 0, split_every=2)
    layers = set(m.__dask_graph__().layers) | set(v.__dask_graph__().layers)
    assert any(k.startswith("cubn-welford") and "partial" in k for k in layers), layers  # combine steps
    assert any(k.startswith("cubn-welford") and "aggregate" in k for k in layers), layers
    merged = dict(m.__dask_graph__()) | dict(v.__dask_graph__())
    chunk_tasks = [k for k in merged if isinstance(k, tuple) and k[0].startswith("cubn-welford-")
                   and "partial" not in k[0] and "aggregate" not in k[0]]
    assert len(chunk_tasks) == 16  # once per chunk, shared by mean and var


@pytest.mark.parametrize("dtype", ["float32", "uint8", "float16"])
def test_moments_dtypes_and_offset(threads, rng, dtype):
    shape = (40, 6, 3)
    if dtype == "uint8":
        x = rng.integers(0, 256, shape).astype(np.uint8)
    else:
        x = (1e3 + rng.standard_normal(shape)).astype(dtype)
    dx = da.from_array(x, chunks=(7, 4, 3))
    m, v = cdask.moments(dx, (0, 2), keepdims=True)
    assert m.shape == (1, 6, 1) and m.dtype == (np.float32 if dtype == "uint8" else np.dtype(dtype))
    rm, rv = _truth(x, (0, 2))
    tol = {"float32": 1e-4, "uint8": 1e-6, "float16": 2e-3}[dtype]
    np.testing.assert_allclose(m.compute().ravel(), rm, rtol=tol)
    np.testing.assert_allclose(v.compute().ravel(), rv, rtol=tol * 10)


@pytest.mark.parametrize("kind", ["batch", "full"])
def test_weighted(threads, rng, kind):
    x = rng.standard_normal((30, 4, 5)) * 2 - 1
    w = rng.random(30) if kind == "batch" else rng.random((30, 4, 5))
    dx = da.from_array(x, chunks=(8, 2, 5))
    dw = da.from_array(w, chunks=8 if kind == "batch" else (8, 2, 5))
    m, v = dask.compute(*cdask.moments(dx, (0, 2), weights=dw))
    rm, rv = _truth(x, (0, 2), w[:, None, None] if kind == "batch" else w)
    np.testing.assert_allclose(m, rm, rtol=1e-12)
    np.testing.assert_allclose(v, rv, rtol=1e-12)
    im, iv = cubn.weighted_moments(x, (0, 2), w)
    np.testing.assert_allclose(m, im, rtol=1e-12)
    np.testing.assert_allclose(v, iv, rtol=1e-12)


def test_welford_triple_and_running_moments(threads, rng):
    x = rng.standard_normal((50, 3)) * 4 + 10
    dx = da.from_array(x, chunks=(9, 3))
    n, m, m2 = dask.compute(*cdask.welford_triple(dx, 0))
    np.testing.assert_array_equal(n, [50.0] * 3)
    np.testing.assert_allclose(m2 / n, x.var(0), rtol=1e-12)
    rm = cdask.fit_running_moments(dx[:30], axis=0)
    rm.update(x[30:40])                                  # goes on with in-memory batches
    rm.merge(RunningMoments(axis=0).update(dx[40:]))     # and with another dask-fitted accumulator
    np.testing.assert_allclose(rm.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rm.var, x.var(0), rtol=1e-12)
    np.testing.assert_array_equal(rm.count, [50.0] * 3)


@pytest.mark.parametrize("weighted", [False, True])
def test_standardizer_fit_and_transform(threads, rng, weighted):
    X = rng.standard_normal((120, 5)) * rng.uniform(0.1, 10, 5) + rng.uniform(-50, 50, 5)
    sw = rng.random(120) if weighted else None
    dX = da.from_array(X, chunks=(25, 5))
    dsw = None if sw is None else da.from_array(sw, chunks=25)
    ours = Standardizer().fit(dX, sample_weight=dsw)
    ref = Standardizer().fit(X, sample_weight=sw)
    for att in ("mean_", "var_", "scale_"):
        np.testing.assert_allclose(getattr(ours, att), getattr(ref, att), rtol=1e-12)
    np.testing.assert_allclose(ours.n_samples_seen_, ref.n_samples_seen_, rtol=1e-12)
    t = ours.transform(dX)
    assert isinstance(t, da.Array)
    np.testing.assert_allclose(t.compute(), ref.transform(X), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.inverse_transform(t).compute(), X, rtol=1e-12, atol=1e-10)
    # partial_fit mixes dask and in-memory batches
    mix = Standardizer().partial_fit(dX[:60]).partial_fit(X[60:])
    np.testing.assert_allclose(mix.var_, Standardizer().fit(X).var_, rtol=1e-12)


def test_standardizer_images(threads, rng):
    x = rng.integers(0, 256, (10, 6, 8, 3)).astype(np.uint8)
    dx = da.from_array(x, chunks=(3, 4, 8, 1))  # channels split across chunks: rechunked for transform
    s = Standardizer(data_format="NHWC", out_format="NCHW", out_dtype="float16").fit(dx)
    r = Standardizer(data_format="NHWC", out_format="NCHW", out_dtype="float16").fit(x)
    np.testing.assert_allclose(s.mean_, r.mean_, rtol=1e-6)
    np.testing.assert_allclose(s.var_, r.var_, rtol=1e-5)
    assert s.n_samples_seen_ == 10 * 6 * 8
    t = s.transform(dx)
    assert t.shape == (10, 3, 6, 8) and t.dtype == np.float16
    np.testing.assert_array_equal(t.compute(), s.transform(x))


def test_errors(rng):
    x = rng.standard_normal((6, 4))
    with pytest.raises(TypeError, match="cubn.dask.moments: argument 'x'.*dask.array.Array"):
        cdask.moments(x, 0)
    with pytest.raises(TypeError, match="cubn.dask.moments: argument 'x'.*int64"):
        cdask.moments(da.from_array(np.ones((4, 3), np.int64)), 0)
    with pytest.raises(ValueError, match="argument 'axes'"):
        cdask.moments(da.from_array(x), 5)
    with pytest.raises(ValueError, match="argument 'weights'.*broadcastable"):
        cdask.moments(da.from_array(x), 0, weights=np.ones(5))
    with pytest.raises(TypeError, match="fit_running_moments: argument 'x'"):
        cdask.fit_running_moments(x)
    rm = RunningMoments().update(x)
    with pytest.raises(ValueError, match="'batch'.*kept axes"):
        rm.update(da.from_array(rng.standard_normal((5, 3))))
    with pytest.raises(ValueError, match="'sample_weight'.*\\(6,\\)"):
        Standardizer().fit(da.from_array(x), sample_weight=np.ones(5))


# ---------------------------------------------------------------------------
# A real cluster: two worker processes
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                       dashboard_address=None, silence_logs=50)
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


@pytest.mark.dask_cluster
def test_local_cluster(client, rng):
    x = rng.standard_normal((400, 6, 3)) * 3 + 100.0
    dx = da.from_array(x, chunks=(47, 6, 2))
    m, v = dask.compute(*cdask.moments(dx, (0, 2), split_every=3))
    im, iv = cubn.moments(x, (0, 2))
    np.testing.assert_allclose(m, im, rtol=1e-12)
    np.testing.assert_allclose(v, iv, rtol=1e-12)
    workers = client.run(lambda: __import__("os").getpid())
    assert len(set(workers.values())) == 2
    rm = cdask.fit_running_moments(dx, axis=(0, 2))
    np.testing.assert_allclose(rm.var, iv, rtol=1e-12)
    X = x.reshape(-1, 3)[:500]
    dX = da.from_array(X, chunks=(60, 3))
    s = Standardizer().fit(dX)
    r = Standardizer().fit(X)
    np.testing.assert_allclose(s.mean_, r.mean_, rtol=1e-12)
    np.testing.assert_allclose(s.scale_, r.scale_, rtol=1e-12)
    np.testing.assert_allclose(s.transform(dX).compute(), r.transform(X), rtol=1e-12, atol=1e-12)
