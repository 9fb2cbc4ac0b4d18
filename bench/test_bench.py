"""pytest-benchmark entry points over cubn's benchmark suite.

    pytest bench/                             # run
    pytest bench/ --benchmark-autosave
    pytest bench/ --benchmark-compare         # against the last saved run

Each case synchronizes the device inside the timed call, so pytest-benchmark's
wall clock measures finished GPU work. ``cubn bench`` runs the same cases with
CUDA events and writes the committed reports (bench/results/).
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from cubn import benchmarking as B

SHAPES = B.QUICK
DTYPES = ["float32", "float16", "bfloat16"]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}-{'x'.join(map(str, s[1]))}")
def shape(request):
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", B.OPS)
@pytest.mark.parametrize("peer", list(B.PEERS))
def test_bench(benchmark, shape, dtype, op, peer):
    layout, shp = shape
    if peer == "cubn_three_launch" and op not in B.ONE_LAUNCH_OPS:
        pytest.skip(f"{op} runs the same kernels as cubn")
    with B.peer_context(peer):
        _bench(benchmark, layout, shp, dtype, op, peer)


def _bench(benchmark, layout, shp, dtype, op, peer):
    dt = B.resolve_dtype(dtype)
    if dt is None:
        pytest.skip(f"{dtype} unavailable")
    if peer == "numpy":
        if dtype != "float32" or np.prod(shp) > B.NUMPY_MAX_ELEMENTS:
            pytest.skip("numpy: float32 shapes up to 4M elements")
        inp = B.Inputs(np, layout, shp, dt)
        run = B.PEERS[peer].build(op, inp)
        sync = lambda: None  # noqa: E731
    else:
        if not cubn.gpu_available():
            pytest.skip("no CUDA device")
        import cupy as cp

        if peer == "torch":
            pytest.importorskip("torch")
        inp = B.Inputs(cp, layout, shp, dt)
        run = B.PEERS[peer].build(op, inp)
        sync = cp.cuda.Device().synchronize
    counter = iter(range(10**9))

    def call():
        run(next(counter) % inp.k)
        sync()

    benchmark.extra_info.update(bytes=B.TENSOR_PASSES[op] * inp.nbytes)
    benchmark.pedantic(call, warmup_rounds=3, rounds=20, iterations=1)
