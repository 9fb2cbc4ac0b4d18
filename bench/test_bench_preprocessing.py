"""Preprocessing benchmarks (pytest-benchmark).

    pytest bench/test_bench_preprocessing.py

CPU: ``cubn.Standardizer`` (NumPy backend) fit + transform against
scikit-learn's ``StandardScaler`` on the same float32/float64 matrix.
GPU (skipped without a CUDA device): ``Standardizer`` fit + transform and the
fused image path (uint8 NHWC -> float16 NCHW: ``normalize_images`` and
``Standardizer.transform``) against naive CuPy expressions doing the same
work. Every GPU case synchronizes inside the timed call, so the wall clock
measures finished work. With ``--benchmark-disable`` each case runs once,
untimed, as a smoke test.
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from cubn.preprocessing import Standardizer, normalize_images

MATRICES = [(200_000, 64), (20_000, 512)]
IMAGES = [(64, 224, 224, 3), (16, 512, 512, 3)]


def _matrix(shape, dtype, xp=np):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape, dtype=np.float32) * 3 + 10).astype(dtype)
    return xp.asarray(x)


# ---------------------------------------------------------------------------
# CPU: against scikit-learn
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", MATRICES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("peer", ["cubn", "sklearn"])
def test_cpu_standardizer_fit_transform(benchmark, shape, dtype, peer):
    x = _matrix(shape, dtype)
    if peer == "sklearn":
        sk = pytest.importorskip("sklearn.preprocessing")
        make = sk.StandardScaler
    else:
        make = Standardizer
    benchmark.extra_info.update(bytes=3 * x.nbytes, elements=x.size)
    y = benchmark.pedantic(lambda: make().fit(x).transform(x), warmup_rounds=1, rounds=5, iterations=1)
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("shape", IMAGES[:1], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("peer", ["cubn", "numpy_naive"])
def test_cpu_normalize_images(benchmark, shape, peer):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    if peer == "cubn":
        def run():
            return normalize_images(x, mean, std, scale=1 / 255, out_dtype="float16")
    else:
        m32, s32 = mean.astype(np.float32), std.astype(np.float32)

        def run():
            y = (x.astype(np.float32) / np.float32(255) - m32) / s32
            return np.ascontiguousarray(y.transpose(0, 3, 1, 2)).astype(np.float16)
    benchmark.extra_info.update(bytes=3 * x.size)
    y = benchmark.pedantic(run, warmup_rounds=1, rounds=5, iterations=1)
    assert y.shape == (shape[0], shape[3], shape[1], shape[2])


# ---------------------------------------------------------------------------
# GPU: against naive CuPy
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cp():
    if not cubn.gpu_available():
        pytest.skip("no CUDA device: " + cubn._backend.gpu_status())
    import cupy

    return cupy


def _timed(benchmark, cp, run, nbytes):
    sync = cp.cuda.Device().synchronize

    def call():
        out = run()
        sync()
        return out

    benchmark.extra_info.update(bytes=nbytes)
    return benchmark.pedantic(call, warmup_rounds=3, rounds=20, iterations=1)


@pytest.mark.parametrize("shape", MATRICES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("peer", ["cubn", "cupy_naive"])
def test_gpu_standardizer_fit_transform(benchmark, cp, shape, dtype, peer):
    x = _matrix(shape, dtype, cp)
    if peer == "cubn":
        def run():
            return Standardizer().fit(x).transform(x)
    else:
        def run():
            xf = x.astype(cp.float32)
            m, v = xf.mean(axis=0), xf.var(axis=0)
            s = cp.where(v == 0, 1, cp.sqrt(v))
            return ((xf - m) / s).astype(x.dtype)
    y = _timed(benchmark, cp, run, 3 * x.nbytes)
    assert y.shape == x.shape


@pytest.mark.parametrize("shape", IMAGES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("peer", ["cubn_normalize_images", "cubn_standardizer", "cupy_naive"])
def test_gpu_uint8_nhwc_to_float16_nchw(benchmark, cp, shape, peer):
    x = cp.asarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if peer == "cubn_normalize_images":
        def run():
            return normalize_images(x, mean, std, scale=1 / 255, out_dtype="float16")
    elif peer == "cubn_standardizer":
        s = Standardizer(data_format="NHWC", out_format="NCHW", out_dtype="float16").fit(x)

        def run():
            return s.transform(x)
    else:
        m = cp.asarray(mean, cp.float32)
        sd = cp.asarray(std, cp.float32)

        def run():
            y = (x.astype(cp.float32) / 255 - m) / sd
            return cp.ascontiguousarray(y.transpose(0, 3, 1, 2)).astype(cp.float16)
    y = _timed(benchmark, cp, run, 3 * x.size)
    assert y.shape == (shape[0], shape[3], shape[1], shape[2]) and y.dtype == cp.float16
