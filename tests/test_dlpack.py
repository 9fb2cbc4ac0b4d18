"""Arrays of other libraries (``__dlpack__``) at cubn's entry points.

A torch CPU tensor passed where cubn takes an array is read in place
(``numpy.from_dlpack``); results are NumPy arrays equal to those of the same
call on NumPy input. Exporters that refuse, and devices cubn cannot reach,
are errors naming the argument.
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from cubn._backend import take_dlpack
from conftest import BF16

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'cubn[torch]')")


def T(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def same(got, want):
    """Results for tensor inputs: NumPy arrays, bitwise those of NumPy inputs."""
    if isinstance(want, (tuple, list)):
        assert type(got) is type(want) or isinstance(got, tuple)
        for g, w in zip(got, want):
            same(g, w)
        return
    if want is None:
        assert got is None
        return
    assert isinstance(got, np.ndarray), type(got)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def _skip_cupy(backend):
    if backend.name == "cupy":
        pytest.skip("torch CPU tensors run on the host backends")


def _inputs(rng, shape=(4, 3, 2, 5)):
    x = rng.normal(2, 3, shape).astype(np.float32)
    x[0, 0, 0, 0] = np.nan                     # NaN propagates alike
    x[:, :, :, 1] += 1e4                       # a channel with a large offset (NHWC)
    return x


def test_functional_ops_take_tensors(backend, rng):
    _skip_cupy(backend)
    x = _inputs(rng)
    C = x.shape[-1]
    g, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.normal(0, 1, C).astype(np.float32)
    m, v = rng.normal(0, 1, C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    side = rng.normal(0, 1, x.shape).astype(np.float32)
    w = rng.uniform(0, 2, x.shape[0]).astype(np.float32)
    w[1] = 0
    same(cubn.moments(T(x), [0, 1, 2]), cubn.moments(x, [0, 1, 2]))
    same(cubn.weighted_moments(T(x), [0, 1, 2], T(w)), cubn.weighted_moments(x, [0, 1, 2], w))
    same(cubn.batch_normalization(T(x), T(m), T(v), T(b), T(g), 1e-3), cubn.batch_normalization(x, m, v, b, g, 1e-3))
    same(cubn.fused_batch_norm(T(x), T(g), T(b), side_input=T(side), activation="relu"),
         cubn.fused_batch_norm(x, g, b, side_input=side, activation="relu"))
    same(cubn.fused_batch_norm(T(x), T(g), T(b), T(m), T(v), is_training=False),
         cubn.fused_batch_norm(x, g, b, m, v, is_training=False))
    dy = rng.normal(0, 1, x.shape).astype(np.float32)
    same(tuple(cubn.batch_norm_backward(T(dy), T(x), T(g), T(m), T(v), offset=T(b), side_input=T(side),
                                        batch_weights=T(w), activation="relu")),
         tuple(cubn.batch_norm_backward(dy, x, g, m, v, offset=b, side_input=side, batch_weights=w,
                                        activation="relu")))
    # tensors and NumPy arrays mix freely: both are host memory
    same(cubn.fused_batch_norm(T(x), g, T(b)), cubn.fused_batch_norm(x, g, b))


def test_layer_takes_tensors(backend, rng):
    _skip_cupy(backend)
    x = _inputs(rng)
    side = rng.normal(0, 1, x.shape).astype(np.float32)
    dy = rng.normal(0, 1, x.shape).astype(np.float32)
    outs = []
    for conv in (lambda a: a, T):
        bn = cubn.BatchNorm(scale=True, activation_fn="relu", updates_collections=None)
        y = bn(conv(x), side_input=conv(side))
        dx, dside = bn.backward(conv(dy))
        yi = bn(conv(x), is_training=False)
        outs.append((y, dx, dside, yi, bn.variables["moving_mean"], bn.gradients["gamma"]))
    same(outs[1], outs[0])


def test_preprocessing_takes_tensors(backend, rng):
    _skip_cupy(backend)
    imgs = rng.integers(0, 256, (3, 4, 5, 3)).astype(np.uint8)
    same(cubn.normalize_images(T(imgs), T(np.float32([0.4, 0.5, 0.6])), (0.2, 0.25, 0.3), scale=1 / 255),
         cubn.normalize_images(imgs, np.float32([0.4, 0.5, 0.6]), (0.2, 0.25, 0.3), scale=1 / 255))
    X = rng.normal(1e4, 1, (20, 3)).astype(np.float32)
    sw = rng.uniform(0, 2, 20)
    a, b = cubn.RunningMoments(axis=0), cubn.RunningMoments(axis=0)
    a.update(T(X), weights=T(sw))
    b.update(X, weights=sw)
    same((a.mean, a.var, a.count), (b.mean, b.var, b.count))
    s1 = cubn.Standardizer().fit(T(X), sample_weight=T(sw))
    s2 = cubn.Standardizer().fit(X, sample_weight=sw)
    same(s1.transform(T(X)), s2.transform(X))
    same(s1.inverse_transform(T(s2.transform(X))), s2.inverse_transform(s2.transform(X)))


def test_take_dlpack_is_zero_copy_for_views_and_bfloat16(rng):
    base = torch.from_numpy(rng.normal(0, 1, (4, 6)).astype(np.float32))
    for t in (base, base[:, ::2], base.t(), base[1:3]):
        a, = take_dlpack("f", x=t)
        assert isinstance(a, np.ndarray) and a.shape == tuple(t.shape)
        assert np.shares_memory(a, base.numpy())
        np.testing.assert_array_equal(a, t.numpy())
    if BF16 is not None:
        bt = base.bfloat16()
        a, = take_dlpack("f", x=bt)
        assert a.dtype == BF16
        assert a.ctypes.data == bt.data_ptr()
        np.testing.assert_array_equal(a.astype(np.float32), bt.float().numpy())
    # NumPy, CuPy and non-array arguments pass through untouched
    n = np.zeros(3)
    assert take_dlpack("f", a=n, b=None, c=1.5, d=[1, 2]) == (n, None, 1.5, [1, 2])


def test_refusals_name_the_argument():
    with pytest.raises(TypeError, match=r"moments: argument 'x'.*gradient.*x\.detach\(\)"):
        cubn.moments(torch.zeros(3, 2, requires_grad=True), [0])

    class OnCuda:
        def __dlpack__(self, stream=None):
            raise AssertionError("not reached without a usable GPU")

        def __dlpack_device__(self):
            return (2, 0)

    class Elsewhere(OnCuda):
        def __dlpack_device__(self):
            return (14, 0)  # oneAPI

    if not cubn.gpu_available():
        with pytest.raises(TypeError, match=r"fused_batch_norm: argument 'x' is a .*OnCuda in CUDA memory"):
            cubn.fused_batch_norm(OnCuda())
    with pytest.raises(TypeError, match=r"argument 'scale'.*device type 14"):
        cubn.fused_batch_norm(np.zeros((2, 3), np.float32), Elsewhere())
    with pytest.raises(TypeError, match="dtype"):  # an integer tensor is refused like an integer array
        cubn.moments(torch.zeros(3, 2, dtype=torch.int64), [0])


@pytest.mark.gpu
def test_cuda_tensors_come_back_as_cupy_arrays_cupy(rng):
    if not (torch.cuda.is_available() and cubn.gpu_available()):
        pytest.skip("needs a CUDA device for torch and for CuPy")
    import cupy

    x = _inputs(rng)
    t = torch.from_numpy(x).cuda()
    mean, var = cubn.moments(t, [0, 1, 2])
    assert isinstance(mean, cupy.ndarray)
    want = cubn.moments(cupy.asarray(x), [0, 1, 2])
    torch.cuda.synchronize()
    np.testing.assert_array_equal(mean.get(), want[0].get())
    np.testing.assert_array_equal(var.get(), want[1].get())
    a, = take_dlpack("f", x=t)
    assert a.data.ptr == t.data_ptr()
    with pytest.raises(TypeError, match="host"):  # a CUDA tensor and a host array in one call
        cubn.fused_batch_norm(t, np.ones(x.shape[-1], np.float32))
