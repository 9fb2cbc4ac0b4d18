"""cubn's batch normalization as PyTorch modules: ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``.

Drop-in for ``torch.nn.BatchNorm1d/2d/3d``: the same constructor, parameters,
buffers and ``state_dict`` (so a torch checkpoint loads with
``strict=True``), the same training / eval behaviour and running-statistics
update, and autograd through a ``torch.autograd.Function``. The arithmetic
is cubn's: CUDA tensors run cubn's kernels through CuPy on torch's current
stream, CPU tensors run cubn's NumPy backend; tensors are exchanged without
copies (DLPack on the GPU, ``Tensor.numpy()`` on the host). Two additions:
a fused activation (``activation="relu"``) and a residual added before it
(``forward(x, side_input)``), as cuDNN's batch norm + add + activation.

``import cubn`` does not import torch; ``import cubn.torch`` does.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import _dtypes, activations
from ._backend import current_override, gpu_available, gpu_status, use_backend
from .ops.backward import batch_norm_backward
from .ops.normalization import fused_batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert_batchnorm"]


# ---------------------------------------------------------------------------
# tensors <-> arrays, without copies
# ---------------------------------------------------------------------------
def _cupy():
    if not gpu_available():
        raise RuntimeError("cubn.torch: CUDA tensors run cubn's kernels through CuPy, which cannot run here: "
                           + gpu_status())
    import cupy

    return cupy


def _array(t: torch.Tensor | None):
    """A NumPy (CPU) or CuPy (CUDA) array viewing the memory of ``t``."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type == "cuda":
        return _cupy().from_dlpack(t)
    if t.device.type != "cpu":
        raise TypeError(f"cubn.torch: tensors on {t.device.type!r} are not supported (CPU and CUDA are)")
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: ml_dtypes' type over the same bits
        if _dtypes.bfloat16 is None:
            raise TypeError("cubn.torch: bfloat16 CPU tensors need ml_dtypes (pip install ml_dtypes)")
        return t.view(torch.int16).numpy().view(_dtypes.bfloat16)
    return t.numpy()


def _tensor(a) -> torch.Tensor:
    """A tensor viewing the memory of a NumPy or CuPy array."""
    if isinstance(a, np.ndarray):
        if _dtypes.bfloat16 is not None and a.dtype == _dtypes.bfloat16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    return torch.from_dlpack(a)


@contextlib.contextmanager
def _on_stream_of(t: torch.Tensor, override):
    """Run cubn where ``t`` lives: for a CUDA tensor, CuPy's current device and
    stream become the tensor's device and torch's current stream, so cubn's
    kernels are ordered with torch's work and DLPack needs no synchronization.
    ``override`` is the ``cubn.use_backend`` choice of the forward pass, which
    backward (possibly on another thread) must use too."""
    with use_backend(override) if override else contextlib.nullcontext():
        if t.device.type != "cuda":
            yield
            return
        cp = _cupy()
        dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(dev)
        with cp.cuda.Device(dev), cp.cuda.ExternalStream(stream.cuda_stream, dev):
            yield


# channels_last memory: the NCHW tensor is an NHWC array seen through a permutation
_TO_CHANNELS_LAST = {4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}
_FROM_CHANNELS_LAST = {4: (0, 3, 1, 2), 5: (0, 4, 1, 2, 3)}
_MEMORY_FORMAT = {4: torch.channels_last, 5: torch.channels_last_3d}


def _is_channels_last(x: torch.Tensor) -> bool:
    fmt = _MEMORY_FORMAT.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _in_layout(t: torch.Tensor | None, channels_last: bool):
    """``t`` as cubn sees it: an NHWC array for channels_last, else the NCHW tensor's own array."""
    if t is None:
        return None
    if channels_last:
        n = t.dim()
        return _array(t.contiguous(memory_format=_MEMORY_FORMAT[n]).permute(_TO_CHANNELS_LAST[n]))
    return _array(t)


