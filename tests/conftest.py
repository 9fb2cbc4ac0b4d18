"""Fixtures shared by the test suite: backends, dtypes and conversions.

Every op test runs on each backend: ``numpy``; ``emulated`` (the real .cu
sources built by g++ and run on CPU threads; needs g++); ``cupy`` (needs a
CUDA device). A backend that is not present is skipped with its reason.
"""
from __future__ import annotations

import contextlib
import os
import shutil

import numpy as np
import pytest

import cubn

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

ALL_DTYPES = ["float16", "bfloat16", "float32", "float64"]

# Error bounds relative to the scale of the data, per input dtype.
TOL = {"float16": 4e-3, "bfloat16": 3e-2, "float32": 2e-5, "float64": 1e-12}


def np_dtype(name):
    if name == "bfloat16":
        if BF16 is None:
            pytest.skip("bfloat16 needs ml_dtypes")
        return BF16
    return np.dtype(name)


def _cupy():
    if not cubn.gpu_available():
        return None
    import cupy

    return cupy


class Backend:
    """How a test runs on one backend: array conversion and the override."""

    def __init__(self, name):
        self.name = name

    def asarray(self, a):
        if a is None:
            return None
        if self.name == "cupy":
            return _cupy().asarray(a)
        return np.asarray(a)

    def to_numpy(self, a):
        if a is None:
            return None
        if self.name == "cupy" and not isinstance(a, np.ndarray):
            return a.get()
        return np.asarray(a)

    def context(self):
        if self.name == "emulated":
            return cubn.use_backend("emulated")
        return contextlib.nullcontext()

    def __repr__(self):
        return self.name


def backend_skip_reason(name):
    if name == "emulated" and shutil.which(os.environ.get("CXX", "g++")) is None:
        return "the emulated backend needs g++"
    if name == "cupy" and not cubn.gpu_available():
        return "no CUDA device: " + cubn._backend.gpu_status()
    return None


def _backend_fixture(request):
    reason = backend_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    b = Backend(request.param)
    with b.context():
        yield b


@pytest.fixture(params=["numpy", "emulated", "cupy"])
def backend(request):
    yield from _backend_fixture(request)


@pytest.fixture(params=["numpy", "emulated", "emulated-three_launch", "cupy", "cupy-three_launch"])
def train_backend(request):
    """``backend`` for training-forward tests: the kernel backends run twice,
    with the one-launch (one_launch.cu) path where the shape allows it, and
    with it switched off (``cubn.use_one_launch(False)``: the three-launch
    path, statistics, finalize, normalize), so both paths meet the same
    assertions."""
    name, _, path = request.param.partition("-")
    reason = backend_skip_reason(name)
    if reason:
        pytest.skip(reason)
    b = Backend(name)
    with b.context(), cubn.use_one_launch(not path):
        yield b


@pytest.fixture(params=["numpy", "emulated"])
def host_backend(request):
    """The backends that take NumPy arrays as they are (memory layouts, threads,
    files: what a host array looks like matters, so no conversion to CuPy)."""
    yield from _backend_fixture(request)


@pytest.fixture(params=["emulated", "cupy"])
def kernel_backend(request):
    """Only the backends that run the CUDA sources."""
    yield from _backend_fixture(request)


@pytest.fixture
def rng(request):
    # A fresh seed per test (and per run): inputs are drawn, never fixed.
    seed = np.random.SeedSequence().entropy % (2**32)
    request.node.user_properties.append(("seed", seed))
    print(f"rng seed: {seed}")  # shown with a failure, to replay it
    return np.random.default_rng(seed)


def assert_close(actual, expected, dtype_name, scale=None, what=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    fin = np.isfinite(expected)
    assert np.array_equal(np.isfinite(actual), fin), f"{what}: non-finite pattern differs"
    if not fin.any():
        return
    s = scale if scale is not None else max(1.0, float(np.max(np.abs(expected[fin]))))
    err = float(np.max(np.abs(actual[fin] - expected[fin]))) / s
    assert err <= TOL[dtype_name], f"{what}: relative error {err:.3g} > {TOL[dtype_name]} ({dtype_name})"


@pytest.fixture
def emulated_launches(monkeypatch):
    """Names of the kernels launched on the emulated backend inside the test (in order)."""
    reason = backend_skip_reason("emulated")
    if reason:
        pytest.skip(reason)
    from cubn._backend import get_backend

    launcher = get_backend("emulated").launcher
    names = []
    real = launcher.launch

    def counting(kernel, grid, block, shared, args):
        names.append(kernel.name_expression.split("<")[0])
        return real(kernel, grid, block, shared, args)

    monkeypatch.setattr(launcher, "launch", counting)
    return names
