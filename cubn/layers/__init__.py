"""Layers: small stateful objects that hold variables and call the ops."""
from .batch_norm import BatchNorm
from .sync_batch_norm import SyncBatchNorm

__all__ = ["BatchNorm", "SyncBatchNorm"]
