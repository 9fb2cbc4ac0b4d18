"""Scoped options: context managers over ``contextvars``, like ``cubn.use_backend``.

An option set with ``with`` holds for the calls made inside the block, in
this thread (and the asyncio task, or the ``contextvars.copy_context()`` run,
that entered it); other threads keep their own value. Options change which
kernels run, never the numbers a call promises.
"""
from __future__ import annotations

import contextlib
import contextvars

from ._checks import arg_error

_one_launch: contextvars.ContextVar[bool] = contextvars.ContextVar("cubn_one_launch", default=True)


@contextlib.contextmanager
def use_one_launch(enabled: bool = True):
    """Allow (default) or forbid the one-launch path inside the block.

    The one-launch path runs the training forward -- statistics, finalize
    and normalize -- and the backward each in a single kernel launch when
    every channel fits in one block's registers (see docs/kernels.md). With
    ``use_one_launch(False)`` the kernel backends always run the
    three-launch path; the benchmarks time both paths this way, and the
    tests check that both give the same results.
    """
    if not isinstance(enabled, bool):
        raise arg_error(TypeError, "use_one_launch", "enabled", "True or False", repr(enabled))
    token = _one_launch.set(enabled)
    try:
        yield
    finally:
        _one_launch.reset(token)


def one_launch_enabled() -> bool:
    """Whether the one-launch path may run here (see [`use_one_launch`][use_one_launch])."""
    return _one_launch.get()
