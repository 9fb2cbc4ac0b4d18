"""``cubn.SyncBatchNorm``: BatchNorm over a batch split across processes.

Each rank computes the (count, mean, M2) Welford triple of every channel of
its own slice with the usual kernels (the mean relative to a pivot of the
channel, which travels with it), the ranks all-gather the triples, and
the finalize step merges them (about common pivots) with Chan's formula in
rank order -- the same
numbers, bit for bit, on every rank. Backward all-reduces the two per-channel
sums it needs. The result is ``BatchNorm`` on the concatenated batch
(outputs, moving statistics, gradients) up to rounding. The communication is
``cubn.distributed``: mpi4py or NCCL, nothing of our own.

Before each exchange the ranks all-gather a small fixed-size header (channel
count, dtype, data_format, input rank, sample count, call number, a failure
flag and message); a disagreement becomes the same clear error on every rank
instead of a hang or a silent mix of unrelated statistics.
"""
from __future__ import annotations

import functools
import json
import zlib
from typing import NamedTuple

import numpy as np

from .. import _dtypes
from .._backend import is_cupy_array
from .._checks import arg_error, describe
from ..backends._memory import pointer
from ..backends.base import Partials, Sums
from ..distributed.comm import ExchangeTimeout, as_communicator
from .batch_norm import BatchNorm

# -- the consistency header: HEADER_WORDS int64 per rank ----------------------
MAGIC = 0x6375626E  # "cubn": anything else means the collectives are out of order
FORWARD, BACKWARD = 1, 2
(_MAGIC, _KIND, _CALL, _FAILED, _CHANNELS, _DTYPE, _FORMAT, _NDIM, _PER_CHANNEL, _WEIGHTED,
 _CONFIG, _MSGLEN) = range(12)
_MSG_BYTES = 160
HEADER_WORDS = 12 + _MSG_BYTES // 8  # 32 words = 256 bytes
_ERROR_TYPES = (RuntimeError, ValueError, TypeError)  # a failed rank's error type, relayed by index
_FORMATS = ("NHWC", "NCHW")


class _Local(NamedTuple):
    """What this rank's call looks like, for the header."""

    channels: int
    dtype: int       # the dtype's sync_code in the dtype table (cubn._dtypes)
    fmt: int         # index in _FORMATS
    ndim: int
    per_channel: int  # elements per channel in this rank's slice (0: an empty slice)
    weighted: int


