"""The roofline: the bytes an op must move, over the copy bandwidth measured in the same run."""
from __future__ import annotations

from .timing import time_gpu

# Tensor-sized transfers each op must make (x reads, dy/side reads, y/dx writes):
# statistics need one read of x, normalizing another read and a write.
TENSOR_PASSES = {"moments": 1, "bn_train": 3, "bn_infer": 2, "bn_relu": 3, "bn_add_relu": 4, "backward": 5}


def op_bytes(op: str, tensor_bytes: int) -> int:
    """The bytes ``op`` must read and write on a tensor of ``tensor_bytes``."""
    return TENSOR_PASSES[op] * tensor_bytes


def copy_bandwidth(cp, nbytes=1 << 30):
    """Device-to-device copy bandwidth in GB/s, bytes read plus bytes written."""
    a = cp.empty(nbytes // 4, cp.float32)
    a.fill(1.0)
    b = cp.empty_like(a)
    med, _, _, _ = time_gpu(cp, lambda i: cp.copyto(b, a), 1, warmup=3, reps=20)
    return 2 * nbytes / (med * 1e-3) / 1e9
