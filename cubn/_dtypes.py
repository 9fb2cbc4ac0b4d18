"""Every dtype fact cubn uses, in one table.

Each row says, for one dtype name: its NumPy dtype (where the array library
has it), the CUDA C++ type kernels are instantiated with, its item size,
the accumulation dtype of the ops and of the preprocessing statistics,
whether the ops / layers / kernels accept it, whether the preprocessing API
takes it as an input or writes it as an output, and its code in
SyncBatchNorm's consistency header.

Statistics and accumulation are float32 for 16-bit inputs and the input's
own precision otherwise (``docs/conventions.md``). bfloat16 exists where the
array library has it: NumPy through ``ml_dtypes``, CuPy when its build knows
the type. Nothing here needs ``ml_dtypes`` except [`DType.numpy`][DType.numpy] of
bfloat16: item sizes, C types and vector widths come from the table, so
enumerating and launching the kernels of other dtypes works without it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

try:  # optional: NumPy has no bfloat16 of its own
    import ml_dtypes as _ml_dtypes

    bfloat16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - exercised only without ml_dtypes
    bfloat16 = None

# The widest access a kernel makes: one 16-byte vector.
VECTOR_BYTES = 16


@dataclass(frozen=True)
class DType:
    """One row of the table."""

    name: str
    ctype: str            # CUDA C++ element type (kernel template argument)
    itemsize: int
    kind: str             # "f" (floating) or "u" (unsigned integer), as numpy's dtype.kind
    acc: str | None       # accumulation dtype of the ops (None: the ops do not take it)
    stats_acc: str        # accumulation dtype of the preprocessing statistics
    sync_code: int | None  # dtype code in SyncBatchNorm's consistency header

    @property
    def numpy(self) -> np.dtype | None:
        """The NumPy dtype, or None (bfloat16 without ``ml_dtypes``)."""
        return _numpy_dtype(self.name)

    @property
    def ops(self) -> bool:
        """Accepted by the ops and layers (and by the kernels behind them)."""
        return self.acc is not None

    @property
    def preprocessing_output(self) -> bool:
        """Written by the preprocessing transforms."""
        return self.kind == "f"

    @property
    def vector_widths(self) -> tuple:
        """Elements per access a kernel may use: powers of two up to 16 bytes."""
        return tuple(v for v in (1, 2, 4, 8, 16) if v * self.itemsize <= VECTOR_BYTES)


TABLE = {
    row.name: row
    for row in (
        DType("uint8", "unsigned char", 1, "u", None, "float32", None),
        DType("uint16", "unsigned short", 2, "u", None, "float32", None),
        DType("float16", "__half", 2, "f", "float32", "float32", 0),
        DType("bfloat16", "__nv_bfloat16", 2, "f", "float32", "float32", 1),
        DType("float32", "float", 4, "f", "float32", "float64", 2),
        DType("float64", "double", 8, "f", "float64", "float64", 3),
    )
}

FLOAT_NAMES = tuple(n for n, r in TABLE.items() if r.ops)                     # the ops' dtypes
ACC_NAMES = tuple(dict.fromkeys(r.acc for r in TABLE.values() if r.ops))     # float32, float64
INT_INPUT_NAMES = tuple(n for n, r in TABLE.items() if r.kind == "u")        # preprocessing only
PREPROCESSING_INPUT_NAMES = tuple(TABLE)  # every dtype of the table (integers: here only)
PREPROCESSING_OUTPUT_NAMES = tuple(n for n, r in TABLE.items() if r.preprocessing_output)
SYNC_NAMES = tuple(sorted((n for n, r in TABLE.items() if r.sync_code is not None), key=lambda n: TABLE[n].sync_code))
CTYPES = {n: r.ctype for n, r in TABLE.items() if r.ops}  # dtype name -> CUDA C++ type

# float32 data read by a kernel that accumulates in float64 (the preprocessing
# statistics of float32 data): a wrapper type of preprocess.cu whose AccOf is
# double, so the moments kernels keep double partials.
_WIDE_CTYPES = {("float32", "float64"): "cubn_f32_wide"}


@functools.lru_cache(maxsize=None)
def _numpy_dtype(name: str):
    if name == "bfloat16":
        return bfloat16
    return np.dtype(name)


def name_of(dtype) -> str:
    """The table name of ``dtype`` (a name, a NumPy dtype or a scalar type).

    Names are looked up without NumPy, so ``"bfloat16"`` works without ``ml_dtypes``.
    """
    if isinstance(dtype, str) and dtype in TABLE:
        return dtype
    try:
        return _NAMES[dtype]
    except (KeyError, TypeError):  # new, or unhashable
        pass
    name = np.dtype(dtype).name
    if len(_NAMES) < 256:
        try:
            _NAMES[dtype] = name
        except TypeError:
            pass
    return name


# ``dtype.name`` costs microseconds and every launch asks it several times:
# the names of the dtypes seen so far (dtypes that compare equal share a name).
_NAMES: dict = {}


def info(dtype) -> DType:
    """The table row of ``dtype``; KeyError for a dtype cubn does not know."""
    return TABLE[name_of(dtype)]


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a table name; TypeError when the array library lacks it."""
    dt = TABLE[name].numpy
    if dt is None:
        raise TypeError(f"{name} needs ml_dtypes on NumPy (pip install 'cubn[bfloat16]')")
    return dt


