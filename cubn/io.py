"""Saving, loading and importing batch-norm layers.

``cubn.save(path, layers)`` writes one ``.npz`` (arrays plus each layer's
config as JSON text; never pickle), ``cubn.load(path)`` reads it back with
``allow_pickle=False``. ``from_torch`` / ``from_keras`` build a
:class:`~cubn.BatchNorm` from a PyTorch ``BatchNorm*d`` or a Keras/TF
``BatchNormalization`` (names and variance conventions converted; see
docs/migrating.md).
"""
from __future__ import annotations

import json
import os

import numpy as np

from ._backend import is_cupy_array
from ._checks import arg_error, describe
from .layers.batch_norm import BatchNorm

_SEP = "::"
_FORMAT_KEY = "__cubn_format__"


def _host(a):
    if is_cupy_array(a):
        return a.get()
    if hasattr(a, "detach"):  # torch tensor
        return a.detach().cpu().numpy()
    if hasattr(a, "numpy") and not isinstance(a, np.ndarray):  # tf / keras variable
        return np.asarray(a.numpy())
    return np.asarray(a)


def save(path, layers) -> None:
    """Save a layer, a list of layers or a dict name -> layer to ``path`` (.npz)."""
    if isinstance(layers, BatchNorm):
        kind, named = "single", {"layer": layers}
    elif isinstance(layers, dict):
        kind, named = "dict", dict(layers)
    elif isinstance(layers, (list, tuple)):
        kind, named = "list", {str(i): l for i, l in enumerate(layers)}
    else:
        raise arg_error(TypeError, "save", "layers", "a BatchNorm, a list of them or a dict name -> BatchNorm", describe(layers))
    arrays = {_FORMAT_KEY: np.array(json.dumps({"kind": kind, "names": list(named)}))}
    for name, layer in named.items():
        if not isinstance(layer, BatchNorm):
            raise arg_error(TypeError, "save", f"layers[{name!r}]", "a BatchNorm", describe(layer))
        if _SEP in str(name):
            raise arg_error(ValueError, "save", "layers", f"names without {_SEP!r}", repr(name))
        arrays[f"{name}{_SEP}__config__"] = np.array(json.dumps(layer.get_config()))
        for k, v in layer.state_dict().items():
            arrays[f"{name}{_SEP}{k}"] = _host(v)
    with open(os.fspath(path), "wb") as fh:
        np.savez(fh, **arrays)


