"""The ``emulated`` backend's launcher: CUDA kernels run on the CPU.

The very ``.cu`` sources the CuPy launcher compiles with NVRTC are built here by
the host compiler (``g++ -std=c++20 -x c++``) with a shim header that emulates
the CUDA programming model (``cubn/kernels/shim/cuda_shim.h``), and launched
through ctypes.  Blocks run one after another; the threads of a block are real
OS threads from a persistent pool, so barriers, warp shuffles and the
sanitizers behave as on real concurrent hardware.  ``docs/emulator.md`` says
what is and is not modelled.

Each source file becomes one shared object holding every requested name
expression; objects are cached on disk (``$CUBN_CACHE_DIR/emulated`` or
``~/.cache/cubn/emulated``) under a hash of everything that goes into them,
each with a SHA-256 digest of its bytes beside it, checked before every load.
"""

from __future__ import annotations

import ctypes
import hashlib
import operator
import os
import pathlib
import subprocess
import tempfile
import threading

import numpy

from .base import DeviceInfo

__all__ = [
    "NULL",
    "DeviceInfo",
    "EmulatedKernel",
    "EmulatedLauncher",
    "NullPointer",
    "sanitizer_env",
]

KERNELS_DIR = pathlib.Path(__file__).resolve().parent.parent / "kernels"
SHIM_DIR = KERNELS_DIR / "shim"
SANITIZERS = ("address", "thread")

_CXX = "g++"
_FLAGS = (
    "-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-pthread",
    "-fvisibility=hidden",  # each library keeps its own copy of the shim's inline state
    "-Wall", "-Wno-unknown-pragmas", "-Wno-volatile",
    "-Wno-unused-function", "-Wno-unused-variable",
)  # fmt: skip
_SANITIZER_FLAGS = {
    None: (),
    "address": ("-fsanitize=address", "-fno-omit-frame-pointer"),
    "thread": ("-fsanitize=thread", "-fno-omit-frame-pointer"),
}
_SANITIZER_LIBRARY = {"address": "libasan.so", "thread": "libtsan.so"}
_SANITIZER_INIT_SYMBOL = {"address": "__asan_init", "thread": "__tsan_init"}

# CUDA's limits (compute capability 7.0 and later).
_MAX_BLOCK = (1024, 1024, 64)
_MAX_GRID = (2**31 - 1, 65535, 65535)

# The shim's parameter codes, and the numpy scalar each one takes.
_SCALAR_DTYPES = {
    "i4": numpy.dtype(numpy.int32),
    "u4": numpy.dtype(numpy.uint32),
    "i8": numpy.dtype(numpy.int64),
    "u8": numpy.dtype(numpy.uint64),
    "f4": numpy.dtype(numpy.float32),
    "f8": numpy.dtype(numpy.float64),
}
_C_TYPES = {"i4": "int", "u4": "unsigned int", "i8": "long long", "u8": "unsigned long long",
            "f4": "float", "f8": "double", "p": "pointer"}  # fmt: skip

_LAUNCH_PROTOTYPE = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.POINTER(ctypes.c_uint),
    ctypes.POINTER(ctypes.c_uint),
    ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.c_char_p,
    ctypes.c_size_t,
)


class NullPointer:
    """A ``nullptr`` kernel argument (use the singleton [`NULL`][NULL]; ``None`` works too, as with CuPy)."""

    _instance: NullPointer | None = None

    def __new__(cls) -> NullPointer:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NULL"


NULL = NullPointer()


class EmulatedKernel:
    """One kernel (a name expression) of a built source file."""

    __slots__ = ("name_expression", "source", "parameters", "_entry")

    def __init__(self, name_expression: str, source: pathlib.Path, parameters: tuple[str, ...], entry):
        self.name_expression = name_expression
        self.source = source
        self.parameters = parameters  # shim codes: "p", "i4", "u4", "i8", "u8", "f4", "f8"
        self._entry = entry

    def __repr__(self) -> str:
        return f"<EmulatedKernel {self.name_expression} from {self.source.name}>"


