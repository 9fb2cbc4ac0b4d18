"""Argument checks. Every error names the function, the argument, what was
expected and what was given, so a user can fix the call without reading code."""
from __future__ import annotations

import numpy as np

from . import _dtypes


def arg_error(exc_type, func: str, arg: str, expected: str, given: str):
    return exc_type(f"{func}: argument '{arg}': expected {expected}, got {given}")


def describe(a) -> str:
    """Short description of a value for error messages."""
    if a is None:
        return "None"
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{type(a).__module__.split('.')[0]}.{type(a).__name__} of shape {tuple(shape)} and dtype {np.dtype(dtype).name}"
    return f"{type(a).__name__} {a!r}"[:200]


def check_float_input(func: str, name: str, x) -> None:
    """``x`` must be an array of a supported floating dtype."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise arg_error(TypeError, func, name, "a numpy.ndarray or cupy.ndarray", describe(x))
    if not _dtypes.is_supported_float(x.dtype):
        raise arg_error(
            TypeError, func, name, f"a floating dtype ({_dtypes.supported_names()})",
            f"dtype {np.dtype(x.dtype).name}",
        )


def check_positive_epsilon(func: str, name: str, eps) -> float:
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise arg_error(TypeError, func, name, "a float", describe(eps)) from None
    if not value >= 0.0 or not np.isfinite(value):
        raise arg_error(ValueError, func, name, "a finite float >= 0", repr(eps))
    return value


def check_unit_interval(func: str, name: str, value, *, open_low=False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise arg_error(TypeError, func, name, "a float", describe(value)) from None
    low_ok = v > 0.0 if open_low else v >= 0.0
    if not (low_ok and v <= 1.0):
        rng = "(0, 1]" if open_low else "[0, 1]"
        raise arg_error(ValueError, func, name, f"a float in {rng}", repr(value))
    return v
