"""Device pointers and their alignment, for NumPy and CuPy arrays alike."""
from __future__ import annotations

import numpy as np

from .._dtypes import VECTOR_BYTES


def pointer(a) -> int:
    """The address of ``a``'s first element (a numpy or cupy array)."""
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]  # works for ml_dtypes' bfloat16 too
    return a.data.ptr


def aligned(nbytes: int, *arrays) -> bool:
    """Every array (None: absent, ignored) starts at a multiple of ``nbytes``."""
    return all(a is None or pointer(a) % nbytes == 0 for a in arrays)


def alignment(*arrays) -> int:
    """The largest power of two, up to one vector (16 bytes), dividing every array's address."""
    a = VECTOR_BYTES
    while a > 1 and not aligned(a, *arrays):
        a //= 2
    return a