# Memo tables: these run on every call, and a dtype's ``name`` costs a microsecond.
_SUPPORTED: dict = {}
_ACC: dict = {}


def _memoized(table, dtype, compute):
    """``compute(dtype)`` through ``table`` (unhashable dtype-likes are computed every time)."""
    try:
        return table[dtype]
    except (KeyError, TypeError):
        pass
    value = compute(dtype)
    try:
        table[dtype] = value
    except TypeError:  # unhashable
        pass
    return value


def _is_float_name(dtype) -> bool:
    try:
        return name_of(dtype) in FLOAT_NAMES
    except TypeError:
        return False


def is_supported_float(dtype) -> bool:
    return _memoized(_SUPPORTED, dtype, _is_float_name)


def acc_dtype(dtype) -> np.dtype:
    """Accumulation dtype of the ops: float32 for 16-bit floats, the dtype itself otherwise."""
    return _memoized(_ACC, dtype, lambda d: np.dtype(TABLE[name_of(d)].acc))


def stats_acc(dtype) -> np.dtype:
    """Accumulation dtype of the preprocessing statistics.

    float64 for float32 and float64 data (a float32 partial mean is good to
    only ulp(|mean|)/2, which merges of many batches turn into variance
    errors of ~1e-4 at |mean|/std ~ 1e4; scikit-learn also accumulates
    float32 in float64); float32 for 8- and 16-bit data, whose values and
    means float32 holds closely enough.
    """
    return np.dtype(TABLE[name_of(dtype)].stats_acc)


def compute_dtype(in_name: str, out_name: str) -> np.dtype:
    """Arithmetic of the preprocessing transforms: float64 when either side is float64, else float32."""
    return np.dtype(np.float64 if "float64" in (in_name, out_name) else np.float32)


def ctype(dtype) -> str:
    """The CUDA C++ type of ``dtype``'s elements."""
    return TABLE[name_of(dtype)].ctype


def kernel_ctype(dtype, acc=None) -> str:
    """The element type a kernel reading ``dtype`` and accumulating in ``acc`` is instantiated with
    (``acc`` None: the kernel does not accumulate in a type of the element's choosing)."""
    name = name_of(dtype)
    if acc is None:
        return TABLE[name].ctype
    return _WIDE_CTYPES.get((name, name_of(acc)), TABLE[name].ctype)


def itemsize(dtype) -> int:
    return TABLE[name_of(dtype)].itemsize


def vector_widths(dtype) -> tuple:
    """Elements per access a kernel may use for ``dtype``: powers of two up to 16 bytes."""
    return TABLE[name_of(dtype)].vector_widths


def available(names) -> tuple:
    """The names among ``names`` that the array library has (bfloat16 needs ``ml_dtypes`` on NumPy)."""
    return tuple(n for n in names if TABLE[n].numpy is not None)


def supported_names() -> str:
    return ", ".join(available(FLOAT_NAMES))
