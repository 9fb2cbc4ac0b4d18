"""``cubn.BatchNorm``: tf.contrib.layers.batch_norm as a small stateful object.

The layer holds variables and calls the functional ops (``cubn.ops``); the
math lives there. Arguments and defaults are those of
``tf.contrib.layers.batch_norm`` (see docs/migrating.md for each one).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _dtypes, activations
from .. import _launch_cache as _lc
from .._backend import _backends, _override, fast_select, gpu_available, is_array, is_cupy_array, select, take_dlpack
from .._options import one_launch_enabled
from .._fast import plain_like
from .._checks import arg_error, check_float_input, check_positive_epsilon, check_unit_interval, describe
from .._memory import readable, readable_all
from .._plan import plan_for_channels
from ..backends import numpy_small as _small
from ..backends._memory import alignment_of
from ..backends.base import Fold, MovingUpdate, Renorm, Stats
from .._args import as_like, channel_param, make_weights
from ..ops.normalization import ForwardContext, _forward_key, bn_backward, bn_forward, check_side_input, \
    check_training_batch
from ..regularizers import L1L2
from ..updates import UPDATE_OPS, is_collection_spec, resolve as resolve_collections, warn_if_pending
from ._foreign import check_constructor_arguments

_no_lock = contextlib.nullcontext()
_CLIP_KEYS = ("rmax", "rmin", "dmax")
_PARAM_NAMES = ("beta", "gamma", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
ZD_BIASED = "moving_mean/biased"
ZD_STEP = "moving_mean/local_step"
BATCHES_TRACKED = "num_batches_tracked"
CONVENTIONS = ("tf", "tf_keras", "keras3", "torch")
# Attributes a call itself sets: every other assignment drops the layer's steady-call plans
_PER_CALL_STATE = frozenset({"_step", "_calls", "_pending", "_plans"})


@dataclass(eq=False)
class BatchNormContext:
    """What ``backward`` needs from one forward call: ``y, ctx = bn.forward(x, ...)``.

    Hand it back as ``bn.backward(dy, ctx)``. A context can be used from any
    thread and more than once; it keeps the forward's input alive until it is
    dropped.
    """

    op: Any               # the functional op's context (ops.normalization.ForwardContext)
    training: bool        # the call's is_training
    side_input: bool      # a side input was given: backward returns (dx, d_side_input)
    z: Any = None         # the fused part's output, kept for an unfused activation_fn
    layer: Any = None     # weakref to the layer that made it
    epoch: int = 0        # the layer's state epoch then (build and to() start a new one)
    gradients: dict = field(default_factory=dict)  # filled by backward(dy, ctx)

    def __repr__(self) -> str:
        kind = "training" if self.training else "inference"
        return f"<BatchNormContext of a {kind} call, input shape {tuple(self.op.plan.orig_shape)}>"


class _PerThread(threading.local):
    """Each thread's own view of a layer: the forward contexts and gradients
    that ``bn.backward(dy)`` and ``bn.gradients`` mean on that thread."""

    def __init__(self):  # threading.local runs it once in every thread that uses the object
        self.last = None      # context of this thread's last call
        self.pending = None   # this thread's last training context whose backward has not run
        self.gradients = {}   # of this thread's last backward


class _LayerThreads:
    """A layer's transient threading state (not part of the layer's data: a
    copy or an unpickled layer starts with a fresh one)."""

    def __init__(self):
        self.local = _PerThread()
        self.lock = threading.RLock()  # in-place state updates of the layer, one at a time

    def __reduce__(self):
        return (_LayerThreads, ())  # copied or pickled: a fresh one (no contexts, an unheld lock)


class CustomActivation:
    """An unfused activation: ``forward(z)``, and ``backward(z, dy)`` if given."""

    def __init__(self, fn):
        self.fn = fn
        self.has_backward = hasattr(fn, "backward") and hasattr(fn, "forward")

    def forward(self, z):
        return self.fn.forward(z) if hasattr(self.fn, "forward") else self.fn(z)

    def backward(self, z, dy):
        return self.fn.backward(z, dy)


class BatchNorm:
    """Batch normalization layer with tf.contrib.layers.batch_norm's arguments.

    ``y = bn(x, is_training=True, batch_weights=None, side_input=None)``;
    ``dx = bn.backward(dy)`` (``(dx, d_side_input)`` when a side input was
    given) is the backward of the calling thread's last call. Hand-written
    nets that call a layer more than once before its backward hold the
    context instead: ``y, ctx = bn.forward(x, ...)``, ``dx = bn.backward(dy,
    ctx)``. ``bn.variables`` maps names to the live state arrays;
    ``bn.gradients`` holds d beta / d gamma of the calling thread's last
    ``backward``. One layer may be used from several threads (see the
    threads section of docs/conventions.md).

    Args:
        decay: moving-average decay: ``moving -= (1 - decay) * (moving - batch)``;
            None for the cumulative average of all batches so far (PyTorch's
            ``momentum=None``, Chainer's ``finetune``): the t-th update uses
            ``1 - decay = 1/t``.
        center: add ``beta``.
        scale: multiply by ``gamma``.
        epsilon: added to the variance.
        activation_fn: None, an activation name or ``cubn.activations`` object
            (fused into the kernels), or any callable (applied after, unfused;
            give an object with ``forward(z)`` and ``backward(z, dy)`` to train
            through it).
        param_initializers: dict over variable names -> callable(shape) or array.
        param_regularizers: dict over ``beta``/``gamma`` -> regularizer
            (see ``cubn.regularizers``); losses in ``bn.losses``.
        updates_collections: where training calls put their moving-statistics
            update (default ``cubn.UPDATE_OPS``; run with ``cubn.run_updates``):
            a list-like collection, a collection name (``"update_ops"`` is
            ``cubn.UPDATE_OPS``) or a tuple of names; None to update in place
            during the call.
        trainable: False: no gradients for beta/gamma (statistics still follow
            ``is_training``).
        fused: None/True/False; chooses TF's moving-variance convention (see
            ``unbiased_moving_variance``), never the speed.
        data_format: ``"NHWC"`` or ``"NCHW"`` (rank-2 inputs are (N, C)).
        zero_debias_moving_mean: TF's zero-debiased moving mean.
        renorm: batch renormalization (arXiv:1702.03275).
        renorm_clipping: dict with keys among ``rmax``, ``rmin``, ``dmax``.
        renorm_decay: decay of the renorm statistics.
        adjustment: ``f(shape) -> (scale, bias)`` applied to the normalized
            value before gamma/beta, in training only.
        unbiased_moving_variance: None (TF's rule: Bessel-corrected batch
            variance where TF's fused path applies, biased elsewhere), True
            (always Bessel, like PyTorch's running_var) or False (always biased).
        virtual_batch_size: ghost batch normalization (tf-keras): a training
            batch of N items is normalized as N / virtual_batch_size groups,
            group j holding items j, j + G, j + 2G, ... (G groups, tf-keras's
            reshape); the moving statistics move once per call toward the
            mean of the groups' means and variances. N must be a multiple.
        convention: whose rules apply where the peers differ: ``"tf"``
            (default: tf.contrib), ``"tf_keras"`` (the fused convention only
            for rank 4 and 5, as tf-keras resolves ``fused=None``),
            ``"keras3"`` (moving variance always biased), ``"torch"``
            (moving variance always Bessel-corrected, and one value per
            channel in training is an error). ``unbiased_moving_variance``,
            when given, wins.
        name: a label.
    """

    def __new__(cls, *args, **kwargs):
        check_constructor_arguments(cls, args, kwargs)  # Keras / PyTorch habits get cubn's spelling
        return super().__new__(cls)

    def __setattr__(self, name, value):
        # A steady-call plan (see _steady) holds what the layer's arguments and
        # state decided; assigning any of them (decay, epsilon, the variables
        # dict, the device, ...) forgets the plans, so none is ever stale.
        if name not in _PER_CALL_STATE:
            self.__dict__["_plans"] = {}
        object.__setattr__(self, name, value)

    def __init__(self, decay=0.999, center=True, scale=False, epsilon=0.001, activation_fn=None,
                 param_initializers=None, param_regularizers=None, updates_collections=UPDATE_OPS,
                 trainable=True, fused=None, data_format="NHWC", zero_debias_moving_mean=False,
                 renorm=False, renorm_clipping=None, renorm_decay=0.99, adjustment=None,
                 unbiased_moving_variance=None, name=None, virtual_batch_size=None, convention=None):
        f = "BatchNorm"
        self.decay = None if decay is None else check_unit_interval(f, "decay", decay)
        self.center = bool(center)
        self.scale = bool(scale)
        self.epsilon = check_positive_epsilon(f, "epsilon", epsilon)
        self.activation_fn = activation_fn
        self._act, self._custom = _resolve_activation(activation_fn)
        self.param_initializers = dict(param_initializers or {})
        self.param_regularizers = dict(param_regularizers or {})
        if updates_collections is not None and not is_collection_spec(updates_collections):
            raise arg_error(TypeError, f, "updates_collections",
                            "None, a collection (list-like), a collection name or a tuple of names",
                            describe(updates_collections))
        self.updates_collections = updates_collections
        self.trainable = bool(trainable)
        if fused not in (None, True, False):
            raise arg_error(ValueError, f, "fused", "None, True or False", repr(fused))
        self.fused = fused
        if not isinstance(data_format, str) or data_format.upper() not in ("NHWC", "NCHW"):
            raise arg_error(ValueError, f, "data_format", "'NHWC' or 'NCHW'", repr(data_format))
        self.data_format = data_format.upper()
        self.zero_debias_moving_mean = bool(zero_debias_moving_mean)
        self.renorm = bool(renorm)
        self.renorm_clipping = _check_clipping(renorm_clipping)
        self.renorm_decay = check_unit_interval(f, "renorm_decay", renorm_decay)
        if adjustment is not None and not callable(adjustment):
            raise arg_error(TypeError, f, "adjustment", "None or a callable shape -> (scale, bias)", describe(adjustment))
        self.adjustment = adjustment
        if unbiased_moving_variance not in (None, True, False):
            raise arg_error(ValueError, f, "unbiased_moving_variance", "None, True or False", repr(unbiased_moving_variance))
        self.unbiased_moving_variance = unbiased_moving_variance
        if virtual_batch_size is not None:
            if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, (int, np.integer)) \
                    or virtual_batch_size < 1:
                raise arg_error(ValueError, f, "virtual_batch_size", "None or a positive int", describe(virtual_batch_size))
            for arg, bad in (("renorm", self.renorm), ("adjustment", adjustment is not None)):
                if bad:
                    raise arg_error(ValueError, f, arg, f"{'False' if arg == 'renorm' else 'None'} with virtual_batch_size "
                                    "(ghost batches are not combined with it)", repr(renorm if arg == "renorm" else adjustment))
            virtual_batch_size = int(virtual_batch_size)
        self.virtual_batch_size = virtual_batch_size
        if convention is None:
            convention = "tf"
        if convention not in CONVENTIONS:
            raise arg_error(ValueError, f, "convention", "one of " + ", ".join(map(repr, CONVENTIONS)), repr(convention))
        self.convention = convention
        if self.decay is None and self.zero_debias_moving_mean:
            raise arg_error(ValueError, f, "zero_debias_moving_mean",
                            "False with decay=None (the cumulative average has no bias to remove)", "True")
        self.name = name
        known = set(_PARAM_NAMES)
        for k in self.param_initializers:
            if k not in known:
                raise arg_error(ValueError, f, "param_initializers", "keys among " + ", ".join(_PARAM_NAMES), repr(k))
        for k, reg in self.param_regularizers.items():
            if k not in ("beta", "gamma"):
                raise arg_error(ValueError, f, "param_regularizers", "keys 'beta' and/or 'gamma'", repr(k))
            if not callable(reg):
                raise arg_error(TypeError, f, f"param_regularizers[{k!r}]", "a callable", describe(reg))
        self._vars: dict = {}
        self._channels = None
        self._acc = None
        self._xp = None
        self._device = None  # None: NumPy; int: CUDA device id
        self._device_fixed = False  # set by to(): the first call must then match it
        self._step = 0       # zero-debias local step (host-side: known without a sync)
        self._epoch = 0      # bumped by build() and a move: older forward contexts are refused
        self._threads = _LayerThreads()  # transient: per-thread contexts and gradients, the update lock

    @property
    def gradients(self) -> dict:
        """d beta / d gamma of the calling thread's last ``backward`` (``{}`` before one)."""
        return self._thread().gradients

    @gradients.setter
    def gradients(self, value: dict) -> None:
        self._thread().gradients = value

    def _thread(self) -> _PerThread:
        return self._threads.local

    # ------------------------------------------------------------------
    # variables
    @property
    def variables(self) -> dict:
        """Name -> live state array (``moving_mean/local_step`` is a 0-d copy)."""
        out = dict(self._vars)
        if self.zero_debias_moving_mean and self._vars:
            out[ZD_STEP] = self._xp.asarray(self._step, dtype=self._acc)
        if self.decay is None and self._vars:
            out[BATCHES_TRACKED] = self._xp.asarray(self._step, dtype=np.int64)
        return out

    @property
    def num_batches_tracked(self) -> int:
        """Moving-statistics updates applied so far (PyTorch's ``num_batches_tracked``)."""
        return self._step

    @property
    def trainable_variables(self) -> dict:
        if not self.trainable:
            return {}
        return {k: self._vars[k] for k in ("beta", "gamma") if k in self._vars}

    @property
    def losses(self) -> list:
        """Regularization losses of the current beta/gamma."""
        return [reg(self._vars[k]) for k, reg in self.param_regularizers.items() if k in self._vars]

    @property
    def built(self) -> bool:
        return self._channels is not None

    @property
    def channels(self):
        return self._channels

    @property
    def device(self) -> str:
        return "cpu" if self._device is None else f"cuda:{self._device}"

    def _initial(self, name, xp, acc, c, default):
        init = self.param_initializers.get(name)
        if init is None:
            v = default
        elif callable(init):
            v = init((c,))
        else:
            v = init
        what = f"param_initializers[{name!r}]"
        if is_array(v) and not isinstance(v, xp.ndarray):
            where = "host" if isinstance(v, np.ndarray) else "GPU"
            raise TypeError(f"BatchNorm: {what} gave an array on the {where}, "
                            f"but the layer is being built on {'the GPU' if xp is not np else 'the host'}")
        v = readable("BatchNorm", what, v)
        if hasattr(v, "dtype") and v.dtype.kind not in "fiu" and not _dtypes.is_supported_float(v.dtype):
            raise arg_error(TypeError, "BatchNorm", what, "real numbers", describe(v))
        # Always a copy: the layer's state never aliases the caller's array
        # (an initializer shared by two layers would otherwise be their shared state).
        arr = xp.array(v, dtype=acc, copy=True) if not np.isscalar(v) else xp.full((c,), v, dtype=acc)
        if arr.ndim == 0:
            arr = xp.full((c,), arr, dtype=acc)
        if arr.shape != (c,):
            raise arg_error(ValueError, "BatchNorm", what, f"shape ({c},)", f"shape {tuple(arr.shape)}")
        return xp.ascontiguousarray(arr)

    def build(self, channels: int, dtype="float32", device=None):
        """Create the variables for ``channels`` channels (called by the first call)."""
        acc = _dtypes.acc_dtype(dtype)
        if device is None:
            xp = np
        else:
            import cupy as xp
        c = int(channels)
        with _on_device(xp, device):
            v = {}
            if self.center:
                v["beta"] = self._initial("beta", xp, acc, c, 0.0)
            if self.scale:
                v["gamma"] = self._initial("gamma", xp, acc, c, 1.0)
            v["moving_mean"] = self._initial("moving_mean", xp, acc, c, 0.0)
            v["moving_variance"] = self._initial("moving_variance", xp, acc, c, 1.0)
            if self.renorm:
                v["moving_stddev"] = self._initial("moving_stddev", xp, acc, c, xp.sqrt(v["moving_variance"]))
                v["renorm_mean"] = self._initial("renorm_mean", xp, acc, c, v["moving_mean"].copy())
                v["renorm_stddev"] = self._initial("renorm_stddev", xp, acc, c, v["moving_stddev"].copy())
                # TF reports moving_variance = relu(moving_stddev**2 - eps) with renorm
                if "moving_stddev" in self.param_initializers:
                    v["moving_variance"] = xp.maximum(v["moving_stddev"] ** 2 - acc.type(self.epsilon), 0).astype(acc)
            if self.zero_debias_moving_mean:
                v[ZD_BIASED] = xp.zeros((c,), acc)
        with self._threads.lock:
            self._vars, self._channels, self._acc, self._xp, self._device = v, c, acc, xp, device
            self._step = 0
            self._new_epoch()
        return self

    def _new_epoch(self):
        """Forget every thread's forward contexts: the state they refer to is gone."""
        self._epoch += 1
        self._threads.local = _PerThread()

    def to(self, device: str):
        """Move the state to ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``; returns self."""
        dev = _parse_device(device)
        if dev is not None and not gpu_available():
            raise RuntimeError(f"BatchNorm.to({device!r}): no CUDA device is available")
        if self._channels is not None and dev != self._device:
            with self._threads.lock:
                if dev is None:
                    self._vars = {k: v.get() if is_cupy_array(v) else v for k, v in self._vars.items()}
                    self._xp = np
                else:
                    import cupy

                    with cupy.cuda.Device(dev):
                        self._vars = {k: cupy.asarray(v) for k, v in self._vars.items()}
                    self._xp = cupy
                self._new_epoch()
        self._device = dev
        self._device_fixed = True
        return self

    # ------------------------------------------------------------------
    def __call__(self, x, is_training=True, batch_weights=None, side_input=None, mask=None):
        """``y = bn(x, ...)``: [`forward`][forward] without the context (``bn.backward(dy)``
        finds it: the calling thread's last call)."""
        return self.forward(x, is_training=is_training, batch_weights=batch_weights, side_input=side_input,
                            mask=mask)[0]

    def forward(self, x, is_training=True, batch_weights=None, side_input=None, mask=None):
        """``(y, ctx)``: the layer's output and the context of this call for ``backward(dy, ctx)``.

        The same computation as ``bn(x, ...)``; the context is also recorded
        as the calling thread's last call, so ``bn.backward(dy)`` works too.
        Hold ``ctx`` when one layer is called more than once before its
        backward (a shared layer, or an inference call in between).
        """
        if batch_weights is None and mask is None:
            out = self._steady(x, is_training, side_input)
            if out is not None:
                return out
        f = "BatchNorm"
        plan = self._fast_plan(x, batch_weights, side_input, mask)
        if plan is not None:
            backend = plan[0]
            plan = plan[1]
        else:
            x, batch_weights, side_input = take_dlpack(f, x=x, batch_weights=batch_weights, side_input=side_input)
            check_float_input(f, "x", x)
            backend = select(f, "x", x, batch_weights=batch_weights, side_input=side_input)
            x, batch_weights, side_input = readable_all(f, x=x, batch_weights=batch_weights, side_input=side_input)
            plan = plan_for_channels(x.shape, self.data_format, f)
            with self._threads.lock:
                self._ensure_built(x, plan.channels, backend)
        training = bool(is_training)
        in_place = training and self.updates_collections is None
        # An in-place update reads and writes the moving statistics (and the
        # step count): one such call of a layer at a time, so none is lost.
        learn = [] if batch_weights is None and mask is None and self._steady_class() else None
        with self._threads.lock if in_place else _no_lock:
            epoch = self._epoch
            y, ctx = self._forward(f, backend, plan, x, training, batch_weights, side_input, mask, learn)
        if learn:
            self._learn(backend, plan, x, training, side_input, ctx, *learn)
        out = BatchNormContext(ctx, training, side_input is not None, None, weakref.ref(self), epoch)
        if self._custom is not None:
            out.z = y
            y = self._custom.forward(y)
        local = self._thread()
        local.last = out
        if training:
            local.pending = out
        return y, out

    # -- steady calls --------------------------------------------------------
    # A call whose signature (x's type, shape, strides, dtype and alignment, the
    # side input's, is_training, the backend override, cubn.use_one_launch)
    # repeats on a kernel backend replays the launch program the ordinary code
    # recorded for it, with none of that code: the plan below is learned from
    # an ordinary call and holds what the layer's arguments and state decided
    # then. Values are never part of it (the program reads the variables as
    # they are at each launch); assigning a layer attribute drops every plan
    # (__setattr__), and a plan is used only while the launch cache is on and
    # has not been cleared since.
    @classmethod
    def _steady_class(cls) -> bool:
        """Whether this class computes a call as BatchNorm does (SyncBatchNorm exchanges statistics)."""
        return cls._exchange is BatchNorm._exchange and cls._check_training_batch is BatchNorm._check_training_batch

    def _steady_key(self, x, is_training, side_input):
        t = type(x)
        if t is np.ndarray:
            dev = None
        elif t.__module__.startswith("cupy"):
            dev = x.device.id
        else:
            return None
        side = None if side_input is None else (type(side_input), side_input.shape, side_input.strides,
                                                side_input.dtype, alignment_of(side_input))
        return (t, dev, x.shape, x.strides, x.dtype, alignment_of(x), is_training is True, side, _override.get(),
                one_launch_enabled())

    def _steady(self, x, is_training, side_input):
        """``(y, ctx)`` of a call with a plan, or None (the ordinary code runs)."""
        plans = self.__dict__.get("_plans")
        if not plans or not _lc._enabled or (is_training is not True and is_training is not False):
            return None
        try:
            key = self._steady_key(x, is_training, side_input)
            p = plans.get(key)
        except (AttributeError, TypeError):  # not an array: the ordinary code explains
            return None
        if p is None or p[0] != _lc._generation or p[1] is not self._vars:
            return None
        _, v, backend, plan, prog, shape3, acc, fold, bessel, mode, update = p
        # the backend fast_select would pick now (a use_backend slot can be given another backend object)
        if _backends.get((key[8] or ("numpy" if key[1] is None else "cupy"), key[1])) is not backend:
            return None
        x3 = x.reshape(shape3)
        side3 = None if side_input is None else side_input.reshape(shape3)
        act = self._act
        sdt = None if side3 is None else side3.dtype
        # prog None: the NumPy backend's small path (numpy_small), which the ordinary code takes too
        if mode == 1:  # training, moving statistics updated in place
            mm, mv = v["moving_mean"], v["moving_variance"]
            lock = self._threads.lock
            lock.acquire()
            try:
                epoch = self._epoch
                if prog is None:
                    y3, stats = _small.train(x3, acc, fold.eps, fold.gamma, fold.beta, side3, act, x3.dtype, update)
                else:
                    outs = prog.run([x3, side3, fold.gamma, fold.beta, mm, mm, mv, mv, None, None, None])
                    y3, stats = outs[0], Stats(*outs[1:])
                self._step += 1
            finally:
                lock.release()
            ctx = ForwardContext(backend, plan, acc, x3, side3, act, True, fold, stats, None, None, None, x3.dtype,
                                 sdt)
        elif mode == 2:  # training, update deferred to the collections
            epoch = self._epoch
            if prog is None:
                y3, stats = _small.train(x3, acc, fold.eps, fold.gamma, fold.beta, side3, act, x3.dtype, None)
            else:
                outs = prog.run([x3, side3, fold.gamma, fold.beta, None, None, None, None, None, None, None])
                y3, stats = outs[0], Stats(*outs[1:])
            ctx = ForwardContext(backend, plan, acc, x3, side3, act, True, fold, stats, None, None, None, x3.dtype,
                                 sdt)
            self._defer(self._deferred(backend, stats, bessel))
        else:  # inference
            warn_if_pending(self, self.updates_collections)
            epoch = self._epoch
            given = (v["moving_mean"], v["moving_variance"])
            if prog is None:
                y3 = _small.infer(x3, acc, fold.eps, fold.gamma, fold.beta, given[0], given[1], side3, act)
            else:
                y3 = prog.run([x3, side3, fold.gamma, fold.beta, None, None, None, None, None, given[0], given[1]])[0]
            ctx = ForwardContext(backend, plan, acc, x3, side3, act, False, fold, None, None, given, None, x3.dtype,
                                 sdt)
        y = y3.reshape(x.shape)
        training = mode != 3
        out = BatchNormContext(ctx, training, side3 is not None, None, weakref.ref(self), epoch)
        if self._custom is not None:
            out.z = y
            y = self._custom.forward(y)
        local = self._threads.local
        local.last = out
        if training:
            local.pending = out
        return y, out

    def _learn(self, backend, plan, x, training, side_input, ctx, fold, update, given, bessel):
        """Keep the plan of an ordinary call that a replay can stand for (see ``_steady``)."""
        if plan.perm is not None or not x.flags.c_contiguous:
            return
        if backend.info is None:  # the NumPy backend: its small path, when the ordinary code took it
            if not (_small.whole(ctx.x3, ctx.side3, ctx.act) and _small.plain_update(update) and fold.adj_scale is None
                    and fold.adj_bias is None and fold.renorm is None):
                return
        elif not _lc._enabled:
            return
        if side_input is not None and not side_input.flags.c_contiguous:
            return
        if fast_select(x, (side_input,)) is not backend or not plain_like(side_input, x):
            return  # the call converted or copied an argument: a replay would not
        try:
            key = self._steady_key(x, training, side_input)
        except (AttributeError, TypeError):
            return
        if key is None:
            return
        prog = None
        if backend.info is not None:
            pkey = _forward_key(backend, ctx.x3, ctx.acc, training, fold, update, given, ctx.side3, ctx.act)
            prog = None if pkey is None else _lc.program_of(backend, pkey)
            if prog is None:
                return
        mode = 3 if not training else (1 if update is not None else 2)
        plans = self.__dict__.get("_plans")
        if plans is None or len(plans) >= 64:
            plans = self.__dict__["_plans"] = {}
        plans[key] = (_lc._generation, self._vars, backend, plan, prog, ctx.x3.shape, ctx.acc, fold, bessel, mode,
                      update)

    def _fast_plan(self, x, batch_weights, side_input, mask):
        """``(backend, plan)`` of a call of a built layer whose arguments need no
        conversion and no check beyond these; None: the ordinary checks run."""
        if batch_weights is not None or mask is not None or self._channels is None:
            return None
        backend = fast_select(x, (side_input,))
        if backend is None or not _dtypes.is_supported_float(x.dtype):
            return None
        plan = plan_for_channels(x.shape, self.data_format, "BatchNorm")  # raises as the ordinary path would
        if plan.channels != self._channels or not plain_like(side_input, x):
            return None
        if type(x) is np.ndarray:
            if self._device is not None:
                return None
        elif x.device.id != self._device:
            return None
        return backend, plan

    def _forward(self, f, backend, plan, x, training, batch_weights, side_input, mask, learn=None):
        """The call's computation; ``learn`` (a list): receives ``(fold, update, given, bessel)``
        of a call that a steady-call plan may stand for."""
        xp = backend.xp
        ch_axis = 1 if (x.ndim > 2 and self.data_format == "NCHW") else x.ndim - 1
        acc = self._acc
        if _dtypes.acc_dtype(x.dtype) != acc:
            raise arg_error(TypeError, f, "x", f"a dtype that accumulates in {acc.name} (the layer's state dtype)",
                            f"dtype {np.dtype(x.dtype).name}")
        check_side_input(f, side_input, x)
        v = self._vars
        gamma = v.get("gamma")
        beta = v.get("beta")
        fold = Fold(self.epsilon, gamma, beta)
        x3 = plan.view3(x)
        side3 = None if side_input is None else plan.view3(side_input)
        fused_act = self._act
        weights = None
        update = None
        element_mask = None if mask is None else _element_mask(f, mask, x, ch_axis, xp)
        if training and self.virtual_batch_size is not None:
            y, ctx = self._ghost_call(backend, x, fold, side_input, fused_act, acc, batch_weights, element_mask)
            y3 = plan.view3(y)
        elif training:
            self._check_training_batch(plan, x)
            if batch_weights is not None:
                w = as_like(f, "batch_weights", batch_weights, x, xp)
                if w.ndim != 1 or w.shape[0] != x.shape[0]:
                    raise arg_error(ValueError, f, "batch_weights", f"shape ({x.shape[0]},)", f"shape {tuple(w.shape)}")
                if element_mask is not None:
                    w = w.reshape((w.shape[0],) + (1,) * (x.ndim - 1)) * element_mask
                weights = make_weights(f, "batch_weights", w, x.shape, plan, xp, acc)
            elif element_mask is not None:
                weights = make_weights(f, "mask", element_mask, x.shape, plan, xp, acc)
            if self.adjustment is not None:
                fold.adj_scale, fold.adj_bias = self._adjustment(x, plan, xp, acc)
            if self.renorm:
                clip = self.renorm_clipping
                fold.renorm = Renorm(v["renorm_mean"], v["renorm_stddev"], clip.get("rmin", 0.0),
                                     clip.get("rmax", math.inf), clip.get("dmax", math.inf))
            bessel = self._bessel(x.ndim, weights is not None)
            if self.updates_collections is None:
                update = self._moving_update(bessel, step=self._step + 1)
            # the cumulative average (1/t) and the zero-debias factor change with every call
            steady = self.decay is not None and not self.zero_debias_moving_mean
            y3, ctx = bn_forward(backend, plan, x3, acc, training=True, fold=fold, update=update,
                                 weights=weights, side3=side3, act=fused_act,
                                 exchange=self._exchange(backend, plan, x, weights is not None),
                                 cacheable=steady or update is None)
            if update is not None:
                self._step += 1
            else:
                self._defer(self._deferred(backend, ctx.stats, bessel))
            if (learn is not None and (steady or update is None) and weights is None and self.adjustment is None
                    and not self.renorm):
                learn.extend((fold, update, None, bessel))
        else:
            warn_if_pending(self, self.updates_collections)
            given = (v["moving_mean"], v["moving_variance"])
            y3, ctx = bn_forward(backend, plan, x3, acc, training=False, fold=fold,
                                 given=given, side3=side3, act=fused_act)
            if learn is not None and element_mask is None:
                learn.extend((fold, None, given, False))
        return plan.unview3(y3), ctx

    def _defer(self, update):
        for coll in resolve_collections(self.updates_collections):
            coll.append(update)

    # -- ghost batch normalization (virtual_batch_size) -----------------------
    def _ghost_call(self, backend, x, fold, side_input, act, acc, batch_weights, element_mask):
        """Training forward with ghost batches, from the ordinary forward per group."""
        f = "BatchNorm"
        vbs = self.virtual_batch_size
        for arg, given in (("batch_weights", batch_weights), ("mask", element_mask)):
            if given is not None:
                raise arg_error(ValueError, f, arg, "None with virtual_batch_size", "weights")
        if type(self)._exchange is not BatchNorm._exchange:
            raise arg_error(ValueError, f, "virtual_batch_size", "None for a distributed layer", repr(vbs))
        n = x.shape[0]
        if n == 0 or n % vbs:
            raise arg_error(ValueError, f, "x", f"a batch size that is a multiple of virtual_batch_size={vbs}",
                            f"shape {tuple(x.shape)}")
        groups = n // vbs
        xp = backend.xp
        y = xp.empty(x.shape, x.dtype)
        parts = []
        for j in range(groups):
            rows = slice(j, None, groups)  # tf-keras reshapes (N, ...) to (vbs, G, ...): group j = rows j, j+G, ...
            xj = x[rows]
            pj = plan_for_channels(xj.shape, self.data_format, f)
            self._check_training_batch(pj, xj)
            sj = None if side_input is None else pj.view3(side_input[rows])
            yj3, cj = bn_forward(backend, pj, pj.view3(xj), acc, training=True, fold=fold, side3=sj, act=act)
            y[rows] = pj.unview3(yj3)
            parts.append((rows, cj))
        bessel = self._bessel(x.ndim, False)
        mean = sum(c.stats.mean for _, c in parts) / acc.type(groups)
        count = parts[0][1].stats.count
        if bessel:
            k = count / xp.maximum(count - 1, 1)
            var = sum(c.stats.var * k for _, c in parts) / acc.type(groups)
        else:
            var = sum(c.stats.var for _, c in parts) / acc.type(groups)
        stats = Stats(count * groups, xp.ascontiguousarray(mean, dtype=acc), xp.ascontiguousarray(var, dtype=acc),
                      None, None, None, None, None)
        update = self._deferred(backend, stats, False)
        if self.updates_collections is None:
            update()
        else:
            self._defer(update)
        return y, _GhostContext(parts, plan_for_channels(x.shape, self.data_format, f), x, xp)

    # -- hooks SyncBatchNorm overrides -------------------------------------
    def _check_training_batch(self, plan, x):
        check_training_batch("BatchNorm", plan, x)
        if self.convention == "torch" and plan.per_channel == 1:
            raise ValueError(f"BatchNorm: expected more than 1 value per channel when training, got input of shape "
                             f"{tuple(x.shape)} (PyTorch's rule; this layer has convention='torch')")

    def _exchange(self, backend, plan, x, weighted):
        """None: statistics of this process's batch only."""
        return None

    def _ensure_built(self, x, channels, backend):
        on_gpu = is_cupy_array(x)
        if self._channels is None:
            device = x.device.id if on_gpu else None
            if self._device_fixed and device != self._device:
                raise TypeError(f"BatchNorm: the layer was put on {self.device} with to(), but 'x' is a "
                                f"{'cupy' if on_gpu else 'numpy'}.ndarray")
            self.build(channels, x.dtype, device)
            return
        if channels != self._channels:
            raise arg_error(ValueError, "BatchNorm", "x", f"{self._channels} channels (fixed by the first call)",
                            f"{channels} channels in shape {tuple(x.shape)}")
        if on_gpu != (self._device is not None) or (on_gpu and x.device.id != self._device):
            where = "the host" if self._device is None else f"CUDA device {self._device}"
            there = f"CUDA device {x.device.id}" if on_gpu else "the host"
            hint = "bn.to('cuda')" if on_gpu else "bn.to('cpu')"
            raise TypeError(f"BatchNorm: the layer's state is on {where} but 'x' is on {there}; "
                            f"cubn never copies behind your back: call {hint} first")

    def _bessel(self, ndim, weighted):
        if self.unbiased_moving_variance is not None:
            return self.unbiased_moving_variance
        if self.convention in ("keras3", "torch"):
            return self.convention == "torch"
        ranks = (4, 5) if self.convention == "tf_keras" else (2, 4, 5)
        fused_path = (self.fused in (None, True) and not weighted and not self.renorm
                      and self.adjustment is None and ndim in ranks and self.virtual_batch_size is None)
        return fused_path

    def _moving_update(self, bessel, step):
        v = self._vars
        a = 1.0 / step if self.decay is None else 1.0 - self.decay  # decay None: the cumulative average
        u = MovingUpdate(a=a, bessel=bessel, mean_in=v["moving_mean"], mean_out=v["moving_mean"],
                         var_in=v["moving_variance"], var_out=v["moving_variance"], eps=self.epsilon)
        if self.zero_debias_moving_mean:
            u.zd_biased = v[ZD_BIASED]
            u.zd_factor = 1.0 - self.decay ** step
        if self.renorm:
            u.renorm_a = 1.0 - self.renorm_decay
            u.renorm_mean, u.renorm_stddev = v["renorm_mean"], v["renorm_stddev"]
            u.moving_stddev = v["moving_stddev"]
        return u

    def _deferred_moving_update(self, bessel, xp):
        """The MovingUpdate a deferred update applies: the variables as they are when it runs."""
        if self._xp is not xp:
            raise RuntimeError("a pending BatchNorm update cannot run: the layer moved to another device since")
        return self._moving_update(bessel, self._step + 1)

    def _count_step(self):
        self._step += 1

    def _deferred(self, backend, stats, bessel):
        """The pending update of a training call (what ``updates_collections`` receives)."""
        return _DeferredUpdate(backend, stats, self._acc, functools.partial(self._deferred_moving_update, bessel),
                               self._count_step, self.__repr__, self._threads.lock, weakref.ref(self))

    def _adjustment(self, x, plan, xp, acc):
        out = self.adjustment(tuple(x.shape))
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise arg_error(TypeError, "BatchNorm", "adjustment", "a function returning (scale, bias)", describe(out))
        res = []
        for name, a in zip(("scale", "bias"), out):
            if is_array(a) and (is_cupy_array(a) != (xp is not np)):
                raise TypeError(f"BatchNorm: adjustment returned its {name} on the "
                                f"{'GPU' if is_cupy_array(a) else 'host'} but x is on the {'GPU' if xp is not np else 'host'}")
            res.append(channel_param("BatchNorm", f"adjustment {name}", a, plan, xp, acc))
        return tuple(res)

    # ------------------------------------------------------------------
    def backward(self, dy, ctx=None):
        """Gradient w.r.t. a forward call's x (and side input); fills ``gradients``.

        ``ctx``: the context ``forward`` returned. Without it, the calling
        thread's last call of the layer -- unless that was an inference call
        made after a training call whose backward has not run yet: which of
        the two ``dy`` belongs to is then ambiguous, and this raises
        RuntimeError (pass the context). Returns ``dx``, or ``(dx,
        d_side_input)`` when the forward had a side input; the gradients go
        to ``ctx.gradients`` and to ``bn.gradients`` (the calling thread's).
        """
        f = "BatchNorm.backward"
        handle = self._context_for(f, ctx)
        ctx, had_side, z = handle.op, handle.side_input, handle.z
        if fast_select(dy, (ctx.x3,)) is None or not _dtypes.is_supported_float(dy.dtype):
            dy, = take_dlpack(f, dy=dy)
            check_float_input(f, "dy", dy)
            select(f, "dy", dy, forward_input=ctx.x3)
            dy = readable(f, "dy", dy)
        if self._custom is not None:
            if not self._custom.has_backward:
                raise TypeError(
                    "BatchNorm.backward: activation_fn is a plain callable with no backward; give an object "
                    "with forward(z) and backward(z, dy), or a fused activation (a name or cubn.activations.*)")
            dy = readable(f, "activation_fn.backward's result", self._custom.backward(z, dy))
        for k, reg in self.param_regularizers.items():
            if self.trainable and not hasattr(reg, "gradient"):
                raise TypeError(f"BatchNorm.backward: param_regularizers[{k!r}] has no gradient(w); use "
                                "cubn.regularizers.* or an object with __call__ and gradient")
        plan = ctx.plan
        if tuple(dy.shape) != tuple(plan.orig_shape):
            raise arg_error(ValueError, f, "dy", f"the forward input's shape {plan.orig_shape}", f"shape {tuple(dy.shape)}")
        if dy.dtype != ctx.x_dtype:
            raise arg_error(TypeError, f, "dy", f"dtype {np.dtype(ctx.x_dtype).name}", f"dtype {np.dtype(dy.dtype).name}")
        if isinstance(ctx, _GhostContext):
            dx3, dgamma, dbeta, dside3 = ctx.backward(dy, had_side)
        else:
            dx3, dgamma, dbeta, dside3 = bn_backward(ctx, plan.view3(dy), had_side)
        grads = {}
        if self.trainable:
            if self.center:
                grads["beta"] = dbeta
            if self.scale:
                grads["gamma"] = dgamma
            for k, reg in self.param_regularizers.items():
                if k in grads:
                    grads[k] = grads[k] + reg.gradient(self._vars[k])
        handle.gradients = grads
        local = self._thread()
        local.gradients = grads
        if local.pending is handle:
            local.pending = None
        dx = plan.unview3(dx3)
        if had_side:
            return dx, plan.unview3(dside3)
        return dx

    def _context_for(self, f, ctx) -> BatchNormContext:
        """The forward context a backward call belongs to (see [`backward`][backward])."""
        if ctx is None:
            local = self._thread()
            ctx = local.last
            if ctx is None:
                raise RuntimeError(f"{f}: call the layer (forward) first; on this thread it has not been called "
                                   "since it was built or moved (each thread's backward(dy) uses that thread's "
                                   "own forward)")
            if not ctx.training and local.pending is not None:
                raise RuntimeError(
                    f"{f}: ambiguous: the last call on this thread was an inference call (is_training=False), "
                    "made after a training call whose backward has not run. Say which forward dy belongs to: "
                    "y, ctx = bn.forward(x, is_training=True, ...); ...; dx = bn.backward(dy, ctx)")
            return ctx
        if not isinstance(ctx, BatchNormContext):
            raise arg_error(TypeError, f, "ctx", "None or the context returned by this layer's forward()", describe(ctx))
        if ctx.layer is None or ctx.layer() is not self:
            raise arg_error(ValueError, f, "ctx", "a context returned by this layer's forward()",
                            "the context of another layer's call")
        if ctx.epoch != self._epoch:
            raise arg_error(ValueError, f, "ctx", "a context of the layer's current state",
                            "one from before the layer was rebuilt or moved to another device (build() or to())")
        return ctx

    # ------------------------------------------------------------------
    def get_config(self) -> dict:
        """The layer's arguments as JSON-ready values: ``from_config`` rebuilds the same layer.

        Built-in activations (with ``alpha``), ``cubn.regularizers`` (with
        their scales) and number or array ``param_initializers`` are stored.
        A custom ``activation_fn``, an ``adjustment`` function, any other
        regularizer, and a callable initializer of a layer not built yet
        cannot be: this raises TypeError naming the argument rather than
        describe a different layer. (Once built, the initializers no longer
        matter: the state holds what they gave.) ``updates_collections`` is
        stored as "in place or not"; a loaded layer that defers its updates
        uses ``cubn.UPDATE_OPS``.
        """
        return self._config(strict=True)

    def _config(self, strict: bool) -> dict:
        """``get_config``; with ``strict=False`` what cannot be stored is described
        by its type instead (SyncBatchNorm compares these across ranks)."""
        def refuse(arg, what, value):
            if strict:
                raise TypeError(f"BatchNorm.get_config: argument '{arg}' is {what} ({describe(value)}), which "
                                "cannot be stored: saving it would load as a different layer. Use a built-in "
                                "one, or save the state alone (bn.state_dict()) and rebuild the layer in code")
            return {"custom": type(value).__qualname__}

        if self._custom is not None:
            act = refuse("activation_fn", "a custom callable", self.activation_fn)
        elif self._act is not None:
            act = {"name": self._act.name, "alpha": self._act.alpha}
        else:
            act = None
        regs = {}
        for k, reg in self.param_regularizers.items():
            if isinstance(reg, L1L2):
                regs[k] = {"l1": reg.l1, "l2": reg.l2}
            else:
                regs[k] = refuse(f"param_regularizers[{k!r}]", "not a cubn.regularizers object", reg)
        inits = {}
        for k, init in (self.param_initializers if strict else {}).items():  # (initial state: not compared)
            if callable(init):
                if not self.built:
                    inits[k] = refuse(f"param_initializers[{k!r}]", "a callable (of a layer not built yet)", init)
            elif isinstance(init, numbers.Real) and not isinstance(init, bool):
                inits[k] = float(init)
            else:
                host = init.get() if is_cupy_array(init) else np.asarray(init)
                inits[k] = {"values": np.asarray(host, np.float64).reshape(-1).tolist(), "shape": list(host.shape)}
        adjustment = None if self.adjustment is None else refuse("adjustment", "a function", self.adjustment)
        cfg = dict(decay=self.decay, center=self.center, scale=self.scale, epsilon=self.epsilon,
                   activation_fn=act, trainable=self.trainable, fused=self.fused, data_format=self.data_format,
                   zero_debias_moving_mean=self.zero_debias_moving_mean, renorm=self.renorm,
                   renorm_clipping=dict(self.renorm_clipping), renorm_decay=self.renorm_decay,
                   unbiased_moving_variance=self.unbiased_moving_variance, name=self.name,
                   updates_in_place=self.updates_collections is None,
                   virtual_batch_size=self.virtual_batch_size, convention=self.convention)
        if regs:
            cfg["param_regularizers"] = regs
        if inits:
            cfg["param_initializers"] = inits
        if adjustment is not None:
            cfg["adjustment"] = adjustment
        return cfg

    @classmethod
    def from_config(cls, config: dict) -> "BatchNorm":
        """The layer ``get_config`` described (not built: load its state to build it)."""
        if not isinstance(config, dict):
            raise arg_error(TypeError, "BatchNorm.from_config", "config", "a dict from get_config()", describe(config))
        cfg = dict(config)
        act = cfg.pop("activation_fn", None)
        if isinstance(act, dict):
            a = activations.get(act.get("name"), "BatchNorm.from_config", "activation_fn")
            act = a(act["alpha"]) if a.has_alpha and "alpha" in act else a
        regs = {}
        for k, r in dict(cfg.pop("param_regularizers", None) or {}).items():
            if not isinstance(r, dict) or set(r) - {"l1", "l2"}:
                raise arg_error(ValueError, "BatchNorm.from_config", f"param_regularizers[{k!r}]",
                                "{'l1': float, 'l2': float}", repr(r))
            regs[k] = L1L2(l1=float(r.get("l1", 0.0)), l2=float(r.get("l2", 0.0)))
        inits = {}
        for k, v in dict(cfg.pop("param_initializers", None) or {}).items():
            if isinstance(v, dict) and set(v) == {"values", "shape"}:
                v = np.asarray(v["values"], np.float64).reshape(v["shape"])
            elif not isinstance(v, (int, float)) or isinstance(v, bool):
                raise arg_error(ValueError, "BatchNorm.from_config", f"param_initializers[{k!r}]",
                                "a number or {'values': [...], 'shape': [...]}", repr(v)[:100])
            inits[k] = v
        in_place = cfg.pop("updates_in_place", False)
        return cls(activation_fn=act, updates_collections=None if in_place else UPDATE_OPS,
                   param_regularizers=regs or None, param_initializers=inits or None, **cfg)

    def state_dict(self) -> dict:
        """Copies of every state array (in the layer's array library), by name."""
        if self._channels is None:
            return {}
        return {k: v.copy() for k, v in self.variables.items()}

    def _variable_names(self) -> list:
        """The state entries this layer has (or will have once built)."""
        names = (["beta"] if self.center else []) + (["gamma"] if self.scale else []) + ["moving_mean", "moving_variance"]
        if self.renorm:
            names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
        if self.zero_debias_moving_mean:
            names += [ZD_BIASED, ZD_STEP]
        if self.decay is None:
            names += [BATCHES_TRACKED]
        return names

    def load_state_dict(self, state: dict, strict: bool = True, *, allow_invalid: bool = False) -> None:
        """Load arrays by name (numpy or cupy; moved to the layer's device): all or nothing.

        Every entry is checked before any is assigned, so a refused state
        leaves the layer exactly as it was (an unbuilt layer stays unbuilt).
        An entry must hold one real number per channel (integers and floats
        are converted to the state dtype; complex, bool, string and object
        arrays are refused) that fits the state dtype. A NaN or infinite
        value, or a negative ``moving_variance`` / ``moving_stddev`` /
        ``renorm_stddev``, is an error unless ``allow_invalid=True``.

        Args:
            state: name -> array, as ``state_dict()`` gives.
            strict: the keys must be exactly this layer's (else a KeyError
                names the missing and unexpected ones); False loads the
                known keys present and ignores the rest.
            allow_invalid: load non-finite values and negative variances as given.
        """
        self._load_state(state, strict, allow_invalid, lambda k: f"load_state_dict: entry {k!r}")

    def _load_state(self, state, strict, allow_invalid, where):
        """load_state_dict, naming entry ``k`` as ``where(k)`` in its errors."""
        if not isinstance(state, Mapping):
            raise arg_error(TypeError, "load_state_dict", "state", "a dict name -> array", describe(state))
        state = dict(state)
        if self._channels is None:
            ref = state.get("moving_mean")
            if ref is None:
                raise arg_error(KeyError, "load_state_dict", "state", "a 'moving_mean' entry to size the layer",
                                f"keys {sorted(state)}")
            shape = tuple(getattr(ref, "shape", np.shape(ref)))
            if len(shape) != 1 or shape[0] < 1:
                raise ValueError(f"{where('moving_mean')}: expected shape (C,) with C >= 1 (it sizes the layer), "
                                 f"got shape {shape}")
            channels = shape[0]
            dt = np.dtype(getattr(ref, "dtype", np.float32))
            acc = np.dtype(np.float64 if dt == np.float64 else np.float32)
        else:
            channels, acc = self._channels, self._acc
        expected = set(self._variable_names())
        missing, unexpected = expected - set(state), set(state) - expected
        if strict and (missing or unexpected):
            raise arg_error(KeyError, "load_state_dict", "state", f"exactly the keys {sorted(expected)}",
                            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        checked, step = {}, None
        for k, a in state.items():
            if k in (ZD_STEP, BATCHES_TRACKED) and k in expected:
                step = _checked_step(where(k), a)
            elif k in expected:
                checked[k] = _checked_entry(where(k), k, a, channels, acc, allow_invalid)
        # Everything is valid: build if needed, move to the device, then assign (nothing left to fail).
        with self._threads.lock:
            if self._channels is None:
                self.build(channels, acc, self._device)
            xp = self._xp
            with _on_device(xp, self._device):
                moved = {k: xp.asarray(h) for k, h in checked.items()}
            for k, a in moved.items():
                self._vars[k][...] = a
            if step is not None:
                self._step = step

    # -- pickle / copy.deepcopy ---------------------------------------------
    def _transient(self) -> dict:
        """The attributes that belong to the running process, not to the layer
        (the array module; the per-thread forward contexts and gradients, and
        the update lock), with the values a copy starts from: pickle and
        copy.deepcopy leave them out."""
        xp = None
        if self._channels is not None:
            if self._device is None:
                xp = np
            else:
                import cupy as xp
        return {"_xp": xp, "_threads": _LayerThreads(), "_plans": {}}

    def __getstate__(self) -> dict:
        transient = self._transient()
        return {k: v for k, v in self.__dict__.items() if k not in transient}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.update(self._transient())

    def __deepcopy__(self, memo):
        # The copy sends its pending updates to the same collection as the
        # original (copying the collection would leave them where nobody runs them).
        if self.updates_collections is not None:
            memo.setdefault(id(self.updates_collections), self.updates_collections)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def __repr__(self) -> str:
        state = f"{self._channels} channels on {self.device}" if self._channels else "not built"
        return f"BatchNorm(name={self.name!r}, {state}, data_format={self.data_format!r})"


class _GhostContext:
    """The forward contexts of the ghost batches of one training call."""

    def __init__(self, parts, plan, x, xp):
        self.parts, self.plan, self.xp = parts, plan, xp
        self.x3 = parts[0][1].x3
        self.x_dtype = x.dtype

    def backward(self, dy, had_side):
        """``(dx3, dgamma, dbeta, dside3)`` in the whole batch's (outer, C, inner) view."""
        xp = self.xp
        dx = xp.empty(dy.shape, dy.dtype)
        dside = xp.empty(dy.shape, dy.dtype) if had_side else None
        dgamma = dbeta = None
        for rows, c in self.parts:
            dyj = dy[rows]
            dxj3, dg, db, dsj3 = bn_backward(c, c.plan.view3(dyj), had_side)
            dx[rows] = c.plan.unview3(dxj3)
            if had_side:
                dside[rows] = c.plan.unview3(dsj3)
            dgamma = dg if dgamma is None else dgamma + dg
            dbeta = db if dbeta is None else dbeta + db
        return (self.plan.view3(dx), dgamma, dbeta, None if dside is None else self.plan.view3(dside))


def _element_mask(func, mask, x, ch_axis, xp):
    """Keras 3's ``mask`` as 0/1 weights broadcastable to x.

    Nonzero counts (Keras casts the mask to bool). A mask with one axis less
    than x lines up with x without its channel axis (x.shape[:-1] for
    channels last, as in Keras); one of x's rank broadcasts against x.
    """
    m = as_like(func, "mask", mask, x, xp)
    if m.dtype.kind not in "biuf":
        raise arg_error(TypeError, func, "mask", "a boolean or numeric array", describe(mask))
    if m.ndim == x.ndim - 1:
        m = xp.expand_dims(m, ch_axis)
    elif m.ndim != x.ndim:
        without = tuple(n for a, n in enumerate(x.shape) if a != ch_axis)
        raise arg_error(ValueError, func, "mask", f"a shape broadcastable to {without} (x's shape without the "
                        f"channel axis) or to {tuple(x.shape)}", f"shape {tuple(m.shape)}")
    return (m != 0).astype(_dtypes.acc_dtype(x.dtype))


class _DeferredUpdate:
    """One pending moving-statistics update, appended to ``updates_collections``.

    It holds the batch statistics and three callbacks of its layer:
    ``make_update(xp)`` gives the ``MovingUpdate`` of the layer's variables
    as they are when the update runs (or raises), ``done()`` records that it
    ran, ``describe()`` names the layer; ``lock`` serializes the updates of
    one layer (reentrant: ``make_update`` may take it too); ``owner`` is a
    weak reference to the layer, for [`belongs_to`][belongs_to] only.
    """

    def __init__(self, backend, stats, acc, make_update, done, describe, lock, owner=None):
        self.backend, self.stats, self.acc = backend, stats, acc
        self.make_update, self.done, self.describe = make_update, done, describe
        self.lock, self.owner = lock, owner

    def belongs_to(self, layer) -> bool:
        """Whether this update is one of ``layer``'s (PendingUpdatesWarning asks)."""
        return self.owner is not None and self.owner() is layer

    def __call__(self):
        with self.lock:
            u = self.make_update(self.backend.xp)
            self.backend.moving_update(self.stats, self.acc, u)
            self.done()

    def __repr__(self):
        return f"<update of {self.describe()}>"

    def __reduce__(self):
        raise TypeError(f"{self!r} is pending: run cubn.run_updates() on its collection before pickling "
                        "or copying the collection")


_VARIANCES = ("moving_variance", "moving_stddev", "renorm_stddev")


def _host_array(where, a):
    if is_cupy_array(a):
        return a.get()
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # a torch tensor
        a = a.detach().cpu().numpy()
    try:
        return np.asarray(a)
    except Exception as e:  # noqa: BLE001 - any conversion failure means "not an array"
        raise TypeError(f"{where}: expected an array, got {describe(a)} ({e})") from None


def _checked_entry(where, key, a, channels, acc, allow_invalid):
    """One state entry as a new host array in ``acc``, or an error naming it."""
    host = _host_array(where, a)
    if host.dtype.kind not in "fiu" and not _dtypes.is_supported_float(host.dtype):
        raise TypeError(f"{where}: expected real numbers (a float or integer array), got dtype {host.dtype} "
                        f"({describe(a)})")
    if host.shape != (channels,):
        raise ValueError(f"{where}: expected shape ({channels},) (one value per channel), got shape {host.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = host.astype(acc)  # a copy, native and aligned
        finite_in = np.isfinite(host.astype(np.float64))
    if not allow_invalid:
        if not finite_in.all():
            bad = int(np.flatnonzero(~finite_in)[0])
            raise ValueError(f"{where}: non-finite value {host[bad]!r} at channel {bad}; pass allow_invalid=True "
                             "to load it anyway")
        if key in _VARIANCES and (out < 0).any():
            bad = int(np.flatnonzero(out < 0)[0])
            raise ValueError(f"{where}: negative value {host[bad]!r} at channel {bad} (a variance or standard "
                             "deviation); pass allow_invalid=True to load it anyway")
    if (finite_in & ~np.isfinite(out)).any():
        raise ValueError(f"{where}: values beyond the {acc.name} range of the layer's state")
    return out


def _checked_step(where, a):
    host = _host_array(where, a)
    if host.dtype.kind not in "fiu" or host.size != 1:
        raise TypeError(f"{where}: expected one integer (a step count), got {describe(host)}")
    v = float(host.reshape(-1)[0])
    if not (np.isfinite(v) and v >= 0 and v == int(v)):
        raise ValueError(f"{where}: expected a whole number >= 0 (a step count), got {v!r}")
    return int(v)


def _resolve_activation(fn):
    if fn is None:
        return None, None
    if isinstance(fn, (str, activations.Activation)):
        return activations.get(fn, "BatchNorm", "activation_fn"), None
    if callable(fn) or (hasattr(fn, "forward") and callable(fn.forward)):
        return None, CustomActivation(fn)
    raise arg_error(TypeError, "BatchNorm", "activation_fn", "None, an activation name, a cubn.activations object or a callable", describe(fn))


def _check_clipping(clip):
    if clip is None:
        return {}
    if not isinstance(clip, dict):
        raise arg_error(TypeError, "BatchNorm", "renorm_clipping", "a dict with keys among rmax, rmin, dmax", describe(clip))
    out = {}
    for k, v in clip.items():
        if k not in _CLIP_KEYS:
            raise arg_error(ValueError, "BatchNorm", "renorm_clipping", "keys among 'rmax', 'rmin', 'dmax'", repr(k))
        if v is None:
            continue
        out[k] = float(v)
    if out.get("rmin", 0.0) > out.get("rmax", math.inf):
        raise arg_error(ValueError, "BatchNorm", "renorm_clipping", "rmin <= rmax", repr(clip))
    if out.get("dmax", 0.0) < 0:
        raise arg_error(ValueError, "BatchNorm", "renorm_clipping", "dmax >= 0", repr(clip))
    return out


def _parse_device(device):
    if device is None:
        return None
    if not isinstance(device, str):
        raise arg_error(TypeError, "BatchNorm.to", "device", "'cpu', 'cuda' or 'cuda:N'", describe(device))
    d = device.lower()
    if d == "cpu":
        return None
    if d == "cuda":
        return 0
    if d.startswith("cuda:") and d[5:].isdigit():
        return int(d[5:])
    raise arg_error(ValueError, "BatchNorm.to", "device", "'cpu', 'cuda' or 'cuda:N'", repr(device))


class _on_device:
    """``with cupy.cuda.Device(id)`` for CuPy; nothing for NumPy."""

    def __init__(self, xp, device):
        self.ctx = xp.cuda.Device(device) if xp is not np and device is not None else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
