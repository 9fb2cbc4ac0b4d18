"""``FullyConnected``: the dense layer behind ``cubn.compat.fully_connected``.

Just enough of slim's ``fully_connected`` for its ``normalizer_fn`` pattern to
run forward and backward: ``z = x @ weights`` (+ ``biases`` when there is no
normalizer), then the normalizer, then the activation. The matmul is the
array library's (NumPy or CuPy); cubn's kernels do the normalization.
"""
from __future__ import annotations

import numpy as np

from .. import _dtypes, activations
from .._backend import array_module, is_array
from .._checks import arg_error, check_float_input, describe
from .batch_norm import CustomActivation


def glorot_uniform(shape, rng=None):
    """Xavier/Glorot uniform: U(-l, l) with ``l = sqrt(6 / (fan_in + fan_out))`` (slim's default)."""
    rng = np.random.default_rng() if rng is None else rng
    fan_in, fan_out = shape[0], shape[-1]
    limit = np.sqrt(6.0 / max(1, fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


class FullyConnected:
    """``y = act(normalizer(x @ weights) or x @ weights + biases)``; ``backward(dy)`` gives dx.

    Args:
        num_outputs: output features.
        activation_fn: None, an activation name / ``cubn.activations`` object,
            or a callable (an object with ``forward``/``backward`` to train
            through it).
        weights_initializer: ``f(shape) -> array`` (its result is put where the
            inputs live) or an array (which must already be there); default
            Glorot uniform.
        biases_initializer: ``f(shape)`` or an array, or None for no biases;
            default zeros. Unused with a normalizer (as slim).
        weights_regularizer: ``cubn.regularizers.*`` or None.
        biases_regularizer: likewise.
        trainable: False: no gradients.
        use_biases: False: never create biases.
        name: the scope name.
    """

    def __init__(self, num_outputs, activation_fn="relu", weights_initializer=None,
                 biases_initializer="zeros", weights_regularizer=None, biases_regularizer=None,
                 trainable=True, use_biases=True, name=None):
        f = "fully_connected"
        if isinstance(num_outputs, bool) or not isinstance(num_outputs, (int, np.integer)) or num_outputs < 1:
            raise arg_error(ValueError, f, "num_outputs", "a positive int", describe(num_outputs))
        self.num_outputs = int(num_outputs)
        self.activation_fn = activation_fn
        self._act, self._custom = _activation(activation_fn)
        for arg, init in (("weights_initializer", weights_initializer), ("biases_initializer", biases_initializer)):
            if init is not None and not _is_zeros(init) and not callable(init) and not is_array(init):
                raise arg_error(TypeError, f, arg, "None, a callable shape -> array, or an array", describe(init))
        for arg, reg in (("weights_regularizer", weights_regularizer), ("biases_regularizer", biases_regularizer)):
            if reg is not None and not callable(reg):
                raise arg_error(TypeError, f, arg, "None or a regularizer (cubn.regularizers.*)", describe(reg))
        self.weights_initializer = weights_initializer
        self.biases_initializer = biases_initializer
        self.weights_regularizer = weights_regularizer
        self.biases_regularizer = biases_regularizer
        self.trainable = bool(trainable)
        self.use_biases = bool(use_biases) and biases_initializer is not None
        self.name = name
        self._vars: dict = {}
        self._ctx = None
        self.gradients: dict = {}

    @property
    def variables(self) -> dict:
        return dict(self._vars)

    @property
    def trainable_variables(self) -> dict:
        return dict(self._vars) if self.trainable else {}

    @property
    def regularizers(self) -> dict:
        out = {}
        if self.weights_regularizer is not None:
            out["weights"] = self.weights_regularizer
        if self.biases_regularizer is not None and "biases" in self._vars:
            out["biases"] = self.biases_regularizer
        return out

    def _make(self, init, shape, xp, dtype, default):
        # Initializers make new values where the variable lives (as TF ran them on the variable's device):
        # what a default or a callable returns is converted; an array given directly must already be there.
        if _is_zeros(init) or (init is None and default == "zeros"):
            v = xp.zeros(shape)
        elif init is None:
            v = xp.asarray(glorot_uniform(shape))
        elif callable(init):
            v = init(shape)
            if not is_array(v) or isinstance(v, np.ndarray):  # host values for a new variable: put them there
                v = xp.asarray(v)
        else:
            v = init
        if is_array(v) and array_module(v) is not xp:
            raise TypeError(f"fully_connected: an initializer gave an array on the "
                            f"{'host' if isinstance(v, np.ndarray) else 'GPU'}, but the inputs are elsewhere")
        arr = xp.asarray(v, dtype=dtype)
        if tuple(arr.shape) != tuple(shape):
            raise arg_error(ValueError, "fully_connected", "initializer", f"an array of shape {tuple(shape)}",
                            f"shape {tuple(arr.shape)}")
        return xp.ascontiguousarray(arr)

    def build(self, in_features, dtype, xp, with_biases):
        acc = _dtypes.acc_dtype(dtype)
        self._vars = {"weights": self._make(self.weights_initializer, (in_features, self.num_outputs), xp, acc, "glorot")}
        if with_biases and self.use_biases:
            self._vars["biases"] = self._make(self.biases_initializer, (self.num_outputs,), xp, acc, "zeros")
        return self

    def forward(self, x, normalizer=None):
        """``normalizer(z) -> (y, layer)``: the normalized ``z`` and the object whose
        ``backward(dy)`` differentiates it (None: forward only)."""
        f = "fully_connected"
        check_float_input(f, "inputs", x)
        if x.ndim < 2:
            raise arg_error(ValueError, f, "inputs", "an array of rank >= 2 (batch, ..., features)", f"shape {tuple(x.shape)}")
        xp = array_module(x)
        if not self._vars:
            self.build(int(x.shape[-1]), x.dtype, xp, with_biases=normalizer is None)
        w = self._vars["weights"]
        if array_module(w) is not xp:
            raise TypeError(f"fully_connected: the layer's weights are on the "
                            f"{'host' if xp is not np else 'GPU'} but 'inputs' is a {xp.__name__}.ndarray")
        if int(x.shape[-1]) != w.shape[0]:
            raise arg_error(ValueError, f, "inputs", f"{w.shape[0]} features on the last axis (fixed by the first call)",
                            f"shape {tuple(x.shape)}")
        acc = w.dtype
        xa = x.astype(acc, copy=False)
        z = xa @ w
        norm_layer = None
        if normalizer is not None:
            z, norm_layer = normalizer(z.astype(x.dtype, copy=False))
            z = z.astype(acc, copy=False)
        elif "biases" in self._vars:
            z = z + self._vars["biases"]
        if self._act is not None:
            y = self._act.forward(z)
        elif self._custom is not None:
            y = self._custom.forward(z)
        else:
            y = z
        self._ctx = (xa, z, norm_layer, normalizer is not None, x.dtype)
        return y.astype(x.dtype, copy=False)

    def backward(self, dy):
        """Gradient w.r.t. the last forward's inputs; fills ``gradients`` (weights, biases)."""
        if self._ctx is None:
            raise RuntimeError("fully_connected.backward: call the layer (forward) first")
        xa, z, norm_layer, normalized, x_dtype = self._ctx
        f = "fully_connected.backward"
        if tuple(dy.shape) != tuple(z.shape):
            raise arg_error(ValueError, f, "dy", f"the output's shape {tuple(z.shape)}", f"shape {tuple(dy.shape)}")
        dz = dy.astype(z.dtype, copy=False)
        if self._act is not None:
            dz = dz * self._act.derivative(z)
        elif self._custom is not None:
            if not self._custom.has_backward:
                raise TypeError("fully_connected.backward: activation_fn is a plain callable with no backward; "
                                "give an object with forward(z) and backward(z, dy), or an activation name")
            dz = self._custom.backward(z, dz)
        if normalized:
            if norm_layer is None:
                raise TypeError("fully_connected.backward: the normalizer_fn gave no layer to differentiate; "
                                "use cubn.compat.batch_norm as normalizer_fn")
            dz = norm_layer.backward(dz.astype(x_dtype, copy=False)).astype(z.dtype, copy=False)
        w = self._vars["weights"]
        x2 = xa.reshape(-1, xa.shape[-1])
        dz2 = dz.reshape(-1, dz.shape[-1])
        grads = {}
        if self.trainable:
            grads["weights"] = x2.T @ dz2
            if "biases" in self._vars:
                grads["biases"] = dz2.sum(axis=0)
            for k, reg in self.regularizers.items():
                if not hasattr(reg, "gradient"):
                    raise TypeError(f"fully_connected.backward: the {k} regularizer has no gradient(w); use cubn.regularizers.*")
                grads[k] = grads[k] + reg.gradient(self._vars[k])
        self.gradients = grads
        return (dz @ w.T).astype(x_dtype, copy=False)

    def __repr__(self):
        shape = tuple(self._vars["weights"].shape) if self._vars else "not built"
        return f"FullyConnected(name={self.name!r}, weights {shape})"


def _is_zeros(init) -> bool:
    return isinstance(init, str) and init == "zeros"


def _activation(fn):
    if fn is None:
        return None, None
    if isinstance(fn, (str, activations.Activation)):
        return activations.get(fn, "fully_connected", "activation_fn"), None
    if callable(fn) or hasattr(fn, "forward"):
        return None, CustomActivation(fn)
    raise arg_error(TypeError, "fully_connected", "activation_fn", "None, an activation name or a callable", describe(fn))
