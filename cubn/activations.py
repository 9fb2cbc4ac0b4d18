"""Activations that the kernels fuse into normalization (forward and backward).

Pass one by name (``"relu"``) or as an object (``cubn.activations.relu``,
``cubn.activations.leaky_relu(0.1)``). Each has a kernel id (the template
argument of the CUDA kernels) and NumPy forward/derivative used by the NumPy
backend. Defaults follow TensorFlow: ``leaky_relu`` alpha 0.2, ``elu`` alpha
1.0, ``gelu`` the exact (erf) form; ``gelu_tanh`` is the tanh approximation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ._checks import arg_error

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_C = 0.044715


def _erf(z):
    """Elementwise erf. SciPy's when installed; else math.erf per element.

    NumPy has no erf, and cubn depends on NumPy alone; the fallback is exact
    but slow (it calls math.erf per element), which only the erf-GELU on the
    NumPy backend without SciPy pays.
    """
    try:
        from scipy.special import erf
    except ImportError:
        return _erf_fallback(z)
    return erf(z)


_erf_ufunc = np.frompyfunc(math.erf, 1, 1)


def _erf_fallback(z):
    return _erf_ufunc(z).astype(z.dtype)


@dataclass(frozen=True)
class Activation:
    """A fusable activation: name, kernel id and parameter ``alpha``."""

    name: str
    kernel_id: int
    alpha: float = 0.0
    has_alpha: bool = False

    def __call__(self, alpha: float | None = None) -> "Activation":
        """``leaky_relu(0.1)`` / ``elu(0.5)``: the same activation with another alpha."""
        if not self.has_alpha:
            raise TypeError(f"activation '{self.name}' takes no parameter")
        if alpha is None:
            return self
        try:
            a = float(alpha)
        except (TypeError, ValueError):
            raise arg_error(TypeError, self.name, "alpha", "a float", repr(alpha)) from None
        if not math.isfinite(a):
            raise arg_error(ValueError, self.name, "alpha", "a finite float", repr(alpha))
        return replace(self, alpha=a)

    def __repr__(self) -> str:
        return f"cubn.activations.{self.name}" + (f"(alpha={self.alpha})" if self.has_alpha else "")

    # --- NumPy reference math (acc dtype in, acc dtype out) ---------------
    def forward(self, z):
        f = _FORWARD[self.name]
        return f(z, z.dtype.type(self.alpha))

    def derivative(self, z):
        """d act / d z at the pre-activation ``z``."""
        f = _DERIVATIVE[self.name]
        return f(z, z.dtype.type(self.alpha))


def _sigmoid(z):
    # exp of -|z| never overflows; both branches agree on the value
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


_FORWARD = {
    "relu": lambda z, a: np.maximum(z, 0),
    "relu6": lambda z, a: np.minimum(np.maximum(z, 0), 6),
    "leaky_relu": lambda z, a: np.where(z > 0, z, a * z),
    "elu": lambda z, a: np.where(z > 0, z, a * np.expm1(np.minimum(z, 0))),
    "sigmoid": lambda z, a: _sigmoid(z),
    "tanh": lambda z, a: np.tanh(z),
    "gelu": lambda z, a: 0.5 * z * (1 + _erf(z * z.dtype.type(_INV_SQRT_2))),
    "gelu_tanh": lambda z, a: 0.5 * z * (1 + np.tanh(z.dtype.type(_SQRT_2_OVER_PI) * (z + z.dtype.type(_GELU_C) * z * z * z))),
    "silu": lambda z, a: z * _sigmoid(z),
}


def _gelu_d(z, a):
    cdf = 0.5 * (1 + _erf(z * z.dtype.type(_INV_SQRT_2)))
    pdf = z.dtype.type(_INV_SQRT_2PI) * np.exp(-0.5 * z * z)
    return cdf + z * pdf


def _gelu_tanh_d(z, a):
    k = z.dtype.type(_SQRT_2_OVER_PI)
    c = z.dtype.type(_GELU_C)
    t = np.tanh(k * (z + c * z * z * z))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * c * z * z)


def _silu_d(z, a):
    s = _sigmoid(z)
    return s * (1 + z * (1 - s))


_DERIVATIVE = {
    "relu": lambda z, a: (z > 0).astype(z.dtype),
    "relu6": lambda z, a: ((z > 0) & (z < 6)).astype(z.dtype),
    "leaky_relu": lambda z, a: np.where(z > 0, z.dtype.type(1), a),
    "elu": lambda z, a: np.where(z > 0, z.dtype.type(1), a * np.exp(np.minimum(z, 0))),
    "sigmoid": lambda z, a: _sigmoid(z) * (1 - _sigmoid(z)),
    "tanh": lambda z, a: 1 - np.tanh(z) ** 2,
    "gelu": _gelu_d,
    "gelu_tanh": _gelu_tanh_d,
    "silu": _silu_d,
}

# Kernel ids: the template argument ACT of the CUDA kernels, stated here only:
# kernels/registry.py hands them to the compilers as CUBN_ACT_<NAME> defines.
NONE_ID = 0
relu = Activation("relu", 1)
relu6 = Activation("relu6", 2)
leaky_relu = Activation("leaky_relu", 3, alpha=0.2, has_alpha=True)
elu = Activation("elu", 4, alpha=1.0, has_alpha=True)
sigmoid = Activation("sigmoid", 5)
tanh = Activation("tanh", 6)
gelu = Activation("gelu", 7)
gelu_tanh = Activation("gelu_tanh", 8)
silu = Activation("silu", 9)
swish = silu

ALL = (relu, relu6, leaky_relu, elu, sigmoid, tanh, gelu, gelu_tanh, silu)
KERNEL_IDS = (NONE_ID,) + tuple(a.kernel_id for a in ALL)

_BY_NAME = {a.name: a for a in ALL}
_BY_NAME.update({"swish": silu, "gelu_erf": gelu, "gelu_approximate": gelu_tanh})


def names() -> tuple:
    return tuple(sorted(_BY_NAME))


def by_name(name: str) -> Activation | None:
    """The activation called ``name`` (any case), or None when there is none."""
    return _BY_NAME.get(name.lower())


def get(activation, func: str = "activation", arg: str = "activation") -> Activation | None:
    """Resolve a name, an [`Activation`][Activation] or None; anything else is an error."""
    if activation is None:
        return None
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        a = _BY_NAME.get(activation.lower())
        if a is not None:
            return a
        raise arg_error(ValueError, func, arg, "None or one of " + ", ".join(names()), repr(activation))
    raise arg_error(
        TypeError, func, arg, "None, an activation name or a cubn.activations object", repr(activation)
    )
