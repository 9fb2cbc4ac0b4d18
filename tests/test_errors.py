"""Every documented bad input: the error type, and a message naming the argument."""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from cubn import _backend


def _x(rng, shape=(4, 3, 5, 6), dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture(params=["numpy", "emulated"])
def be(request):
    from conftest import backend_skip_reason

    reason = backend_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    with cubn.use_backend(request.param):
        yield request.param


def test_integer_input_is_rejected(be, rng):
    xi = rng.integers(0, 10, (4, 5, 6, 3))
    with pytest.raises(TypeError, match="'x'.*floating dtype.*int64"):
        cubn.moments(xi, [0, 1, 2])
    with pytest.raises(TypeError, match="'x'.*floating"):
        cubn.fused_batch_norm(xi)
    with pytest.raises(TypeError, match="'x'"):
        cubn.batch_normalization(xi, 0.0, 1.0, None, None, 1e-3)


def test_not_an_array(be):
    with pytest.raises(TypeError, match="'x'.*numpy.ndarray or cupy.ndarray.*list"):
        cubn.moments([[1.0, 2.0]], [0])


def test_rank(be, rng):
    with pytest.raises(ValueError, match="'x'.*rank 2 to 5.*rank 1"):
        cubn.fused_batch_norm(_x(rng, (8,)))
    with pytest.raises(ValueError, match="'x'.*rank 2 to 5.*rank 6"):
        cubn.fused_batch_norm(_x(rng, (2, 2, 2, 2, 2, 2)))


def test_data_format(be, rng):
    with pytest.raises(ValueError, match="'data_format'.*'NHWC'.*'NCHW'.*'HWNC'"):
        cubn.fused_batch_norm(_x(rng), data_format="HWNC")
    with pytest.raises(ValueError, match="'data_format'"):
        cubn.batch_normalization(_x(rng), 0.0, 1.0, None, None, 1e-3, data_format="CHWN")
    with pytest.raises(ValueError, match="'data_format'.*rank-5"):
        cubn.fused_batch_norm(_x(rng), data_format="NDHWC")


def test_zero_channels(be, rng):
    with pytest.raises(ValueError, match="'x'.*channel dimension of size >= 1"):
        cubn.fused_batch_norm(np.zeros((4, 5, 0), np.float32))
    with pytest.raises(ValueError, match="'x'.*channel"):
        cubn.fused_batch_norm(np.zeros((4, 0, 5), np.float32), data_format="NCHW")


@pytest.mark.parametrize("arg", ["scale", "offset", "mean", "variance"])
def test_parameter_shape_mismatch(be, rng, arg):
    x = _x(rng)  # NHWC: 6 channels
    kwargs = dict(scale=np.ones(6, np.float32), offset=np.zeros(6, np.float32),
                  mean=np.zeros(6, np.float32), variance=np.ones(6, np.float32), is_training=False)
    kwargs[arg] = np.ones(5, np.float32)
    with pytest.raises(ValueError, match=f"'{arg}'.*shape \\(6,\\).*shape \\(5,\\)"):
        cubn.fused_batch_norm(x, **kwargs)


@pytest.mark.parametrize("arg", ["mean", "variance", "offset", "scale"])
def test_batch_normalization_param_not_broadcastable(be, rng, arg):
    x = _x(rng)
    p = dict(mean=0.0, variance=1.0, offset=None, scale=None)
    p[arg] = np.ones(4, np.float32)  # last axis is 6
    with pytest.raises(ValueError, match=f"'{arg}'.*broadcastable"):
        cubn.batch_normalization(x, p["mean"], p["variance"], p["offset"], p["scale"], 1e-3)


def test_parameter_dtype(be, rng):
    with pytest.raises(TypeError, match="'scale'.*floating-point"):
        cubn.fused_batch_norm(_x(rng), scale=np.array(["a"] * 6))


def test_empty_batch_in_training(be, rng):
    with pytest.raises(ValueError, match="'x'.*at least one element per channel.*empty batch"):
        cubn.fused_batch_norm(np.zeros((0, 4, 4, 3), np.float32))
    # inference on an empty batch is fine
    y, _, _ = cubn.fused_batch_norm(np.zeros((0, 4, 4, 3), np.float32), mean=np.zeros(3), variance=np.ones(3),
                                    is_training=False)
    assert y.shape == (0, 4, 4, 3)


def test_inference_needs_statistics(be, rng):
    with pytest.raises(ValueError, match="'mean'.*is_training=False"):
        cubn.fused_batch_norm(_x(rng), is_training=False)


def test_exponential_avg_factor(be, rng):
    with pytest.raises(ValueError, match="'exponential_avg_factor'.*\\[0, 1\\]"):
        cubn.fused_batch_norm(_x(rng), exponential_avg_factor=1.5)
    with pytest.raises(ValueError, match="'mean'.*exponential_avg_factor != 1"):
        cubn.fused_batch_norm(_x(rng), exponential_avg_factor=0.5)


def test_epsilon(be, rng):
    with pytest.raises(ValueError, match="'epsilon'.*>= 0"):
        cubn.fused_batch_norm(_x(rng), epsilon=-1.0)
    with pytest.raises(ValueError, match="'variance_epsilon'"):
        cubn.batch_normalization(_x(rng), 0.0, 1.0, None, None, float("nan"))


def test_side_input(be, rng):
    x = _x(rng)
    with pytest.raises(ValueError, match="'side_input'.*shape"):
        cubn.fused_batch_norm(x, side_input=_x(rng, (4, 3, 5, 5)))
    with pytest.raises(TypeError, match="'side_input'.*dtype float32"):
        cubn.fused_batch_norm(x, side_input=x.astype(np.float64))


def test_activation(be, rng):
    with pytest.raises(ValueError, match="'activation'.*relu"):
        cubn.fused_batch_norm(_x(rng), activation="softplus")
    with pytest.raises(TypeError, match="'activation'"):
        cubn.fused_batch_norm(_x(rng), activation=42)
    with pytest.raises(TypeError, match="takes no parameter"):
        cubn.activations.relu(0.1)


def test_axes(be, rng):
    x = _x(rng)
    with pytest.raises(ValueError, match="'axes'.*\\[-4, 4\\)"):
        cubn.moments(x, [0, 4])
    with pytest.raises(ValueError, match="'axes'.*repeated"):
        cubn.moments(x, [0, -4])
    with pytest.raises(TypeError, match="'axes'"):
        cubn.moments(x, ["a"])


def test_weights(be, rng):
    x = _x(rng)
    with pytest.raises(ValueError, match="'weights'.*broadcastable"):
        cubn.weighted_moments(x, [0, 1, 2], np.ones((3, 3)))
    with pytest.raises(TypeError, match="'weights'"):
        cubn.weighted_moments(x, [0, 1, 2], None)


def test_backward_arguments(be, rng):
    x = _x(rng)
    with pytest.raises(ValueError, match="'dy'.*shape"):
        cubn.batch_norm_backward(x[:2], x, None, np.zeros(6), np.ones(6))
    with pytest.raises(ValueError, match="'mean'.*None"):
        cubn.batch_norm_backward(x, x, None, None, np.ones(6))
    with pytest.raises(ValueError, match="'batch_weights'.*\\(4,\\)"):
        cubn.batch_norm_backward(x, x, None, np.zeros(6), np.ones(6), batch_weights=np.ones(3))


def test_use_backend(rng):
    with pytest.raises(ValueError, match="'name'.*'numpy'.*'cupy'.*'emulated'"):
        with cubn.use_backend("tpu"):
            pass
    with cubn.use_backend("cupy"):
        with pytest.raises(TypeError, match="use_backend\\('cupy'\\) needs cupy arrays.*numpy.ndarray"):
            cubn.moments(_x(rng), [0])


class _FakeDeviceArray(np.ndarray):
    """Stands for a cupy.ndarray in the mixing test (no GPU needed)."""


def test_mixing_host_and_device_arrays_names_both(monkeypatch, rng):
    monkeypatch.setattr(_backend, "_side", lambda a: None if a is None or np.isscalar(a) else
                        ("cupy" if isinstance(a, _FakeDeviceArray) else "numpy" if isinstance(a, np.ndarray) else None))
    x = _x(rng)
    dev_mean = np.zeros(6, np.float32).view(_FakeDeviceArray)
    with pytest.raises(TypeError, match="'x' is on the host.*'mean' is on the GPU"):
        cubn.fused_batch_norm(x, mean=dev_mean, variance=np.ones(6, np.float32), is_training=False)


def test_import_without_gpu_reports_why():
    assert isinstance(cubn.gpu_available(), bool)
    assert isinstance(_backend.gpu_status(), str) and _backend.gpu_status()