class SyncBatchNorm(BatchNorm):
    """``BatchNorm`` whose training statistics are those of every rank's batch together.

    ``y = bn(x, is_training=True, batch_weights=None, side_input=None)`` on
    each rank with its own slice ``x`` of the global batch;
    ``dx = bn.backward(dy)`` with that slice's ``dy``. Training outputs,
    moving statistics and gradients equal ``BatchNorm`` on the concatenated
    batch (with the concatenated ``dy``), and are identical on every rank.
    Slices may have different sizes, and a rank may have zero samples (the
    whole batch must not be empty). With ``batch_weights`` the counts that
    are merged are weight totals. Inference (``is_training=False``) is local
    and communicates nothing.

    ``bn.gradients`` are the gradients of the whole batch (the sum over
    ranks), already the same on every rank: do not all-reduce them again. If
    your optimizer averages the other gradients over ranks, divide these by
    the number of ranks to match.

    Every rank must make the same training calls and backward calls of the
    layer, in the same order (collectives are matched by order). A rank
    whose call differs -- channel count, dtype, data_format, input rank,
    batch_weights or not, layer configuration, or one that is a call ahead
    -- makes every rank raise the same error at that exchange; a rank whose
    call fails its own argument checks makes the others raise that error
    too. A rank that never calls again -- it raised outside the layer, or
    exited -- leaves the others waiting in the exchange for at most
    ``timeout`` seconds; then each of them raises
    [`cubn.distributed.ExchangeTimeout`][cubn.distributed.comm.ExchangeTimeout] saying where it waited, and
    the communicator cannot be used again (a collective cannot be
    cancelled). Launch with ``mpiexec -n K python -m mpi4py script.py``:
    then the first uncaught exception on any rank aborts every rank at once.

    Args:
        comm: None (``mpi4py``'s ``MPI.COMM_WORLD``, taken at the first
            training call), an ``mpi4py`` communicator (any arrays; CuPy
            arrays staged through the host -- wrap it as
            ``cubn.distributed.MPIComm(comm, cuda_aware=True)`` for a
            CUDA-aware MPI), a ``cupy.cuda.nccl.NcclCommunicator`` or a
            ``cupyx.distributed.NCCLBackend`` (CuPy arrays on its device), or a
            ``cubn.distributed.Communicator``.
        verify: exchange the consistency header before each exchange (256
            bytes per rank). With NCCL reading it back waits for the GPU once
            per exchange; ``verify=False`` skips it -- and with it every
            check above, including the empty-batch one (an all-empty batch
            then gives NaN statistics). Must be the same on every rank.
        timeout: seconds a rank waits for the others in one exchange before
            it raises ``ExchangeTimeout`` (default 600: more than a slow
            rank's first kernel compilation); None waits forever. With NCCL
            the bound applies to the consistency header (``verify=True``):
            the statistics themselves are only enqueued on the GPU, so a rank
            that disappears is noticed at the next header exchange.
        **kwargs: the arguments of [`cubn.BatchNorm`][cubn.layers.batch_norm.BatchNorm].
    """

    def __init__(self, comm=None, *, verify=True, timeout=600.0, **kwargs):
        super().__init__(**kwargs)
        self._comm = None if comm is None else as_communicator(comm)
        self.verify = bool(verify)
        self.timeout = _check_timeout(timeout)
        self._calls = 0        # training calls made on this rank: the header's call number
        self._pending = None   # (kind, call) whose header has not been exchanged yet

    @property
    def comm(self):
        """The [`cubn.distributed.Communicator`][cubn.distributed.comm.Communicator] (None: MPI.COMM_WORLD, resolved now)."""
        if self._comm is None:
            self._comm = as_communicator(None)
        return self._comm

    # ------------------------------------------------------------------
    def forward(self, x, is_training=True, batch_weights=None, side_input=None, mask=None):
        if not is_training:
            return super().forward(x, is_training=False, batch_weights=batch_weights, side_input=side_input,
                                   mask=mask)
        self._calls += 1
        self._pending = (FORWARD, self._calls)
        try:
            return super().forward(x, is_training=True, batch_weights=batch_weights, side_input=side_input,
                                   mask=mask)
        except Exception as e:
            self._abort(e)
            raise
        finally:
            self._pending = None

    def backward(self, dy, ctx=None):
        try:
            handle = self._context_for("SyncBatchNorm.backward", ctx)
        except (RuntimeError, TypeError, ValueError):
            handle = None  # BatchNorm.backward raises the same error below
        ex = handle.op.exchange if handle is not None else None
        if ex is None:  # after an inference call: nothing to exchange
            return super().backward(dy, ctx)
        self._pending = (BACKWARD, ex.call)
        try:
            return super().backward(dy, ctx)
        except Exception as e:
            self._abort(e)
            raise
        finally:
            self._pending = None

    # -- BatchNorm's hooks ---------------------------------------------------
    def _check_training_batch(self, plan, x):
        """A rank's own slice may be empty; the whole batch is checked in the exchange."""

    def _exchange(self, backend, plan, x, weighted):
        comm = self.comm
        if comm.device_only and not is_cupy_array(x):
            raise TypeError(f"SyncBatchNorm: a {comm.name.upper()} communicator moves GPU memory only, but 'x' is a "
                            f"{type(x).__module__.split('.')[0]}.{type(x).__name__}; use an mpi4py communicator for "
                            "host arrays")
        if getattr(comm, "device", None) is not None and is_cupy_array(x) and x.device.id != comm.device:
            raise ValueError(f"SyncBatchNorm: the NCCL communicator belongs to CUDA device {comm.device} but 'x' is "
                             f"on device {x.device.id}")
        local = _Local(plan.channels, _dtype_code(x.dtype),
                       _code(_FORMATS, self.data_format), x.ndim, plan.per_channel, int(bool(weighted)))
        check_sums = None
        if self.verify:
            headers = self._agree(FORWARD, self._calls, local)
            if int(headers[:, _PER_CHANNEL].sum()) == 0:
                raise arg_error(ValueError, "SyncBatchNorm", "x",
                                "at least one element per channel in the whole distributed batch",
                                f"an empty batch on all {comm.size} ranks (training call {self._calls})")
            check_sums = functools.partial(self._agree, BACKWARD, self._calls, local)
        return _Exchange(comm, self._calls, check_sums, self.timeout)

    # -- consistency ----------------------------------------------------------
    def _config_code(self) -> int:
        cfg = self._config(strict=False)  # a custom activation is compared by its type
        cfg.pop("name", None)         # labels may differ per rank
        cfg.pop("data_format", None)  # checked on its own, with a clearer message
        return zlib.crc32(json.dumps(cfg, sort_keys=True, default=repr).encode())

    def _agree(self, kind, call, local):
        """All-gather the headers and raise the same error on every rank if they disagree."""
        comm = self.comm
        mine = _header(kind, call, local, self._config_code())
        self._pending = None  # from here on every rank takes part, whatever happens
        what = "training call" if kind == FORWARD else "the backward of training call"
        got = _collective(comm, "allgather", mine, self.timeout, f"the consistency header of {what} {call}")
        headers = np.asarray(got).reshape(comm.size, HEADER_WORDS)
        _check_headers(headers)
        return headers

    def _abort(self, exc):
        """This rank failed before its header went out: tell the others, so they raise too."""
        pending, self._pending = self._pending, None
        if pending is None or not self.verify:
            return
        try:
            comm = self.comm
            comm.allgather(_header(pending[0], pending[1], None, 0, exc), timeout=self.timeout)
        except Exception:  # the original error says more than a failed relay
            pass

    def __repr__(self) -> str:
        state = f"{self._channels} channels on {self.device}" if self._channels else "not built"
        where = repr(self._comm) if self._comm is not None else "MPI.COMM_WORLD"
        return f"SyncBatchNorm(name={self.name!r}, {state}, data_format={self.data_format!r}, comm={where})"


