"""Every kernel variant cubn can launch.

A variant is one template instantiation of one kernel in one ``.cu`` file.
The kernel backend obtains variants only through the constructors below,
which refuse anything not in :func:`all_variants`; the NVRTC test compiles
exactly :func:`all_variants`, and the emulated launcher builds them per
source file, so no launchable variant escapes either.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _dtypes
from ..activations import KERNEL_IDS

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = ("moments.cu", "finalize.cu", "normalize.cu", "backward.cu", "persistent.cu", "preprocess.cu")

# Options the CuPy launcher passes to NVRTC (the NVRTC test adds only the
# target architecture and include directories).
NVRTC_OPTIONS = ("--std=c++17",)
# What CuPy's RawModule adds on its own before calling NVRTC (besides -arch):
# the NVRTC test compiles with these too, so it sees what the GPU gets.
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")

DTYPES = ("float16", "bfloat16", "float32", "float64")
ACC_DTYPES = ("float32", "float64")


# By name: "bfloat16" is a NumPy dtype only where ml_dtypes is installed, but
# its variants are registered (and compiled for CuPy) everywhere.
_ITEMSIZES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def vector_widths(dtype) -> tuple:
    """Elements per access a kernel may use: powers of two up to 16 bytes."""
    size = _ITEMSIZES[dtype] if isinstance(dtype, str) and dtype in _ITEMSIZES else np.dtype(dtype).itemsize
    return tuple(v for v in (1, 2, 4, 8, 16) if v * size <= 16)


@dataclass(frozen=True)
class Variant:
    source: str
    kernel: str
    targs: tuple

    @property
    def name_expression(self) -> str:
        return f"{self.kernel}<{', '.join(self.targs)}>"

    @property
    def path(self) -> Path:
        return KERNEL_DIR / self.source


def _ct(dtype) -> str:
    return _dtypes.CTYPES[_dtypes.name_of(dtype)]


@functools.lru_cache(maxsize=None)
def all_variants() -> tuple:
    out = []
    for dt in DTYPES:
        t = _dtypes.CTYPES[dt]
        vmax = vector_widths(dt)[-1]
        for layout in ("cl", "cf"):
            for wmode in (0, 1, 2):
                for v in vector_widths(dt):
                    out.append(Variant("moments.cu", f"cubn_moments_{layout}", (t, str(wmode), str(v))))
            for act in KERNEL_IDS:
                for v in vector_widths(dt):
                    out.append(Variant("backward.cu", f"cubn_bwd_reduce_{layout}", (t, str(act), str(v))))
        for act in KERNEL_IDS:
            for v in sorted({1, vmax}):
                for raw in (0, 1):
                    out.append(Variant("normalize.cu", "cubn_normalize", (t, str(act), str(v), str(raw))))
                out.append(Variant("backward.cu", "cubn_bwd_apply", (t, str(act), str(v))))
                for cl in (0, 1):  # like normalize: scalar or 16-byte vectors only (compile time)
                    out.append(Variant("persistent.cu", "cubn_bn_train_persistent", (t, str(act), str(v), str(cl))))
                    out.append(Variant("persistent.cu", "cubn_bn_bwd_persistent", (t, str(act), str(v), str(cl))))
    for a in ACC_DTYPES:
        t = _dtypes.CTYPES[a]
        for k in ("cubn_bn_finalize", "cubn_bn_update", "cubn_bwd_finalize", "cubn_merge_partials", "cubn_merge_sums"):
            out.append(Variant("finalize.cu", k, (t,)))
    out.extend(_preprocess_variants())
    return tuple(out)


def _preprocess_variants() -> list:
    """Image-normalization variants (preprocess.cu), when that source exists."""
    try:
        from ..preprocessing.image import kernel_variants
    except ImportError:
        return []
    return list(kernel_variants(Variant))


@functools.lru_cache(maxsize=None)
def _known() -> frozenset:
    return frozenset(all_variants())


def variants_for_source(source: str) -> list:
    return [v for v in all_variants() if v.source == source]


def _checked(v: Variant) -> Variant:
    if v not in _known():
        raise KeyError(f"kernel variant {v.name_expression} ({v.source}) is not registered")
    return v


# -- constructors used by the kernel backend ---------------------------------
def moments(dtype, layout: str, wmode: int, vec: int) -> Variant:
    return _checked(Variant("moments.cu", f"cubn_moments_{layout}", (_ct(dtype), str(wmode), str(vec))))


def normalize(dtype, act_id: int, vec: int, raw: bool) -> Variant:
    return _checked(Variant("normalize.cu", "cubn_normalize", (_ct(dtype), str(act_id), str(vec), str(int(raw)))))


def bwd_reduce(dtype, layout: str, act_id: int, vec: int) -> Variant:
    return _checked(Variant("backward.cu", f"cubn_bwd_reduce_{layout}", (_ct(dtype), str(act_id), str(vec))))


def bwd_apply(dtype, act_id: int, vec: int) -> Variant:
    return _checked(Variant("backward.cu", "cubn_bwd_apply", (_ct(dtype), str(act_id), str(vec))))


def train_persistent(dtype, act_id: int, vec: int, channels_last: bool) -> Variant:
    return _checked(Variant("persistent.cu", "cubn_bn_train_persistent",
                            (_ct(dtype), str(act_id), str(vec), str(int(channels_last)))))


def bwd_persistent(dtype, act_id: int, vec: int, channels_last: bool) -> Variant:
    return _checked(Variant("persistent.cu", "cubn_bn_bwd_persistent",
                            (_ct(dtype), str(act_id), str(vec), str(int(channels_last)))))


def finalize_kernel(name: str, acc) -> Variant:
    return _checked(Variant("finalize.cu", name, (_ct(acc),)))
