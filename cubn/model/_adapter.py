"""Everything the model needs from cubn's internals, in one place.

The model drives the real orchestration (``KernelBackend``) with launchers of
its own and reads facts about kernels (sources, template arguments, parameter
names, compiler options) and about the benchmark suite. Every such dependency
on the kernel registry, the emulated launcher's build machinery, the backend
table and the benchmark module is here, so that a change of those internals
is mended in this file alone.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import pathlib
import subprocess
import tempfile
import threading

import numpy as np

from .. import _backend
from ..backends import emulated_launcher as _emu
from ..backends import kernel_backend as _kb
from ..backends.base import DeviceInfo
from ..kernels import registry as _registry
from ..kernels.spec import Variant as _Variant

MODEL_DIR = pathlib.Path(__file__).resolve().parent
KERNELS_DIR = _registry.KERNEL_DIR
SOURCES = _registry.SOURCES

# -- the orchestration ---------------------------------------------------------
KernelBackend = _kb.KernelBackend
#: Resident 256-thread blocks per SM the launch planner assumes.
PLANNED_BLOCKS_PER_SM = _kb.BLOCKS_PER_SM


def kernel_backend(launcher):
    """The real orchestration on ``launcher``."""
    return _kb.KernelBackend(launcher)


@contextlib.contextmanager
def routed_to(backend):
    """Inside the block, cubn's public ops called on NumPy arrays run on
    ``backend`` (a KernelBackend with a model launcher): they are routed
    through the ``emulated`` backend slot, which is swapped for the
    duration. Not re-entrant across threads; the model runs one op at a time."""
    key = ("emulated", None)
    with _route_lock:
        old = _backend._backends.get(key)
        _backend._backends[key] = backend
        try:
            with _backend.use_backend("emulated"):
                yield
        finally:
            if old is None:
                _backend._backends.pop(key, None)
            else:
                _backend._backends[key] = old


_route_lock = threading.RLock()


# -- variants -----------------------------------------------------------------
def variant_of(kernel):
    """The registry variant a model launcher's ``get`` received."""
    return kernel if isinstance(kernel, _Variant) else kernel.variant


def nvrtc_options(arch: str) -> list:
    """What the CuPy launcher hands NVRTC, plus the target (as tests/test_nvrtc.py does)."""
    include = [f"-I{KERNELS_DIR}"] + [f"-I{d}" for d in cuda_include_dirs()]
    return [*_registry.NVRTC_OPTIONS, *_registry.define_options(), *_registry.CUPY_ADDED_OPTIONS,
            f"--gpu-architecture={arch}", *include]


def cuda_include_dirs() -> list:
    """cuda_fp16.h / cuda_bf16.h from the nvidia-cuda-runtime wheel (or a toolkit)."""
    from ..backends.cupy_launcher import cuda_include_dirs as dirs

    return list(dirs())


# -- kernel parameter names ------------------------------------------------------
def parameter_names(variant) -> tuple:
    """Names of a variant's launch arguments, in the kernel's order (its spec's)."""
    return tuple(a.name for a in variant.spec.arguments)


def template_params(variant) -> dict:
    """{template parameter name: its C spelling} of a variant."""
    return dict(zip((p.name for p in variant.spec.template), variant.targs))


# -- benchmark suite facts ---------------------------------------------------------
def benchmark_suite():
    from .. import benchmarking as B

    return list(B.SUITE)


def benchmark_quick():
    from .. import benchmarking as B

    return list(B.QUICK)


def benchmark_ops():
    from .. import benchmarking as B

    return tuple(B.OPS)


def tensor_passes():
    """Tensor-sized transfers per op, as the benchmark's roofline column counts them."""
    from .. import benchmarking as B

    return dict(B.TENSOR_PASSES)


def benchmark_constants():
    from .. import benchmarking as B

    return B.EPS, B.MOMENTUM


def one_launch_allowed(enabled: bool):
    """The scoped option that allows (or forbids) the one-launch kernels inside a block."""
    from .._options import use_one_launch

    return use_one_launch(bool(enabled))


def three_launch_peer() -> str:
    """The benchmark peer that times the three-launch path."""
    return "cubn_three_launch"


# -- building traced kernels ---------------------------------------------------------
TRACE_FLAGS = ("-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0",
               # Keep each vector access one aggregate load/store, as on the GPU
               # (scalar replacement would split a 16-byte load into four).
               "-fno-tree-sra", "-fno-ipa-sra")


