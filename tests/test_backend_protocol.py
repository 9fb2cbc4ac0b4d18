"""Both backends satisfy the interface of ``cubn.backends.base`` (names and parameters)."""
from __future__ import annotations

import inspect

import pytest

from cubn.backends import base
from cubn.backends.emulated_launcher import EmulatedLauncher
from cubn.backends.kernel_backend import KernelBackend
from cubn.backends.numpy_backend import NumpyBackend


def _methods(protocol):
    return {n: f for n, f in vars(protocol).items() if callable(f) and not n.startswith("_")}


def _check(backend, protocol):
    assert isinstance(backend, protocol)
    for cls in protocol.__mro__:
        if cls in (protocol, base.Backend, base.OneLaunchBackend):
            for name, f in _methods(cls).items():
                want = list(inspect.signature(f).parameters)
                got = list(inspect.signature(getattr(type(backend), name)).parameters)
                assert got == want, f"{type(backend).__name__}.{name}{tuple(got)} != the protocol's {tuple(want)}"
    for attr in base.Backend.__annotations__:
        assert hasattr(backend, attr), attr


def test_numpy_backend_satisfies_the_protocol():
    b = NumpyBackend()
    _check(b, base.Backend)
    assert b.info is None and not isinstance(b, base.OneLaunchBackend)


@pytest.mark.parametrize("protocol", [base.Backend, base.OneLaunchBackend])
def test_kernel_backend_satisfies_the_protocol(protocol):
    b = KernelBackend(EmulatedLauncher())  # builds nothing until a launch
    _check(b, protocol)
    assert isinstance(b.info, base.DeviceInfo)
