"""Saving, loading and importing batch-norm layers.

``cubn.save(path, layers)`` writes one ``.npz`` (arrays plus each layer's
config as JSON text; never pickle), ``cubn.load(path)`` reads it back with
``allow_pickle=False``. ``from_torch`` / ``from_keras`` build a
[`BatchNorm`][cubn.layers.batch_norm.BatchNorm] from a PyTorch ``BatchNorm*d`` or a Keras/TF
``BatchNormalization`` (names and variance conventions converted; see
docs/migrating.md).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets

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


FORMAT_VERSION = 1
_KINDS = ("single", "list", "dict")


def save(path, layers) -> None:
    """Save a layer, a list of layers or a dict name -> layer to ``path`` (.npz).

    Atomic: the file is written under a temporary name in the same folder,
    flushed to disk, then renamed over ``path``, so an exception or a full
    disk midway leaves the previous file as it was (and no temporary file).
    What cannot be stored (a custom activation, an adjustment function, a
    regularizer not from ``cubn.regularizers``: see ``BatchNorm.get_config``)
    is refused with a TypeError before anything is written.
    """
    if isinstance(layers, BatchNorm):
        kind, named = "single", {"layer": layers}
    elif isinstance(layers, dict):
        kind, named = "dict", dict(layers)
    elif isinstance(layers, (list, tuple)):
        kind, named = "list", {str(i): l for i, l in enumerate(layers)}
    else:
        raise arg_error(TypeError, "save", "layers", "a BatchNorm, a list of them or a dict name -> BatchNorm", describe(layers))
    arrays = {_FORMAT_KEY: np.array(json.dumps({"kind": kind, "names": list(named), "version": FORMAT_VERSION}))}
    for name, layer in named.items():
        if not isinstance(name, str):
            raise arg_error(TypeError, "save", "layers", "a dict whose keys are strings (the names in the file)",
                            f"key {name!r}")
        if not isinstance(layer, BatchNorm):
            raise arg_error(TypeError, "save", f"layers[{name!r}]", "a BatchNorm", describe(layer))
        if _SEP in name:
            raise arg_error(ValueError, "save", "layers", f"names without {_SEP!r}", repr(name))
        try:
            config = layer.get_config()
        except TypeError as e:
            raise TypeError(f"save: layers[{name!r}]: {e}") from None
        arrays[f"{name}{_SEP}__config__"] = np.array(json.dumps(config))
        for k, v in layer.state_dict().items():
            arrays[f"{name}{_SEP}{k}"] = _host(v)
    _write_atomically("save", path, lambda fh: np.savez(fh, **arrays))


def _write_atomically(func, path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename over ``path``."""
    target = os.path.realpath(os.fspath(path))  # through a symlink, as open() would write
    folder, base = os.path.split(target)
    if os.path.isdir(target):
        raise IsADirectoryError(errno.EISDIR, f"{func}: {os.fspath(path)!r} is a directory")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise PermissionError(errno.EACCES, f"{func}: {os.fspath(path)!r} is not writable")
    while True:
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            # 0o666 less the umask, like open(path, "wb"): the renamed file gets ordinary permissions.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise type(e)(e.errno, f"{func}: cannot write {os.fspath(path)!r}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise type(e)(e.errno, f"{func}: writing {os.fspath(path)!r} failed ({e.strerror}); the previous "
                          "file, if any, is unchanged") from e
        raise
    with contextlib.suppress(OSError, AttributeError):  # the rename itself survives a crash (POSIX)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class _Unreadable(ValueError):
    pass


