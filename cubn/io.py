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
    (give ``eps``/``momentum`` if not PyTorch's defaults 1e-5 / 0.1).
    PyTorch's ``running_var`` is the unbiased (Bessel) estimate, so the
    layer gets ``unbiased_moving_variance=True``; ``momentum`` m becomes
    ``decay = 1 - m``; updates happen in place, as in PyTorch.
    """
    src = module_or_state_dict
    if hasattr(src, "state_dict") and callable(src.state_dict):
        eps = src.eps if eps is None else eps
        momentum = src.momentum if momentum is None else momentum
        affine = src.affine if affine is None else affine
        state = src.state_dict()
    elif isinstance(src, dict):
        state = src
    else:
        raise arg_error(TypeError, "from_torch", "module_or_state_dict", "a torch BatchNorm module or its state_dict", describe(src))
    eps = 1e-5 if eps is None else float(eps)
    momentum = 0.1 if momentum is None else momentum
    if momentum is None or not 0 <= float(momentum) <= 1:
        raise arg_error(ValueError, "from_torch", "momentum", "a float in [0, 1] (cumulative averaging is not supported)", repr(momentum))
    if affine is None:
        affine = "weight" in state
    if "running_mean" not in state:
        raise arg_error(ValueError, "from_torch", "state_dict", "running statistics (track_running_stats=True)", sorted(state))
    bn = BatchNorm(decay=1.0 - float(momentum), center=affine, scale=affine, epsilon=eps, data_format=data_format,
                   updates_collections=None, unbiased_moving_variance=True)
    names = {"bias": "beta", "weight": "gamma", "running_mean": "moving_mean", "running_var": "moving_variance"}
    ours = {names[k]: _host(v) for k, v in state.items() if k in names}
    ref = ours["moving_mean"]
    bn.build(ref.shape[0], "float64" if ref.dtype == np.float64 else "float32")
    bn.load_state_dict(ours)
    return bn


def to_torch_state_dict(bn: BatchNorm) -> dict:
    """The layer's state as a PyTorch ``BatchNorm*d`` state_dict of NumPy arrays."""
    if bn.unbiased_moving_variance is not True:
        raise ValueError("to_torch_state_dict: PyTorch's running_var is unbiased; build the layer with "
                         "unbiased_moving_variance=True so the exported value means the same")
    v = {k: _host(a) for k, a in bn.variables.items()}
    out = {"running_mean": v["moving_mean"], "running_var": v["moving_variance"], "num_batches_tracked": np.array(0, np.int64)}
    if "gamma" in v:
        out["weight"] = v["gamma"]
    if "beta" in v:
        out["bias"] = v["beta"]
    return out


# ---------------------------------------------------------------------------
# Keras / TensorFlow
# ---------------------------------------------------------------------------
_KERAS_ORDER = ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


def from_keras(layer_or_config, weights=None):
    """A :class:`BatchNorm` equal to a Keras/TF ``BatchNormalization``.

    Pass the Keras layer itself, or its ``get_config()`` dict and its
    ``get_weights()`` list. ``momentum`` is TF's ``decay``; ``axis`` 1 means
    NCHW, any other axis channels last; ``fused`` keeps TF's
    moving-variance convention (see the Conventions page). Updates happen in place, as
    Keras applies them in TF 2.
    """
    if hasattr(layer_or_config, "get_config"):
        cfg = dict(layer_or_config.get_config())
        # Keras resolves fused=None at build time and does not serialize it: ask the layer.
        if getattr(layer_or_config, "fused", None) is not None:
            cfg["fused"] = bool(layer_or_config.fused)
        named = {}
        for w in layer_or_config.weights:
            short = w.name.split("/")[-1].split(":")[0]
            named[short] = _host(w)
    elif isinstance(layer_or_config, dict):
        cfg = layer_or_config
        if weights is None:
            raise arg_error(ValueError, "from_keras", "weights", "the layer's get_weights() list", "None")
        present = [k for k in _KERAS_ORDER if (k != "gamma" or cfg.get("scale", True)) and (k != "beta" or cfg.get("center", True))
                   and (not k.startswith(("moving_stddev", "renorm")) or cfg.get("renorm", False))]
        if len(weights) != len(present):
            raise arg_error(ValueError, "from_keras", "weights", f"{len(present)} arrays ({', '.join(present)})", f"{len(weights)} arrays")
        named = {k: _host(w) for k, w in zip(present, weights)}
    else:
        raise arg_error(TypeError, "from_keras", "layer_or_config", "a Keras BatchNormalization or its config dict", describe(layer_or_config))
    axis = cfg.get("axis", -1)
    axis = axis[0] if isinstance(axis, (list, tuple)) else axis
    clipping = cfg.get("renorm_clipping") or None
    bn = BatchNorm(decay=float(cfg.get("momentum", 0.99)), center=bool(cfg.get("center", True)),
                   scale=bool(cfg.get("scale", True)), epsilon=float(cfg.get("epsilon", 1e-3)),
                   data_format="NCHW" if axis == 1 else "NHWC", fused=cfg.get("fused"),
                   renorm=bool(cfg.get("renorm", False)), renorm_clipping=clipping,
                   renorm_decay=float(cfg.get("renorm_momentum", 0.99)), updates_collections=None,
                   name=cfg.get("name"))
    ref = named["moving_mean"]
    bn.build(ref.shape[0], "float64" if ref.dtype == np.float64 else "float32")
    bn.load_state_dict({k: v for k, v in named.items() if k in bn._vars}, strict=True)
    return bn
