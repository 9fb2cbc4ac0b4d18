"""The one communication interface SyncBatchNorm needs, over existing engines.

Two collectives and nothing else -- ``allgather`` and ``allreduce`` (sum) of a
1-D contiguous array -- with two implementations:

- [`MPIComm`][MPIComm] wraps an ``mpi4py`` communicator. Any array: NumPy arrays
  go straight to MPI's buffer interface; CuPy arrays are staged through the
  host (``.get()``, then ``cupy.asarray``) unless the MPI is CUDA-aware
  (``cuda_aware=True``), in which case MPI reads device memory after the
  current stream has been synchronized (MPI knows nothing of CUDA streams).
- [`NCCLComm`][NCCLComm] wraps ``cupy.cuda.nccl.NcclCommunicator`` (or a
  ``cupyx.distributed.NCCLBackend``, which holds one). CuPy arrays on the
  communicator's device; the collectives are enqueued on CuPy's current
  stream, so nothing waits on the host. A NumPy array given to it (only
  SyncBatchNorm's small consistency header) goes through the device and
  comes back to the host, which synchronizes.

Both return the same kind of array they were given. cubn has no transport of
its own: these classes only translate arrays into the engines' calls.

Both collectives take ``timeout`` (seconds, None: wait forever). A rank that
waits longer for the others raises [`ExchangeTimeout`][ExchangeTimeout] instead of
hanging; the collective it started cannot be cancelled (neither MPI nor NCCL
can take a collective back), so the communicator is unusable afterwards and
says so. With MPI the wait is a non-blocking collective polled against the
deadline. With NCCL only the collectives of host arrays wait on the host at
all (the consistency header); those are polled against the deadline, and on
expiry the NCCL communicator is aborted (``ncclCommAbort``) so the GPU
stream is released. Collectives of device arrays are only enqueued and never
waited for, so they have no timeout of their own: a rank gone between two
exchanges is caught at the next header exchange.
"""
from __future__ import annotations

import inspect
import time

import numpy as np

from .._backend import is_cupy_array
from .._checks import arg_error, describe

# Poll a pending collective this many times back to back before sleeping
# between polls: a healthy exchange completes within the spins (no added
# latency), a stuck one costs ~one core-millisecond per millisecond at most.
_SPINS = 2000
_NAP = 1e-3


class ExchangeTimeout(TimeoutError):
    """The other ranks did not join a collective within the timeout."""


class Communicator:
    """``rank``, ``size`` and two collectives over 1-D contiguous arrays.

    A subclass implements ``allgather(a, timeout=None)`` and
    ``allreduce(a, timeout=None)``; on a timeout it raises
    [`ExchangeTimeout`][ExchangeTimeout] (and refuses every later collective: the
    abandoned one is still pending).
    """

    name = "abstract"
    rank: int = 0
    size: int = 1
    #: True when data arrays must be CuPy arrays (NCCL moves device memory only).
    device_only = False

    def allgather(self, a, timeout=None):
        """``a`` of shape (n,) on every rank -> (size, n); row r is rank r's ``a``."""
        raise NotImplementedError

    def allreduce(self, a, timeout=None):
        """Elementwise sum over ranks of ``a`` (n,); may reuse ``a``'s memory."""
        raise NotImplementedError

    # -- the timeout bookkeeping shared by the implementations ----------------
    _abandoned = None  # (what, keep-alive objects) of the collective that timed out

    def _check_usable(self, what):
        if self._abandoned is not None:
            raise RuntimeError(f"{type(self).__name__} (rank {self.rank} of {self.size}): cannot run {what}: an "
                               f"earlier {self._abandoned[0]} timed out and is still pending (a collective cannot "
                               "be cancelled); the communicator cannot be used again: end the job")

    def _timed_out(self, what, timeout, keep_alive):
        # The engine may still write into the buffers when a late rank arrives: keep them alive.
        self._abandoned = (what, keep_alive)
        return ExchangeTimeout(f"{what} on rank {self.rank} of {self.size}: the other ranks did not join within "
                               f"{timeout:g} s")

    def __repr__(self):
        return f"<{type(self).__name__} rank {self.rank} of {self.size}>"


