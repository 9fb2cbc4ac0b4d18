"""Host time of one call on the kernel path, with no kernel run.

The orchestration (argument checks, launch plans, buffer allocation, the
launcher calls) runs for an H100's launch plan on a launcher that keeps the
launches and runs nothing (``cubn.model.tracing.NullLauncher``), so what is
timed is the Python a GPU call costs before CuPy launches anything. The
target is at most 10 µs per training forward (``extra_info["target_us"]``);
the GPU takes 3-20 µs for an ImageNet-size batch-norm layer, so above that
the host decides the speed. A benchmark, not a timed test:

    pytest bench/test_bench_host.py --benchmark-enable
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from cubn.model import _adapter
from cubn.model.tracing import NullLauncher

TARGET_US = 10.0
CASES = [("NC", (8, 16)), ("NCHW", (32, 64, 56, 56)), ("NHWC", (32, 56, 56, 64))]


@pytest.fixture(scope="module")
def launcher():
    return NullLauncher("h100")


def _call(op, layout, shape, launcher):
    c = shape[1] if layout == "NCHW" else shape[-1]
    fmt = "NCHW" if layout == "NCHW" else "NHWC"
    x = np.zeros(shape, np.float32)  # never touched: nothing runs
    g, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    if op == "bn_train":
        return lambda: cubn.fused_batch_norm(x, g, b, rm, rv, 1e-3, fmt, exponential_avg_factor=0.1)
    if op == "bn_infer":
        return lambda: cubn.fused_batch_norm(x, g, b, rm, rv, 1e-3, fmt, is_training=False)
    axes = [0, 2, 3] if layout == "NCHW" else list(range(len(shape) - 1))
    return lambda: cubn.moments(x, axes)


@pytest.mark.parametrize("op", ["bn_train", "bn_infer", "moments"])
@pytest.mark.parametrize("layout,shape", CASES, ids=[f"{l}-{'x'.join(map(str, s))}" for l, s in CASES])
def test_host_time(benchmark, launcher, op, layout, shape):
    backend = _adapter.kernel_backend(launcher)
    call = _call(op, layout, shape, launcher)
    with _adapter.routed_to(backend), np.errstate(all="ignore"):
        launcher.clear()
        call()
        launches = len(launcher.launches)

        def once():
            launcher.launches.clear()
            call()

        benchmark.pedantic(once, warmup_rounds=20, rounds=200, iterations=5)
    benchmark.extra_info.update(target_us=TARGET_US, launches=launches, device="H100 plan (model)")
    assert launches >= 1