def load(path, device: str = "cpu", *, allow_invalid: bool = False):
    """Load what [`save`][save] wrote; layers come back on ``device``.

    A file that is not a readable cubn file -- not an ``.npz``, truncated,
    damaged, missing an entry, or holding an entry of the wrong shape or
    type -- raises ValueError naming the path and the entry. Nothing is
    returned unless every layer loads (each layer's state is checked as
    ``load_state_dict`` checks it; ``allow_invalid`` as there: load NaN or
    infinite values and negative variances as they were saved).
    """
    p = os.fspath(path)
    where = f"load: {p!r}"
    try:
        z = np.load(p, allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, ValueError, OSError, ...
        raise ValueError(f"{where} is not a file written by cubn.save (not a readable .npz archive: "
                         f"{type(e).__name__}: {e})") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{where} is a single .npy array, not a file written by cubn.save")
    with z:
        if _FORMAT_KEY not in z.files:
            raise ValueError(f"{where} was not written by cubn.save (no {_FORMAT_KEY!r} entry)")
        entries = {}
        for k in z.files:
            try:
                entries[k] = z[k]
            except Exception as e:  # noqa: BLE001 - a damaged member raises anything zipfile/zlib/numpy has
                raise ValueError(f"{where} is damaged or truncated: entry {k!r} cannot be read "
                                 f"({type(e).__name__}: {e})") from e
    try:
        return _layers_from(entries, where, device, allow_invalid)
    except _Unreadable as e:
        raise ValueError(str(e)) from e.__cause__


def _json_entry(entries, key, where):
    if key not in entries:
        raise _Unreadable(f"{where} is incomplete: entry {key!r} is missing")
    try:
        return json.loads(str(entries[key]))
    except (ValueError, TypeError) as e:
        raise _Unreadable(f"{where} is damaged: entry {key!r} is not the JSON cubn.save writes ({e})") from e


def _layers_from(entries, where, device, allow_invalid):
    fmt = _json_entry(entries, _FORMAT_KEY, where)
    if (not isinstance(fmt, dict) or fmt.get("kind") not in _KINDS or not isinstance(fmt.get("names"), list)
            or not all(isinstance(n, str) for n in fmt["names"])):
        raise _Unreadable(f"{where} is damaged: entry {_FORMAT_KEY!r} is not a cubn.save header")
    version = fmt.get("version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _Unreadable(f"{where} was written by a newer cubn (file format {version!r}; this cubn reads up to "
                          f"{FORMAT_VERSION}): upgrade cubn to load it")
    out = {}
    for name in fmt["names"]:
        prefix = f"{name}{_SEP}"
        cfg = _json_entry(entries, f"{prefix}__config__", where)
        try:
            layer = BatchNorm.from_config(cfg)
        except (TypeError, ValueError, KeyError) as e:
            raise _Unreadable(f"{where}: entry '{prefix}__config__' is not a valid layer configuration "
                              f"({type(e).__name__}: {e})") from e
        state = {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix) and k != f"{prefix}__config__"}
        if state:
            try:
                layer._load_state(state, True, allow_invalid, lambda k, pre=prefix: f"{where}: entry '{pre}{k}'")
            except (TypeError, ValueError, KeyError) as e:
                msg = e.args[0] if e.args else str(e)
                if isinstance(e, KeyError):
                    msg = f"{where}: layer {name!r} has the wrong entries: {msg}"
                raise _Unreadable(msg) from e
        out[name] = layer
    for layer in out.values():
        if device != "cpu":
            layer.to(device)
    if fmt["kind"] == "single":
        if "layer" not in out:
            raise _Unreadable(f"{where} is damaged: a single-layer file without its 'layer' entry")
        return out["layer"]
    if fmt["kind"] == "list":
        return [out[n] for n in fmt["names"]]
    return out


# ---------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------
def from_torch(module_or_state_dict, *, eps=None, momentum=None, data_format="NCHW", affine=None):
    """A [`BatchNorm`][BatchNorm] equal to a PyTorch ``BatchNorm1d/2d/3d``.

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
    tracked = "num_batches_tracked" in state
    if cumulative and tracked:  # the count is part of a cumulative layer's state
        ours["num_batches_tracked"] = _host(state["num_batches_tracked"])
    bn.load_state_dict(ours, strict=tracked or not cumulative)
    if tracked and not cumulative:
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
    """A [`BatchNorm`][BatchNorm] equal to a Keras ``BatchNormalization`` (tf-keras / Keras 2, or Keras 3).

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
    (``convention="tf_keras"``, with the layer's resolved ``fused``; see the
    Conventions page). tf-keras's ``virtual_batch_size`` is kept. Updates happen in place, as
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