class MPIComm(Communicator):
    """An ``mpi4py`` communicator (``MPI.COMM_WORLD`` or any other).

    Args:
        comm: an ``mpi4py.MPI.Comm`` (intra-communicator).
        cuda_aware: the MPI library reads and writes device memory itself.
            False (the default) stages CuPy arrays through host memory, which
            waits for the GPU once per exchange -- unavoidable with a host
            MPI. mpi4py cannot ask the library portably, so say it.
    """

    name = "mpi"

    def __init__(self, comm, cuda_aware: bool = False):
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())
        self.cuda_aware = bool(cuda_aware)

    def _device_call(self, a, op, timeout):
        import cupy

        if self.cuda_aware:
            # MPI reads device memory directly but does not order itself after
            # the kernels queued on the stream: wait for them first.
            cupy.cuda.get_current_stream().synchronize()
            return op(a, timeout)
        with cupy.cuda.Device(a.device.id):
            return cupy.asarray(op(a.get(), timeout))

    def allgather(self, a, timeout=None):
        self._check_usable("an allgather")
        if is_cupy_array(a):
            return self._device_call(a, self._allgather, timeout)
        return self._allgather(a, timeout)

    def allreduce(self, a, timeout=None):
        self._check_usable("an allreduce")
        if is_cupy_array(a):
            return self._device_call(a, self._allreduce, timeout)
        return self._allreduce(a, timeout)

    def _allgather(self, a, timeout):
        out = _empty_like(a, (self.size, a.shape[0]))
        if timeout is None:
            self.comm.Allgather(a, out)
        else:
            self._wait(self.comm.Iallgather(a, out), "MPI allgather", timeout, (a, out))
        return out

    def _allreduce(self, a, timeout):
        from mpi4py import MPI

        if timeout is None:
            self.comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
        else:
            self._wait(self.comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM), "MPI allreduce", timeout, (a,))
        return a

    def _wait(self, request, what, timeout, buffers):
        """Poll a non-blocking collective until it completes or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        spins = 0
        while not request.Test():
            spins += 1
            if spins > _SPINS:
                now = time.monotonic()
                if now >= deadline:
                    raise self._timed_out(what, timeout, (request, buffers))
                time.sleep(min(_NAP, deadline - now))


class NCCLComm(Communicator):
    """A ``cupy.cuda.nccl.NcclCommunicator`` (one process per GPU).

    The collectives run on CuPy's current stream of the communicator's
    device and return without waiting.
    """

    name = "nccl"
    device_only = True

    def __init__(self, comm):
        from cupy.cuda import nccl

        self.comm = comm
        self.rank = int(comm.rank_id())
        self.size = int(comm.size())
        self.device = int(comm.device_id())
        self._nccl = nccl
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.int64): nccl.NCCL_INT64}

    def _staged(self, a, op, what, timeout):
        """Run ``op`` on a device copy of a host array ``a``; back to the host (a sync,
        polled against ``timeout``). Device arrays: ``op`` is only enqueued."""
        import cupy

        self._check_usable(what)
        if not isinstance(a, np.ndarray):
            return op(a)
        with cupy.cuda.Device(self.device):
            d = op(cupy.asarray(a))
            if timeout is not None:
                done = cupy.cuda.Event(disable_timing=True)
                done.record()
                deadline = time.monotonic() + timeout
                while not done.done:
                    self.comm.check_async_error()  # a network error: NcclError now, not a hang
                    if time.monotonic() >= deadline:
                        err = self._timed_out(what, timeout, (d,))
                        self.comm.abort()  # releases the GPU stream that waits for the collective
                        raise err
                    time.sleep(_NAP / 10)
            return d.get()

    def _type(self, a):
        t = self._types.get(np.dtype(a.dtype))
        if t is None:
            raise arg_error(TypeError, "NCCLComm", "a", "float32, float64 or int64 data", describe(a))
        return t

    def allgather(self, a, timeout=None):
        def op(d):
            import cupy

            out = cupy.empty((self.size, d.shape[0]), d.dtype)
            self.comm.allGather(d.data.ptr, out.data.ptr, d.shape[0], self._type(d),
                                cupy.cuda.get_current_stream().ptr)
            return out

        return self._staged(a, op, "NCCL allgather", timeout)

    def allreduce(self, a, timeout=None):
        def op(d):
            import cupy

            # In place: NCCL allows sendbuf == recvbuf.
            self.comm.allReduce(d.data.ptr, d.data.ptr, d.shape[0], self._type(d), self._nccl.NCCL_SUM,
                                cupy.cuda.get_current_stream().ptr)
            return d

        return self._staged(a, op, "NCCL allreduce", timeout)


def _empty_like(a, shape):
    if is_cupy_array(a):
        import cupy

        return cupy.empty(shape, a.dtype)
    return np.empty(shape, a.dtype)


def as_communicator(comm, func: str = "SyncBatchNorm") -> Communicator:
    """The [`Communicator`][Communicator] for what the user passed.

    None: ``mpi4py``'s ``MPI.COMM_WORLD``. An ``mpi4py`` communicator:
    [`MPIComm`][MPIComm] (host staging for CuPy arrays). A
    ``cupy.cuda.nccl.NcclCommunicator`` or ``cupyx.distributed.NCCLBackend``:
    [`NCCLComm`][NCCLComm]. A [`Communicator`][Communicator] is used as it is.
    """
    if isinstance(comm, Communicator):
        for method in ("allgather", "allreduce"):
            try:
                takes = "timeout" in inspect.signature(getattr(comm, method)).parameters
            except (TypeError, ValueError):
                takes = True  # not introspectable: trust it
            if not takes:
                raise arg_error(TypeError, func, "comm", f"a Communicator whose {method}(a, timeout=None) takes "
                                "a timeout (seconds; None: wait forever)", f"{type(comm).__name__}.{method} "
                                "without one")
        return comm
    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise ImportError(f"{func}: comm=None means mpi4py's MPI.COMM_WORLD, but mpi4py cannot be imported "
                              f"({e}); pip install 'cubn[mpi]', or pass a NCCL communicator") from e
        return MPIComm(MPI.COMM_WORLD)
    module = type(comm).__module__ or ""
    if module.startswith("mpi4py"):
        from mpi4py import MPI

        if isinstance(comm, MPI.Intracomm):
            return MPIComm(comm)
    if module.startswith(("cupy", "cupyx", "cupy_backends")):
        from cupy.cuda import nccl

        if isinstance(comm, nccl.NcclCommunicator):
            return NCCLComm(comm)
        # cupyx.distributed.NCCLBackend keeps its NcclCommunicator in ``_comm``
        inner = getattr(comm, "_comm", None)
        if isinstance(inner, nccl.NcclCommunicator):
            return NCCLComm(inner)
    raise arg_error(TypeError, func, "comm",
                    "None (MPI.COMM_WORLD), an mpi4py intra-communicator, a cupy.cuda.nccl.NcclCommunicator, "
                    "a cupyx.distributed.NCCLBackend or a cubn.distributed.Communicator", describe(comm))
