"""cubn.torch against torch.nn.BatchNorm1d/2d/3d: outputs, running statistics,
gradients (and torch.autograd.gradcheck), state_dict, training in a net.

CPU tensors run on the NumPy backend and, inside ``cubn.use_backend("emulated")``,
on the CUDA kernel sources compiled for the CPU. The CUDA tests at the end
(named ``*_cupy`` so that ``bench/gpu_session.sh`` picks them up) need a GPU
and a CUDA build of torch.
"""
from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

import cubn
from conftest import backend_skip_reason

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'cubn[torch]')")
ct = pytest.importorskip("cubn.torch")
nn = torch.nn

# float64 compares to rounding; float32 to float32 rounding of data with offsets
TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SHAPES = {1: [(7, 3), (5, 3, 4)], 2: [(4, 3, 3, 5)], 3: [(2, 3, 2, 3, 2)]}
CLASSES = {1: (ct.BatchNorm1d, nn.BatchNorm1d), 2: (ct.BatchNorm2d, nn.BatchNorm2d),
           3: (ct.BatchNorm3d, nn.BatchNorm3d)}


@pytest.fixture(params=["numpy", "emulated"])
def cpu_backend(request):
    """cubn's backend for CPU tensors: NumPy, or the kernels on the emulator."""
    reason = backend_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    with cubn.use_backend(request.param) if request.param == "emulated" else _nothing():
        yield request.param


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def close(a, b, dtype, what, scale=None, cond=1.0):
    """|a - b| <= tol * scale, where tol grows with the data's conditioning
    ``cond`` = max|x| / std(x): a float32 input at 1e4 + N(0, 1) is itself
    only known to ~1e-3 of its spread, whoever normalizes it."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (what, a.shape, b.shape)
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    assert torch.equal(fa, fb), f"{what}: non-finite pattern differs"
    if not fb.any():
        return
    s = scale if scale is not None else max(1.0, b[fb].abs().max().item())
    err = (a[fb] - b[fb]).abs().max().item() / s
    tol = TOL[dtype] + 8 * torch.finfo(dtype).eps * cond
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def cond(x):
    x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
    return (x.abs().amax(1) / x.std(1, correction=0).clamp_min(1e-30)).clamp_max(1e6).max().item()


def twins(dim, momentum=0.1, affine=True, track=True, dtype=torch.float64, rng=None, ref_dtype=None, **kw):
    """A cubn module and a torch module with the same random affine parameters."""
    cls, tcls = CLASSES[dim]
    mine = cls(3, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype, **kw)
    ref = tcls(3, momentum=momentum, affine=affine, track_running_stats=track, dtype=ref_dtype or dtype)
    if affine:
        with torch.no_grad():
            for p, q in ((mine.weight, ref.weight), (mine.bias, ref.bias)):
                p.copy_(torch.tensor(rng.uniform(0.5, 1.5, 3) if p is mine.weight else rng.normal(0, 1, 3)))
                q.copy_(p)
    return mine, ref


def data(rng, shape, dtype, kind="normal"):
    x = rng.normal(2.0, 3.0, shape)
    if kind == "offset":
        x = 1e4 + rng.normal(0, 1, shape)
    elif kind == "constant_channel":
        x[:, 1] = 7.25
    elif kind == "quantized":
        x = np.round(x * 4) / 4
    return torch.tensor(x, dtype=dtype)


def _grads(module):
    return [p.grad for p in (module.weight, module.bias) if p is not None]


# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dim,shape", [(d, s) for d, ss in SHAPES.items() for s in ss])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_torch_module(cpu_backend, rng, dim, shape, momentum, affine, track, dtype):
    if cpu_backend == "emulated" and (dtype == torch.float32 or momentum is None) and (affine, track) != (True, True):
        pytest.skip("emulated: float64 and the default flags (every combination runs on numpy)")
    # the reference is torch's module in float64 on the same (rounded) input
    mine, ref = twins(dim, momentum, affine, track, dtype, rng, ref_dtype=torch.float64)
    kinds = ["normal", "offset", "constant_channel", "quantized"]
    c_max = 1.0
    for step in range(3):  # train: the running statistics move (cumulative with momentum=None)
        x = data(rng, shape, dtype, kinds[(step + rng.integers(4)) % 4]).requires_grad_()
        x2 = x.detach().double().requires_grad_()
        c = cond(x)
        c_max = max(c, c_max)
        y, y2 = mine(x), ref(x2)
        dy = torch.tensor(rng.normal(0, 1, shape), dtype=dtype)
        y.backward(dy)
        y2.backward(dy.double())
        close(y, y2, dtype, f"y step {step}", cond=c)
        close(x.grad, x2.grad, dtype, "dx", scale=x2.grad.abs().max().item() + 1e-30, cond=c)
        for g, g2, what in zip(_grads(mine), _grads(ref), ("dweight", "dbias")):
            close(g, g2, dtype, what, scale=g2.abs().max().item() + 1, cond=c)
        for p in (mine, ref):
            p.zero_grad()
    sd, sd2 = mine.state_dict(), ref.state_dict()
    assert list(sd) == list(sd2)
    for k in sd:
        assert sd[k].shape == sd2[k].shape, k
        assert sd[k].dtype == (sd2[k].dtype if k == "num_batches_tracked" else dtype), k
        if k == "num_batches_tracked":
            assert sd[k].item() == sd2[k].item() == 3
        else:
            close(sd[k], sd2[k], dtype, k, cond=c_max)
    mine.eval()
    ref.eval()  # eval: the running statistics (batch statistics when they are not tracked)
    x = data(rng, shape, dtype).requires_grad_()
    x2 = x.detach().double().requires_grad_()
    y, y2 = mine(x), ref(x2)
    close(y, y2, dtype, "eval y", cond=c_max)
    dy = torch.tensor(rng.normal(0, 1, shape), dtype=dtype)
    y.backward(dy)
    y2.backward(dy.double())
    close(x.grad, x2.grad, dtype, "eval dx", scale=x2.grad.abs().max().item() + 1e-30, cond=c_max)


@pytest.mark.parametrize("mode", ["train", "eval", "untracked_eval"])
@pytest.mark.parametrize("with_side,activation", [(False, None), (True, "relu")])
def test_gradcheck_float64(cpu_backend, rng, mode, with_side, activation):
    if cpu_backend == "emulated" and (mode, with_side) != ("train", True):
        pytest.skip("emulated: training with a residual and ReLU (every case runs on numpy)")
    m = ct.BatchNorm2d(3, activation=activation, track_running_stats=mode != "untracked_eval", dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, 3)))
        m.bias.copy_(torch.tensor(rng.normal(0, 0.3, 3)))
        if m.running_mean is not None:
            m.running_mean.copy_(torch.tensor(rng.normal(0, 1, 3)))
            m.running_var.copy_(torch.tensor(rng.uniform(0.5, 2, 3)))
    m.train(mode == "train")
    x = torch.tensor(rng.normal(1, 2, (3, 3, 2, 2)), requires_grad=True)
    side = torch.tensor(rng.normal(0, 1, (3, 3, 2, 2)), requires_grad=True) if with_side else None
    inputs = (x, m.weight, m.bias) + ((side,) if with_side else ())
    f = (lambda x, w, b, s: m(x, s)) if with_side else (lambda x, w, b: m(x))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu", None])
def test_fused_activation_and_residual_equal_torch_ops(cpu_backend, rng, activation):
    dtype = torch.float64
    mine, ref = twins(2, rng=rng, activation=activation)
    act = {"relu": torch.relu, "gelu": nn.functional.gelu, None: lambda t: t}[activation]
    x = data(rng, (4, 3, 2, 3), dtype).requires_grad_()
    side = torch.tensor(rng.normal(0, 3, (4, 3, 2, 3)), requires_grad=True)
    x2, side2 = (t.detach().clone().requires_grad_() for t in (x, side))
    y, y2 = mine(x, side), act(ref(x2) + side2)
    dy = torch.tensor(rng.normal(0, 1, y.shape))
    y.backward(dy)
    y2.backward(dy)
    close(y, y2, dtype, "y")
    close(x.grad, x2.grad, dtype, "dx", scale=x2.grad.abs().max().item())
    close(side.grad, side2.grad, dtype, "dside", scale=side2.grad.abs().max().item())
    close(mine.weight.grad, ref.weight.grad, dtype, "dweight", scale=ref.weight.grad.abs().max().item() + 1)
    assert "activation='" + (activation or "") in repr(mine) or activation is None


@pytest.mark.parametrize("dim", [2, 3])
def test_channels_last_runs_as_nhwc_without_copies(cpu_backend, rng, dim, monkeypatch):
    shape = (4, 3, 3, 5) if dim == 2 else (2, 3, 2, 3, 2)
    fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
    mine, ref = twins(dim, rng=rng, dtype=torch.float32, activation="relu")
    x = data(rng, shape, torch.float32).contiguous(memory_format=fmt).requires_grad_()
    side = data(rng, shape, torch.float32).contiguous(memory_format=fmt)
    seen = []
    real = ct.fused_batch_norm

    def spy(xa, *args, **kwargs):
        seen.append((kwargs["data_format"], xa.flags.c_contiguous,
                     np.shares_memory(xa, x.detach().numpy()), np.shares_memory(kwargs["side_input"], side.numpy())))
        return real(xa, *args, **kwargs)

    monkeypatch.setattr(ct, "fused_batch_norm", spy)
    y = mine(x, side)
    assert seen == [("NHWC", True, True, True)]
    assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous()
    x2 = x.detach().clone().requires_grad_()
    y2 = torch.relu(ref(x2) + side)
    close(y, y2, torch.float32, "y")
    dy = torch.tensor(rng.normal(0, 1, shape), dtype=torch.float32)  # contiguous: converted to x's layout
    y.backward(dy)
    y2.backward(dy)
    assert x.grad.is_contiguous(memory_format=fmt)
    close(x.grad, x2.grad, torch.float32, "dx", scale=x2.grad.abs().max().item())


def test_contiguous_input_is_not_copied(rng, monkeypatch):
    m = ct.BatchNorm2d(3)
    x = data(rng, (2, 3, 4, 4), torch.float32)
    seen = []
    real = ct.fused_batch_norm
    monkeypatch.setattr(ct, "fused_batch_norm", lambda xa, *a, **k: seen.append(
        (k["data_format"], np.shares_memory(xa, x.numpy()))) or real(xa, *a, **k))
    m(x)
    m.eval()
    m(x)
    assert seen == [("NCHW", True)] * 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs(cpu_backend, rng, dtype):
    mine, ref = twins(2, rng=rng, dtype=torch.float32)
    x = data(rng, (4, 3, 3, 3), dtype).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = mine(x), ref(x2)
    assert y.dtype == dtype
    close(y, y2, dtype, "y")
    y.float().sum().backward()
    y2.float().sum().backward()
    close(mine.weight.grad, ref.weight.grad, dtype, "dweight", scale=ref.weight.grad.abs().max().item() + 1)
    close(mine.running_var, ref.running_var, dtype, "running_var")


def test_trains_in_a_sequential_net_with_a_torch_optimizer(rng):
    torch.manual_seed(int(rng.integers(2**31)))

    def net(bn):
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), bn(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))

    mine, ref = net(ct.BatchNorm2d).double(), net(nn.BatchNorm2d).double()
    ref.load_state_dict(mine.state_dict(), strict=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (mine, ref)]
    x = torch.tensor(rng.normal(0, 1, (16, 2, 5, 5)))
    target = torch.tensor(rng.integers(0, 4, 16))
    losses = []
    for _ in range(5):
        for m, opt in zip((mine, ref), opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-2] < losses[0]  # it learns
    for (k, a), (_, b) in zip(mine.state_dict().items(), ref.state_dict().items()):
        close(a, b, torch.float64, k)
    assert isinstance(mine[1].weight, nn.Parameter)


def test_state_dict_loads_strictly_both_ways(rng):
    ref = nn.BatchNorm2d(5, momentum=0.3)
    ref(torch.tensor(rng.normal(0, 1, (4, 5, 2, 2)), dtype=torch.float32))
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    mine = ct.BatchNorm2d(5, momentum=0.3)
    assert mine.load_state_dict(torch.load(buf), strict=True).missing_keys == []
    for k, v in ref.state_dict().items():
        assert torch.equal(mine.state_dict()[k], v), k
    back = nn.BatchNorm2d(5)
    back.load_state_dict(mine.state_dict(), strict=True)
    assert mine.state_dict()._metadata[""]["version"] == ref.state_dict()._metadata[""]["version"]
    # a checkpoint from before num_batches_tracked (version 1) loads with the count at 0, as in torch
    old = {k: v for k, v in ref.state_dict().items() if k != "num_batches_tracked"}
    old = type(ref.state_dict())(old)
    old._metadata = {"": {"version": 1}}
    mine.load_state_dict(old, strict=True)
    assert mine.num_batches_tracked.item() == 0
    # constructor, parameters and buffers as torch's
    for kw in ({}, {"affine": False}, {"track_running_stats": False}, {"bias": False}, {"momentum": None}):
        a, b = ct.BatchNorm1d(4, **kw), nn.BatchNorm1d(4, **kw)
        assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
        assert [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()]
        assert a.extra_repr() == b.extra_repr()


def test_empty_batch_as_torch(rng):
    mine, ref = twins(2, rng=rng, momentum=0.5)
    x = torch.zeros((0, 3, 2, 2), dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = mine(x), ref(x2)
    assert y.shape == y2.shape
    y.sum().backward()
    y2.sum().backward()
    assert torch.equal(mine.weight.grad, ref.weight.grad)
    for k, v in ref.state_dict().items():
        assert torch.equal(mine.state_dict()[k], v), k


def test_errors_read_like_torch(rng):
    m = ct.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        m(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(torch.zeros(1, 3, 1, 1))
    m.eval()
    assert m(torch.zeros(1, 3, 1, 1)).shape == (1, 3, 1, 1)  # inference: fine
    with pytest.raises(ValueError, match="3 channels"):
        m(torch.zeros(2, 4, 1, 1))
    with pytest.raises(ValueError, match="side_input"):
        m(torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 1))
    with pytest.raises(ValueError, match="activation"):
        ct.BatchNorm1d(3, activation="nope")


def test_backward_on_another_thread_uses_the_forward_backend(emulated_launches, rng):
    m = ct.BatchNorm2d(3, dtype=torch.float64)
    x = data(rng, (2, 3, 2, 2), torch.float64).requires_grad_()
    with cubn.use_backend("emulated"):
        y = m(x)
    n_forward = len(emulated_launches)
    assert n_forward >= 1
    t = threading.Thread(target=lambda: y.sum().backward())
    t.start()
    t.join()
    assert len(emulated_launches) > n_forward  # the emulated kernels ran the backward too
    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    x2 = x.detach().clone().requires_grad_()
    ref(x2).sum().backward()
    close(x.grad, x2.grad, torch.float64, "dx", scale=1.0)


def test_convert_batchnorm_keeps_state_and_behaviour(rng):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Sequential(nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3)))
    model.double()
    x = torch.tensor(rng.normal(0, 1, (6, 4, 1)))

    def run(m, x):
        return m[2](m[1](m[0](x[:, :, 0])).unsqueeze(-1))

    run(model, x)  # move the running statistics
    model.eval()
    want = run(model, x)
    converted = ct.convert_batchnorm(copy.deepcopy(model))
    assert isinstance(converted[1], ct.BatchNorm1d) and isinstance(converted[2][1], ct.BatchNorm1d)
    assert not converted.training
    close(run(converted, x), want, torch.float64, "converted eval")


def test_module_copies_and_pickles(rng):
    m = ct.BatchNorm2d(3, activation="relu")
    m(data(rng, (2, 3, 2, 2), torch.float32))
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert other.activation == m.activation
        for k, v in m.state_dict().items():
            assert torch.equal(other.state_dict()[k], v)


def test_import_cubn_does_not_import_torch():
    code = "import sys, cubn; cubn.moments; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------
# CUDA tensors (a GPU and a CUDA build of torch)
# ---------------------------------------------------------------------------
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here")
    if not cubn.gpu_available():
        pytest.skip("no CUDA device for CuPy: " + cubn._backend.gpu_status())


@pytest.mark.gpu
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_tensors_equal_torch_cupy(rng, memory_format, dtype):
    _need_cuda()
    mine, ref = (m.cuda() for m in twins(2, rng=rng, dtype=torch.float32))
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    stream = torch.cuda.Stream()  # not the default stream: cubn must follow torch's current stream
    with torch.cuda.stream(stream):
        x = data(rng, (8, 3, 6, 5), dtype).cuda().contiguous(memory_format=fmt).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        dy = torch.randn(x.shape, device="cuda", dtype=dtype)
        for _ in range(2):
            y, y2 = mine(x), ref(x2)
            y.backward(dy)
            y2.backward(dy)
        mine.eval()
        ref.eval()
        yi, yi2 = mine(x), ref(x2)
    torch.cuda.synchronize()
    assert y.is_cuda and y.is_contiguous(memory_format=fmt)
    close(y.cpu(), y2.cpu(), dtype, "y")
    close(yi.cpu(), yi2.cpu(), dtype, "eval y")
    close(x.grad.cpu(), x2.grad.cpu(), dtype, "dx", scale=x2.grad.abs().max().item())
    close(mine.weight.grad.cpu(), ref.weight.grad.cpu(), dtype, "dweight", scale=ref.weight.grad.abs().max().item() + 1)
    close(mine.running_var.cpu(), ref.running_var.cpu(), dtype, "running_var")


@pytest.mark.gpu
def test_cuda_gradcheck_float64_cupy(rng):
    _need_cuda()
    m = ct.BatchNorm2d(3, activation="relu", dtype=torch.float64, device="cuda")
    x = torch.tensor(rng.normal(1, 2, (3, 3, 2, 2)), device="cuda", requires_grad=True)
    side = torch.tensor(rng.normal(0, 1, (3, 3, 2, 2)), device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b, s: m(x, s), (x, m.weight, m.bias, side), eps=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_cuda_and_cpu_mixed_is_refused_cupy():
    _need_cuda()
    with pytest.raises(RuntimeError, match="module.to"):
        ct.BatchNorm2d(3)(torch.zeros(2, 3, 2, 2, device="cuda"))
