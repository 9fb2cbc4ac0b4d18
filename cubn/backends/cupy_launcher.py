"""Launch cubn's kernels on a GPU through CuPy.

Each variant is compiled by NVRTC on first use into its own ``RawModule``
(so a process pays only for the variants it launches), cached per device in
memory and by CuPy on disk (``~/.cupy/kernel_cache``, or
``CUPY_CACHE_DIR``). Launches go on CuPy's current stream; nothing waits.
"""
from __future__ import annotations

import functools
import hashlib
import os
import threading
from pathlib import Path

from ..kernels import registry
from .base import DeviceInfo


def cuda_include_dirs() -> tuple:
    """Directories holding cuda_fp16.h / cuda_bf16.h, if they can be found.

    The CUDA toolkit's include directory, or the one of the
    ``nvidia-cuda-runtime`` wheel; CuPy usually finds them itself, but
    naming them costs nothing and helps pip-only installs.
    """
    found = []
    candidates = []
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    try:
        import nvidia

        for base in getattr(nvidia, "__path__", []):
            candidates.extend(sorted(Path(base).glob("cu*/include")))
            candidates.extend(sorted(Path(base).glob("cuda_runtime/include")))
    except ImportError:
        pass
    for c in candidates:
        if (c / "cuda_fp16.h").is_file() and str(c) not in found:
            found.append(str(c))
    return tuple(found)


def compile_options() -> tuple:
    """The options cubn passes to CuPy's NVRTC for every kernel: the launch constants
    as defines (the emulator's g++ gets the same), the include directories."""
    return (registry.NVRTC_OPTIONS + registry.define_options() + (f"-I{registry.KERNEL_DIR}",)
            + tuple(f"-I{d}" for d in cuda_include_dirs()))


@functools.lru_cache(maxsize=None)
def source_text(path) -> str:
    """A kernel source as handed to NVRTC, headed by a digest of cubn's own
    headers: CuPy's on-disk cache keys on the source text, not on what it
    includes, so a changed ``.cuh`` must change the text."""
    h = hashlib.sha256()
    for p in sorted(registry.KERNEL_DIR.glob("*.cuh")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return f"// cubn headers {h.hexdigest()[:16]}\n" + Path(path).read_text()


class CupyLauncher:
    name = "cupy"

    def __init__(self, device_id: int = 0):
        import cupy

        self.xp = cupy
        self.device_id = int(device_id)
        self._kernels: dict = {}
        self._lock = threading.Lock()
        self._options = compile_options()
        self._info = None
        self._get_device = cupy.cuda.runtime.getDevice

    def stream_key(self):
        """The current stream (the fused statistics keep one counter buffer per stream)."""
        return self.xp.cuda.get_current_stream().ptr

    def device_info(self) -> DeviceInfo:
        if self._info is None:
            cp = self.xp
            dev = cp.cuda.Device(self.device_id)
            attrs = dev.attributes
            props = cp.cuda.runtime.getDeviceProperties(self.device_id)
            name = props["name"]
            self._info = DeviceInfo(
                name=name.decode() if isinstance(name, bytes) else str(name),
                multiprocessor_count=int(attrs["MultiProcessorCount"]),
                max_threads_per_block=int(attrs["MaxThreadsPerBlock"]),
                max_shared_memory_per_block=int(attrs["MaxSharedMemoryPerBlock"]),
                compute_capability=int(dev.compute_capability),
            )
        return self._info

    def get(self, variant):
        k = self._kernels.get(variant)
        if k is None:
            with self._lock:
                k = self._kernels.get(variant)
                if k is None:
                    with self.xp.cuda.Device(self.device_id):
                        mod = self.xp.RawModule(
                            code=source_text(variant.path), options=self._options,
                            name_expressions=[variant.name_expression],
                        )
                        k = mod.get_function(variant.name_expression)
                    self._kernels[variant] = k
        return k

    def launch(self, kernel, grid, block, shared_bytes, args) -> None:
        # None is a NULL pointer for CuPy; numpy scalars pass by value. A kernel
        # runs on the device current at its launch: switch only when another one
        # is (a Device context around every launch costs more than the launch's Python).
        if self._get_device() == self.device_id:
            kernel(tuple(grid), tuple(block), tuple(args), shared_mem=int(shared_bytes))
        else:
            with self.xp.cuda.Device(self.device_id):
                kernel(tuple(grid), tuple(block), tuple(args), shared_mem=int(shared_bytes))

    def empty(self, shape, dtype):
        with self.xp.cuda.Device(self.device_id):
            return self.xp.empty(shape, dtype)


def _compile_chunk(names):
    from ..kernels import registry as reg

    by_name = {(v.source, v.name_expression): v for v in reg.all_variants()}
    launcher = CupyLauncher(0)
    for key in names:
        launcher.get(by_name[tuple(key)])
    return len(names)


def precompile(jobs: int = 1, progress=None) -> int:
    """Compile every registered variant for device 0 into CuPy's disk cache,
    in ``jobs`` processes, so that first calls (and test runs) load cubins.

    ``progress(n, total)``: called as each process finishes its ``n`` variants.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    variants = registry.all_variants()
    keys = [(v.source, v.name_expression) for v in variants]
    chunks = [keys[i::max(1, jobs)] for i in range(max(1, jobs))]
    done = 0
    ctx = mp.get_context("spawn")  # CUDA does not survive fork
    with cf.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as ex:
        for n in ex.map(_compile_chunk, chunks):
            done += n
            if progress is not None:
                progress(n, len(keys))
    return done
