"""Which backend runs a call.

The input's array type picks it: a ``cupy.ndarray`` runs the CUDA
kernels on its device, a ``numpy.ndarray`` the NumPy implementation. Nothing is
copied between host and device behind the user's back: mixing the two in one
call is a ``TypeError`` that names each argument's side. ``use_backend``
overrides the choice for NumPy inputs (``"emulated"`` runs the CUDA sources on
the CPU; tests use it).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import threading

import numpy as np

from ._checks import arg_error

BACKENDS = ("numpy", "cupy", "emulated")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("cubn_backend", default=None)


@functools.lru_cache(maxsize=None)
def _import_cupy():
    """The cupy module, or None when it cannot be imported."""
    try:
        import cupy  # noqa: F401

        return cupy
    except Exception:  # ImportError, or a broken install (missing CUDA libraries)
        return None


def cupy_or_none():
    return _import_cupy()


def is_cupy_array(a) -> bool:
    # Check the module name first so that NumPy-only calls never import CuPy.
    if not type(a).__module__.startswith("cupy"):
        return False
    cp = _import_cupy()
    return cp is not None and isinstance(a, cp.ndarray)


def is_array(a) -> bool:
    return isinstance(a, np.ndarray) or is_cupy_array(a)


def array_module(a):
    return _import_cupy() if is_cupy_array(a) else np


# DLPack device types (dlpack.h): host memory, and memory a CUDA device reads.
_DL_HOST = {1: "CPU", 3: "CUDA pinned host"}
_DL_CUDA = {2: "CUDA", 13: "CUDA managed"}


def take_dlpack(func: str, **named):
    """The arguments ``named``, with other libraries' arrays taken zero-copy.

    An argument that is not a NumPy or CuPy array but has ``__dlpack__`` (a
    torch tensor, a JAX array, ...) becomes a ``numpy.ndarray`` (host memory,
    ``numpy.from_dlpack``) or a ``cupy.ndarray`` (CUDA memory,
    ``cupy.from_dlpack``) viewing the same memory, chosen by its
    ``__dlpack_device__()``; everything else is returned unchanged. Returns
    the values in the order given (a tuple, also for one argument).
    """
    return tuple(_from_dlpack(func, name, a) for name, a in named.items())


def _from_dlpack(func, name, a):
    if a is None or isinstance(a, np.ndarray) or is_cupy_array(a) or not hasattr(a, "__dlpack__"):
        return a
    what = f"{type(a).__module__.split('.')[0]}.{type(a).__name__}"
    try:
        dev_type = int(a.__dlpack_device__()[0])
    except Exception as e:  # noqa: BLE001 - any failure of the exporter
        raise arg_error(TypeError, func, name, "an array with a DLPack device", f"{what} ({type(e).__name__}: {e})") from None
    try:
        if dev_type in _DL_HOST:
            return _host_from_dlpack(a)
        if dev_type in _DL_CUDA:
            cp = _import_cupy()
            if cp is None or not gpu_available():
                raise TypeError(f"{func}: argument '{name}' is a {what} in {_DL_CUDA[dev_type]} memory, which cubn "
                                f"reads through CuPy, but {gpu_status()}")
            return cp.from_dlpack(a)
    except (BufferError, RuntimeError, ValueError) as e:
        hint = ""
        if "gradient" in str(e):
            hint = f" (pass {name}.detach(), or use the cubn.torch modules, which run cubn inside autograd)"
        raise arg_error(TypeError, func, name, "an array cubn can take through DLPack",
                        f"{what} that refused the exchange ({type(e).__name__}: {e}){hint}") from None
    raise arg_error(TypeError, func, name, "an array in host or CUDA memory",
                    f"{what} on DLPack device type {dev_type}")


def _host_from_dlpack(a):
    try:
        return np.from_dlpack(a)
    except (BufferError, RuntimeError, TypeError):
        # NumPy has no bfloat16 in DLPack; a torch bfloat16 tensor goes through
        # its int16 view and comes back as ml_dtypes.bfloat16, still zero-copy.
        if type(a).__module__.startswith("torch") and str(getattr(a, "dtype", "")) == "torch.bfloat16":
            import torch

            from ._dtypes import bfloat16

            if bfloat16 is not None:
                return np.from_dlpack(a.view(torch.int16)).view(bfloat16)
        raise


@functools.lru_cache(maxsize=None)
def _gpu_probe() -> tuple[bool, str]:
    cp = _import_cupy()
    if cp is None:
        return False, "cupy is not installed (pip install cubn[cuda13] or cubn[cuda12])"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device, or a driver too old
        return False, f"cupy is installed but no CUDA device is usable ({type(e).__name__}: {e})"
    if n < 1:
        return False, "cupy is installed but reports no CUDA device"
    return True, f"{n} CUDA device(s)"


def gpu_available() -> bool:
    """True when CuPy is importable and at least one CUDA device is usable."""
    return _gpu_probe()[0]


def gpu_status() -> str:
    """One line saying why the GPU is or is not available."""
    return _gpu_probe()[1]


@contextlib.contextmanager
def use_backend(name: str):
    """Run the cubn calls inside the block on backend ``name`` for NumPy inputs.

    ``"numpy"`` (the default for NumPy inputs), ``"emulated"`` (the CUDA kernel
    sources compiled for and run on the CPU; slow, for testing), or ``"cupy"``,
    which with NumPy inputs is an error rather than a silent copy.
    """
    if name not in BACKENDS:
        raise arg_error(ValueError, "use_backend", "name", "one of " + ", ".join(map(repr, BACKENDS)), repr(name))
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def current_override() -> str | None:
    return _override.get()


def _side(a) -> str | None:
    if isinstance(a, np.ndarray):
        return "numpy"
    if is_cupy_array(a):
        return "cupy"
    return None


def select(func: str, primary: str, x, **others):
    """The backend for a call whose main array is ``x`` (named ``primary``).

    ``others`` are the call's other array-like arguments (None allowed); they
    must live on the same side as ``x``.
    """
    x_side = _side(x)
    if x_side is None:
        raise arg_error(TypeError, func, primary, "a numpy.ndarray or cupy.ndarray", type(x).__name__)
    for name, a in others.items():
        s = _side(a)
        if s is not None and s != x_side:
            where = {"numpy": "host (numpy.ndarray)", "cupy": "GPU (cupy.ndarray)"}
            raise TypeError(
                f"{func}: '{primary}' is on the {where[x_side]} but '{name}' is on the {where[s]}; "
                "cubn never copies between host and device behind your back: move them to one side "
                "(cupy.asarray(a) or a.get())"
            )
    override = _override.get()
    if x_side == "cupy":
        if override in ("numpy", "emulated"):
            raise TypeError(
                f"{func}: use_backend({override!r}) applies to NumPy inputs, but '{primary}' is a cupy.ndarray"
            )
        dev = x.device.id
        for name, a in others.items():
            if is_cupy_array(a) and a.device.id != dev:
                raise ValueError(
                    f"{func}: '{primary}' is on CUDA device {dev} but '{name}' is on device {a.device.id}"
                )
        return get_backend("cupy", dev)
    if override == "cupy":
        raise TypeError(
            f"{func}: use_backend('cupy') needs cupy arrays, but '{primary}' is a numpy.ndarray; "
            "cubn does not copy host arrays to the device implicitly (use cupy.asarray)"
        )
    return get_backend(override or "numpy")


def fast_select(x, others):
    """The backend of a call whose arrays need none of [`select`][select]'s and
    ``readable``'s work, or None (then the ordinary checks run and explain).

    That is: ``x`` a plain ``numpy.ndarray`` in native byte order with
    aligned elements, every array of ``others`` None or a plain
    ``numpy.ndarray`` too -- or all of them ``cupy.ndarray`` on ``x``'s
    device -- and the backend for them already made. Checks only; the
    callers still check shapes and dtypes.
    """
    t = type(x)
    if t is np.ndarray:
        for a in others:
            if a is not None and type(a) is not t:
                return None
        if not (x.flags.aligned and x.dtype.isnative):
            return None
        override = _override.get()
        if override is None:
            override = "numpy"
        elif override == "cupy":
            return None
        return _backends.get((override, None))
    if not t.__module__.startswith("cupy"):
        return None
    cp = _import_cupy()
    if cp is None or t is not cp.ndarray or _override.get() not in (None, "cupy"):
        return None
    size = x.dtype.itemsize
    if x.size and (x.data.ptr % size or any(st % size for st in x.strides)):
        return None  # readable() copies it
    dev = x.device.id
    for a in others:
        if a is not None and (type(a) is not t or a.device.id != dev):
            return None
    return _backends.get(("cupy", dev))


_backends: dict = {}
_backends_lock = threading.Lock()  # threads meeting a backend for the first time create one, not two


def get_backend(name: str, device: int | None = None):
    """The backend object ``name`` (one per CUDA device for ``"cupy"``)."""
    key = (name, device)
    b = _backends.get(key)
    if b is not None:
        return b
    with _backends_lock:
        return _create_backend(name, device, key)


def _create_backend(name, device, key):
    b = _backends.get(key)
    if b is None:
        if name == "numpy":
            from .backends.numpy_backend import NumpyBackend

            b = NumpyBackend()
        elif name == "emulated":
            from .backends.emulated_launcher import EmulatedLauncher
            from .backends.kernel_backend import KernelBackend

            b = KernelBackend(EmulatedLauncher())
        elif name == "cupy":
            if not gpu_available():
                raise RuntimeError(f"the cupy backend is not available: {gpu_status()}")
            from .backends.cupy_launcher import CupyLauncher
            from .backends.kernel_backend import KernelBackend

            b = KernelBackend(CupyLauncher(device if device is not None else 0))
        else:
            raise arg_error(ValueError, "get_backend", "name", "one of " + ", ".join(map(repr, BACKENDS)), repr(name))
        _backends[key] = b
    return b


def loaded_modules() -> dict:
    """Versions of the array libraries in use (for ``cubn info``)."""
    cp = _import_cupy()
    return {"numpy": np.__version__, "cupy": getattr(cp, "__version__", None)}
