"""Preprocessing for GPU-resident pipelines.

* [`RunningMoments`][RunningMoments] -- streaming, mergeable per-feature mean/variance.
* [`Standardizer`][Standardizer] -- scikit-learn's ``StandardScaler`` (interface and
  numbers) on cubn's kernels, taking uint8/uint16/16-bit inputs and writing
  any float dtype and layout in one pass.
* [`normalize_images`][normalize_images] -- convert, normalize per channel and change
  layout (NHWC -> NCHW) in one kernel launch.

Integer inputs (uint8, uint16) are accepted here and only here; they are
converted inside the kernels, never materialized as floats.
"""
from .image import normalize_images
from .running_moments import RunningMoments

__all__ = ["RunningMoments", "Standardizer", "normalize_images", "NotFittedError"]


def __getattr__(name):
    # Standardizer subclasses scikit-learn's estimators when scikit-learn is installed:
    # loaded on first use, so that importing cubn never imports scikit-learn.
    if name in ("Standardizer", "NotFittedError"):
        from . import standardizer

        return getattr(standardizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
