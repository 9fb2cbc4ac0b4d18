"""Scale-out: the communicators SyncBatchNorm exchanges its statistics through.

cubn has no transport of its own: [`MPIComm`][MPIComm] wraps ``mpi4py`` and
[`NCCLComm`][NCCLComm] wraps CuPy's NCCL; both offer the two collectives the layer
needs (see ``docs/distributed.md``). Importing this package imports neither
engine.
"""
from .comm import Communicator, ExchangeTimeout, MPIComm, NCCLComm, as_communicator

__all__ = ["Communicator", "ExchangeTimeout", "MPIComm", "NCCLComm", "as_communicator"]
