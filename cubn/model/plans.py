"""The launches one benchmark call makes, planned for a device preset.

The model runs exactly the calls the benchmark times (the same case
builder), on a ``KernelBackend`` whose launcher is one of the model's
([`cubn.model.tracing`][cubn.model.tracing]), with inputs of the full size that stay
unallocated (``numpy.zeros``) except for what a traced launch touches.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _adapter
from .tracing import RecordingLauncher

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ModelInputs:
    """What the benchmark's case builders read from their inputs."""

    layout: str
    shape: tuple
    dtype: np.dtype
    x: list
    dy: list
    side: list
    gamma: np.ndarray
    beta: np.ndarray
    rmean: np.ndarray
    rvar: np.ndarray
    nbytes: int
    k: int = 1


def make_inputs(layout: str, shape, dtype) -> ModelInputs:
    dtype = np.dtype(_adapter.resolve_dtype(dtype) if isinstance(dtype, str) else dtype)
    c_axis, _ = _adapter.benchmark_axes(layout, len(shape))
    c = shape[c_axis]
    acc = np.float64 if dtype == np.float64 else np.float32
    # zeros: pages nobody touches are never allocated
    x, dy, side = (np.zeros(shape, dtype) for _ in range(3))
    return ModelInputs(layout, tuple(shape), dtype, [x], [dy], [side], np.ones(c, acc), np.zeros(c, acc),
                       np.zeros(c, acc), np.ones(c, acc), x.nbytes)


def run_case(launcher, backend, op: str, inputs: ModelInputs, one_launch: bool = True) -> None:
    """One call of the benchmark's ``op`` on ``backend`` (whose launcher is
    ``launcher``); the launcher keeps only the launches of the call itself
    (the backward's forward context is built before it is cleared)."""
    # np.errstate: the model's data are placeholders, and the statistics a
    # sampled launch leaves are not meant to be looked at.
    with _adapter.one_launch_allowed(one_launch), _adapter.routed_to(backend), np.errstate(all="ignore"):
        run = _adapter.benchmark_case(op, inputs)
        launcher.clear()
        run(0)


def plan(launcher, op: str, layout: str, shape, dtype, one_launch: bool = True):
    """The launches one call of ``op`` makes on ``launcher`` (a RecordingLauncher
    or TracingLauncher), with placeholder inputs of the full size."""
    backend = _adapter.kernel_backend(launcher)
    run_case(launcher, backend, op, make_inputs(layout, shape, dtype), one_launch)
    return list(launcher.launches)


def used_variants(shapes, dtypes=DTYPES, ops=None, device="h200"):
    """Registry variants the benchmark's cubn calls launch on these shapes
    (both training paths: the ``cubn`` and three-launch peers)."""
    ops = ops or _adapter.benchmark_ops()
    launcher = RecordingLauncher(device)
    seen = {}
    for layout, shape in shapes:
        for dt in dtypes:
            if _adapter.resolve_dtype(dt) is None:
                continue
            for op in ops:
                for one_launch in (True, False):
                    for launch in plan(launcher, op, layout, shape, dt, one_launch):
                        v = _adapter.make_variant(launch.source, launch.kernel, launch.template_args)
                        seen[(v.source, v.name_expression)] = v
    return [seen[k] for k in sorted(seen)]


def benchmark_shapes(which: str):
    """The benchmark's shapes: ``"quick"`` or ``"full"``."""
    return _adapter.benchmark_quick() if which == "quick" else _adapter.benchmark_suite()
