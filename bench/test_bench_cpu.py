"""CPU benchmarks (pytest-benchmark): cubn's NumPy backend beside PyTorch and naive NumPy.

    pytest bench/test_bench_cpu.py --benchmark-enable [-k "float32 and moments"]

One test per (shape, dtype, op, peer) and one for the copy bandwidth, so
pytest-benchmark can save and compare runs; peers are the columns of
``cubn.cpu_benchmarks`` (cubn-1t, cubn-Nt, torch-1t, torch-Nt, numpy).
Each test's ``extra_info`` holds the bytes it moves and, for the NumPy-based
peers, its peak memory beyond its outputs. For ratios measured side by side
(interleaved, on a shared machine), run ``bench/run_cpu_peers.py``.
With ``--benchmark-disable`` (the default in pyproject) each case runs once.
"""
from __future__ import annotations

import pytest

from cubn import cpu_benchmarks as C
from cubn.benchmarking import QUICK

SHAPES = QUICK


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}-{'x'.join(map(str, s[1]))}")
def shape(request):
    return request.param


@pytest.fixture(scope="module", params=["float32", "float64"])
def inputs(request, shape):
    inp = C.inputs(shape[0], shape[1], request.param)
    yield inp
    inp.release()


def test_copy_bandwidth(benchmark):
    c = C.Copy()
    benchmark.extra_info.update(bytes=c.nbytes)
    benchmark.pedantic(c, warmup_rounds=1, rounds=10, iterations=1)


@pytest.mark.parametrize("op", C.OPS)
@pytest.mark.parametrize("peer", C.PEERS)
def test_cpu(benchmark, inputs, op, peer):
    if peer.startswith("torch"):
        pytest.importorskip("torch")
    import cubn

    try:
        C.set_threads(peer)
        run = C.build(peer, op, inputs)
        counter = iter(range(10**9))
        benchmark.extra_info.update(bytes=C.TENSOR_PASSES[op] * inputs.nbytes, threads=C.threads_of(peer))
        if peer.startswith("cubn") or peer == "numpy":
            extra, _ = C.peak_memory(run, 0)
            benchmark.extra_info.update(peak_memory_fraction=extra / inputs.nbytes)
        benchmark.pedantic(lambda: run(next(counter) % inputs.k), warmup_rounds=1, rounds=10, iterations=1)
    finally:
        cubn.set_num_threads(None)