class EmulatedLauncher:
    """Builds kernels with the host compiler and runs them on the CPU."""

    name = "emulated"
    xp = numpy

    def __init__(self, sanitize: str | None = None):
        """``sanitize``: None, "address" or "thread"; None reads ``CUBN_EMULATOR_SANITIZE``.

        A sanitized launcher only works in a process started with the
        sanitizer's runtime preloaded: see [`sanitizer_env`][sanitizer_env].
        """
        if sanitize is None:
            sanitize = os.environ.get("CUBN_EMULATOR_SANITIZE") or None
        if sanitize not in (None, *SANITIZERS):
            raise ValueError(f"sanitize must be None, 'address' or 'thread', not {sanitize!r}")
        if sanitize is not None and not hasattr(ctypes.CDLL(None), _SANITIZER_INIT_SYMBOL[sanitize]):
            raise RuntimeError(
                f"sanitize={sanitize!r} needs the sanitizer runtime loaded before anything else: run "
                f"Python in a subprocess whose environment includes sanitizer_env({sanitize!r})"
            )
        self.sanitize = sanitize

    def device_info(self) -> DeviceInfo:
        """A small pretend device, so that multi-block code paths run."""
        return DeviceInfo(
            name="cubn CPU emulator" + (f" ({self.sanitize} sanitizer)" if self.sanitize else ""),
            multiprocessor_count=2,
            max_threads_per_block=1024,
            max_shared_memory_per_block=48 * 1024,
        )

    def get(self, variant) -> EmulatedKernel:
        """The kernel of a registry variant (``.source``, ``.name_expression``).

        Builds the variant together with its siblings, so that a session
        compiles each group once: every variant of a small source file, or,
        for a large one, every variant of the same kernel and data type
        (a float32-only sanitizer run then builds none of the float16,
        bfloat16 and float64 code).
        """
        names = _names_for_source(variant.source, variant.name_expression)
        module = self.build_module(KERNELS_DIR / variant.source, names, defines=_kernel_defines())
        return module[variant.name_expression]

    def build_module(
        self, source_path: pathlib.Path, name_expressions: list[str], include_dirs=(), defines=()
    ) -> dict[str, EmulatedKernel]:
        """Builds (or loads from the cache) ``source_path`` with the given name expressions.

        ``defines``: ``(name, value)`` pairs passed to the compiler as ``-Dname=value``.
        """
        source_path = pathlib.Path(source_path).resolve()
        include_dirs = tuple(pathlib.Path(d).resolve() for d in include_dirs)
        defines = tuple((str(k), str(v)) for k, v in defines)
        key = (self.sanitize, source_path, tuple(name_expressions), include_dirs, defines)
        with _build_lock:
            module = _modules.get(key)
            if module is None:
                module = _load_module(source_path, list(name_expressions), include_dirs, self.sanitize, defines)
                _modules[key] = module
        return module

    def launch(self, kernel: EmulatedKernel, grid: tuple, block: tuple, shared_bytes: int, args: tuple) -> None:
        """Runs ``kernel`` on a ``grid`` of ``block``s; returns when it has finished.

        ``args``: numpy arrays (their data pointer is passed), [`NULL`][NULL] or
        None (a null pointer), or numpy scalars of exactly the parameter's type.
        """
        if not isinstance(kernel, EmulatedKernel):
            raise TypeError(f"expected a kernel from EmulatedLauncher.get(), got {type(kernel).__name__}")
        info = self.device_info()
        grid3 = _dims("grid", grid, _MAX_GRID)
        block3 = _dims("block", block, _MAX_BLOCK)
        if block3[0] * block3[1] * block3[2] > info.max_threads_per_block:
            raise ValueError(f"block {block3} has more than {info.max_threads_per_block} threads")
        shared_bytes = operator.index(shared_bytes)
        if not 0 <= shared_bytes <= info.max_shared_memory_per_block:
            raise ValueError(
                f"shared_bytes={shared_bytes} is outside [0, {info.max_shared_memory_per_block}]"
            )
        argv, holders = _marshal(kernel, args)  # holders keep the values argv points to alive
        err = ctypes.create_string_buffer(8192)
        # ctypes releases the GIL for the call.
        rc = kernel._entry(
            (ctypes.c_uint * 3)(*grid3), (ctypes.c_uint * 3)(*block3), shared_bytes, argv, err, len(err)
        )
        del holders
        if rc != 0:
            raise RuntimeError(err.value.decode(errors="replace").rstrip())

    def empty(self, shape, dtype) -> numpy.ndarray:
        """Like numpy.empty, filled with 0xFF bytes: what a kernel forgets to write reads NaN / -1."""
        out = numpy.empty(shape, dtype)
        out.reshape(-1).view(numpy.uint8).fill(0xFF)
        return out


