"""Floating-point dtypes cubn accepts, and the precision it accumulates in.

Statistics and accumulation are float32 for 16-bit inputs and the input's own
precision otherwise (CONTRACT §1). bfloat16 exists where the array library has
it: NumPy through ``ml_dtypes``, CuPy when its build knows the type.
"""
from __future__ import annotations

import numpy as np

try:  # optional: NumPy has no bfloat16 of its own
    import ml_dtypes as _ml_dtypes

    bfloat16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - exercised only without ml_dtypes
    bfloat16 = None

FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")

# dtype name -> CUDA C++ type used in kernel template arguments
CTYPES = {
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "float32": "float",
    "float64": "double",
}


def name_of(dtype) -> str:
    return np.dtype(dtype).name


# Memo tables: these run on every call, and a dtype's ``name`` costs a microsecond.
_SUPPORTED: dict = {}
_ACC: dict = {}


def is_supported_float(dtype) -> bool:
    try:
        return _SUPPORTED[dtype]
    except (KeyError, TypeError):
        pass
    try:
        ok = np.dtype(dtype).name in FLOAT_NAMES
    except TypeError:
        return False
    try:
        _SUPPORTED[dtype] = ok
    except TypeError:  # unhashable
        pass
    return ok


def acc_dtype(dtype) -> np.dtype:
    """Accumulation dtype: float32 for 16-bit floats, the dtype itself otherwise."""
    try:
        return _ACC[dtype]
    except (KeyError, TypeError):
        pass
    dt = np.dtype(dtype)
    acc = np.dtype(np.float32) if dt.name in ("float16", "bfloat16") else dt
    try:
        _ACC[dtype] = acc
    except TypeError:
        pass
    return acc


def ctype(dtype) -> str:
    return CTYPES[np.dtype(dtype).name]


def supported_names() -> str:
    names = [n for n in FLOAT_NAMES if n != "bfloat16" or bfloat16 is not None]
    return ", ".join(names)
