"""Timing one call: CUDA events on the GPU, the wall clock on the CPU."""
from __future__ import annotations

import statistics
import time


def time_gpu(cp, run, k, warmup=3, reps=None, budget_s=0.25):
    """Median/p10/p90 in ms of run(i), CUDA events around each call.

    ``run(i)`` takes input rotation ``i`` (of ``k``); warm-up calls first, then
    as many repetitions as fit ``budget_s`` (15 to 100) unless ``reps`` is given.
    """
    for i in range(warmup):
        run(i % k)
    cp.cuda.Device().synchronize()
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    e0.record()
    run(warmup % k)
    e1.record()
    e1.synchronize()
    est = max(cp.cuda.get_elapsed_time(e0, e1), 1e-3)
    n = reps or int(min(100, max(15, budget_s * 1e3 / est)))
    times = []
    for r in range(n):
        e0.record()
        run(r % k)
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1))
    return summary(times)


def time_cpu(run, k, warmup=1, reps=3):
    """Median/p10/p90 in ms of run(i) by the wall clock."""
    for i in range(warmup):
        run(i % k)
    times = []
    for r in range(reps):
        t = time.perf_counter()
        run(r % k)
        times.append((time.perf_counter() - t) * 1e3)
    return summary(times)


def summary(times):
    """(median, p10, p90, count) of a list of times."""
    s = sorted(times)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return statistics.median(s), q(0.1), q(0.9), len(s)
