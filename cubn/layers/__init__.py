"""Layers: small stateful objects that hold variables and call the ops."""
from .batch_norm import BatchNorm

__all__ = ["BatchNorm"]
