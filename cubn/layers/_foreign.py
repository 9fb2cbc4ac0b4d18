"""Habits from other libraries' batch-norm layers, answered with cubn's spelling.

``cubn.BatchNorm`` takes ``tf.contrib.layers.batch_norm``'s arguments. Someone
coming from Keras or PyTorch writes ``training=``, ``momentum=``, ``axis=`` or
``BatchNorm(64)``; Python's own "unexpected keyword argument" does not say
what to write instead, so the layer's constructor checks for these first.
"""
from __future__ import annotations

import functools
import inspect
import numbers

_PER_CALL = ("is_training is an argument of the call, not of the layer: y = bn(x, is_training=True) "
             "(or is_training=False for inference)")

# foreign keyword -> what to write in cubn instead
HINTS = {
    "training": _PER_CALL + " (Keras's training=)",
    "is_training": _PER_CALL,
    "momentum": ("use decay=: Keras's momentum=m is decay=m; PyTorch's momentum=m is decay=1-m "
                 "(PyTorch's default momentum=0.1 is decay=0.9). For PyTorch's constructor use "
                 "cubn.torch.BatchNorm1d/2d/3d"),
    "eps": "use epsilon= (cubn's default is tf.contrib's 0.001; PyTorch's is 1e-5)",
    "num_features": ("BatchNorm takes no channel count: the first call fixes it. For PyTorch's "
                     "BatchNorm2d(num_features) use cubn.torch.BatchNorm2d(num_features)"),
    "affine": "use center=True (beta) and scale=True (gamma); PyTorch's affine=True is both",
    "track_running_stats": ("there is no switch: training calls produce moving-statistics updates "
                            "(see updates_collections) and is_training=False uses them"),
    "axis": "use data_format='NHWC' (Keras's axis=-1) or data_format='NCHW' (axis=1)",
    "activation": "use activation_fn= (a name such as 'relu', a cubn.activations object or a callable)",
    "renorm_momentum": "use renorm_decay= (Keras's renorm_momentum has the same meaning)",
    "beta_initializer": "use param_initializers={'beta': ...}",
    "gamma_initializer": "use param_initializers={'gamma': ...}",
    "moving_mean_initializer": "use param_initializers={'moving_mean': ...}",
    "moving_variance_initializer": "use param_initializers={'moving_variance': ...}",
    "beta_regularizer": "use param_regularizers={'beta': ...}",
    "gamma_regularizer": "use param_regularizers={'gamma': ...}",
    "synchronized": "use cubn.SyncBatchNorm for statistics across processes",
}


@functools.lru_cache(maxsize=None)
def _accepted(cls) -> tuple:
    """(keyword names cls's constructor accepts, its first positional parameter)."""
    names, first = set(), None
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        if first is None and params and params[0].kind in (params[0].POSITIONAL_ONLY,
                                                            params[0].POSITIONAL_OR_KEYWORD):
            first = params[0].name
        names.update(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return frozenset(names), first


def check_constructor_arguments(cls, args, kwargs) -> None:
    """Raise a TypeError/ValueError naming cubn's spelling for another library's habit."""
    accepted, first = _accepted(cls)
    name = cls.__name__
    for k in kwargs:
        if k not in accepted and k in HINTS:
            raise TypeError(f"{name}() got an unexpected keyword argument {k!r}: {HINTS[k]}")
    decay = args[0] if args and first == "decay" else kwargs.get("decay") if "decay" in accepted else None
    if isinstance(decay, numbers.Integral) and not isinstance(decay, bool) and decay > 1:
        raise ValueError(
            f"{name}: argument 'decay': got {decay!r}, which looks like a channel count. {name} takes none "
            f"(the first call fixes it); its first argument is the moving-average decay, e.g. "
            f"{name}(decay=0.99). For PyTorch's BatchNorm2d({decay}) use cubn.torch.BatchNorm2d({decay})")
