"""The peers measured side by side with cubn, pluggable.

A [`Peer`][Peer] builds, for one op and one [`Inputs`][cubn.benchmarking.cases.Inputs],
a callable ``run(i)`` over input rotation ``i``. It runs on the GPU (CuPy
inputs, CUDA-event timing) or on the CPU (NumPy inputs, the wall clock), may
cover only some ops or cases (``skip``), and is built and timed inside its
``options()`` (scoped options such as ``cubn.use_one_launch(False)``).
[`register`][register] adds one; ``cubn bench`` runs every registered peer.

Built in: ``cubn`` (our kernels), ``cubn_three_launch`` (the same with the
one-launch path switched off), ``torch`` (``torch.nn.functional.batch_norm``
and its relu/add, channels_last for NHWC, tensors shared through DLPack),
``cupy_naive`` (CuPy mean/var and elementwise expressions) and ``numpy``
(cubn's NumPy backend on the CPU, a few shapes, for scale).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

from .cases import EPS, MOMENTUM, ONE_LAUNCH_OPS, channel_axis, reduce_axes

NUMPY_MAX_ELEMENTS = 1 << 22          # with a GPU: NumPy is only there for scale
NUMPY_MAX_ELEMENTS_CPU_ONLY = 1 << 24  # without one, NumPy is all there is to plot


class Skip(Exception):
    """A peer has nothing to measure for this case (recorded as skipped, with the reason)."""


class SameAsCubn(Skip):
    """cubn_three_launch on an op without a one-launch path."""


@dataclass(frozen=True)
class Peer:
    """One implementation measured by the suite."""

    name: str
    build: Callable            # (op, inputs) -> run(i); may raise Skip
    device: str = "gpu"        # "gpu" or "cpu"
    label: str = ""            # its column in the table (default: the name)
    options: Callable = contextlib.nullcontext  # () -> the context it is built and timed in
    skip: Callable | None = None  # (layout, shape, dtype name, gpu present) -> reason, or None

    @property
    def column(self) -> str:
        return self.label or self.name


PEERS: dict = {}  # name -> Peer, in registration order (the table's column order)


def register(peer: Peer) -> Peer:
    """Add (or replace) a peer of ``cubn bench``."""
    PEERS[peer.name] = peer
    return peer


def peer_context(name):
    """The scoped options a peer is built and timed under."""
    return PEERS[name].options()


def _cubn_case(op, inp):
    import cubn
    from cubn import _dtypes
    from cubn._backend import select
    from cubn._plan import plan_for_channels
    from cubn.backends.base import Fold
    from cubn.ops.normalization import bn_backward, bn_forward

    fmt = "NCHW" if inp.layout == "NCHW" else "NHWC"
    axes = reduce_axes(inp.layout, len(inp.shape))
    g, b, rm, rv = inp.gamma, inp.beta, inp.rmean, inp.rvar
    if op == "moments":
        return lambda i: cubn.moments(inp.x[i], axes)
    if op == "bn_train":
        return lambda i: cubn.fused_batch_norm(inp.x[i], g, b, rm, rv, EPS, fmt, exponential_avg_factor=MOMENTUM)
    if op == "bn_infer":
        return lambda i: cubn.fused_batch_norm(inp.x[i], g, b, rm, rv, EPS, fmt, is_training=False)
    if op == "bn_relu":
        return lambda i: cubn.fused_batch_norm(inp.x[i], g, b, rm, rv, EPS, fmt, exponential_avg_factor=MOMENTUM,
                                               activation="relu")
    if op == "bn_add_relu":
        return lambda i: cubn.fused_batch_norm(inp.x[i], g, b, rm, rv, EPS, fmt, exponential_avg_factor=MOMENTUM,
                                               activation="relu", side_input=inp.side[i % len(inp.side)])
    if op == "backward":
        # What BatchNorm.backward runs: the saved forward context, then 3 launches.
        ctxs = []
        for x in inp.x:
            backend = select("bench", "x", x)
            plan = plan_for_channels(x.shape, fmt, "bench")
            acc = _dtypes.acc_dtype(x.dtype)
            _, ctx = bn_forward(backend, plan, plan.view3(x), acc, training=True, fold=Fold(EPS, g, b))
            ctxs.append((ctx, plan))
        return lambda i: bn_backward(ctxs[i][0], ctxs[i][1].view3(inp.dy[i % len(inp.dy)]), False)
    raise KeyError(op)


def _torch_case(op, inp):
    import torch
    import torch.nn.functional as F

    nd = len(inp.shape)

    def tt(a):
        t = torch.from_dlpack(a)
        if inp.layout == "NHWC":  # NCHW logical view with channels_last strides
            t = t.permute(0, nd - 1, *range(1, nd - 1))
        return t

    xs = [tt(x) for x in inp.x]
    dys = [tt(d) for d in inp.dy]
    sides = [tt(s) for s in inp.side]
    w, b = torch.from_dlpack(inp.gamma), torch.from_dlpack(inp.beta)
    rm, rv = torch.from_dlpack(inp.rmean).clone(), torch.from_dlpack(inp.rvar).clone()
    dims = tuple(a for a in range(nd) if a != 1)
    if op == "moments":
        return lambda i: torch.var_mean(xs[i], dim=dims, correction=0)
    if op == "bn_train":
        return lambda i: F.batch_norm(xs[i], rm, rv, w, b, True, MOMENTUM, EPS)
    if op == "bn_infer":
        return lambda i: F.batch_norm(xs[i], rm, rv, w, b, False, MOMENTUM, EPS)
    if op == "bn_relu":
        return lambda i: F.relu(F.batch_norm(xs[i], rm, rv, w, b, True, MOMENTUM, EPS), inplace=True)
    if op == "bn_add_relu":
        return lambda i: F.batch_norm(xs[i], rm, rv, w, b, True, MOMENTUM, EPS).add_(sides[i % len(sides)]).relu_()
    if op == "backward":
        saved = [torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, MOMENTUM, EPS) for x in xs]
        return lambda i: torch.ops.aten.native_batch_norm_backward(
            dys[i % len(dys)], xs[i], w, rm, rv, saved[i][1], saved[i][2], True, EPS, [True, True, True])
    raise KeyError(op)


def _cupy_naive_case(op, inp):
    xp = inp.xp
    nd = len(inp.shape)
    axes = reduce_axes(inp.layout, nd)
    shp = [1] * nd
    shp[channel_axis(inp.layout, nd)] = inp.c
    g, b = inp.gamma.reshape(shp), inp.beta.reshape(shp)
    rm, rv = inp.rmean.reshape(shp), inp.rvar.reshape(shp)
    n = math.prod(inp.shape) // inp.c

    def train(x):
        m = x.mean(axis=axes, keepdims=True)
        v = x.var(axis=axes, keepdims=True)
        return (x - m) / xp.sqrt(v + EPS) * g + b

    if op == "moments":
        return lambda i: (inp.x[i].mean(axis=axes), inp.x[i].var(axis=axes))
    if op == "bn_train":
        return lambda i: train(inp.x[i])
    if op == "bn_infer":
        return lambda i: (inp.x[i] - rm) / xp.sqrt(rv + EPS) * g + b
    if op == "bn_relu":
        return lambda i: xp.maximum(train(inp.x[i]), 0)
    if op == "bn_add_relu":
        return lambda i: xp.maximum(train(inp.x[i]) + inp.side[i % len(inp.side)], 0)
    if op == "backward":
        stats = [(x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)) for x in inp.x]

        def bwd(i):
            x, dy = inp.x[i], inp.dy[i % len(inp.dy)]
            m, v = stats[i]
            inv = 1 / xp.sqrt(v + EPS)
            xhat = (x - m) * inv
            db = dy.sum(axis=axes, keepdims=True)
            dg = (dy * xhat).sum(axis=axes, keepdims=True)
            return g * inv * (dy - db / n - xhat * dg / n), dg, db

        return bwd
    raise KeyError(op)


def _numpy_case(op, inp):
    return _cubn_case(op, inp)  # cubn on NumPy arrays: the NumPy backend


def _numpy_skip(layout, shape, dtype, gpu):
    limit = NUMPY_MAX_ELEMENTS if gpu else NUMPY_MAX_ELEMENTS_CPU_ONLY
    if math.prod(shape) > limit or dtype != "float32":
        return f"numpy runs only float32 shapes up to {limit >> 20}M elements"
    return None


def _cubn_three_launch_case(op, inp):
    if op not in ONE_LAUNCH_OPS:
        raise SameAsCubn(f"{op} runs the same kernels as cubn")
    return _cubn_case(op, inp)  # built and timed inside cubn.use_one_launch(False)


def _one_launch_off():
    import cubn

    return cubn.use_one_launch(False)


register(Peer("cubn", _cubn_case))
register(Peer("cubn_three_launch", _cubn_three_launch_case, label="three-launch", options=_one_launch_off))
register(Peer("torch", _torch_case))
register(Peer("cupy_naive", _cupy_naive_case, label="naive"))
register(Peer("numpy", _numpy_case, device="cpu", skip=_numpy_skip))
