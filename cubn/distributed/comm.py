"""The one communication interface SyncBatchNorm needs, over existing engines.

Two collectives and nothing else -- ``allgather`` and ``allreduce`` (sum) of a
1-D contiguous array -- with two implementations:

- :class:`MPIComm` wraps an ``mpi4py`` communicator. Any array: NumPy arrays
  go straight to MPI's buffer interface; CuPy arrays are staged through the
  host (``.get()``, then ``cupy.asarray``) unless the MPI is CUDA-aware
  (``cuda_aware=True``), in which case MPI reads device memory after the
  current stream has been synchronized (MPI knows nothing of CUDA streams).
- :class:`NCCLComm` wraps ``cupy.cuda.nccl.NcclCommunicator`` (or a
  ``cupyx.distributed.NCCLBackend``, which holds one). CuPy arrays on the
  communicator's device; the collectives are enqueued on CuPy's current
  stream, so nothing waits on the host. A NumPy array given to it (only
  SyncBatchNorm's small consistency header) goes through the device and
  comes back to the host, which synchronizes.

Both return the same kind of array they were given. cubn has no transport of
its own: these classes only translate arrays into the engines' calls.
"""
from __future__ import annotations

import numpy as np

from .._backend import is_cupy_array
from .._checks import arg_error, describe


class Communicator:
    """``rank``, ``size`` and two collectives over 1-D contiguous arrays."""

    name = "abstract"
    rank: int = 0
    size: int = 1
    #: True when data arrays must be CuPy arrays (NCCL moves device memory only).
    device_only = False

    def allgather(self, a):
        """``a`` of shape (n,) on every rank -> (size, n); row r is rank r's ``a``."""
        raise NotImplementedError

    def allreduce(self, a):
        """Elementwise sum over ranks of ``a`` (n,); may reuse ``a``'s memory."""
        raise NotImplementedError

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

    def _device_call(self, a, op):
        import cupy

        if self.cuda_aware:
            # MPI reads device memory directly but does not order itself after
            # the kernels queued on the stream: wait for them first.
            cupy.cuda.get_current_stream().synchronize()
            return op(a)
        with cupy.cuda.Device(a.device.id):
            return cupy.asarray(op(a.get()))

    def allgather(self, a):
        if is_cupy_array(a):
            return self._device_call(a, self._allgather)
        return self._allgather(a)

    def allreduce(self, a):
        if is_cupy_array(a):
            return self._device_call(a, self._allreduce)
        return self._allreduce(a)

    def _allgather(self, a):
        out = _empty_like(a, (self.size, a.shape[0]))
        self.comm.Allgather(a, out)
        return out

    def _allreduce(self, a):
        from mpi4py import MPI

        self.comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
        return a


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

    def _staged(self, a, op):
        """Run ``op`` on a device copy of a host array ``a``; back to the host (a sync)."""
        import cupy

        if not isinstance(a, np.ndarray):
            return op(a)
        with cupy.cuda.Device(self.device):
            return op(cupy.asarray(a)).get()

    def _type(self, a):
        t = self._types.get(np.dtype(a.dtype))
        if t is None:
            raise arg_error(TypeError, "NCCLComm", "a", "float32, float64 or int64 data", describe(a))
        return t

    def allgather(self, a):
        def op(d):
            import cupy

            out = cupy.empty((self.size, d.shape[0]), d.dtype)
            self.comm.allGather(d.data.ptr, out.data.ptr, d.shape[0], self._type(d),
                                cupy.cuda.get_current_stream().ptr)
            return out

        return self._staged(a, op)

    def allreduce(self, a):
        def op(d):
            import cupy

            # In place: NCCL allows sendbuf == recvbuf.
            self.comm.allReduce(d.data.ptr, d.data.ptr, d.shape[0], self._type(d), self._nccl.NCCL_SUM,
                                cupy.cuda.get_current_stream().ptr)
            return d

        return self._staged(a, op)


def _empty_like(a, shape):
    if is_cupy_array(a):
        import cupy

        return cupy.empty(shape, a.dtype)
    return np.empty(shape, a.dtype)


def as_communicator(comm, func: str = "SyncBatchNorm") -> Communicator:
    """The :class:`Communicator` for what the user passed.

    None: ``mpi4py``'s ``MPI.COMM_WORLD``. An ``mpi4py`` communicator:
    :class:`MPIComm` (host staging for CuPy arrays). A
    ``cupy.cuda.nccl.NcclCommunicator`` or ``cupyx.distributed.NCCLBackend``:
    :class:`NCCLComm`. A :class:`Communicator` is used as it is.
    """
    if isinstance(comm, Communicator):
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
