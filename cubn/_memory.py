"""Arrays as the kernels read them: native byte order, every element aligned.

A kernel reads raw memory: it cannot byte-swap a big-endian array (``>f4``)
and it cannot load a float from an address that is not a multiple of its size
(a GPU faults; even the CPU emulator would silently read wrong bytes from a
byte-swapped array). NumPy makes such arrays easily -- ``np.frombuffer`` at an
odd offset, a field of a packed record array, data read from a big-endian
file -- so every public entry point passes each array argument through
[`readable`][readable] before anything else looks at it. The other layout questions
(non-contiguous, negative or zero strides, read-only memory) are answered
where the (outer, C, inner) views are made: a view the kernels cannot walk is
copied once into a contiguous array (``cubn._plan.Plan.view3``), and no kernel
ever writes into an input.
"""
from __future__ import annotations

import numpy as np

from ._backend import is_cupy_array
from ._checks import arg_error


def _misaligned(a) -> bool:
    if isinstance(a, np.ndarray):
        return not a.flags.aligned
    size = a.dtype.itemsize
    if a.size == 0:
        return False
    return a.data.ptr % size != 0 or any(s % size for s in a.strides)


def readable(func: str, name: str, a):
    """``a`` itself when the kernels can read it, else a copy they can.

    The copy has native byte order and aligned elements, and the same shape
    and values. A subclass of ``numpy.ndarray`` is viewed as a plain ndarray,
    except a masked array, which is refused (its mask would be ignored).
    None, Python scalars, lists and other non-arrays are returned unchanged
    (they become native arrays where they are converted).
    """
    if isinstance(a, np.ndarray):
        if type(a) is not np.ndarray:
            if isinstance(a, np.ma.MaskedArray):
                raise arg_error(TypeError, func, name,
                                "a plain array (a masked array's mask would be ignored: use a.filled(value), "
                                "or zero weights for the masked elements)", "a numpy.ma.MaskedArray")
            a = a.view(np.ndarray)
        if not a.dtype.isnative:
            return a.astype(a.dtype.newbyteorder("="))  # a new, aligned array
        if not a.flags.aligned:
            return a.copy()
        return a
    if is_cupy_array(a) and _misaligned(a):
        return a.copy()
    return a


def readable_all(func: str, **arrays):
    """[`readable`][readable] of each keyword argument (named by its keyword), as a tuple in order."""
    return tuple(readable(func, name, a) for name, a in arrays.items())
