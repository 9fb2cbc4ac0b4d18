"""Checks that only a CUDA device can answer (skipped without one).

The op/layer suites already run on the ``cupy`` backend through the shared
``backend`` fixture; these add what needs the real device: sizes that fill
it, 64-bit indexing past 2^31 elements, CUDA-graph capture of a whole
training step (which fails on any host synchronization), bitwise
reproducibility, and the host/device mixing errors with real CuPy arrays.
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn

pytestmark = pytest.mark.gpu

if not cubn.gpu_available():
    pytest.skip("no CUDA device: " + cubn._backend.gpu_status(), allow_module_level=True)

import cupy as cp  # noqa: E402


def _stats_f64(x, axes, chunk_axis=0, chunks=16):
    """Per-channel mean/var in float64 on the GPU, chunk by chunk (the float64 truth)."""
    n = x.shape[chunk_axis]
    step = -(-n // chunks)
    s = None
    cnt = 0
    for i in range(0, n, step):
        part = cp.take(x, cp.arange(i, min(n, i + step)), axis=chunk_axis).astype(cp.float64)
        ps = part.sum(axis=axes)
        s = ps if s is None else s + ps
        cnt += part.size // ps.size
    mean = s / cnt
    m2 = None
    for i in range(0, n, step):
        part = cp.take(x, cp.arange(i, min(n, i + step)), axis=chunk_axis).astype(cp.float64)
        shape = [1] * x.ndim
        keep = [a for a in range(x.ndim) if a not in axes]
        for a in keep:
            shape[a] = x.shape[a]
        d = ((part - mean.reshape(shape)) ** 2).sum(axis=axes)
        m2 = d if m2 is None else m2 + d
    return mean, m2 / cnt


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_float16_tensor_over_2_pow_31_elements(layout):
    """64-bit indexing: a float16 tensor with more than 2^31 elements."""
    free, _ = cp.cuda.runtime.memGetInfo()
    shape = (2049, 4, 512, 512) if layout == "NCHW" else (2049, 512, 512, 4)
    n = int(np.prod(shape))
    assert n > 2**31
    if free < 3.2 * n * 2:
        pytest.skip(f"needs {3.2 * n * 2 / 2**30:.1f} GiB of free device memory")
    ch = 1 if layout == "NCHW" else 3
    offsets = cp.asarray([3.0, -2.0, 10.0, 0.5], cp.float32)
    x = cp.empty(shape, cp.float16)
    rs = cp.random.RandomState(1234)
    for i in range(0, shape[0], 256):  # fill in slabs to bound temporary memory
        sl = x[i:i + 256]
        noise = rs.standard_normal(sl.shape, dtype=cp.float32)
        bshape = [1] * 4
        bshape[ch] = 4
        sl[...] = (noise + offsets.reshape(bshape)).astype(cp.float16)
        del noise
    axes = tuple(a for a in range(4) if a != ch)
    m, v = cubn.moments(x, axes)
    tm, tv = _stats_f64(x, axes)
    assert float(cp.max(cp.abs(m.astype(cp.float64) - tm))) < 2e-3
    assert float(cp.max(cp.abs(v.astype(cp.float64) / tv - 1))) < 2e-3
    y, bm, bv = cubn.fused_batch_norm(x, data_format=layout, activation="relu")
    assert float(cp.max(cp.abs(bm - tm))) < 1e-4
    # spot-check the last elements (past 2^31): y = relu((x - mean) / sqrt(var + eps))
    tail = x.reshape(-1)[-4096:].astype(cp.float64)
    idx = cp.arange(n - 4096, n)
    c = (idx // (512 * 512)) % 4 if layout == "NCHW" else idx % 4
    want = cp.maximum((tail - tm[c]) / cp.sqrt(tv[c] + 1e-3), 0)
    got = y.reshape(-1)[-4096:].astype(cp.float64)
    assert float(cp.max(cp.abs(got - want))) < 1e-2
    del x, y


@pytest.mark.parametrize("shape,fmt", [((256, 64, 56, 56), "NCHW"), ((256, 56, 56, 64), "NHWC"),
                                       ((20, 6, 65536), "NCHW"), ((65536, 1024), "NHWC")])
def test_device_filling_sizes(shape, fmt):
    rs = cp.random.RandomState(7)
    x = (rs.standard_normal(shape, dtype=cp.float32) * 3 + 1e3)
    y, bm, bv = cubn.fused_batch_norm(x, data_format=fmt)
    ch = 1 if fmt == "NCHW" and len(shape) > 2 else len(shape) - 1
    axes = tuple(a for a in range(len(shape)) if a != ch)
    tm, tv = _stats_f64(x, axes)
    n = x.size // x.shape[ch]
    assert float(cp.max(cp.abs(bm - tm) / cp.abs(tm))) < 1e-6
    assert float(cp.max(cp.abs(bv / (tv * n / (n - 1)) - 1))) < 1e-4
    g = cubn.batch_norm_backward(cp.ones_like(x), x, None, bm, tv.astype(cp.float32), data_format=fmt)
    assert float(cp.max(cp.abs(g.dx))) < 1e-3  # d/dx of sum(normalized x) is 0


def test_bitwise_reproducible():
    rs = cp.random.RandomState(3)
    for shape, fmt in (((64, 32, 28, 28), "NCHW"), ((64, 28, 28, 32), "NHWC")):
        x = rs.standard_normal(shape, dtype=cp.float32)
        dy = rs.standard_normal(shape, dtype=cp.float32)
        outs = []
        for _ in range(3):
            y, bm, bv = cubn.fused_batch_norm(x, data_format=fmt)
            g = cubn.batch_norm_backward(dy, x, None, bm, cp.var(x, axis=(0, 2, 3) if fmt == "NCHW" else (0, 1, 2)), data_format=fmt)
            outs.append([a.copy() for a in (y, bm, bv, g.dx, g.dscale, g.doffset)])
        for o in outs[1:]:
            for a, b in zip(outs[0], o):
                assert cp.array_equal(a.view(cp.uint32), b.view(cp.uint32))


def test_training_step_captures_in_a_cuda_graph():
    """Forward + backward + in-place update in one CUDA graph: any device->host
    synchronization inside would make the capture fail. The layers' update
    scalars are constant (a fixed decay, no zero-debias factor 1 - decay^t),
    since a graph replays the scalars it captured."""
    rs = cp.random.RandomState(11)
    x = rs.standard_normal((32, 64, 28, 28), dtype=cp.float32) + 2
    side = rs.standard_normal(x.shape, dtype=cp.float32)
    dy = rs.standard_normal(x.shape, dtype=cp.float32)
    bn = cubn.BatchNorm(scale=True, decay=0.9, updates_collections=None, data_format="NCHW", activation_fn="relu")
    ref = cubn.BatchNorm(scale=True, decay=0.9, updates_collections=None, data_format="NCHW", activation_fn="relu")
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        bn(x, side_input=side)
        bn.backward(dy)  # warm-up: compile kernels, fill the memory pool
        ref(x, side_input=side)
        ref.backward(dy)
        stream.synchronize()
        stream.begin_capture()
        y = bn(x, side_input=side)
        dx, dside = bn.backward(dy)
        graph = stream.end_capture()
        for _ in range(3):
            graph.launch(stream)
        stream.synchronize()
    for _ in range(3):  # bn ran 1 warm-up + 3 replays (the capture itself runs nothing); ref 1 + 3
        ry = ref(x, side_input=side)
        rdx, rds = ref.backward(dy)
    assert cp.allclose(y, ry) and cp.allclose(dx, rdx) and cp.allclose(dside, rds)
    for k in ("moving_mean", "moving_variance"):
        assert cp.allclose(bn.variables[k], ref.variables[k], rtol=1e-6), k


def test_mixing_host_and_device_is_a_type_error():
    x = cp.ones((4, 3), cp.float32)
    with pytest.raises(TypeError, match="'x' is on the GPU.*'mean' is on the host"):
        cubn.fused_batch_norm(x, mean=np.zeros(3, np.float32), variance=cp.ones(3, cp.float32), is_training=False)
    with pytest.raises(TypeError, match="use_backend\\('emulated'\\) applies to NumPy inputs"):
        with cubn.use_backend("emulated"):
            cubn.moments(x, [0])
    bn = cubn.BatchNorm()
    bn(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match="state is on the host.*bn.to\\('cuda'\\)"):
        bn(x)
    bn.to("cuda")
    y = bn(x)
    assert isinstance(y, cp.ndarray) and isinstance(bn.variables["moving_mean"], cp.ndarray)
    bn.to("cpu")
    assert isinstance(bn.variables["moving_mean"], np.ndarray)


def test_layer_on_gpu_matches_cpu_layer():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((16, 8, 6, 6)) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    kw = dict(scale=True, renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5}, updates_collections=None,
              data_format="NCHW", activation_fn="gelu")
    a, b = cubn.BatchNorm(**kw), cubn.BatchNorm(**kw)
    for _ in range(3):
        ya = a(x)
        yb = b(cp.asarray(x))
        da, db = a.backward(dy), b.backward(cp.asarray(dy))
    np.testing.assert_allclose(ya, yb.get(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(da, db.get(), rtol=1e-4, atol=1e-5)
    for k in a.variables:
        np.testing.assert_allclose(a.variables[k], b.variables[k].get(), rtol=1e-5, atol=1e-6)


def test_bfloat16_on_cupy_if_supported():
    import ml_dtypes

    try:
        x = cp.asarray(np.random.default_rng(0).standard_normal((8, 4, 4, 16)).astype(ml_dtypes.bfloat16))
    except Exception as e:  # CuPy without bfloat16
        pytest.skip(f"this CuPy cannot hold bfloat16 arrays: {e}")
    y, bm, bv = cubn.fused_batch_norm(x)
    assert y.dtype == x.dtype
    xf = x.get().astype(np.float64)
    np.testing.assert_allclose(bm.get(), xf.mean((0, 1, 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,shape", [("NCHW", (64, 2048, 7, 7)), ("NHWC", (256, 1024)), ("NHWC", (1024, 64)),
                                       ("NCHW", (32, 256, 16, 32))])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_launch_forward_on_device_shapes(fmt, shape, dtype, monkeypatch):
    """The one-launch training forward on shapes of the benchmark suite that
    fit it: the kernel really is chosen, and it agrees with the three-launch
    path (statistics to float32 rounding, y to the dtype's rounding)."""
    from cubn.backends import kernel_backend as kb

    rs = cp.random.RandomState(7)
    x = (3 + 2 * rs.standard_normal(shape, dtype=cp.float32)).astype(dtype)
    c = shape[-1] if fmt == "NHWC" else shape[1]
    g = cp.asarray(np.linspace(0.5, 1.5, c, dtype=np.float32))
    b = cp.asarray(np.linspace(-1, 1, c, dtype=np.float32))
    from cubn.backends import one_launch
    from cubn.backends._memory import alignment

    backend = cubn._backend.get_backend("cupy")
    plan = cubn._plan.plan_for_channels(shape, fmt, "test")
    acc = np.dtype(np.float32)
    assert one_launch.decide(one_launch.FORWARD, plan, x.dtype, acc, backend.info, alignment(x)) is not None
    calls = []
    real = kb.KernelBackend.train_forward_one_launch

    def spy(self, *a):
        calls.append(a[0].kind)
        return real(self, *a)

    monkeypatch.setattr(kb.KernelBackend, "train_forward_one_launch", spy)
    y1, m1, v1 = cubn.fused_batch_norm(x, g, b, data_format=fmt, activation="relu")
    assert calls == [one_launch.FORWARD]
    with cubn.use_one_launch(False):
        y3, m3, v3 = cubn.fused_batch_norm(x, g, b, data_format=fmt, activation="relu")
    assert calls == [one_launch.FORWARD]
    cp.testing.assert_allclose(m1, m3, rtol=1e-5, atol=1e-5)
    cp.testing.assert_allclose(v1, v3, rtol=1e-4, atol=1e-5)
    tol = 2e-5 if dtype == "float32" else 4e-3
    cp.testing.assert_allclose(y1.astype(cp.float32), y3.astype(cp.float32), rtol=tol, atol=tol * 4)
