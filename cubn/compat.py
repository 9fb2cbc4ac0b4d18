"""TensorFlow 1 / slim compatibility: ``batch_norm`` with tf.contrib's exact
signature, ``fully_connected``, a variable store keyed by scope, collections
named by strings, slim's ``arg_scope``, regularization losses, and the
``ExponentialMovingAverage`` helper that hand-written TF 1 batch norms used.

``normalizer_fn=cubn.compat.batch_norm, normalizer_params={...}`` code runs
as written: each call finds its layer by scope name and reuses it, the way
TF reused variables. There is no graph-building phase, so a scope that
already exists is reused when ``reuse`` is None (as ``tf.AUTO_REUSE``);
``reuse=False`` on an existing scope and ``reuse=True`` on a missing one are
errors, as in TF.

Unscoped calls are named as TF names them: ``BatchNorm``, ``BatchNorm_1``, ...
in creation order, counted afresh each time a ``variable_scope`` block is
entered -- so the second tower of a Siamese net, built under
``variable_scope(name, reuse=True)``, finds the first tower's layers by
order. A call from the very same place (the same Python call stack) as an
earlier call of the same block is a new training step, not a new layer: it
finds the layer that place created. Identical code run from another place
(a re-run notebook cell) creates new layers, as TF would, and warns
([`LayerCreatedAgainWarning`][LayerCreatedAgainWarning]). See docs/migrating.md.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sys
import types
import warnings

import numpy as np

from ._backend import is_array, take_dlpack
from ._checks import arg_error, check_unit_interval, describe
from .arg_scope import add_arg_scope, arg_scope, arg_scoped_arguments, current_arg_scope, has_arg_scope
from .layers.batch_norm import BatchNorm
from .layers.dense import FullyConnected, glorot_uniform
from . import updates as _updates
from .updates import UPDATE_OPS

DATA_FORMAT_NHWC = "NHWC"
DATA_FORMAT_NCHW = "NCHW"
AUTO_REUSE = "auto_reuse"

__all__ = [
    "AUTO_REUSE", "DATA_FORMAT_NCHW", "DATA_FORMAT_NHWC", "ExponentialMovingAverage", "GraphKeys",
    "LayerCreatedAgainWarning", "add_arg_scope", "add_to_collection", "add_to_collections", "arg_scope",
    "arg_scoped_arguments", "batch_norm", "constant_initializer", "current_arg_scope", "fully_connected",
    "get_collection", "get_collection_ref", "get_layer", "get_regularization_loss", "get_regularization_losses",
    "has_arg_scope", "losses", "reset_default_graph", "truncated_normal_initializer", "variable_scope",
    "xavier_initializer", "zeros_initializer",
]


class GraphKeys:
    """Collection names, as ``tf.GraphKeys``: strings. ``get_collection(GraphKeys.UPDATE_OPS)``
    is ``cubn.UPDATE_OPS``, the collection ``cubn.run_updates()`` drains by default."""

    UPDATE_OPS = "update_ops"
    GLOBAL_VARIABLES = "variables"
    TRAINABLE_VARIABLES = "trainable_variables"
    MOVING_AVERAGE_VARIABLES = "moving_average_variables"
    REGULARIZATION_LOSSES = "regularization_losses"
    MODEL_VARIABLES = "model_variables"


class LayerCreatedAgainWarning(UserWarning):
    """Code that already created a layer ran again from another place and created a new one
    (``BatchNorm_2``, ...): usually a re-run notebook cell, where TF would do the same."""


_layers: dict = {}            # full scope name -> BatchNorm or FullyConnected
_last_layer: contextvars.ContextVar = contextvars.ContextVar("cubn_compat_last_layer", default=None)


# ---------------------------------------------------------------------------
# collections
# ---------------------------------------------------------------------------
def get_collection(key, scope=None):
    """The items of a collection (``GraphKeys.*`` or any name; a list passes through).

    With ``scope``, only the items whose name starts with a match of the
    regular expression ``scope`` (``re.match``), as in TF. Without it the live
    list itself is returned, so ``cubn.run_updates(get_collection(...))``
    drains it.
    """
    if isinstance(key, list):
        coll = key
    elif isinstance(key, str):
        coll = _updates.get_collection(key)
    else:
        raise arg_error(TypeError, "get_collection", "key", "a collection name (str) or a list", describe(key))
    if scope is None:
        return coll
    return [item for item in coll if _item_name(item) is not None and re.match(scope, _item_name(item))]


def get_collection_ref(key):
    """The live list behind a collection name."""
    return get_collection(key)


def _item_name(item):
    if isinstance(item, tuple) and item and isinstance(item[0], str):
        return item[0]
    return getattr(item, "name", None)


def add_to_collection(key, value) -> None:
    get_collection(key).append(value)


def add_to_collections(keys, value) -> None:
    for coll in _as_collections(keys, "add_to_collections"):
        coll.append(value)


def reset_default_graph() -> None:
    """Forget every layer, automatic name and collection (and empty UPDATE_OPS)."""
    _layers.clear()
    _top_names.reset()
    _updates.clear_named()
    _last_layer.set(None)


def get_layer(scope: str):
    """The layer stored under the full scope name ``scope``."""
    try:
        return _layers[scope]
    except KeyError:
        raise KeyError(f"no compat layer under scope {scope!r}; known: {sorted(_layers)}") from None


# ---------------------------------------------------------------------------
# regularization losses
# ---------------------------------------------------------------------------
class RegularizationLoss:
    """One entry of ``GraphKeys.REGULARIZATION_LOSSES``: a regularizer bound to a variable.

    Like TF's loss tensor it is evaluated when used, on the variable's value
    then: ``float(loss)``, ``loss()`` (an array of the variable's library),
    and ``sum(get_collection(GraphKeys.REGULARIZATION_LOSSES))`` work.
    """

    def __init__(self, name, layer, variable, regularizer):
        self.name, self.layer, self.variable, self.regularizer = name, layer, variable, regularizer

    def __call__(self):
        return self.regularizer(self.layer._vars[self.variable])

    def __float__(self):
        v = self()
        return float(v.get() if hasattr(v, "get") and not isinstance(v, np.ndarray) else v)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(float(self), dtype=dtype)

    def __add__(self, other):
        return self() + (other() if isinstance(other, RegularizationLoss) else other)

    def __radd__(self, other):
        return (other() if isinstance(other, RegularizationLoss) else other) + self()

    def __repr__(self):
        return f"<RegularizationLoss {self.name!r}: {float(self):.6g}>"


def _add_regularization_losses(layer, regularizers: dict) -> None:
    for var, reg in regularizers.items():
        if var in layer._vars:
            add_to_collection(GraphKeys.REGULARIZATION_LOSSES,
                              RegularizationLoss(f"{layer.name}/{var}/Regularizer", layer, var, reg))


def get_regularization_losses(scope=None) -> list:
    """The current values of the regularization losses (``tf.compat.v1.losses.get_regularization_losses``)."""
    return [loss() for loss in get_collection(GraphKeys.REGULARIZATION_LOSSES, scope)]


def get_regularization_loss(scope=None, name="total_regularization_loss"):
    """Their sum (0.0 when there are none), as ``tf.compat.v1.losses.get_regularization_loss``."""
    total = 0.0
    for v in get_regularization_losses(scope):
        total = total + v
    return total


losses = types.SimpleNamespace(get_regularization_losses=get_regularization_losses,
                               get_regularization_loss=get_regularization_loss)
losses.__doc__ = "``tf.compat.v1.losses``' regularization getters, for literal ports."


# ---------------------------------------------------------------------------
# scopes and automatic names
# ---------------------------------------------------------------------------
class _Names:
    """Automatic names of one ``variable_scope`` entry (or of the top level)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.count = {}   # base -> next ordinal
        self.sites = {}   # (base, call stack) -> ordinal it got
        self.code = {}    # (base, call stack without file names) -> ordinal it got

    def note_explicit(self, name):
        base, _, k = name.rpartition("_")
        if k.isdigit() and base:
            self.count[base] = max(self.count.get(base, 0), int(k) + 1)
        else:
            self.count[name] = max(self.count.get(name, 0), 1)

    def ordinal(self, base, site, code):
        """(ordinal, earlier ordinal of the same code from another place or None)."""
        k = self.sites.get((base, site))
        if k is not None:  # the same place again: a new step of a loop
            self.count[base] = k + 1
            return k, None
        k = self.count.get(base, 0)
        self.count[base] = k + 1
        self.sites[(base, site)] = k
        earlier = self.code.get((base, code))
        self.code.setdefault((base, code), k)
        return k, earlier


_top_names = _Names()


class VariableScope(str):
    """What ``variable_scope`` yields: its full name (a str), with ``.name`` and ``.reuse``."""

    def __new__(cls, name, reuse=None):
        s = super().__new__(cls, name)
        s.reuse = reuse
        return s

    @property
    def name(self):
        return str(self)

    @property
    def original_name_scope(self):
        return str(self) + "/"


# each entry: (full name, reuse, _Names of the block)
_scope: contextvars.ContextVar[tuple] = contextvars.ContextVar("cubn_compat_scope", default=())


def _current():
    parts = _scope.get()
    if not parts:
        return "", None, _top_names
    prefix, _, names = parts[-1]
    reuse = next((r for _, r, _ in reversed(parts) if r is not None), None)
    return prefix, reuse, names


def _auto_name(base, prefix, names, func):
    k, earlier = names.ordinal(base, _call_site(), _call_code())
    short = base if k == 0 else f"{base}_{k}"
    full = f"{prefix}/{short}" if prefix else short
    return full, (None if earlier is None else (f"{prefix}/" if prefix else "") + (base if earlier == 0 else f"{base}_{earlier}"))


@contextlib.contextmanager
def variable_scope(name_or_scope, default_name=None, values=None, reuse=None, **unused):
    """``tf.compat.v1.variable_scope``: prefix the names of the compat layers inside.

    ``name_or_scope`` is a name (nested under the current scope), a
    `VariableScope` yielded earlier (entered by its full name), or
    None with ``default_name`` (named ``default_name``, ``default_name_1``, ...
    as TF does). ``reuse``: None (inherit; existing layers are reused),
    True (every layer must exist), False (none may), or ``AUTO_REUSE``.
    """
    prefix, _, names = _current()
    if isinstance(name_or_scope, VariableScope):
        full = str(name_or_scope)
    elif isinstance(name_or_scope, str) and name_or_scope:
        full = f"{prefix}/{name_or_scope}" if prefix else name_or_scope
        names.note_explicit(name_or_scope)
    elif name_or_scope is None and isinstance(default_name, str) and default_name:
        full, _ = _auto_name(default_name, prefix, names, "variable_scope")
    else:
        raise arg_error(TypeError, "variable_scope", "name_or_scope",
                        "a non-empty str, a VariableScope, or None with default_name", describe(name_or_scope))
    if reuse == AUTO_REUSE:
        reuse = None
    if reuse not in (None, True, False):
        raise arg_error(ValueError, "variable_scope", "reuse", "None, True, False or AUTO_REUSE", repr(reuse))
    token = _scope.set(_scope.get() + ((full, reuse, _Names()),))
    try:
        yield VariableScope(full, reuse)
    finally:
        _scope.reset(token)


_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_frames():
    f = sys._getframe(1)
    while f is not None:
        if not os.path.abspath(f.f_code.co_filename).startswith(_PKG_DIR):
            yield f
        f = f.f_back


def _call_site() -> tuple:
    """The Python call stack outside cubn: one id per distinct caller."""
    return tuple((f.f_code.co_filename, f.f_lineno) for f in _user_frames())


def _call_code() -> tuple:
    """The call stack without file names: the same code run from another file (a re-run cell) matches."""
    return tuple((f.f_code.co_name, f.f_lineno, f.f_code.co_code) for f in _user_frames())


def _resolve(func, base, scope, reuse):
    """(full name, the existing layer or None, reuse) for a layer call, by TF's rules."""
    prefix, inherited, names = _current()
    if reuse is None or reuse == AUTO_REUSE:
        reuse = inherited if reuse is None else None
    if reuse is True and scope is None and not prefix:
        raise ValueError(f"{func}: reuse=True cannot be used without a scope (as in TensorFlow)")
    earlier = None
    if scope is not None:
        if isinstance(scope, VariableScope):
            full = str(scope)
        elif isinstance(scope, str) and scope:
            full = f"{prefix}/{scope}" if prefix else scope
            names.note_explicit(scope)
        else:
            raise arg_error(TypeError, func, "scope", "a non-empty str", describe(scope))
    else:
        full, earlier = _auto_name(base, prefix, names, func)
    layer = _layers.get(full)
    if layer is None:
        if reuse is True:
            raise ValueError(f"{func}: scope {full!r} does not exist, so it cannot be reused (reuse=True)")
        if earlier is not None and earlier != full:
            warnings.warn(
                f"{func}: this code already created the layer {earlier!r} and now creates {full!r}, because it "
                "runs from another place (a re-run notebook cell?). TF would do the same; pass scope=..., or call "
                "cubn.compat.reset_default_graph() before building the model again",
                LayerCreatedAgainWarning, stacklevel=_updates.user_stacklevel())
    elif reuse is False:
        raise ValueError(f"{func}: scope {full!r} already exists; pass reuse=True (or None) to share it")
    return full, layer


_STRUCTURAL = ("center", "scale", "renorm", "zero_debias_moving_mean", "data_format")


@add_arg_scope
def batch_norm(inputs, decay=0.999, center=True, scale=False, epsilon=0.001, activation_fn=None,
               param_initializers=None, param_regularizers=None, updates_collections=GraphKeys.UPDATE_OPS,
               is_training=True, reuse=None, variables_collections=None, outputs_collections=None,
               trainable=True, batch_weights=None, fused=None, data_format=DATA_FORMAT_NHWC,
               zero_debias_moving_mean=False, scope=None, renorm=False, renorm_clipping=None,
               renorm_decay=0.99, adjustment=None):
    """``tf.contrib.layers.batch_norm``, argument for argument.

    Returns the normalized ``inputs``. The layer behind a scope is
    ``get_layer(scope_name)``; its pending updates go to
    ``updates_collections`` (default ``GraphKeys.UPDATE_OPS``, that is
    ``cubn.UPDATE_OPS``): run them with ``cubn.run_updates()`` after each
    training step, or pass ``updates_collections=None`` to update in place.
    ``param_regularizers`` losses go to ``GraphKeys.REGULARIZATION_LOSSES``
    when the layer is created (see [`get_regularization_losses`][get_regularization_losses]).
    Decorated with [`add_arg_scope`][add_arg_scope].
    """
    f = "batch_norm"
    check_unit_interval(f, "decay", decay)
    full, layer = _resolve(f, "BatchNorm", scope, reuse)
    kwargs = dict(decay=decay, center=center, scale=scale, epsilon=epsilon, activation_fn=activation_fn,
                  param_initializers=param_initializers, param_regularizers=param_regularizers,
                  updates_collections=updates_collections, trainable=trainable, fused=fused,
                  data_format=data_format, zero_debias_moving_mean=zero_debias_moving_mean, renorm=renorm,
                  renorm_clipping=renorm_clipping, renorm_decay=renorm_decay, adjustment=adjustment, name=full)
    fresh = BatchNorm(**kwargs)  # validates every argument
    if layer is None:
        layer = fresh
        _layers[full] = layer
        created = True
    else:
        if not isinstance(layer, BatchNorm):
            raise ValueError(f"batch_norm: scope {full!r} holds a {type(layer).__name__}, not a batch_norm layer")
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
        _add_regularization_losses(layer, layer.param_regularizers)
    if outputs_collections is not None:
        for coll in _as_collections(outputs_collections):
            coll.append(outputs)
    _last_layer.set(layer)
    return outputs


def _as_collections(spec, func="batch_norm"):
    """A collection spec -> lists: a name, a list/tuple of names, or a list used as the collection."""
    if isinstance(spec, str):
        return [get_collection(spec)]
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
        return [get_collection(s) for s in spec]
    if isinstance(spec, list):
        return [spec]
    raise arg_error(TypeError, func, "collections", "a name, a list of names or a list", describe(spec))


def _collect_variables(layer, variables_collections, moving=("moving_mean", "moving_variance")):
    v = layer.variables
    for name, arr in v.items():
        add_to_collection(GraphKeys.GLOBAL_VARIABLES, (f"{layer.name}/{name}", arr))
        add_to_collection(GraphKeys.MODEL_VARIABLES, (f"{layer.name}/{name}", arr))
    for name, arr in layer.trainable_variables.items():
        add_to_collection(GraphKeys.TRAINABLE_VARIABLES, (f"{layer.name}/{name}", arr))
    for name in moving:
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


# ---------------------------------------------------------------------------
# slim.fully_connected
# ---------------------------------------------------------------------------
def xavier_initializer(uniform=True, seed=None, dtype=np.float32):
    """``tf.contrib.layers.xavier_initializer``: Glorot uniform (or truncated normal) ``f(shape)``."""
    rng = np.random.default_rng(seed)

    def init(shape):
        if uniform:
            return glorot_uniform(shape, rng).astype(dtype)
        std = np.sqrt(2.0 / max(1, shape[0] + shape[-1]))
        return _truncated_normal(rng, shape, 0.0, std).astype(dtype)

    return init


def truncated_normal_initializer(mean=0.0, stddev=1.0, seed=None, dtype=np.float32):
    """``tf.truncated_normal_initializer``: normal values redrawn beyond two standard deviations."""
    rng = np.random.default_rng(seed)
    return lambda shape: _truncated_normal(rng, shape, mean, stddev).astype(dtype)


def zeros_initializer(dtype=np.float32):
    return lambda shape: np.zeros(shape, dtype)


def constant_initializer(value=0.0, dtype=np.float32):
    return lambda shape: np.full(shape, value, dtype)


def _truncated_normal(rng, shape, mean, std):
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2
    return mean + std * out


@add_arg_scope
def fully_connected(inputs, num_outputs, activation_fn="relu", normalizer_fn=None, normalizer_params=None,
                    weights_initializer=None, weights_regularizer=None, biases_initializer="zeros",
                    biases_regularizer=None, reuse=None, variables_collections=None, outputs_collections=None,
                    trainable=True, scope=None):
    """``slim.fully_connected``: ``activation_fn(normalizer_fn(inputs @ weights, **normalizer_params))``.

    Without a normalizer the biases are added instead (slim's rule). The
    layer is ``get_layer(scope_name)`` (a [`FullyConnected`][cubn.layers.dense.FullyConnected]);
    ``get_layer(name).backward(dy)`` differentiates the whole call --
    activation, the batch norm given as ``normalizer_fn`` (its own
    ``backward``) and the matmul -- and fills ``.gradients``. The matmul is
    NumPy's or CuPy's. ``weights_initializer`` defaults to Glorot uniform
    (slim's ``xavier_initializer()``), ``activation_fn`` to ``"relu"``
    (``tf.nn.relu``); regularizer losses go to ``GraphKeys.REGULARIZATION_LOSSES``.
    Decorated with [`add_arg_scope`][add_arg_scope].
    """
    f = "fully_connected"
    if normalizer_params is not None and not isinstance(normalizer_params, dict):
        raise arg_error(TypeError, f, "normalizer_params", "None or a dict", describe(normalizer_params))
    if normalizer_fn is not None and not callable(normalizer_fn):
        raise arg_error(TypeError, f, "normalizer_fn", "None or a callable", describe(normalizer_fn))
    full, layer = _resolve(f, "fully_connected", scope, reuse)
    created = layer is None
    if created:
        layer = FullyConnected(num_outputs, activation_fn=activation_fn, weights_initializer=weights_initializer,
                               biases_initializer=biases_initializer, weights_regularizer=weights_regularizer,
                               biases_regularizer=biases_regularizer, trainable=trainable, name=full)
    elif not isinstance(layer, FullyConnected):
        raise ValueError(f"fully_connected: scope {full!r} holds a {type(layer).__name__}, not a fully_connected layer")
    elif layer.num_outputs != num_outputs:
        raise ValueError(f"fully_connected: scope {full!r} was created with num_outputs={layer.num_outputs}; "
                         f"it cannot be reused with num_outputs={num_outputs}")
    normalizer = None
    if normalizer_fn is not None:
        params = dict(normalizer_params or {})

        def normalizer(z):
            token = _last_layer.set(None)
            try:
                y = normalizer_fn(z, **params)
                return y, _last_layer.get()
            finally:
                _last_layer.reset(token)

    with variable_scope(VariableScope(full), reuse=None if created else True):
        outputs = layer.forward(inputs, normalizer)
    if created:
        _layers[full] = layer
        _collect_variables(layer, variables_collections, moving=())
        _add_regularization_losses(layer, layer.regularizers)
    if outputs_collections is not None:
        for coll in _as_collections(outputs_collections, f):
            coll.append(outputs)
    _last_layer.set(layer)
    return outputs


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