def sanitizer_env(mode: str) -> dict[str, str]:
    """Environment additions to run a Python *subprocess* under a sanitizer.

    Start the real interpreter, ``[sys.executable, ...]`` (a virtualenv's
    ``python`` symlink is fine), never a shell script such as a pyenv shim:
    the preloaded runtime must go into Python itself.  Raises RuntimeError
    when the compiler has no such runtime.
    """
    if mode not in SANITIZERS:
        raise ValueError(f"mode must be one of {SANITIZERS}, not {mode!r}")
    preload = [str(_compiler_library(_SANITIZER_LIBRARY[mode], f"the {mode} sanitizer runtime"))]
    if mode == "address":
        # ASan intercepts __cxa_throw (the shim unwinds a failed launch with an
        # exception) and needs libstdc++ loaded by its start-up to find the real
        # one; Python itself does not link libstdc++.
        preload.append(str(_compiler_library("libstdc++.so", "libstdc++")))
    preload += [p for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if p not in preload]
    env = {"LD_PRELOAD": " ".join(preload), "CUBN_EMULATOR_SANITIZE": mode}
    if mode == "address":
        # Python's own allocations are never freed at exit: leak reports would be noise.
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1"
    else:
        # No suppressions are needed: CPython and numpy are not instrumented,
        # and their locks are intercepted, so they cause no reports.
        env["TSAN_OPTIONS"] = "halt_on_error=1:report_signal_unsafe=0"
    return env


# ---------------------------------------------------------------- building

_build_lock = threading.Lock()
# Shared by every launcher of the process, so that each source is loaded once.
_modules: dict[tuple, dict[str, EmulatedKernel]] = {}
_runtimes: dict[str | None, int] = {}  # sanitize mode -> address of the runtime's API table


def _kernel_defines() -> tuple:
    """cubn's launch constants for its own kernels (none when the registry is absent)."""
    try:
        from cubn.kernels import registry
    except ModuleNotFoundError as exc:
        if exc.name not in ("cubn.kernels.registry", "cubn.kernels", "cubn"):
            raise
        return ()
    return registry.DEFINES


def _names_for_source(source: str, requested: str) -> list[str]:
    try:
        from cubn.kernels import registry
    except ModuleNotFoundError as exc:
        if exc.name not in ("cubn.kernels.registry", "cubn.kernels", "cubn"):
            raise
        return [requested]
    variants = registry.variants_for_source(source)
    if len(variants) > _WHOLE_FILE_MAX:
        mine = [v for v in variants if v.name_expression == requested]
        if mine:
            key = (mine[0].kernel, mine[0].targs[:1])
            variants = [v for v in variants if (v.kernel, v.targs[:1]) == key]
    names = list(dict.fromkeys(v.name_expression for v in variants))
    if requested not in names:
        names.append(requested)
    return names


_WHOLE_FILE_MAX = 64  # sources with more variants are built per (kernel, data type)


def _compiler_library(library: str, what: str) -> pathlib.Path:
    found = _run([_CXX, f"-print-file-name={library}"]).strip()
    path = pathlib.Path(found).resolve()  # the real file, not the linker's symlink
    if not pathlib.Path(found).is_absolute() or not path.is_file():
        raise RuntimeError(f"{_CXX} has no {library} ({what} is not installed)")
    return path


def _compiler_env() -> dict[str, str]:
    # A sanitized process passes its LD_PRELOAD on; the compiler must not get it.
    env = dict(os.environ)
    preload = [p for p in env.pop("LD_PRELOAD", "").replace(":", " ").split() if "san" not in pathlib.Path(p).name]
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    return env


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_compiler_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


_compiler_id: str | None = None


def _compiler_identity() -> str:
    global _compiler_id
    if _compiler_id is None:
        _compiler_id = _run([_CXX, "--version"]).splitlines()[0] + " " + _run([_CXX, "-dumpmachine"]).strip()
    return _compiler_id


def cache_dir() -> pathlib.Path:
    """Where built emulated kernels are cached."""
    return _cache_dir()


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("CUBN_CACHE_DIR")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "cubn"
    return base / "emulated"


def _hash_files(h, paths) -> None:
    for path in sorted(set(paths)):
        h.update(f"\0{path.name}\0{path.stat().st_size}\0".encode())
        h.update(path.read_bytes())


