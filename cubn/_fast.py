"""Checks of the fast paths: arguments already in the form the primitives take.

The ops convert what users pass (scalars, lists, other dtypes, keepdims
shapes, byte-swapped or misaligned arrays) with checks that explain what is
wrong. Most calls pass arrays that need none of that; these predicates say
so cheaply, and a call for which one is False takes the ordinary path,
which converts or raises exactly as before.
"""
from __future__ import annotations

import numpy as np


def plain_vector(a, c: int, acc, _ndarray=np.ndarray) -> bool:
    """``a`` is None, or a (c,) contiguous array of dtype ``acc`` the kernels read as is."""
    if a is None:
        return True
    if type(a) is _ndarray and a.dtype is acc and a.shape == (c,):  # the common case, first
        f = a.flags
        return f.aligned and f.c_contiguous
    if a.shape != (c,) or a.dtype != acc:
        return False
    if type(a) is np.ndarray:
        return a.flags.aligned and (c == 1 or a.strides[0] == a.itemsize)
    return a.strides[0] == a.itemsize and a.data.ptr % a.itemsize == 0


def plain_like(a, x) -> bool:
    """``a`` is None, or an array of ``x``'s shape and dtype the kernels read as is."""
    if a is None:
        return True
    if a.shape != x.shape or a.dtype != x.dtype:
        return False
    if type(a) is np.ndarray:
        return a.flags.aligned
    size = a.itemsize
    return a.size == 0 or (a.data.ptr % size == 0 and not any(s % size for s in a.strides))
