"""The benchmark suite behind ``cubn bench`` and ``bench/`` (pytest-benchmark).

One module per job:

* ``cases``    -- the shapes, ops and dtypes measured, and the rotating inputs of one case;
* ``peers``    -- the implementations measured side by side (pluggable: ``register``);
* ``timing``   -- CUDA events on the GPU, the wall clock on the CPU;
* ``roofline`` -- the bytes an op must move, and the copy bandwidth they are compared with;
* ``suite``    -- every case timed into ``Record`` rows;
* ``report``   -- summaries, the text table, the results folder;
* ``chart``    -- the charts (matplotlib);
* ``command``  -- ``cubn bench`` itself.

GPU timing: CUDA events around each call, warm-up first, the median of many
repetitions, input buffers rotated so that the L2 cache (50 MB on an H100)
does not flatter anyone. The roofline column divides the bytes an op must
move by the device-to-device copy bandwidth measured in the same run.
"""
from __future__ import annotations

from .cases import (
    DTYPES, EPS, L2_FLUSH_BYTES, MOMENTUM, ONE_LAUNCH_OPS, OPS, QUICK, ROTATION_CAP_BYTES, SUITE, Inputs,
    channel_axis, reduce_axes, resolve_dtype,
)
from .command import main
from .peers import NUMPY_MAX_ELEMENTS, NUMPY_MAX_ELEMENTS_CPU_ONLY, PEERS, Peer, SameAsCubn, Skip, peer_context, register
from .report import summarize, table, write_results
from .roofline import TENSOR_PASSES, copy_bandwidth, op_bytes
from .suite import Record, environment, format_record, run_suite
from .timing import time_cpu, time_gpu

__all__ = [
    "DTYPES", "EPS", "L2_FLUSH_BYTES", "MOMENTUM", "ONE_LAUNCH_OPS", "OPS", "QUICK", "ROTATION_CAP_BYTES", "SUITE",
    "Inputs", "channel_axis", "reduce_axes", "resolve_dtype", "main", "NUMPY_MAX_ELEMENTS",
    "NUMPY_MAX_ELEMENTS_CPU_ONLY", "PEERS", "Peer", "SameAsCubn", "Skip", "peer_context", "register", "summarize",
    "table", "write_results", "TENSOR_PASSES", "copy_bandwidth", "op_bytes", "Record", "environment",
    "format_record", "run_suite", "time_cpu", "time_gpu",
]
