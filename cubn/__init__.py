"""cubn: batch normalization and moments as hand-written CUDA kernels.

CuPy arrays run the project's CUDA kernels on their device; NumPy arrays run
a vectorized NumPy implementation. ``import cubn`` needs NumPy only.
"""
from . import activations, compat, distributed, preprocessing, regularizers
from ._backend import gpu_available, use_backend
from ._threads import get_num_threads, set_num_threads
from .layers import BatchNorm, SyncBatchNorm
from ._version import __version__
from .ops import (
    BatchNormGrads,
    batch_norm_backward,
    batch_norm_with_global_normalization,
    batch_normalization,
    fused_batch_norm,
    moments,
    weighted_moments,
)
from .io import from_keras, from_torch, load, save, to_torch_state_dict
from .preprocessing import RunningMoments, Standardizer, normalize_images
from .updates import UPDATE_OPS, UpdateCollection, run_updates

__all__ = [
    "__version__",
    "activations",
    "gpu_available",
    "use_backend",
    "set_num_threads",
    "get_num_threads",
    "moments",
    "weighted_moments",
    "batch_normalization",
    "batch_norm_with_global_normalization",
    "fused_batch_norm",
    "batch_norm_backward",
    "BatchNormGrads",
    "BatchNorm",
    "SyncBatchNorm",
    "distributed",
    "preprocessing",
    "RunningMoments",
    "Standardizer",
    "normalize_images",
    "UPDATE_OPS",
    "UpdateCollection",
    "run_updates",
    "regularizers",
    "compat",
    "save",
    "load",
    "from_keras",
    "from_torch",
    "to_torch_state_dict",
]