def _out_layout(a, channels_last: bool) -> torch.Tensor | None:
    if a is None:
        return None
    t = _tensor(a)
    return t.permute(_FROM_CHANNELS_LAST[t.dim()]) if channels_last else t


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Options:
    eps: float
    activation: Any          # cubn.activations.Activation or None
    batch_stats: bool        # normalize with the batch's statistics (else with the given ones)
    override: str | None     # cubn.use_backend in effect at forward time


class _BatchNormFunction(torch.autograd.Function):
    """``y = act(batch_norm(x) + side_input)``; also returns the batch mean and
    Bessel-corrected variance (non-differentiable) for the running update."""

    @staticmethod
    def forward(ctx, x, weight, bias, side_input, mean, var, opts: _Options):
        cl = _is_channels_last(x)
        fmt = "NHWC" if cl else "NCHW"
        C = x.shape[1]
        if x.numel() == 0:  # as torch: an empty output, no statistics
            y = torch.empty_like(x)
            bmean = bvar = x.new_zeros(C, dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
            ctx.empty = True
            ctx.save_for_backward(x, weight, bias, side_input)
            ctx.mark_non_differentiable(bmean, bvar)
            return y, bmean, bvar
        ctx.empty = False
        with _on_stream_of(x, opts.override):
            xa = _in_layout(x, cl)
            sa = _in_layout(side_input, cl)
            w, b = _array(weight), _array(bias)
            if opts.batch_stats:
                ya, m, v_unbiased = fused_batch_norm(xa, w, b, epsilon=opts.eps, data_format=fmt, is_training=True,
                                                     activation=opts.activation, side_input=sa)
                n = x.numel() // C
                bmean, bvar = _tensor(m), _tensor(v_unbiased)
                # backward needs the biased variance that y used (0 for a single value per channel)
                biased = v_unbiased * ((n - 1) / n) if n > 1 else v_unbiased * 0
                saved_mean, saved_var = bmean, _tensor(biased)
            else:
                ya, _, _ = fused_batch_norm(xa, w, b, _array(mean), _array(var), epsilon=opts.eps, data_format=fmt,
                                            is_training=False, activation=opts.activation, side_input=sa)
                bmean = bvar = None
                saved_mean, saved_var = mean, var
            y = _out_layout(ya, cl)
        ctx.opts, ctx.channels_last, ctx.fmt = opts, cl, fmt
        ctx.save_for_backward(x, weight, bias, side_input, saved_mean, saved_var)
        if bmean is None:
            bmean = bvar = x.new_empty(0)
        ctx.mark_non_differentiable(bmean, bvar)
        return y, bmean, bvar

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        need_x, need_w, need_b, need_side = ctx.needs_input_grad[:4]
        if ctx.empty:
            x, weight, bias, side = ctx.saved_tensors
            zeros = lambda t, need: torch.zeros_like(t) if need and t is not None else None  # noqa: E731
            return (zeros(x, need_x), zeros(weight, need_w), zeros(bias, need_b), zeros(side, need_side),
                    None, None, None)
        x, weight, bias, side, mean, var = ctx.saved_tensors
        opts, cl = ctx.opts, ctx.channels_last
        with _on_stream_of(x, opts.override):
            g = batch_norm_backward(_in_layout(dy, cl), _in_layout(x, cl), _array(weight), _array(mean), _array(var),
                                    opts.eps, offset=_array(bias), data_format=ctx.fmt, is_training=opts.batch_stats,
                                    activation=opts.activation, side_input=_in_layout(side, cl))
            dx = _out_layout(g.dx, cl) if need_x else None
            dside = _out_layout(g.dside_input, cl) if need_side else None
            dw = _tensor(g.dscale).to(weight.dtype) if need_w else None
            db = _tensor(g.doffset).to(bias.dtype) if need_b else None
        return dx, dw, db, dside, None, None, None


# ---------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------
class _BatchNorm(nn.Module):
    """What BatchNorm1d/2d/3d share: torch.nn.BatchNormNd's constructor, state and forward."""

    _version = 2  # torch's state_dict version for batch norm (num_batches_tracked exists)
    _dims: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 activation=None) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.activation = activations.get(activation, type(self).__name__, "activation")
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
             f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")
        if self.activation is not None:
            s += f", activation={self.activation.name!r}"
        return s

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A checkpoint from before num_batches_tracked existed (version < 2) loads with the count at 0, as in torch.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._dims:
            want = " or ".join(f"{d}D" for d in self._dims)
            raise ValueError(f"expected {want} input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor, side_input: torch.Tensor | None = None) -> torch.Tensor:
        """``act(batch_norm(x) + side_input)``; ``side_input`` (a residual) has ``x``'s shape."""
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected {self.num_features} channels on axis 1, "
                             f"got input of shape {tuple(x.shape)}")
        if side_input is not None and (side_input.shape != x.shape or side_input.dtype != x.dtype):
            raise ValueError(f"{type(self).__name__}: side_input must have x's shape {tuple(x.shape)} and dtype "
                             f"{x.dtype}, got {tuple(side_input.shape)} and {side_input.dtype}")
        for name, t in (("side_input", side_input), ("weight", self.weight), ("bias", self.bias),
                        ("running_mean", self.running_mean)):
            if t is not None and t.device != x.device:
                raise RuntimeError(f"{type(self).__name__}: input is on {x.device} but {name} is on {t.device}; "
                                   "move the module (module.to(device)) or the input")
        # torch.nn.BatchNormNd's bookkeeping, line for line in meaning
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        running_mean = self.running_mean if tracked else None
        running_var = self.running_var if tracked else None
        if self.training and x.numel() // x.shape[1] == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        opts = _Options(float(self.eps), self.activation, bool(batch_stats), current_override())
        y, bmean, bvar = _BatchNormFunction.apply(x, self.weight, self.bias, side_input,
                                                  None if batch_stats else running_mean,
                                                  None if batch_stats else running_var, opts)
        if batch_stats and running_mean is not None and x.numel() > 0:
            with torch.no_grad():  # running = (1 - f) * running + f * batch, with the Bessel-corrected variance
                running_mean.mul_(1.0 - factor).add_(bmean.to(running_mean.dtype), alpha=factor)
                running_var.mul_(1.0 - factor).add_(bvar.to(running_var.dtype), alpha=factor)
        return y


