"""Views of a tensor as ``(outer, C, inner)``: the one shape every primitive sees.

A per-channel reduction keeps a block of consecutive axes (the "channels") and
reduces the axes before it (``outer``) and after it (``inner``). NHWC and
``(N, C)`` have ``inner == 1`` (channels last); NCHW has ``outer = N`` and
``inner = H*W`` (channels first). Kept axes that are not consecutive are made
so by a transpose, which costs one copy; every layout a layer uses avoids it.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from ._checks import arg_error

# data_format -> where the channel axis is
_CHANNELS_LAST = {"NHWC", "NDHWC", "NWC", "NC"}
_CHANNELS_FIRST = {"NCHW", "NCDHW", "NCW"}
DATA_FORMATS = ("NHWC", "NCHW", "NDHWC", "NCDHW")


@dataclass(frozen=True)
class Plan:
    shape: tuple           # shape of the (possibly transposed) tensor the kernels see
    outer: int
    channels: int
    inner: int
    kept: tuple            # kept axes of the original tensor, in order
    perm: tuple | None     # transpose applied before viewing as 3-D (None: none)
    orig_shape: tuple
    outer_axes: int = 0    # how many leading axes of ``shape`` make up ``outer``

    @property
    def channels_last(self) -> bool:
        return self.inner == 1

    @property
    def size(self) -> int:
        return self.outer * self.channels * self.inner

    @property
    def per_channel(self) -> int:
        """Elements reduced into each channel."""
        return self.outer * self.inner

    @property
    def stat_shape(self) -> tuple:
        """Shape of a statistic without keepdims (the kept axes)."""
        return tuple(self.orig_shape[a] for a in self.kept)

    @property
    def keepdims_shape(self) -> tuple:
        kept = set(self.kept)
        return tuple(n if a in kept else 1 for a, n in enumerate(self.orig_shape))

    def view3(self, x):
        """``x`` (original layout) as a C-contiguous (outer, C, inner) array."""
        if self.perm is not None:
            x = x.transpose(self.perm)
        if not x.flags.c_contiguous:
            x = _contiguous(x)
        return x.reshape(self.outer, self.channels, self.inner)

    def unview3(self, y3):
        """Inverse of [`view3`][view3] for an output of the same shape."""
        y = y3.reshape(self.shape)
        if self.perm is not None:
            inv = [0] * len(self.perm)
            for i, p in enumerate(self.perm):
                inv[p] = i
            y = y.transpose(inv)
        return y


def _contiguous(x):
    from ._backend import array_module

    return array_module(x).ascontiguousarray(x)


def plan_for_kept_axes(shape, kept) -> Plan:
    """Plan for statistics that keep the axes ``kept`` (sorted, unique)."""
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    kept = tuple(sorted(kept))
    if kept and kept != tuple(range(kept[0], kept[-1] + 1)):
        # Not consecutive: move the kept axes to the end (one transpose copy).
        reduced = tuple(a for a in range(ndim) if a not in kept)
        perm = reduced + kept
        tshape = tuple(shape[a] for a in perm)
        outer = math.prod(shape[a] for a in reduced)
        channels = math.prod(shape[a] for a in kept)
        return _normalized(Plan(tshape, outer, channels, 1, kept, perm, shape, len(reduced)))
    if not kept:
        return _normalized(Plan(shape, 1, 1, math.prod(shape), kept, None, shape))
    a, b = kept[0], kept[-1]
    outer = math.prod(shape[:a])
    channels = math.prod(shape[a : b + 1])
    inner = math.prod(shape[b + 1 :])
    return _normalized(Plan(shape, outer, channels, inner, kept, None, shape, a))


def _normalized(p: Plan) -> Plan:
    # One channel: read it as one contiguous run (channels-first with outer 1)
    # so the kernels split it over many blocks and load it with wide vectors.
    if p.channels == 1 and p.outer != 1:
        return Plan(p.shape, 1, 1, p.outer * p.inner, p.kept, p.perm, p.orig_shape, 0)
    return p


_REDUCTION_PLANS: dict = {}


def plan_for_reduction(shape, axes, func: str) -> Plan:
    """Plan for ``moments(x, axes)``: reduce ``axes``, keep the rest (memoized: plans are immutable)."""
    key = plan = None
    # only plain ints: 0.0 == 0 would otherwise find the plan of axes=[0] instead of an error
    if type(axes) is int or (type(axes) in (list, tuple) and all(type(a) is int for a in axes)):
        key = (tuple(shape), axes if type(axes) is int else tuple(axes))
        plan = _REDUCTION_PLANS.get(key)
    if plan is None:
        plan = _plan_for_reduction(shape, axes, func)
        if key is not None and len(_REDUCTION_PLANS) < 1024:
            _REDUCTION_PLANS[key] = plan
    return plan


def _plan_for_reduction(shape, axes, func):
    ndim = len(shape)
    if isinstance(axes, int):
        axes = (axes,)
    try:
        axes = [operator.index(a) for a in axes]
    except TypeError:
        raise arg_error(TypeError, func, "axes", "a sequence of ints", repr(axes)) from None
    norm = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise arg_error(
                ValueError, func, "axes", f"axes in [-{ndim}, {ndim}) for a rank-{ndim} x", repr(axes)
            )
        norm.append(a % ndim)
    if len(set(norm)) != len(norm):
        raise arg_error(ValueError, func, "axes", "no repeated axis", repr(axes))
    kept = tuple(a for a in range(ndim) if a not in norm)
    return plan_for_kept_axes(shape, kept)


def channel_axis(ndim: int, data_format: str, func: str) -> int:
    """The channel axis of a rank-``ndim`` tensor in ``data_format``."""
    if not isinstance(data_format, str) or data_format.upper() not in _CHANNELS_LAST | _CHANNELS_FIRST:
        raise arg_error(
            ValueError, func, "data_format", "one of " + ", ".join(repr(d) for d in DATA_FORMATS),
            repr(data_format),
        )
    fmt = data_format.upper()
    if fmt in ("NDHWC", "NCDHW") and ndim != 5:
        raise arg_error(ValueError, func, "data_format", f"{fmt!r} with a rank-5 input", f"rank {ndim}")
    if ndim == 2:
        return 1  # (N, C): statistics over the batch axis, whatever the format
    return ndim - 1 if fmt in _CHANNELS_LAST else 1


_CHANNEL_PLANS: dict = {}


def plan_for_channels(shape, data_format: str, func: str, *, min_rank=2, max_rank=5) -> Plan:
    """Plan for batch normalization: statistics over all axes but the channel axis (memoized: plans are immutable)."""
    key = (tuple(shape), data_format, func, min_rank, max_rank) if isinstance(data_format, str) else None
    plan = _CHANNEL_PLANS.get(key) if key is not None else None
    if plan is None:
        plan = _plan_for_channels(shape, data_format, func, min_rank, max_rank)
        if key is not None and len(_CHANNEL_PLANS) < 1024:
            _CHANNEL_PLANS[key] = plan
    return plan


def _plan_for_channels(shape, data_format, func, min_rank, max_rank) -> Plan:
    ndim = len(shape)
    if not min_rank <= ndim <= max_rank:
        raise arg_error(
            ValueError, func, "x", f"a tensor of rank {min_rank} to {max_rank}", f"shape {tuple(shape)} (rank {ndim})"
        )
    ax = channel_axis(ndim, data_format, func)
    if shape[ax] == 0:
        raise arg_error(
            ValueError, func, "x", "a channel dimension of size >= 1",
            f"shape {tuple(shape)} with {shape[ax]} channels on axis {ax} ({data_format})",
        )
    return plan_for_kept_axes(shape, (ax,))
