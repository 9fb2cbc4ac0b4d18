"""A traced traffic and instruction model of cubn's kernels, for GPUs this
machine does not have (see docs/performance.md, "The model")."""
