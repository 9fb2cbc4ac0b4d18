"""The CPU threads of the NumPy backend.

NumPy's ufuncs and reductions release the GIL while they run, so the NumPy
backend splits large arrays into cache-sized chunks and runs them on a small
pool of threads. How an array is split, and the order in which the partial
results are merged, depend only on its shape: results are bitwise identical
for every thread count.

The default is one thread per CPU this process may run on
(``os.sched_getaffinity``); ``set_num_threads`` overrides it.
"""
from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._checks import arg_error

# NumPy's ufuncs buffer an operand that is broadcast along rows shorter than
# the buffer size (8192 elements by default), which runs 2-3x slower than the
# plain loop; the chunks' rows are at least this long, so a smaller buffer
# keeps every loop unbuffered. Set in the threads that run chunks only.
UFUNC_BUFSIZE = 1024
DEFAULT_BUFSIZE = 8192

_lock = threading.Lock()
_requested: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def get_num_threads() -> int:
    """How many threads the NumPy backend runs large arrays on."""
    return _requested if _requested is not None else _available_cpus()


def set_num_threads(n: int | None) -> None:
    """Run the NumPy backend's large arrays on ``n`` threads (``None``: one per available CPU).

    Results do not depend on ``n``: arrays are split by shape alone and merged
    in a fixed order. ``n = 1`` runs everything in the calling thread.
    """
    global _requested
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise arg_error(TypeError, "set_num_threads", "n", "an int >= 1 or None", repr(n))
        if n < 1:
            raise arg_error(ValueError, "set_num_threads", "n", "an int >= 1 or None", repr(n))
        n = int(n)
    with _lock:
        _requested = n


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < workers:
            old = _pool
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cubn")
            _pool_size = workers
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def _after_fork() -> None:  # a forked child has no pool threads: start afresh
    global _pool, _pool_size, _lock
    _lock = threading.Lock()
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _drain(counter, n_tasks, task, bufsize) -> None:
    """Run tasks taken from ``counter`` until none is left (in any thread)."""
    old = np.setbufsize(bufsize)
    try:
        with np.errstate(all="ignore"):  # NaN/Inf propagate to their channel by design
            for i in counter:
                if i >= n_tasks:
                    return
                task(i)
    finally:
        np.setbufsize(old)


def _serial(n_tasks, task, bufsize) -> None:
    """All tasks in the calling thread. The callers (the NumPy backend's
    primitives) already ignore floating-point errors, and the buffer size is
    changed only where it differs: on small arrays these calls cost as much
    as the arithmetic."""
    old = np.getbufsize()
    if old != bufsize:
        np.setbufsize(bufsize)
    try:
        for i in range(n_tasks):
            task(i)
    finally:
        if old != bufsize:
            np.setbufsize(old)


def run(n_tasks: int, task, bufsize: int = UFUNC_BUFSIZE) -> None:
    """Call ``task(i)`` for every ``i`` in ``range(n_tasks)``, on up to ``get_num_threads()`` threads.

    The calling thread takes part. ``bufsize`` is NumPy's ufunc buffer size
    in the threads while they run tasks: small for loops without casts, the
    default (8192) for loops that cast (16-bit floats), whose buffers it sizes. ``task`` writes its results to its own
    slot; which thread runs which ``i`` varies, nothing else does. The first
    exception raised by a task is raised here once all threads have stopped.
    """
    threads = min(get_num_threads(), n_tasks)
    if threads <= 1:
        _serial(n_tasks, task, bufsize)
        return
    counter = itertools.count()
    pool = _executor(threads - 1)
    futures = [pool.submit(_drain, counter, n_tasks, task, bufsize) for _ in range(threads - 1)]
    try:
        _drain(counter, n_tasks, task, bufsize)
    except BaseException:
        for f in futures:  # stop handing out work, then let the others finish
            f.cancel()
        for _ in range(n_tasks):
            if next(counter) >= n_tasks:
                break
        for f in futures:
            if not f.cancelled():
                f.exception()
        raise
    for f in futures:
        f.result()
