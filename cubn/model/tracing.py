"""Launchers that let the real orchestration plan launches for a GPU the
machine does not have.

Both implement the launcher interface ``KernelBackend`` drives (``name``,
``xp``, ``get``, ``launch``, ``device_info``, ``empty``) and report the
device of a [`Device`][cubn.model.devices.Device] preset (an H100's 132 SMs,
...), so the launch plans are the ones that GPU would get:

* [`RecordingLauncher`][RecordingLauncher] records each launch (kernel, grid, block,
  shared memory, named arguments) and runs nothing: launch-plan checks at
  full size cost no kernel time; [`NullLauncher`][NullLauncher] keeps even less, for
  timing the host side of a call.
* [`TracingLauncher`][TracingLauncher] also runs a sample of each grid's blocks through
  the traced emulator build (every global-memory access recorded; see
  ``trace_runtime.cpp``) and keeps a [`LaunchTrace`][LaunchTrace] per launch, which
  [`cubn.model.access`][cubn.model.access] turns into traffic and coalescing numbers.

Inputs to the model can be ``numpy.zeros`` of the full size: untouched pages
cost no memory, and a sampled launch touches only its blocks' share.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from . import _adapter, sampling
from .devices import Device, get_device

RECORD_DTYPE = np.dtype([
    ("addr", "<u8"), ("pc", "<u8"), ("block", "<u4"), ("thread", "<u2"), ("size", "u1"), ("kind", "u1"),
    ("range", "<u4"), ("seq", "<u4"),
])


@dataclass
class Argument:
    """One kernel argument as launched."""

    name: str
    kind: str                 # "array", "null" or "scalar"
    value: object = None      # the scalar's value
    ptr: int = 0
    nbytes: int = 0
    itemsize: int = 0
    alloc: int = -1           # which allocation (arrays sharing memory share it)
    offset: int = 0           # byte offset of ptr from the allocation's start


@dataclass
class Launch:
    """What a launcher was asked to launch."""

    kernel: str               # kernel name (no template arguments)
    name_expression: str
    source: str
    template_args: tuple
    grid: tuple
    block: tuple
    shared_bytes: int
    args: list
    template: dict = field(default_factory=dict)  # template parameter name -> its C spelling

    @property
    def named(self) -> dict:
        return {a.name: a.value for a in self.args if a.kind == "scalar"}

    def arg(self, name):
        for a in self.args:
            if a.name == name:
                return a
        raise KeyError(name)

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def threads_per_block(self) -> int:
        return self.block[0] * self.block[1] * self.block[2]


@dataclass
class LaunchTrace:
    """A launch and the accesses its sampled blocks made."""

    launch: Launch
    records: np.ndarray       # RECORD_DTYPE; "range" indexes ``ranges``
    ranges: list              # argument names (joined with "|" when arrays alias) per range
    range_args: list          # the Argument of each range
    blocks: np.ndarray        # (samples, 3) block indices run
    weights: np.ndarray       # blocks each sample stands for
    role_of: np.ndarray       # role of each sample
    roles: int
    library: str = ""
    dropped: int = 0


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _c_dims(what, dims, limits):
    return _adapter.check_dims(what, dims, limits)


class RecordingLauncher:
    """Records launches for a device preset; runs nothing."""

    name = "model"
    xp = np

    def __init__(self, device: Device | str = "h100"):
        self.device = get_device(device) if isinstance(device, str) else device
        self.launches: list[Launch] = []
        self._allocs: dict[int, int] = {}

    def device_info(self):
        return self.device.device_info()

    def get(self, variant):
        return variant

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def clear(self):
        self.launches.clear()

    def _describe(self, variant, grid, block, shared_bytes, args, names) -> Launch:
        grid3 = _c_dims("grid", grid, _adapter.MAX_GRID)
        block3 = _c_dims("block", block, _adapter.MAX_BLOCK)
        threads = block3[0] * block3[1] * block3[2]
        if threads > self.device.max_threads_per_block:
            raise ValueError(f"block {block3} has more than {self.device.max_threads_per_block} threads")
        if not 0 <= int(shared_bytes) <= self.device.max_shared_per_block:
            raise ValueError(f"shared_bytes={shared_bytes} is outside [0, {self.device.max_shared_per_block}]")
        if names is None:
            names = _adapter.parameter_names(variant)
        if len(names) != len(args):
            raise TypeError(f"{variant.name_expression} takes {len(names)} arguments, got {len(args)}")
        out = []
        for name, a in zip(names, args):
            if isinstance(a, np.ndarray):
                root = _root(a)
                rptr = _ptr(root)
                alloc = self._allocs.setdefault(rptr, len(self._allocs))
                out.append(Argument(name, "array", ptr=_ptr(a), nbytes=a.nbytes, itemsize=a.itemsize,
                                    alloc=alloc, offset=_ptr(a) - rptr))
            elif a is None or a is _adapter.NULL:
                out.append(Argument(name, "null"))
            else:
                out.append(Argument(name, "scalar", value=a.item() if hasattr(a, "item") else a))
        return Launch(variant.kernel, variant.name_expression, variant.source, tuple(variant.targs), grid3, block3,
                      int(shared_bytes), out, _adapter.template_params(variant))

    def launch(self, kernel, grid, block, shared_bytes, args) -> None:
        variant = _adapter.variant_of(kernel)
        self.launches.append(self._describe(variant, grid, block, shared_bytes, args, None))


class NullLauncher(RecordingLauncher):
    """Keeps only ``(variant, grid, block, shared_bytes)`` per launch: as
    little work as a launcher can do, for measuring the host time of the
    orchestration itself."""

    def launch(self, kernel, grid, block, shared_bytes, args) -> None:
        self.launches.append((kernel, grid, block, shared_bytes))


class TracingLauncher(RecordingLauncher):
    """Records launches and traces a sample of each grid's blocks."""

    def __init__(self, device: Device | str = "h100", policy: sampling.SamplePolicy = sampling.SamplePolicy()):
        super().__init__(device)
        self.policy = policy
        self.traces: list[LaunchTrace] = []
        self._runtime = _adapter.trace_runtime()
        self._filled: set = set()

    def get(self, variant):
        return _adapter.traced_kernel(variant)

    HOLD = 1 << 31  # a fused statistics counter far from any group's block count

    @staticmethod
    def _hold_counters(variant, args):
        """The fused statistics' group counters are set far from completion, so
        no traced block runs the last block's merge, whether the grid is sampled
        or run whole (a sample would complete a count only by chance): that
        merge is modelled from the launch's arguments (``predict.last_block_cycles``)."""
        names = _adapter.parameter_names(variant)
        if "counters" in names:
            c = args[names.index("counters")]
            if isinstance(c, np.ndarray):
                c[...] = TracingLauncher.HOLD

    def _fill_new_arrays(self, args):
        """Arrays the launcher has not seen yet and that are small (partial
        buffers, statistics) are filled with ones before the launch: blocks
        the sample skips never write their share, and zeros there (a fresh
        allocation) would send later kernels down data-dependent shortcuts
        (Chan's merge of an empty partial returns early, skipping loads)."""
        for a in args:
            if not isinstance(a, np.ndarray) or a.nbytes > FILL_LIMIT:
                continue
            root = _root(a)
            key = (_ptr(root), root.nbytes)
            if key in self._filled or not root.flags.writeable:
                continue
            self._filled.add(key)
            try:
                np.copyto(root, 1, casting="unsafe")
            except (TypeError, ValueError):
                pass

    def clear(self):
        super().clear()
        self.traces.clear()

    def launch(self, kernel, grid, block, shared_bytes, args) -> None:
        variant = _adapter.variant_of(kernel)
        desc = self._describe(variant, grid, block, shared_bytes, args, kernel.names)
        self.launches.append(desc)
        self._fill_new_arrays(args)
        self._hold_counters(variant, args)
        blocks, weights, role_of, roles = sampling.choose(
            desc.kernel, desc.template, desc.grid, desc.block, desc.named, self.policy)
        # One range per distinct (pointer, size): aliased arguments (in-place
        # updates) share one, named after all of them.
        ranges, range_args, lo_len = [], [], []
        index = {}
        for a in desc.args:
            if a.kind != "array" or a.nbytes == 0:
                continue
            key = (a.ptr, a.nbytes)
            if key in index:
                ranges[index[key]] += "|" + a.name
                continue
            index[key] = len(ranges)
            ranges.append(a.name)
            range_args.append(a)
            lo_len += [a.ptr, a.nbytes]
        rt = self._runtime
        with _trace_lock:
            buf = np.asarray(lo_len, dtype=np.uint64)
            if rt.cubn_trace_set_ranges(buf.ctypes.data, len(ranges)) != 0:
                raise RuntimeError(f"{desc.name_expression}: too many argument arrays to trace ({len(ranges)})")
            try:
                _adapter.launch_traced(kernel, desc.grid, desc.block, desc.shared_bytes, args, blocks)
            finally:
                n = rt.cubn_trace_count()
                records = np.empty(n, RECORD_DTYPE)
                rt.cubn_trace_take(records.ctypes.data)
                rt.cubn_trace_set_ranges(None, 0)
            dropped = int(rt.cubn_trace_dropped())
        self.traces.append(LaunchTrace(desc, records, ranges, range_args, blocks, weights, role_of, roles,
                                       library=kernel.library, dropped=dropped))


_trace_lock = threading.Lock()
FILL_LIMIT = 64 << 20  # bytes: larger arrays are the tensors, left as they are