class _Exchange:
    """The object bn_forward/bn_backward call between statistics and finalize.

    ``comm``: the communicator; ``call``: the training call it belongs to;
    ``check_sums``: run before the backward sums are exchanged (the header
    agreement of the backward), or None without verification; ``timeout``:
    seconds each collective may wait (None: forever).
    """

    def __init__(self, comm, call, check_sums=None, timeout=None):
        self.comm, self.call, self.check_sums, self.timeout = comm, call, check_sums, timeout

    def partials(self, backend, partials, acc):
        """Local partials -> one triple per channel -> every rank's triples, (ranks, C)."""
        xp = backend.xp
        merged = backend.merge_partials(partials, acc)
        if merged.pivot is None:  # means are the means (the NumPy backend)
            rows = list(merged[:3]) + [xp.zeros_like(merged.count)]
        else:
            rows = list(merged[:3]) + [merged.pivot]
        mine = _stack_rows(xp, rows)  # (4, C): count, mean - pivot, M2, pivot
        c, p = mine.shape[1], self.comm.size
        got = _collective(self.comm, "allgather", mine.reshape(-1), self.timeout,
                          f"the statistics exchange of training call {self.call}").reshape(p, 4, c)
        # finalize wants each field as a contiguous (ranks, C) block; it merges
        # the ranks with Chan's formula in a fixed order, each rank's mean
        # re-expressed about a common pivot (exact for nearby pivots), so all
        # ranks agree and no rank's offset costs digits.
        fields = xp.ascontiguousarray(got.transpose(1, 0, 2))
        pivot = None if merged.pivot is None else fields[3]
        return Partials(fields[0], fields[1], fields[2], 1, pivot, merged.weighted)

    def sums(self, backend, sums, acc):
        """Local backward sums -> their sum over ranks, (1, C)."""
        if self.check_sums is not None:
            self.check_sums()
        xp = backend.xp
        mine = _stack_rows(xp, backend.merge_sums(sums, acc)[:2])  # (2, C): S1, S2
        c = mine.shape[1]
        total = _collective(self.comm, "allreduce", mine.reshape(-1), self.timeout,
                            f"the gradient exchange of the backward of training call {self.call}").reshape(2, c)
        return Sums(total[0:1], total[1:2], 1)


# -- helpers -------------------------------------------------------------------
def _check_timeout(timeout):
    if timeout is None:
        return None
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise arg_error(TypeError, "SyncBatchNorm", "timeout", "seconds (a float) or None", describe(timeout)) from None
    if not (t > 0 and np.isfinite(t)):
        raise arg_error(ValueError, "SyncBatchNorm", "timeout", "a finite number of seconds > 0, or None",
                        repr(timeout))
    return t


def _collective(comm, method, a, timeout, phase):
    """``comm.allgather`` / ``allreduce`` bounded by ``timeout``; a timeout says where the rank waited."""
    try:
        return getattr(comm, method)(a, timeout=timeout)
    except ExchangeTimeout as e:
        raise ExchangeTimeout(
            f"SyncBatchNorm: {e}, in {phase}. A rank has failed or stopped calling the layer (every rank must "
            "make the same training and backward calls). The communicator cannot be used again: end the job "
            "(launched as `mpiexec -n K python -m mpi4py script.py`, an uncaught exception on any rank aborts "
            "them all)") from None


def _dtype_code(dtype) -> int:
    row = _dtypes.TABLE.get(np.dtype(dtype).name)
    return 99 if row is None or row.sync_code is None else row.sync_code


def _code(names, name) -> int:
    return names.index(name) if name in names else 99