class TracedKernel:
    """One kernel of a traced library: its variant, parameter codes and names, and entries."""

    __slots__ = ("variant", "parameters", "names", "library", "_launch", "_emulated")

    def __init__(self, variant, parameters, names, launch, emulated, library=""):
        self.variant = variant
        self.parameters = parameters
        self.names = names
        self.library = str(library)
        self._launch = launch
        self._emulated = emulated

    @property
    def name_expression(self) -> str:
        return self.variant.name_expression

    def __repr__(self) -> str:
        return f"<TracedKernel {self.variant.name_expression}>"


_TRACE_LAUNCH = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t, ctypes.c_char_p,
    ctypes.c_size_t,
)
_lock = threading.Lock()
_trace_runtime = None
_libraries: dict = {}


def trace_runtime():
    """The hooks library (loaded once, RTLD_GLOBAL, before any traced kernel library)."""
    global _trace_runtime
    with _lock:
        if _trace_runtime is None:
            src = MODEL_DIR / "trace_runtime.cpp"
            path = _build_shared("trace-runtime", src.read_text(), (), instrument=False)
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            lib.cubn_trace_count.restype = ctypes.c_size_t
            lib.cubn_trace_dropped.restype = ctypes.c_uint64
            lib.cubn_trace_set_ranges.argtypes = [ctypes.c_void_p, ctypes.c_int]
            lib.cubn_trace_take.argtypes = [ctypes.c_void_p]
            _trace_runtime = lib
        return _trace_runtime


def traced_kernel(variant) -> TracedKernel:
    """The traced build of a registry variant (built with its siblings, cached on disk)."""
    runtime = trace_runtime()
    names = tuple(_emu._names_for_source(variant.source, variant.name_expression))
    key = (variant.source, names)
    with _lock:
        lib = _libraries.get(key)
        if lib is None:
            lib = _load_traced(KERNELS_DIR / variant.source, list(names))
            _libraries[key] = lib
    del runtime
    return lib[variant.name_expression](variant)


def _load_traced(source: pathlib.Path, names: list):
    lines = [
        "// Generated by cubn.model._adapter: a traced build.",
        f'#include "{source.name}"',
        f'#include "{MODEL_DIR / "trace_launch.h"}"',
        'extern "C" CUBN_EMU_EXPORT int cubn_emu_bind(const cubn_emu_runtime_api* api) { return cubn_emu::bind(api); }',
    ]
    for i, name in enumerate(names):
        lines += [
            f'extern "C" CUBN_EMU_EXPORT int cubn_trace_launch_{i}(const unsigned* g, const unsigned* b, size_t sh,',
            "    void** args, const unsigned* blocks, size_t nblocks, char* err, size_t errlen) {",
            f"  return cubn_trace::launch({_emu._c_string(name)}, &{name}, g, b, sh, args, blocks, nblocks, err, errlen);",
            "}",
            f'extern "C" CUBN_EMU_EXPORT const char* cubn_emu_signature_{i}() {{ return cubn_emu::signature(&{name}); }}',
        ]
    path = _build_shared(f"{source.stem}-traced", "\n".join(lines) + "\n", (source.parent,), instrument=True)
    library = _emu.load_bound(path, _emu._runtime_api(None))
    out = {}
    for i, (name, params) in enumerate(zip(names, _emu.signatures(library, len(names)))):
        entry = _TRACE_LAUNCH((f"cubn_trace_launch_{i}", library))
        out[name] = functools.partial(_make_traced, params, entry, path)
    return out


def _make_traced(params, entry, path, variant):
    names = parameter_names(variant)
    if len(names) != len(params):
        raise RuntimeError(f"{variant.name_expression}: its spec names {len(names)} arguments "
                           f"but the compiled kernel takes {len(params)} parameters")
    shim = _emu.EmulatedKernel(variant.name_expression, KERNELS_DIR / variant.source, params, None)
    return TracedKernel(variant, params, names, entry, shim, path)


def marshal(kernel: TracedKernel, args):
    """``(void*[] argv, holders)`` exactly as the emulated launcher passes arguments."""
    return _emu._marshal(kernel._emulated, args)