class BatchNorm1d(_BatchNorm):
    """``torch.nn.BatchNorm1d`` on cubn: input ``(N, C)`` or ``(N, C, L)``.

    Args: those of ``torch.nn.BatchNorm1d`` (``num_features, eps=1e-5,
    momentum=0.1, affine=True, track_running_stats=True, device=None,
    dtype=None, *, bias=True``), and ``activation``: None, a name such as
    ``"relu"`` or a ``cubn.activations`` object, fused after the
    normalization and the optional ``side_input`` of ``forward``.
    """

    _dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """``torch.nn.BatchNorm2d`` on cubn: input ``(N, C, H, W)``, contiguous or channels_last.

    Args: as [`BatchNorm1d`][BatchNorm1d].
    """

    _dims = (4,)


class BatchNorm3d(_BatchNorm):
    """``torch.nn.BatchNorm3d`` on cubn: input ``(N, C, D, H, W)``, contiguous or channels_last_3d.

    Args: as [`BatchNorm1d`][BatchNorm1d].
    """

    _dims = (5,)


_REPLACES = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` inside ``module`` by cubn's, with its state.

    Parameters, buffers, training mode, device and dtype carry over; returns
    the module (a new one when ``module`` itself is a batch norm), as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does. Subclasses of
    torch's batch norms (``SyncBatchNorm``, lazy ones) are left alone.
    """
    cls = _REPLACES.get(type(module))
    if cls is not None:
        ref = module.weight if module.weight is not None else module.running_mean
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype,
                  bias=module.bias is not None)
        new.load_state_dict(module.state_dict())
        for name in ("weight", "bias"):
            if getattr(module, name) is not None:
                getattr(new, name).requires_grad_(getattr(module, name).requires_grad)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = convert_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