def _stack_rows(xp, rows):
    """(1, C) arrays -> one contiguous (k, C) array; no copy when they already are its rows."""
    k, c = len(rows), rows[0].shape[-1]
    base = getattr(rows[0], "base", None)
    if (base is not None and tuple(base.shape) == (k, c) and base.flags.c_contiguous
            and all(getattr(r, "base", None) is base and pointer(r) == pointer(base) + i * c * base.itemsize
                    for i, r in enumerate(rows))):
        return base  # the kernel backend's merge buffers are laid out this way
    return xp.concatenate([r.reshape(1, c) for r in rows], axis=0)


def _header(kind, call, local, config, exc=None):
    h = np.full(HEADER_WORDS, -1, np.int64)
    h[_MAGIC], h[_KIND], h[_CALL], h[_FAILED], h[_CONFIG] = MAGIC, kind, call, 0, config
    if local is not None:
        h[_CHANNELS], h[_DTYPE], h[_FORMAT], h[_NDIM], h[_PER_CHANNEL], h[_WEIGHTED] = local
    if exc is not None:
        code = next((i for i, t in enumerate(_ERROR_TYPES) if type(exc) is t), 0)
        h[_FAILED] = 1 + code
        msg = f"{type(exc).__name__}: {exc}".encode(errors="replace")[:_MSG_BYTES]
        h[_MSGLEN] = len(msg)
        h[12:] = np.frombuffer(msg.ljust(_MSG_BYTES, b"\0"), np.int64)
    return h


def _phase(row) -> str:
    what = "training call" if row[_KIND] == FORWARD else "the backward of training call"
    return f"{what} {int(row[_CALL])}"


def _grouped(values) -> str:
    """'3 on ranks 0, 2; 4 on rank 1': every distinct value with its ranks."""
    groups: dict = {}
    for r, v in enumerate(values):
        groups.setdefault(v, []).append(r)
    parts = []
    for v, ranks in groups.items():
        who = ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
        parts.append(f"{v} on {who}")
    return "; ".join(parts)


def _check_headers(h):
    """Raise, identically on every rank (all see the same headers), if the ranks disagree."""
    f = "SyncBatchNorm"
    size = h.shape[0]
    bad = [r for r in range(size) if h[r, _MAGIC] != MAGIC]
    if bad:
        raise RuntimeError(f"{f}: rank {bad[0]} is in another collective call than this layer's header exchange: "
                           "the ranks' communication is out of order")
    failed = [r for r in range(size) if h[r, _FAILED] > 0]
    if failed:
        r = failed[0]
        n = int(h[r, _MSGLEN])
        msg = h[r, 12:].tobytes()[:n].decode(errors="replace")
        exc_type = _ERROR_TYPES[int(h[r, _FAILED]) - 1]
        raise exc_type(f"{f}: rank {r} of {size} failed in {_phase(h[r])} before the statistics exchange "
                       f"({msg}); every rank raises this rather than wait for rank {r}")
    if len({(int(k), int(c)) for k, c in h[:, [_KIND, _CALL]]}) > 1:
        raise RuntimeError(f"{f}: the ranks are out of step: {_grouped([_phase(row) for row in h])}. Every rank "
                           "must make the same training calls (is_training=True) and backward calls of the layer, "
                           "in the same order")
    when = f" ({_phase(h[0])})"

    def differs(col):
        return len(set(h[:, col].tolist())) > 1

    if differs(_CHANNELS):
        raise arg_error(ValueError, f, "x", "the same channel count on every rank",
                        _grouped([f"{int(v)} channels" for v in h[:, _CHANNELS]]) + when)
    if differs(_DTYPE):
        names = [_dtypes.SYNC_NAMES[v] if 0 <= v < len(_dtypes.SYNC_NAMES) else "?" for v in h[:, _DTYPE]]
        raise arg_error(TypeError, f, "x", "the same dtype on every rank", _grouped(names) + when)
    if differs(_FORMAT):
        names = [_FORMATS[v] if 0 <= v < len(_FORMATS) else "?" for v in h[:, _FORMAT]]
        raise arg_error(ValueError, f, "data_format", "the same data_format on every rank", _grouped(names) + when)
    if differs(_NDIM):
        raise arg_error(ValueError, f, "x", "inputs of the same rank (number of dimensions) on every rank",
                        _grouped([f"{int(v)}-D" for v in h[:, _NDIM]]) + when)
    if differs(_WEIGHTED):
        raise arg_error(ValueError, f, "batch_weights", "batch_weights on every rank or on none",
                        _grouped(["batch_weights" if v else "None" for v in h[:, _WEIGHTED]]) + when)
    if differs(_CONFIG):
        raise arg_error(ValueError, f, "config",
                        "the same layer arguments on every rank (get_config() without name and data_format)",
                        _grouped([f"configuration #{int(v) & 0xFFFFFFFF:08x}" for v in h[:, _CONFIG]]) + when)
