"""Device pointers and their alignment, for NumPy and CuPy arrays alike."""
from __future__ import annotations

import threading

import numpy as np

from .._dtypes import VECTOR_BYTES

_probe = threading.local()  # .log: the arrays whose address was asked, while a call is being recorded
_persistent: dict = {}  # id -> array: long-lived backend buffers (see persistent)


def persistent(a) -> None:
    """Mark ``a`` (a backend's long-lived buffer, e.g. the fused statistics'
    counters, which every launch leaves as it found them) as one a launch
    program may pass to its launches as it is: a replay uses this very buffer."""
    _persistent[id(a)] = a


def is_persistent(a) -> bool:
    return _persistent.get(id(a)) is a


def start_probe(log: list) -> None:
    """Note in ``log`` every array whose address this thread asks, until [`stop_probe`][stop_probe]
    (the launch cache learns which alignments decided a call)."""
    _probe.log = log


def stop_probe() -> None:
    _probe.log = None


def _struct_reader():
    """A reader of a NumPy array's data pointer straight from its C struct, or None.

    ``PyArrayObject`` starts with the object header and then ``char *data``
    (NumPy's public struct layout); ``a.__array_interface__`` builds a dict to
    say the same and costs ten times more, which a kernel-path call pays for
    each tensor whose alignment its launch plan depends on. Used only where
    it agrees with ``__array_interface__`` on probe arrays (CPython, where
    ``id`` is the address).
    """
    try:
        import ctypes
        import platform

        if platform.python_implementation() != "CPython":
            return None
        offset = object.__basicsize__  # the object header: ob_refcnt and ob_type (more on free-threaded builds)
        read = ctypes.c_size_t.from_address
        base = np.arange(64, dtype=np.float32)
        probes = [base, base[3:], base[1::2], base.reshape(8, 8)[2:, 1:], np.empty(0), np.zeros((3, 5), ">f8")]
        if any(read(id(a) + offset).value != a.__array_interface__["data"][0] for a in probes):
            return None
        global DATA_OFFSET
        DATA_OFFSET = offset
        return lambda a: read(id(a) + offset).value
    except Exception:  # noqa: BLE001 - any doubt: the documented interface
        return None


DATA_OFFSET = None  # where an ndarray object holds its data pointer, once _struct_reader has verified it
_read_data = _struct_reader()


def pointer(a) -> int:
    """The address of ``a``'s first element (a numpy or cupy array)."""
    log = getattr(_probe, "log", None)
    if log is not None:
        log.append(a)
    if isinstance(a, np.ndarray):
        if _read_data is not None:
            return _read_data(a)
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


def alignment_of(a) -> int:
    """[`alignment`][alignment] of one array (None: 16), with one address read."""
    if a is None:
        return VECTOR_BYTES
    p = pointer(a) % VECTOR_BYTES
    return VECTOR_BYTES if p == 0 else p & -p