def _headers_in(directory: pathlib.Path):
    return [p for p in directory.iterdir() if p.is_file() and p.suffix in (".cu", ".cuh", ".h", ".hpp")]


def _build(
    stem: str, tu_text: str, include_dirs: tuple[pathlib.Path, ...], sanitize: str | None, defines=()
) -> pathlib.Path:
    """Compiles ``tu_text`` into a cached shared object, unless already there."""
    define_flags = [f"-D{k}={v}" for k, v in defines]
    flags = [*_FLAGS, *_SANITIZER_FLAGS[sanitize], *define_flags, f"-I{SHIM_DIR}", *(f"-I{d}" for d in include_dirs)]
    h = hashlib.sha256()
    h.update("\0".join([_compiler_identity(), str(sanitize), *_FLAGS, *_SANITIZER_FLAGS[sanitize], *define_flags,
                        tu_text]).encode())
    _hash_files(h, [p for p in SHIM_DIR.iterdir() if p.is_file()])
    for d in include_dirs:
        _hash_files(h, _headers_in(d))
    target = _cache_dir() / f"{stem}-{sanitize or 'plain'}-{h.hexdigest()[:24]}.so"
    if _verified(target):
        return target
    # Missing, or damaged (truncated, overwritten, no digest): build it anew.
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # its own user's: it holds code we run
    # Built under a private name, then renamed (atomic): two processes building
    # the same object both succeed and neither ever loads a half-written file.
    staged = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tempfile.TemporaryDirectory(prefix="cubn-emu-") as tmp:
        tu = pathlib.Path(tmp) / f"{stem}.cpp"
        tu.write_text(tu_text)
        cmd = [_CXX, *flags, "-include", "cuda_shim.h", "-x", "c++", str(tu), "-o", str(staged)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_compiler_env())
    if proc.returncode != 0:
        staged.unlink(missing_ok=True)
        raise RuntimeError(f"building {stem} for the emulated backend failed:\n{' '.join(cmd)}\n{proc.stderr}")
    staged_digest = _digest_path(staged)
    staged_digest.write_text(_file_digest(staged) + "\n")
    # The object first, then its digest: a reader between the two renames sees
    # a mismatch and builds again, never loads an object that was not verified.
    os.replace(staged, target)
    os.replace(staged_digest, _digest_path(target))
    return target


def _digest_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def _file_digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(target: pathlib.Path) -> bool:
    """``target`` exists and its bytes are those its digest file recorded at build time.

    Loading a truncated or overwritten shared object can crash the process
    (SIGBUS) or fail on every run ("file too short"); a mismatch rebuilds it.
    This guards against accidents, not against an attacker: whoever can write
    the cache folder can replace the object and its digest alike (see the
    cache's trust model in docs/emulator.md).
    """
    try:
        return _digest_path(target).read_text().strip() == _file_digest(target)
    except OSError:
        return False


def _runtime_api(sanitize: str | None) -> int:
    api = _runtimes.get(sanitize)
    if api is None:
        tu = f'#include "{SHIM_DIR / "emu_runtime.cpp"}"\n'
        library = ctypes.CDLL(str(_build("runtime", tu, (), sanitize)))
        library.cubn_emu_runtime.restype = ctypes.c_void_p
        api = library.cubn_emu_runtime()
        _runtimes[sanitize] = api
    return api


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _load_module(
    source: pathlib.Path, names: list[str], include_dirs: tuple[pathlib.Path, ...], sanitize: str | None, defines=()
) -> dict[str, EmulatedKernel]:
    if not source.is_file():
        raise FileNotFoundError(f"kernel source {source} does not exist")
    lines = [
        "// Generated by cubn.backends.emulated_launcher.",
        f'#include "{source.name}"',
        'extern "C" CUBN_EMU_EXPORT int cubn_emu_bind(const cubn_emu_runtime_api* api) {',
        "  return cubn_emu::bind(api);",
        "}",
    ]
    for i, name in enumerate(names):
        lines += [
            f'extern "C" CUBN_EMU_EXPORT int cubn_emu_launch_{i}(const unsigned* grid3, const unsigned* block3,',
            "    size_t shared_bytes, void** args, char* err, size_t errlen) {",
            f"  return cubn_emu::launch({_c_string(name)}, &{name}, grid3, block3, shared_bytes, args, err, errlen);",
            "}",
            f'extern "C" CUBN_EMU_EXPORT const char* cubn_emu_signature_{i}() {{ return cubn_emu::signature(&{name}); }}',
        ]
    # The kernel's own directory is searched first, as for `#include "x.cuh"` under nvcc.
    path = _build(source.stem, "\n".join(lines) + "\n", (source.parent, *include_dirs), sanitize, defines)
    library = load_bound(path, _runtime_api(sanitize))
    kernels = {}
    for i, (name, params) in enumerate(zip(names, signatures(library, len(names)))):
        entry = _LAUNCH_PROTOTYPE((f"cubn_emu_launch_{i}", library))
        kernels[name] = EmulatedKernel(name, source, params, entry)
    return kernels