def launch_traced(kernel: TracedKernel, grid3, block3, shared_bytes, args, blocks) -> None:
    argv, holders = marshal(kernel, args)
    flat = np.ascontiguousarray(np.asarray(blocks, dtype=np.uint32).reshape(-1))
    err = ctypes.create_string_buffer(8192)
    rc = kernel._launch((ctypes.c_uint * 3)(*grid3), (ctypes.c_uint * 3)(*block3), int(shared_bytes), argv,
                        flat.ctypes.data_as(ctypes.POINTER(ctypes.c_uint)), len(flat) // 3, err, len(err))
    del holders
    if rc != 0:
        raise RuntimeError(err.value.decode(errors="replace").rstrip())


def _build_shared(stem: str, tu_text: str, include_dirs, instrument: bool) -> pathlib.Path:
    """Compile (instrumented or not) and link separately, so that no sanitizer
    runtime is linked in: the hooks come from the trace runtime."""
    compile_flags = [f for f in _emu._FLAGS if f != "-shared"]
    extra = list(TRACE_FLAGS) if instrument else []
    defines = [f"-D{k}={v}" for k, v in _registry.DEFINES]  # the launch constants, as the emulator gets them
    flags = [*compile_flags, *extra, *defines, f"-I{_emu.SHIM_DIR}", *(f"-I{d}" for d in include_dirs)]
    h = hashlib.sha256()
    h.update("\0".join([_emu._compiler_identity(), "trace", *flags, tu_text]).encode())
    _emu._hash_files(h, [p for p in _emu.SHIM_DIR.iterdir() if p.is_file()])
    _emu._hash_files(h, [MODEL_DIR / "trace_launch.h", MODEL_DIR / "trace_runtime.cpp"])
    for d in include_dirs:
        _emu._hash_files(h, _emu._headers_in(pathlib.Path(d)))
    target = _emu.cache_dir() / f"{stem}-{h.hexdigest()[:24]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tempfile.TemporaryDirectory(prefix="cubn-trace-") as tmp:
        tu = pathlib.Path(tmp) / f"{stem}.cpp"
        obj = pathlib.Path(tmp) / f"{stem}.o"
        tu.write_text(tu_text)
        include = ["-include", "cuda_shim.h"] if instrument else []
        steps = [[_emu._CXX, *flags, *include, "-x", "c++", "-c", str(tu), "-o", str(obj)],
                 [_emu._CXX, "-shared", "-pthread", str(obj), "-o", str(staged)]]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_emu._compiler_env())
            if proc.returncode != 0:
                staged.unlink(missing_ok=True)
                raise RuntimeError(f"building the traced {stem} failed:\n{' '.join(cmd)}\n{proc.stderr}")
    os.replace(staged, target)
    return target


# -- limits the emulated launcher enforces -------------------------------------------
def check_dims(what, dims, limits):
    return _emu._dims(what, dims, limits)


MAX_BLOCK = _emu._MAX_BLOCK
MAX_GRID = _emu._MAX_GRID
NULL = _emu.NULL


def device_info(name, sms, max_threads=1024, max_shared=48 * 1024) -> DeviceInfo:
    return DeviceInfo(name=name, multiprocessor_count=sms, max_threads_per_block=max_threads,
                      max_shared_memory_per_block=max_shared)


def benchmark_case(op, inputs):
    """The benchmark's cubn call for ``op`` (``run(i)`` over input set i),
    built on whatever backend NumPy inputs are routed to."""
    from ..benchmarking import peers

    return peers.PEERS["cubn"].build(op, inputs)


def benchmark_axes(layout, ndim):
    from .. import benchmarking as B

    return B.channel_axis(layout, ndim), B.reduce_axes(layout, ndim)


def resolve_dtype(name):
    from .. import benchmarking as B

    return B.resolve_dtype(name)


def make_variant(source, kernel, targs):
    """The registered variant of ``kernel`` in ``source`` with these template arguments (C spellings)."""
    return _variants_by_key()[(source, kernel, tuple(targs))]


@functools.lru_cache(maxsize=None)
def _variants_by_key() -> dict:
    return {(v.source, v.kernel, v.targs): v for v in _registry.all_variants()}


def cupy_compile(keys) -> int:
    """Compile ``(source, name expression)`` variants into CuPy's cache (needs a GPU)."""
    from ..backends.cupy_launcher import _compile_chunk

    return _compile_chunk([list(k) for k in keys])


def run_benchmark(shapes, dtypes, ops, log):
    """The benchmark suite's timing loop on these shapes (every peer)."""
    from .. import benchmarking as B

    return B.run_suite(shapes, dtypes, ops, B.PEERS, log=log)


def write_benchmark(folder, env, records):
    from .. import benchmarking as B

    return B.write_results(folder, env, records)
