"""TensorFlow 1 / slim compatibility: ``batch_norm`` with tf.contrib's exact
signature, a variable store keyed by scope, collections, and the
``ExponentialMovingAverage`` helper that hand-written TF 1 batch norms used.

``normalizer_fn=cubn.compat.batch_norm, normalizer_params={...}`` code runs
as written: each call finds its layer by scope name and reuses it, the way
TF reused variables. There is no graph-building phase, so a scope that
already exists is reused when ``reuse`` is None (as ``tf.AUTO_REUSE``);
``reuse=False`` on an existing scope and ``reuse=True`` on a missing one are
errors, as in TF. Without ``scope``, the layer is named ``BatchNorm``,
``BatchNorm_1``, ... by call site (the Python call stack), so the same line
of a training loop finds the same layer on every step.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys

import numpy as np

from ._backend import is_array, take_dlpack
from ._checks import arg_error, check_unit_interval, describe
from .layers.batch_norm import BatchNorm
from .updates import UPDATE_OPS

DATA_FORMAT_NHWC = "NHWC"
DATA_FORMAT_NCHW = "NCHW"


class GraphKeys:
    """Collection names, as tf.GraphKeys. ``UPDATE_OPS`` is ``cubn.UPDATE_OPS`` itself."""

    UPDATE_OPS = UPDATE_OPS
    GLOBAL_VARIABLES = "variables"
    TRAINABLE_VARIABLES = "trainable_variables"
    MOVING_AVERAGE_VARIABLES = "moving_average_variables"
    REGULARIZATION_LOSSES = "regularization_losses"


_collections: dict = {}
_layers: dict = {}            # full scope name -> BatchNorm
_auto_names: dict = {}        # (scope prefix, call stack) -> full scope name
_scope: contextvars.ContextVar[tuple] = contextvars.ContextVar("cubn_compat_scope", default=())


def get_collection(key):
    """The list behind a collection key (``GraphKeys.*``, a name, or an UpdateCollection)."""
    if isinstance(key, list):
        return key
    return _collections.setdefault(key, [])


def add_to_collection(key, value) -> None:
    get_collection(key).append(value)


def reset_default_graph() -> None:
    """Forget every layer, automatic name and collection (and empty UPDATE_OPS)."""
    _layers.clear()
    _auto_names.clear()
    _collections.clear()
    UPDATE_OPS.clear()


def get_layer(scope: str) -> BatchNorm:
    """The layer stored under the full scope name ``scope``."""
    try:
        return _layers[scope]
    except KeyError:
        raise KeyError(f"no batch_norm layer under scope {scope!r}; known: {sorted(_layers)}") from None


@contextlib.contextmanager
def variable_scope(name_or_scope, reuse=None):
    """Prefix the scope of the ``batch_norm`` calls inside (``tf.variable_scope``)."""
    if not isinstance(name_or_scope, str) or not name_or_scope:
        raise arg_error(TypeError, "variable_scope", "name_or_scope", "a non-empty str", describe(name_or_scope))
    parent = _scope.get()
    token = _scope.set(parent + ((name_or_scope, reuse),))
    try:
        yield "/".join(n for n, _ in _scope.get())
    finally:
        _scope.reset(token)


_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def _call_site() -> tuple:
    """The Python call stack outside cubn: one id per distinct caller."""
    f = sys._getframe(2)
    out = []
    while f is not None:
        fn = f.f_code.co_filename
        if not os.path.abspath(fn).startswith(_PKG_DIR):
            out.append((fn, f.f_lineno))
        f = f.f_back
    return tuple(out)


def _unique(prefix: str, base: str) -> str:
    name = f"{prefix}/{base}" if prefix else base
    k = 0
    while name in _layers or name in _auto_names.values():
        k += 1
        name = f"{prefix}/{base}_{k}" if prefix else f"{base}_{k}"
    return name


_STRUCTURAL = ("center", "scale", "renorm", "zero_debias_moving_mean", "data_format")


def batch_norm(inputs, decay=0.999, center=True, scale=False, epsilon=0.001, activation_fn=None,
               param_initializers=None, param_regularizers=None, updates_collections=UPDATE_OPS,
               is_training=True, reuse=None, variables_collections=None, outputs_collections=None,
               trainable=True, batch_weights=None, fused=None, data_format=DATA_FORMAT_NHWC,
               zero_debias_moving_mean=False, scope=None, renorm=False, renorm_clipping=None,
               renorm_decay=0.99, adjustment=None):
    """``tf.contrib.layers.batch_norm``, argument for argument.

    Returns the normalized ``inputs``. The layer behind a scope is
    ``get_layer(scope_name)``; its pending updates go to
    ``updates_collections`` (default ``GraphKeys.UPDATE_OPS``): run them with
    ``cubn.run_updates()`` after each training step, or pass
    ``updates_collections=None`` to update in place.
    """
    f = "batch_norm"
    check_unit_interval(f, "decay", decay)
    prefix_parts = _scope.get()
    prefix = "/".join(n for n, _ in prefix_parts)
    inherited_reuse = next((r for _, r in reversed(prefix_parts) if r is not None), None)
    if reuse is None:
        reuse = inherited_reuse
    if reuse is True and scope is None and not prefix:
        raise ValueError("batch_norm: reuse=True cannot be used without a scope (as in TensorFlow)")
    if scope is not None:
        if not isinstance(scope, str) or not scope:
            raise arg_error(TypeError, f, "scope", "a non-empty str", describe(scope))
        full = f"{prefix}/{scope}" if prefix else scope
    else:
        key = (prefix, _call_site())
        full = _auto_names.get(key)
        if full is None:
            full = _unique(prefix, "BatchNorm")
            _auto_names[key] = full
    if isinstance(updates_collections, str):
        updates_collections = get_collection(updates_collections)
    kwargs = dict(decay=decay, center=center, scale=scale, epsilon=epsilon, activation_fn=activation_fn,
                  param_initializers=param_initializers, param_regularizers=param_regularizers,
                  updates_collections=updates_collections, trainable=trainable, fused=fused,
                  data_format=data_format, zero_debias_moving_mean=zero_debias_moving_mean, renorm=renorm,
                  renorm_clipping=renorm_clipping, renorm_decay=renorm_decay, adjustment=adjustment, name=full)
    fresh = BatchNorm(**kwargs)  # validates every argument
    layer = _layers.get(full)
    if layer is None:
        if reuse is True:
            raise ValueError(f"batch_norm: scope {full!r} does not exist, so it cannot be reused (reuse=True)")
        layer = fresh
        _layers[full] = layer
        created = True
    else:
        if reuse is False:
            raise ValueError(f"batch_norm: scope {full!r} already exists; pass reuse=True (or None) to share it")
        for k in _STRUCTURAL:
            if getattr(layer, k) != getattr(fresh, k):
                raise ValueError(f"batch_norm: scope {full!r} was created with {k}={getattr(layer, k)!r}; "
                                 f"it cannot be reused with {k}={getattr(fresh, k)!r}")
        # Hyper-parameters follow this call, as TF rebuilt its ops with them; the state stays.
        for k in ("decay", "epsilon", "activation_fn", "_act", "_custom", "param_regularizers",
                  "updates_collections", "trainable", "fused", "renorm_clipping", "renorm_decay", "adjustment"):
            setattr(layer, k, getattr(fresh, k))
        created = False
    outputs = layer(inputs, is_training=is_training, batch_weights=batch_weights)
    if created:
        _collect_variables(layer, variables_collections)
    if outputs_collections is not None:
        for coll in _as_collections(outputs_collections):
            coll.append(outputs)
    return outputs


def _as_collections(spec):
    """A collection spec -> lists: a name, a list/tuple of names, or a list used as the collection."""
    if isinstance(spec, str):
        return [get_collection(spec)]
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
        return [get_collection(s) for s in spec]
    if isinstance(spec, list):
        return [spec]
    raise arg_error(TypeError, "batch_norm", "collections", "a name, a list of names or a list", describe(spec))


def _collect_variables(layer, variables_collections):
    v = layer.variables
    for name, arr in v.items():
        add_to_collection(GraphKeys.GLOBAL_VARIABLES, (f"{layer.name}/{name}", arr))
    for name, arr in layer.trainable_variables.items():
        add_to_collection(GraphKeys.TRAINABLE_VARIABLES, (f"{layer.name}/{name}", arr))
    for name in ("moving_mean", "moving_variance"):
        add_to_collection(GraphKeys.MOVING_AVERAGE_VARIABLES, (f"{layer.name}/{name}", v[name]))
    if variables_collections is None:
        return
    if isinstance(variables_collections, dict):
        for name, arr in v.items():
            short = name.split("/")[0]
            spec = variables_collections.get(name, variables_collections.get(short))
            if spec is not None:
                for coll in _as_collections(spec):
                    coll.append((f"{layer.name}/{name}", arr))
    else:
        for coll in _as_collections(variables_collections):
            for name, arr in v.items():
                coll.append((f"{layer.name}/{name}", arr))


class ExponentialMovingAverage:
    """``tf.train.ExponentialMovingAverage`` for arrays, tracked by name as TF tracks variables.

    ``ema.apply({"mean": mean, "variance": var})`` (or ``(name, array)``
    pairs, such as the entries of ``get_collection(GraphKeys.MOVING_AVERAGE_VARIABLES)``)
    updates one shadow per name, ``shadow -= (1 - decay) * (shadow - value)``;
    the first apply of a name starts its shadow at the value, as TF
    initialises it. With ``num_updates`` the decay is
    ``min(decay, (1 + n) / (10 + n))``; with ``zero_debias`` the shadow is
    TF's zero-debiased average.

    ``ema.average("mean")`` is the shadow array, updated in place by later
    ``apply`` calls; ``ema.average(mean)`` finds the shadow of the name last
    applied with that very array. Whether the code updates its array in place
    (``self.mean[...] = m``) or rebinds it (``self.mean = m``), the same name
    keeps the same average. Bare arrays (``ema.apply([mean])``) are refused:
    an array has no name, and tracking it by identity would silently start a
    new average whenever the attribute is rebound.
    """

    def __init__(self, decay, num_updates=None, zero_debias=False, name="ExponentialMovingAverage"):
        self.decay = check_unit_interval("ExponentialMovingAverage", "decay", decay)
        self.num_updates = num_updates
        self.zero_debias = bool(zero_debias)
        self.name = name
        self._shadow: dict = {}   # name -> shadow array (updated in place)
        self._biased: dict = {}   # name -> zero-debias accumulator
        self._steps: dict = {}    # name -> zero-debias local step
        self._latest: dict = {}   # name -> the array last applied under it

    def _decay(self):
        d = self.decay
        if self.num_updates is not None:
            n = float(self.num_updates)
            d = min(d, (1.0 + n) / (10.0 + n))
        return d

    @staticmethod
    def _named(var_list) -> list:
        f = "ExponentialMovingAverage.apply"
        how = ("name the arrays, as TF names its variables: ema.apply({'mean': mean, 'variance': var}) or "
               "[('mean', mean), ...], then ema.average('mean')")
        if isinstance(var_list, dict):
            items = list(var_list.items())
        elif isinstance(var_list, (list, tuple)):
            items = []
            for v in var_list:
                if not (isinstance(v, tuple) and len(v) == 2):
                    raise arg_error(TypeError, f, "var_list", how, f"an unnamed {describe(v)}")
                items.append(v)
        else:
            raise arg_error(TypeError, f, "var_list", how, describe(var_list))
        out = []
        for k, v in items:
            if not isinstance(k, str) or not k:
                raise arg_error(TypeError, f, "var_list", "names that are non-empty str", describe(k))
            (v,) = take_dlpack(f, **{k: v})
            out.append((k, v if is_array(v) else np.asarray(v, dtype=np.float64)))
        return out

    def apply(self, var_list):
        """Update the shadow of each named array (a dict name -> array, or (name, array) pairs)."""
        d = self._decay()
        for k, v in self._named(var_list):
            shadow = self._shadow.get(k)
            if shadow is not None and tuple(shadow.shape) != tuple(v.shape):
                raise arg_error(ValueError, "ExponentialMovingAverage.apply", k,
                                f"shape {tuple(shadow.shape)} (as first applied)", f"shape {tuple(v.shape)}")
            self._latest[k] = v
            if shadow is None:
                v0 = v.copy() if v.dtype.kind == "f" else v.astype(np.float64)  # a float shadow
                if not self.zero_debias:
                    self._shadow[k] = v0
                    continue
                self._shadow[k] = v0 * 0
                self._biased[k] = v0 * 0
                self._steps[k] = 0
            if self.zero_debias:
                b = self._biased[k]
                b -= (b - v) * (1 - d)
                self._steps[k] += 1
                self._shadow[k][...] = b / (1 - d ** self._steps[k])
            else:
                s = self._shadow[k]
                s -= (s - v) * (1 - d)
        return None

    def average(self, var):
        """The shadow of a name, or of the array last applied under some name."""
        if isinstance(var, str):
            if var in self._shadow:
                return self._shadow[var]
            raise KeyError(f"ExponentialMovingAverage.average: no average named {var!r}; "
                           f"known: {sorted(self._shadow)}")
        for k, v in self._latest.items():
            if v is var:
                return self._shadow[k]
        raise KeyError("ExponentialMovingAverage.average: this array was never applied (or another array was "
                       f"applied under its name since); pass the name instead, one of {sorted(self._shadow)}")

    def average_name(self, var_name: str) -> str:
        return f"{var_name}/{self.name}"