def load_bound(path, api):
    """``dlopen`` a built kernel library and bind it to the emulator runtime ``api``."""
    library = ctypes.CDLL(str(path))
    library.cubn_emu_bind.argtypes = [ctypes.c_void_p]
    if library.cubn_emu_bind(api) != 0:
        raise RuntimeError(f"{path} does not match the emulator runtime (stale build?)")
    return library


def signatures(library, count):
    """The parameter type codes of the library's kernels 0..count-1 (``cubn_emu_signature_i``)."""
    out = []
    for i in range(count):
        signature = getattr(library, f"cubn_emu_signature_{i}")
        signature.restype = ctypes.c_char_p
        codes = signature().decode()
        out.append(tuple(codes.split(",")) if codes else ())
    return out


# ---------------------------------------------------------------- launching


def _dims(what: str, dims, limits) -> tuple[int, int, int]:
    dims = tuple(operator.index(d) for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{what} must have 1 to 3 dimensions, got {dims}")
    dims = dims + (1,) * (3 - len(dims))
    for d, limit, axis in zip(dims, limits, "xyz"):
        if not 1 <= d <= limit:
            raise ValueError(f"{what}.{axis}={d} is outside [1, {limit}]")
    return dims


def _describe(arg) -> str:
    if isinstance(arg, numpy.ndarray):
        return f"a numpy array of {arg.dtype}"
    if isinstance(arg, numpy.generic):
        return f"numpy.{arg.dtype}"
    return type(arg).__name__


def _layout(a: numpy.ndarray) -> str:
    bad = [what for what, ok in (("non-native byte order", a.dtype.isnative), ("misaligned", a.flags.aligned),
                                 ("not C-contiguous", a.flags.c_contiguous)) if not ok]
    return f"a numpy array of {a.dtype.str} ({', '.join(bad)})"


def _marshal(kernel: EmulatedKernel, args) -> tuple:
    """A ``void*[]`` pointing at each argument's value, and what keeps them alive."""
    params = kernel.parameters
    if len(args) != len(params):
        raise TypeError(f"{kernel.name_expression} takes {len(params)} arguments, got {len(args)}")
    holders = []
    for i, (code, arg) in enumerate(zip(params, args)):
        if code == "p":
            if isinstance(arg, numpy.ndarray):
                if not (arg.dtype.isnative and arg.flags.aligned and arg.flags.c_contiguous):
                    # A GPU reads raw memory too: it would fault, or read wrong bytes.
                    raise TypeError(
                        f"{kernel.name_expression}: argument {i} ({_C_TYPES[code]}) must be a C-contiguous "
                        f"array of aligned elements in native byte order, got {_layout(arg)}")
                holders.append(ctypes.c_void_p(arg.ctypes.data))
                continue
            if arg is NULL or arg is None:
                holders.append(ctypes.c_void_p(None))
                continue
            expected = "a numpy array or NULL/None"
        else:
            dtype = _SCALAR_DTYPES[code]
            if isinstance(arg, numpy.generic) and arg.dtype == dtype:
                holders.append(numpy.array(arg, dtype=dtype))
                continue
            expected = f"numpy.{dtype}"
            if isinstance(arg, (int, float)):
                expected += " (a Python number has no fixed size)"
        raise TypeError(
            f"{kernel.name_expression}: argument {i} ({_C_TYPES[code]}) expects {expected}, got {_describe(arg)}"
        )
    addresses = [h.ctypes.data if isinstance(h, numpy.ndarray) else ctypes.addressof(h) for h in holders]
    return (ctypes.c_void_p * len(holders))(*addresses), holders
