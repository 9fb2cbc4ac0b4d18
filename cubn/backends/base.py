"""The seam between the ops and the backends: a few per-channel primitives.

Every op is a sequence of these on a tensor viewed as ``(outer, C, inner)``
(see ``cubn._plan``). The NumPy backend implements them with vectorized NumPy;
the kernel backend (CuPy or emulated) with one kernel launch each. All
per-channel arrays are 1-D of length C in the accumulation dtype.

The kernel backends have two primitives more, ``train_forward_one_launch``
and ``backward_one_launch``: the whole training forward, or the whole
backward, in one launch when every channel fits in one block. Whether they
run is decided once, by ``one_launch.decide`` (the ops call it with the
backend's ``info``: None on the NumPy backend, which has no such path).
The preprocessing API is a second client of the same backends, through four
primitives of its own (``input_partials``, ``merge_into_state``,
``affine_map``, ``affine_transpose``). [`Backend`][Backend] and
[`OneLaunchBackend`][OneLaunchBackend] list the interface.

Normalization is always written ``y = act((x - mean) * scale + shift + side)``:
subtracting the mean first keeps every digit when |mean| >> std, which the
folded form ``x * scale + (shift - mean * scale)`` would lose.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable


@dataclass(frozen=True)
class DeviceInfo:
    """What the launch configuration needs to know about a device."""

    name: str
    multiprocessor_count: int
    max_threads_per_block: int
    max_shared_memory_per_block: int
    warp_size: int = 32
    compute_capability: int | None = None  # major * 10 + minor; None: no GPU (occupancy as sm_90)


class Partials(NamedTuple):
    """Welford triples per (split, column): arrays of shape (nsplit, C * fold).

    Column j belongs to channel j % C; ``fold > 1`` when a channels-last
    kernel folded several outer rows into one row to fill its warps.
    ``pivot`` (the same shape): each mean is relative to its pivot (the
    kernels shift by a nearby element of the data so that offsets cost no
    digits; merges re-express means about a common pivot); None: the means
    are the means. ``weighted``: from a weighted reduction (a channel whose
    weights sum to 0 has mean 0 and variance 0, not NaN).
    """

    count: Any
    mean: Any
    m2: Any
    fold: int = 1
    pivot: Any = None
    weighted: bool = False


class Sums(NamedTuple):
    """Backward partial sums S1 = sum(dy'), S2 = sum(dy' (x - mean)), laid out like Partials."""

    s1: Any
    s2: Any
    fold: int = 1


@dataclass
class Weights:
    """Frequency weights of a weighted reduction, in the accumulation dtype.

    ``kind == "outer"``: ``values`` has one weight per group of ``divisor``
    consecutive outer indices (outer index ``o`` uses ``values[o // divisor]``),
    which is how ``[N]`` batch weights reach an NHWC tensor without being
    expanded. ``kind == "full"``: ``values`` has the (outer, C, inner) shape.
    """

    kind: str
    values: Any
    divisor: int = 1


@dataclass
class Renorm:
    renorm_mean: Any          # pre-update values (C,)
    renorm_stddev: Any
    rmin: float = 0.0
    rmax: float = float("inf")
    dmax: float = float("inf")


@dataclass
class Fold:
    """How the statistics become the normalization coefficients.

    ``y = gamma * (adj_scale * (r * xhat + d) + adj_bias) + beta`` with
    ``xhat = (x - mean) * invstd``; missing pieces are the identity.
    """

    eps: float
    gamma: Any = None
    beta: Any = None
    adj_scale: Any = None
    adj_bias: Any = None
    renorm: Renorm | None = None


@dataclass
class MovingUpdate:
    """Moving statistics: ``new = old - (old - batch) * a`` (``old`` None: ``new = batch``).

    ``mean_in``/``var_in`` and ``mean_out``/``var_out`` may be the same array
    (in place). The variance fed in is the batch's Bessel-corrected one when
    ``bessel`` and the biased one otherwise. With ``zd_biased`` the mean is
    TF's zero-debiased EMA: ``biased -= (biased - batch) * a`` and
    ``mean_out = biased / zd_factor`` (``zd_factor = 1 - decay**t``). With
    renorm, ``renorm_mean``/``renorm_stddev`` move with ``renorm_a`` and
    ``moving_stddev`` with ``a`` toward ``sqrt(var + eps)``, and
    ``var_out = max(moving_stddev**2 - eps, 0)``.
    """

    a: float
    bessel: bool
    mean_in: Any = None
    mean_out: Any = None
    var_in: Any = None
    var_out: Any = None
    zd_biased: Any = None
    zd_factor: float = 1.0
    renorm_a: float = 0.0
    renorm_mean: Any = None
    renorm_stddev: Any = None
    moving_stddev: Any = None
    eps: float = 0.0


@dataclass
class Stats:
    """Per-channel results of ``finalize``; what backward needs is kept here."""

    count: Any
    mean: Any
    var: Any            # biased (population) variance
    invstd: Any         # 1 / sqrt(var + eps)
    scale: Any          # y = (x - mean) * scale + shift
    shift: Any
    gcoef: Any          # d gamma = gcoef * sum(dy' (x - mean)) + hcoef * sum(dy')
    hcoef: Any
    r: Any = None       # renorm corrections (None without renorm)
    d: Any = None


class Affine(NamedTuple):
    """Folded coefficients: ``y = act((x - mean) * scale + shift + side)``."""

    mean: Any
    scale: Any
    shift: Any


class RawAffine(NamedTuple):
    """Inference straight from statistics: ``scale = gamma / sqrt(var + eps)``,
    ``shift = beta``; computed inside the normalize kernel (one launch)."""

    mean: Any
    var: Any
    gamma: Any
    beta: Any
    eps: float


class BackwardCoeffs(NamedTuple):
    """``dx = scale * dy' - w * (k1 + k2 * (x - mean))``; dgamma, dbeta per channel."""

    dgamma: Any
    dbeta: Any
    k1: Any
    k2: Any


# ---------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------
@runtime_checkable
class Backend(Protocol):
    """What the ops, the layers and the preprocessing API call on a backend."""

    name: str
    xp: Any                   # the array module (numpy or cupy)
    info: DeviceInfo | None   # the device's limits; None: no device (no one-launch path)

    # statistics
    def welford_partials(self, plan, x3, acc, weights=None) -> Partials: ...
    def finalize(self, partials, acc, fold, update=None, given=None) -> Stats: ...
    def merge_partials(self, partials, acc) -> Partials: ...
    def merge_sums(self, sums, acc) -> Sums: ...
    def moving_update(self, stats, acc, u) -> None: ...

    # elementwise and backward
    def normalize(self, plan, x3, affine, side3, act, acc, out_dtype): ...
    def backward_partials(self, plan, dy3, x3, side3, affine, act, acc) -> Sums: ...
    def backward_finalize(self, sums, stats, acc, training) -> BackwardCoeffs: ...
    def backward_apply(self, plan, dy3, x3, side3, affine, act, coeffs, weights, acc, want_dside, out_dtype,
                       side_dtype): ...

    # preprocessing
    def input_partials(self, plan, x3, acc, weights=None) -> Partials: ...
    def merge_into_state(self, partials, acc, state) -> None: ...
    def affine_map(self, x3, a, d, out_dtype, inverse): ...
    def affine_transpose(self, x3, channel_last, a, d, out_dtype, inverse): ...


@runtime_checkable
class OneLaunchBackend(Backend, Protocol):
    """A backend with the one-launch path (the kernel backends); ``launch``: a ``one_launch.OneLaunch``."""

    def train_forward_one_launch(self, launch, plan, x3, acc, fold, update, side3, act): ...
    def backward_one_launch(self, launch, plan, dy3, x3, side3, stats, act, acc, training, want_dside): ...


def statistics(backend, plan, x3, acc, weights=None, fold=None, update=None) -> Stats:
    """``backend.finalize(backend.welford_partials(...), ...)``, in one launch on a backend
    with fused statistics (``fused_statistics``: the kernel backends)."""
    fused = getattr(backend, "fused_statistics", None)
    if fused is not None:
        stats = fused(plan, x3, acc, weights, fold, update)
        if stats is not None:
            return stats
    return backend.finalize(backend.welford_partials(plan, x3, acc, weights), acc, fold, update)
