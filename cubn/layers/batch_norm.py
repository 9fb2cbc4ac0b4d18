"""``cubn.BatchNorm``: tf.contrib.layers.batch_norm as a small stateful object.

The layer holds variables and calls the functional ops (``cubn.ops``); the
math lives there. Arguments and defaults are those of
``tf.contrib.layers.batch_norm`` (see docs/migrating.md for each one).
"""
from __future__ import annotations

import functools
import math
import numpy as np

from .. import _dtypes, activations
from .._backend import gpu_available, is_array, is_cupy_array, select
from .._checks import arg_error, check_float_input, check_positive_epsilon, check_unit_interval, describe
from .._plan import plan_for_channels
from ..backends.base import Fold, MovingUpdate, Renorm
from .._args import as_like, channel_param, make_weights
from ..ops.normalization import bn_backward, bn_forward, check_side_input, check_training_batch
from ..updates import UPDATE_OPS

_CLIP_KEYS = ("rmax", "rmin", "dmax")
_PARAM_NAMES = ("beta", "gamma", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
ZD_BIASED = "moving_mean/biased"
ZD_STEP = "moving_mean/local_step"


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
    given). ``bn.variables`` maps names to the live state arrays;
    ``bn.gradients`` holds d beta / d gamma after ``backward``.

    Args:
        decay: moving-average decay: ``moving -= (1 - decay) * (moving - batch)``.
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
            update (default ``cubn.UPDATE_OPS``; run with ``cubn.run_updates``),
            or None to update in place during the call.
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
        name: a label.
    """

    def __init__(self, decay=0.999, center=True, scale=False, epsilon=0.001, activation_fn=None,
                 param_initializers=None, param_regularizers=None, updates_collections=UPDATE_OPS,
                 trainable=True, fused=None, data_format="NHWC", zero_debias_moving_mean=False,
                 renorm=False, renorm_clipping=None, renorm_decay=0.99, adjustment=None,
                 unbiased_moving_variance=None, name=None):
        f = "BatchNorm"
        self.decay = check_unit_interval(f, "decay", decay)
        self.center = bool(center)
        self.scale = bool(scale)
        self.epsilon = check_positive_epsilon(f, "epsilon", epsilon)
        self.activation_fn = activation_fn
        self._act, self._custom = _resolve_activation(activation_fn)
        self.param_initializers = dict(param_initializers or {})
        self.param_regularizers = dict(param_regularizers or {})
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
        self._ctx = None
        self.gradients: dict = {}

    # ------------------------------------------------------------------
    # variables
    @property
    def variables(self) -> dict:
        """Name -> live state array (``moving_mean/local_step`` is a 0-d copy)."""
        out = dict(self._vars)
        if self.zero_debias_moving_mean and self._vars:
            out[ZD_STEP] = self._xp.asarray(self._step, dtype=self._acc)
        return out

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
        if is_array(v) and not isinstance(v, xp.ndarray):
            where = "host" if isinstance(v, np.ndarray) else "GPU"
            raise TypeError(f"BatchNorm: param_initializers[{name!r}] gave an array on the {where}, "
                            f"but the layer is being built on {'the GPU' if xp is not np else 'the host'}")
        arr = xp.asarray(v, dtype=acc) if not np.isscalar(v) else xp.full((c,), v, dtype=acc)
        if arr.ndim == 0:
            arr = xp.full((c,), arr, dtype=acc)
        if arr.shape != (c,):
            raise arg_error(ValueError, "BatchNorm", f"param_initializers[{name!r}]", f"shape ({c},)", f"shape {tuple(arr.shape)}")
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
        self._vars, self._channels, self._acc, self._xp, self._device = v, c, acc, xp, device
        self._step = 0
        return self

    def to(self, device: str):
        """Move the state to ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``; returns self."""
        dev = _parse_device(device)
        if dev is not None and not gpu_available():
            raise RuntimeError(f"BatchNorm.to({device!r}): no CUDA device is available")
        if self._channels is not None and dev != self._device:
            if dev is None:
                self._vars = {k: v.get() if is_cupy_array(v) else v for k, v in self._vars.items()}
                self._xp = np
            else:
                import cupy

                with cupy.cuda.Device(dev):
                    self._vars = {k: cupy.asarray(v) for k, v in self._vars.items()}
                self._xp = cupy
            self._ctx = None
            self.gradients = {}
        self._device = dev
        self._device_fixed = True
        return self

    # ------------------------------------------------------------------
    def __call__(self, x, is_training=True, batch_weights=None, side_input=None):
        f = "BatchNorm"
        check_float_input(f, "x", x)
        backend = select(f, "x", x, batch_weights=batch_weights, side_input=side_input)
        xp = backend.xp
        plan = plan_for_channels(x.shape, self.data_format, f)
        ch_axis = 1 if (x.ndim > 2 and self.data_format == "NCHW") else x.ndim - 1
        self._ensure_built(x, plan.channels, backend)
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
        training = bool(is_training)
        weights = None
        update = None
        if training:
            self._check_training_batch(plan, x)
            if batch_weights is not None:
                w = as_like(f, "batch_weights", batch_weights, x, xp)
                if w.ndim != 1 or w.shape[0] != x.shape[0]:
                    raise arg_error(ValueError, f, "batch_weights", f"shape ({x.shape[0]},)", f"shape {tuple(w.shape)}")
                weights = make_weights(f, "batch_weights", w, x.shape, plan, xp, acc)
            if self.adjustment is not None:
                fold.adj_scale, fold.adj_bias = self._adjustment(x, plan, xp, acc)
            if self.renorm:
                clip = self.renorm_clipping
                fold.renorm = Renorm(v["renorm_mean"], v["renorm_stddev"], clip.get("rmin", 0.0),
                                     clip.get("rmax", math.inf), clip.get("dmax", math.inf))
            bessel = self._bessel(x.ndim, batch_weights is not None)
            if self.updates_collections is None:
                update = self._moving_update(bessel, step=self._step + 1)
                self._step += 1
            y3, ctx = bn_forward(backend, plan, x3, acc, training=True, fold=fold, update=update,
                                 weights=weights, side3=side3, act=fused_act,
                                 exchange=self._exchange(backend, plan, x, batch_weights is not None))
            if self.updates_collections is not None:
                self.updates_collections.append(_DeferredUpdate(
                    backend, ctx.stats, acc, functools.partial(self._deferred_moving_update, bessel),
                    self._count_step, self.__repr__))
        else:
            y3, ctx = bn_forward(backend, plan, x3, acc, training=False, fold=fold,
                                 given=(v["moving_mean"], v["moving_variance"]), side3=side3, act=fused_act)
        y = plan.unview3(y3)
        z = None
        if self._custom is not None:
            z = y
            y = self._custom.forward(z)
        self._ctx = (ctx, side_input is not None, z, ch_axis)
        return y

    # -- hooks SyncBatchNorm overrides -------------------------------------
    def _check_training_batch(self, plan, x):
        check_training_batch("BatchNorm", plan, x)

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
        fused_path = (self.fused in (None, True) and not weighted and not self.renorm
                      and self.adjustment is None and ndim in (2, 4, 5))
        return fused_path

    def _moving_update(self, bessel, step):
        v = self._vars
        u = MovingUpdate(a=1.0 - self.decay, bessel=bessel, mean_in=v["moving_mean"], mean_out=v["moving_mean"],
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
    def backward(self, dy):
        """Gradient w.r.t. the last call's x (and side input); fills ``self.gradients``."""
        if self._ctx is None:
            raise RuntimeError("BatchNorm.backward: call the layer (forward) first")
        ctx, had_side, z, ch_axis = self._ctx
        f = "BatchNorm.backward"
        check_float_input(f, "dy", dy)
        select(f, "dy", dy, forward_input=ctx.x3)
        if self._custom is not None:
            if not self._custom.has_backward:
                raise TypeError(
                    "BatchNorm.backward: activation_fn is a plain callable with no backward; give an object "
                    "with forward(z) and backward(z, dy), or a fused activation (a name or cubn.activations.*)")
            dy = self._custom.backward(z, dy)
        for k, reg in self.param_regularizers.items():
            if self.trainable and not hasattr(reg, "gradient"):
                raise TypeError(f"BatchNorm.backward: param_regularizers[{k!r}] has no gradient(w); use "
                                "cubn.regularizers.* or an object with __call__ and gradient")
        plan = ctx.plan
        if tuple(dy.shape) != tuple(plan.orig_shape):
            raise arg_error(ValueError, f, "dy", f"the forward input's shape {plan.orig_shape}", f"shape {tuple(dy.shape)}")
        if dy.dtype != ctx.x_dtype:
            raise arg_error(TypeError, f, "dy", f"dtype {np.dtype(ctx.x_dtype).name}", f"dtype {np.dtype(dy.dtype).name}")
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
        self.gradients = grads
        dx = plan.unview3(dx3)
        if had_side:
            return dx, plan.unview3(dside3)
        return dx

    # ------------------------------------------------------------------
    def get_config(self) -> dict:
        act = self.activation_fn
        if isinstance(act, activations.Activation):
            act = {"name": act.name, "alpha": act.alpha}
        elif act is not None and not isinstance(act, str):
            act = None  # a custom callable cannot be stored
        return dict(decay=self.decay, center=self.center, scale=self.scale, epsilon=self.epsilon,
                    activation_fn=act, trainable=self.trainable, fused=self.fused, data_format=self.data_format,
                    zero_debias_moving_mean=self.zero_debias_moving_mean, renorm=self.renorm,
                    renorm_clipping=dict(self.renorm_clipping), renorm_decay=self.renorm_decay,
                    unbiased_moving_variance=self.unbiased_moving_variance, name=self.name,
                    updates_in_place=self.updates_collections is None)

    @classmethod
    def from_config(cls, config: dict) -> "BatchNorm":
        cfg = dict(config)
        act = cfg.pop("activation_fn", None)
        if isinstance(act, dict):
            act = activations.get(act["name"])(act["alpha"]) if activations.get(act["name"]).has_alpha else activations.get(act["name"])
        in_place = cfg.pop("updates_in_place", False)
        return cls(activation_fn=act, updates_collections=None if in_place else UPDATE_OPS, **cfg)

    def state_dict(self) -> dict:
        """Copies of every state array (in the layer's array library), by name."""
        if self._channels is None:
            return {}
        return {k: v.copy() for k, v in self.variables.items()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Load arrays by name (numpy or cupy; moved to the layer's device)."""
        state = dict(state)
        step = state.pop(ZD_STEP, None)
        if self._channels is None:
            ref = state.get("moving_mean")
            if ref is None:
                raise arg_error(ValueError, "load_state_dict", "state", "a 'moving_mean' entry to size the layer", sorted(state))
            self.build(ref.shape[0], ref.dtype if np.dtype(ref.dtype).name in _dtypes.ACC_NAMES else "float32",
                       self._device)
        expected = set(self._vars)
        missing, unexpected = expected - set(state), set(state) - expected
        if strict and (missing or unexpected):
            raise arg_error(KeyError, "load_state_dict", "state", f"exactly the keys {sorted(expected)}",
                            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        xp = self._xp
        for k, a in state.items():
            if k not in self._vars:
                continue
            host = a.get() if is_cupy_array(a) else np.asarray(a)
            if host.shape != (self._channels,):
                raise arg_error(ValueError, "load_state_dict", k, f"shape ({self._channels},)", f"shape {host.shape}")
            with _on_device(xp, self._device):
                self._vars[k][...] = xp.asarray(host.astype(self._acc))
        if step is not None:
            self._step = int(np.asarray(step.get() if is_cupy_array(step) else step))

    def __repr__(self) -> str:
        state = f"{self._channels} channels on {self.device}" if self._channels else "not built"
        return f"BatchNorm(name={self.name!r}, {state}, data_format={self.data_format!r})"


class _DeferredUpdate:
    """One pending moving-statistics update, appended to ``updates_collections``.

    It holds the batch statistics and three callbacks of its layer:
    ``make_update(xp)`` gives the ``MovingUpdate`` of the layer's variables
    as they are when the update runs (or raises), ``done()`` records that it
    ran, ``describe()`` names the layer.
    """

    def __init__(self, backend, stats, acc, make_update, done, describe):
        self.backend, self.stats, self.acc = backend, stats, acc
        self.make_update, self.done, self.describe = make_update, done, describe

    def __call__(self):
        u = self.make_update(self.backend.xp)
        self.backend.moving_update(self.stats, self.acc, u)
        self.done()

    def __repr__(self):
        return f"<update of {self.describe()}>"


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
