"""Functional ops: stateless, one call per op."""
from .backward import BatchNormGrads, batch_norm_backward
from .gradients import BatchNormalizationGrads, batch_normalization_backward, moments_backward, weighted_moments_backward
from .moments import moments, normalize_moments, sufficient_statistics, weighted_moments
from .normalization import batch_norm_with_global_normalization, batch_normalization, fused_batch_norm

__all__ = [
    "moments",
    "weighted_moments",
    "batch_normalization",
    "batch_norm_with_global_normalization",
    "fused_batch_norm",
    "batch_norm_backward",
    "BatchNormGrads",
    "sufficient_statistics",
    "normalize_moments",
    "batch_normalization_backward",
    "BatchNormalizationGrads",
    "moments_backward",
    "weighted_moments_backward",
]
