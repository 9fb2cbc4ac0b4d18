"""Host time of one call: the Python around the kernels, and around NumPy.

``kernel`` cases: the orchestration (argument checks, launch plans -- the
launch programs of ``cubn._launch_cache`` once a signature repeats --,
buffer allocation, the launcher calls) runs for an H100's launch plan on a
launcher that keeps the launches and runs nothing
(``cubn.model.tracing.NullLauncher``), so what is timed is the Python a GPU
call costs before CuPy launches anything. The target is at most 10 µs per
training forward (``extra_info["target_us"]``); the GPU takes 3-20 µs for
an ImageNet-size batch-norm layer, so above that the host decides the speed.

``numpy`` cases: the same calls on the NumPy backend at (8, 16), where the
layers above the backend are a large share of the time.

Ops: ``bn_train`` / ``bn_infer`` (``fused_batch_norm``), ``moments``,
``bn_backward`` (``batch_norm_backward`` from given statistics),
``layer_train`` (``BatchNorm(x)``, moving statistics updated in place),
``layer_backward`` (``bn.backward(dy, ctx)`` of one training forward). A
benchmark, not a timed test:

    pytest bench/test_bench_host.py --benchmark-only
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

import cubn
from cubn.model import _adapter
from cubn.model.tracing import NullLauncher

TARGET_US = 10.0
CASES = [("NC", (8, 16)), ("NCHW", (32, 64, 56, 56)), ("NHWC", (32, 56, 56, 64))]
OPS = ["bn_train", "bn_infer", "moments", "bn_backward", "layer_train", "layer_backward"]


@pytest.fixture(scope="module")
def launcher():
    return NullLauncher("h100")


def _call(op, layout, shape):
    c = shape[1] if layout == "NCHW" else shape[-1]
    fmt = "NCHW" if layout == "NCHW" else "NHWC"
    x = np.zeros(shape, np.float32)  # never touched on the kernel path: nothing runs
    g, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    if op == "bn_train":
        return lambda: cubn.fused_batch_norm(x, g, b, rm, rv, 1e-3, fmt, exponential_avg_factor=0.1)
    if op == "bn_infer":
        return lambda: cubn.fused_batch_norm(x, g, b, rm, rv, 1e-3, fmt, is_training=False)
    if op == "moments":
        axes = [0, 2, 3] if layout == "NCHW" else list(range(len(shape) - 1))
        return lambda: cubn.moments(x, axes)
    if op == "bn_backward":
        dy = np.ones(shape, np.float32)
        return lambda: cubn.batch_norm_backward(dy, x, g, rm, rv, 1e-3, offset=b, data_format=fmt)
    bn = cubn.BatchNorm(scale=True, data_format=fmt, updates_collections=None)
    if op == "layer_train":
        return lambda: bn(x)
    dy = np.ones(shape, np.float32)
    state = {}

    def backward():
        if "ctx" not in state:  # the forward runs once, under the same backend as the backward
            state["ctx"] = bn.forward(x)[1]
        return bn.backward(dy, state["ctx"])

    return backward


def _time(benchmark, call, clear=None):
    with np.errstate(all="ignore"):
        call()

        def once():
            if clear is not None:
                clear()
            call()

        benchmark.pedantic(once, warmup_rounds=20, rounds=200, iterations=5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout,shape", CASES, ids=[f"{l}-{'x'.join(map(str, s))}" for l, s in CASES])
def test_host_time(benchmark, launcher, op, layout, shape):
    backend = _adapter.kernel_backend(launcher)
    with _adapter.routed_to(backend):
        call = _call(op, layout, shape)
        launcher.clear()
        with np.errstate(all="ignore"):
            call()
        launches = len(launcher.launches)
        _time(benchmark, call, launcher.launches.clear)
    benchmark.extra_info.update(target_us=TARGET_US, launches=launches, device="H100 plan (model)", path="kernel")
    assert launches >= 1


@pytest.mark.parametrize("op", OPS)
def test_host_time_numpy(benchmark, op):
    """The NumPy backend at (8, 16): its time is mostly the Python around a few tiny ufunc calls."""
    with contextlib.ExitStack():
        _time(benchmark, _call(op, "NC", (8, 16)))
    benchmark.extra_info.update(path="numpy", shape="8x16")