def load(path, device: str = "cpu"):
    """Load what :func:`save` wrote; layers come back on ``device``."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        if _FORMAT_KEY not in z.files:
            raise ValueError(f"load: {os.fspath(path)!r} was not written by cubn.save")
        fmt = json.loads(str(z[_FORMAT_KEY]))
        out = {}
        for name in fmt["names"]:
            cfg = json.loads(str(z[f"{name}{_SEP}__config__"]))
            layer = BatchNorm.from_config(cfg)
            prefix = f"{name}{_SEP}"
            state = {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix) and not k.endswith("__config__")}
            if state:
                layer.load_state_dict(state)
            if device != "cpu":
                layer.to(device)
            out[name] = layer
    if fmt["kind"] == "single":
        return out["layer"]
    if fmt["kind"] == "list":
        return [out[n] for n in fmt["names"]]
    return out


# ---------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------
def from_torch(module_or_state_dict, *, eps=None, momentum=None, data_format="NCHW", affine=None):
    """A :class:`BatchNorm` equal to a PyTorch ``BatchNorm1d/2d/3d``.

    Pass the module (its eps/momentum/affine are read) or its ``state_dict``
    (give ``eps``/``momentum`` if not PyTorch's defaults 1e-5 / 0.1; pass
    ``momentum="cumulative"`` for a module built with ``momentum=None``).
    The layer follows PyTorch's rules (``convention="torch"``): the moving
    variance is the unbiased (Bessel) estimate like ``running_var``, and a
    training batch with one value per channel is an error, as PyTorch
    raises. ``momentum`` m becomes ``decay = 1 - m``; ``momentum=None`` (the
    cumulative average) becomes ``decay=None``, continuing from
    ``num_batches_tracked``. Updates happen in place, as in PyTorch.
    """
    src = module_or_state_dict
    cumulative = False
    if hasattr(src, "state_dict") and callable(src.state_dict):
        eps = src.eps if eps is None else eps
        if momentum is None:
            momentum = src.momentum
            cumulative = momentum is None
        affine = src.affine if affine is None else affine
        state = src.state_dict()
    elif isinstance(src, dict):
        state = src
    else:
        raise arg_error(TypeError, "from_torch", "module_or_state_dict", "a torch BatchNorm module or its state_dict", describe(src))
    if isinstance(momentum, str) and momentum == "cumulative":
        cumulative, momentum = True, None
    eps = 1e-5 if eps is None else float(eps)
    if not cumulative:
        momentum = 0.1 if momentum is None else momentum
        try:
            ok = 0 <= float(momentum) <= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise arg_error(ValueError, "from_torch", "momentum", "a float in [0, 1] or 'cumulative'", repr(momentum))
    if affine is None:
        affine = "weight" in state
    if "running_mean" not in state:
        raise arg_error(ValueError, "from_torch", "state_dict", "running statistics (track_running_stats=True)", sorted(state))
    bn = BatchNorm(decay=None if cumulative else 1.0 - float(momentum), center=affine, scale=affine, epsilon=eps,
                   data_format=data_format, updates_collections=None, unbiased_moving_variance=True,
                   convention="torch")
    names = {"bias": "beta", "weight": "gamma", "running_mean": "moving_mean", "running_var": "moving_variance"}
    ours = {names[k]: _host(v) for k, v in state.items() if k in names}
    ref = ours["moving_mean"]
    bn.build(ref.shape[0], "float64" if ref.dtype == np.float64 else "float32")
    bn.load_state_dict(ours)
    if "num_batches_tracked" in state:
        bn._step = int(np.asarray(_host(state["num_batches_tracked"])))
    return bn


def to_torch_state_dict(bn: BatchNorm) -> dict:
    """The layer's state as a PyTorch ``BatchNorm*d`` state_dict of NumPy arrays.

    ``num_batches_tracked`` is the number of moving-statistics updates the
    layer has applied (``bn.num_batches_tracked``), as PyTorch counts them.
    """
    if bn.unbiased_moving_variance is not True and bn.convention != "torch":
        raise ValueError("to_torch_state_dict: PyTorch's running_var is unbiased; build the layer with "
                         "unbiased_moving_variance=True so the exported value means the same")
    v = {k: _host(a) for k, a in bn.variables.items()}
    out = {"running_mean": v["moving_mean"], "running_var": v["moving_variance"],
           "num_batches_tracked": np.array(bn.num_batches_tracked, np.int64)}
    if "gamma" in v:
        out["weight"] = v["gamma"]
    if "beta" in v:
        out["bias"] = v["beta"]
    return out


# ---------------------------------------------------------------------------
# Keras / TensorFlow
# ---------------------------------------------------------------------------
_KERAS_ORDER = ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


def from_keras(layer_or_config, weights=None, *, input_shape=None, keras=None):
    """A :class:`BatchNorm` equal to a Keras ``BatchNormalization`` (tf-keras / Keras 2, or Keras 3).

    Pass the built Keras layer itself, or its ``get_config()`` dict (or the
    serialized ``{"class_name": ..., "config": ..., "build_config": ...}``
    form) and its ``get_weights()`` list. ``momentum`` is TF's ``decay``;
    the channel axis becomes ``data_format``: the last axis is ``"NHWC"``,
    axis 1 ``"NCHW"``; any other axis, or several axes, is refused (cubn
    normalizes per channel of one of those two layouts).

    Which Keras wrote the layer or config is detected (``keras=`` forces it:
    ``"tf_keras"`` or ``"keras3"``) and its moving-variance convention kept:
    Keras 3 always feeds the biased batch variance (``convention="keras3"``);
    tf-keras the Bessel-corrected one where its fused kernel runs (rank 4
    or 5 with ``fused`` None or True) and the biased one elsewhere
    (``convention="tf_keras"``, with the layer's resolved ``fused``).
    tf-keras's ``virtual_batch_size`` is kept. Updates happen in place, as
    Keras applies them in TF 2.

    Args:
        layer_or_config: a built Keras BatchNormalization, or its config.
        weights: with a config, its ``get_weights()`` (gamma, beta,
            moving_mean, moving_variance, then the renorm variables).
        input_shape: the input shape (only its rank is used); needed with a
            config whose axis is neither -1 nor 1 and has no build_config.
        keras: None (detect), ``"tf_keras"`` or ``"keras3"``.
    """
    f = "from_keras"
    if keras not in (None, "tf_keras", "keras3"):
        raise arg_error(ValueError, f, "keras", "None, 'tf_keras' or 'keras3'", repr(keras))
    rank = None
    if hasattr(layer_or_config, "get_config"):
        layer = layer_or_config
        if not getattr(layer, "built", True) or not layer.weights:
            raise arg_error(ValueError, f, "layer_or_config", "a built layer (call it or layer.build(shape) first)",
                            "an unbuilt layer")
        cfg = dict(layer.get_config())
        # Keras resolves fused=None at build time and does not serialize it: ask the layer.
        if getattr(layer, "fused", None) is not None:
            cfg["fused"] = bool(layer.fused)
        spec = getattr(layer, "input_spec", None)
        spec = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
        rank = getattr(spec, "ndim", None)
        named = {}
        for w in layer.weights:
            short = w.name.split("/")[-1].split(":")[0]
            named[short] = _host(w)
        which = keras or _keras_of_layer(layer)
        axis = getattr(layer, "axis", cfg.get("axis", -1))
        if which == "tf_keras" and cfg.get("virtual_batch_size") is not None and isinstance(axis, (list, tuple)):
            axis = [a - 1 for a in axis]  # tf-keras shifted its axes past the virtual-batch dimension
    elif isinstance(layer_or_config, dict):
        cfg = layer_or_config
        if "config" in cfg and isinstance(cfg.get("config"), dict) and "class_name" in cfg:
            build = cfg.get("build_config") or {}
            if input_shape is None and build.get("input_shape") is not None:
                input_shape = build["input_shape"]
            cfg = cfg["config"]
        if weights is None:
            raise arg_error(ValueError, f, "weights", "the layer's get_weights() list", "None")
        which = keras or _keras_of_config(cfg)
        present = [k for k in _KERAS_ORDER if (k != "gamma" or cfg.get("scale", True)) and (k != "beta" or cfg.get("center", True))
                   and (not k.startswith(("moving_stddev", "renorm")) or cfg.get("renorm", False))]
        if len(weights) != len(present):
            raise arg_error(ValueError, f, "weights", f"{len(present)} arrays ({', '.join(present)})", f"{len(weights)} arrays")
        named = {k: _host(w) for k, w in zip(present, weights)}
        axis = cfg.get("axis", -1)
        if which == "tf_keras" and cfg.get("virtual_batch_size") is not None and isinstance(axis, (list, tuple)):
            axis = [a - 1 for a in axis]  # a built tf-keras layer reports its axes past the virtual-batch dimension
    else:
        raise arg_error(TypeError, f, "layer_or_config", "a Keras BatchNormalization or its config dict", describe(layer_or_config))
    if input_shape is not None:
        rank = len(tuple(input_shape))
    data_format = _keras_data_format(axis, rank)
    clipping = cfg.get("renorm_clipping") or None
    if isinstance(clipping, dict):
        clipping = {k: v for k, v in clipping.items() if v is not None}
    vbs = cfg.get("virtual_batch_size") if which == "tf_keras" else None
    bn = BatchNorm(decay=float(cfg.get("momentum", 0.99)), center=bool(cfg.get("center", True)),
                   scale=bool(cfg.get("scale", True)), epsilon=float(cfg.get("epsilon", 1e-3)),
                   data_format=data_format, fused=cfg.get("fused") if which == "tf_keras" else None,
                   renorm=bool(cfg.get("renorm", False)), renorm_clipping=clipping,
                   renorm_decay=float(cfg.get("renorm_momentum", 0.99)), updates_collections=None,
                   name=cfg.get("name"), virtual_batch_size=vbs, convention=which)
    # tf-keras keeps (1, ..., C, ...) parameters with virtual batches: one value per channel either way
    named = {k: np.asarray(v).reshape(-1) for k, v in named.items()}
    ref = named["moving_mean"]
    bn.build(ref.shape[0], "float64" if ref.dtype == np.float64 else "float32")
    bn.load_state_dict({k: v for k, v in named.items() if k in bn._vars}, strict=True)
    return bn


_KERAS3_POLICIES = ("DTypePolicy", "FloatDTypePolicy", "QuantizedDTypePolicy", "QuantizedFloat8DTypePolicy",
                    "DTypePolicyMap")


def _keras_of_layer(layer) -> str:
    """'keras3' or 'tf_keras' from the package that defined the layer's class."""
    import sys

    root = type(layer).__module__.split(".")[0]
    version = getattr(sys.modules.get(root), "__version__", "")
    if root == "tf_keras":
        return "tf_keras"
    if root == "keras" and version:
        return "keras3" if int(version.split(".")[0]) >= 3 else "tf_keras"
    return _keras_of_config(layer.get_config())


def _keras_of_config(cfg) -> str:
    """'keras3' or 'tf_keras' from what each writes into a BatchNormalization config."""
    dtype = cfg.get("dtype")
    if isinstance(dtype, dict):
        if dtype.get("module") == "keras" or dtype.get("class_name") in _KERAS3_POLICIES:
            return "keras3"
        if dtype.get("class_name") == "Policy":
            return "tf_keras"
    if any(k in cfg for k in ("fused", "virtual_batch_size", "adjustment")) or isinstance(cfg.get("axis"), list):
        return "tf_keras"  # keys and forms only tf-keras writes
    if "synchronized" in cfg:
        return "keras3"    # Keras 3 always writes it; tf-keras never
    if isinstance(dtype, str):
        return "tf_keras"
    raise ValueError("from_keras: cannot tell whether tf-keras or Keras 3 wrote this config (their moving variances "
                     "differ); pass keras='tf_keras' or keras='keras3'")


def _keras_data_format(axis, rank):
    """Keras's channel axis -> 'NHWC' (last) or 'NCHW' (axis 1); anything else is refused."""
    f = "from_keras"
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    if len(axes) != 1:
        raise arg_error(ValueError, f, "axis", "a single channel axis (cubn normalizes per channel)",
                        f"axis={axis!r} (several axes)")
    a = int(axes[0])
    if rank is not None:
        if not -rank <= a < rank:
            raise arg_error(ValueError, f, "axis", f"an axis of a rank-{rank} input", f"axis={a}")
        a = a % rank
        if a == rank - 1:
            return "NHWC"
        if a == 1:
            return "NCHW"
        raise arg_error(ValueError, f, "axis", f"the last axis or axis 1 of a rank-{rank} input (NHWC or NCHW)",
                        f"axis={axes[0]}")
    if a == -1:
        return "NHWC"
    if a == 1:
        return "NCHW"  # the channels of NCHW, and of a rank-2 (N, C) input alike
    raise arg_error(ValueError, f, "axis", "-1 or 1, or input_shape= to tell which axis of which rank this is",
                    f"axis={axes[0]} with the input rank unknown")
