"""cubn: batch normalization and moments as hand-written CUDA kernels.

CuPy arrays run the project's CUDA kernels on their device; NumPy arrays run
a vectorized NumPy implementation. ``import cubn`` needs NumPy only.
"""
from . import activations, compat, distributed, preprocessing, regularizers
from ._backend import gpu_available, use_backend
from ._options import use_one_launch
from ._threads import get_num_threads, set_num_threads
from .layers import BatchNorm, SyncBatchNorm
from ._version import __version__
from . import ops as _ops
from .ops import *  # noqa: F401,F403 -- the functional ops, listed in ops.__all__
from .io import from_keras, from_torch, load, save, to_torch_state_dict
from .preprocessing import RunningMoments, normalize_images
from .updates import UPDATE_OPS, PendingUpdatesWarning, UpdateCollection, run_updates

__all__ = [
    "__version__",
    "activations",
    "gpu_available",
    "use_backend",
    "use_one_launch",
    "set_num_threads",
    "get_num_threads",
    *_ops.__all__,
    "BatchNorm",
    "SyncBatchNorm",
    "distributed",
    "preprocessing",
    "RunningMoments",
    "Standardizer",
    "normalize_images",
    "UPDATE_OPS",
    "UpdateCollection",
    "PendingUpdatesWarning",
    "run_updates",
    "regularizers",
    "compat",
    "save",
    "load",
    "from_keras",
    "from_torch",
    "to_torch_state_dict",
]


def __getattr__(name):
    # cubn.Standardizer is loaded on first use (it imports scikit-learn when installed).
    if name == "Standardizer":
        from .preprocessing.standardizer import Standardizer

        return Standardizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
