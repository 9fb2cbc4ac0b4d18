"""PyTorch's BatchNorm module rules (``test/test_nn.py``: test_batchnorm_simple_average,
test_batchnorm_update_stats, test_batchnorm_raises_error_if_less_than_one_value_per_channel,
test_batchnorm_eval, test_batchnorm_affine, test_batchnorm_load_state_dict) against real
``torch.nn.BatchNorm*d`` modules, and Chainer's cumulative average
(``chainer/links/normalization/batch_normalization.py``, ``finetune=True``;
``tests/chainer_tests/links_tests/normalization_tests/test_batch_normalization.py``
TestBatchNormalization / test_finetune) from Chainer's formulas (Chainer itself is
not installable on current Pythons).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

import cubn

torch = pytest.importorskip("torch", reason="torch is not installed")


def _t(a):
    return torch.tensor(np.asarray(a))


# test_nn.py test_batchnorm_simple_average: momentum=None is the plain average of the batches' statistics
@pytest.mark.parametrize("in_place", [True, False])
def test_momentum_none_cumulative_average(train_backend, rng, in_place):
    m = torch.nn.BatchNorm1d(3, momentum=None).double()
    coll = cubn.UpdateCollection()
    bn = cubn.BatchNorm(decay=None, scale=True, epsilon=1e-5, unbiased_moving_variance=True,
                        updates_collections=None if in_place else coll)
    batches = [rng.standard_normal((6, 3)) * (k + 1) + k for k in range(4)]
    for k, x in enumerate(batches):
        m(_t(x))
        bn(train_backend.asarray(x))
        cubn.run_updates(coll)
        np.testing.assert_allclose(train_backend.to_numpy(bn.variables["moving_mean"]), m.running_mean.numpy(),
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(train_backend.to_numpy(bn.variables["moving_variance"]), m.running_var.numpy(),
                                   rtol=1e-12)
        assert bn.num_batches_tracked == int(m.num_batches_tracked) == k + 1
    # and that is the mean of the batch means (the initial 0 / 1 are forgotten)
    np.testing.assert_allclose(m.running_mean.numpy(), np.mean([x.mean(0) for x in batches], 0), rtol=1e-12)


# test_nn.py test_batchnorm_update_stats / test_batchnorm_load_state_dict: num_batches_tracked counts updates
def test_to_torch_state_dict_counts_batches(rng):
    m = torch.nn.BatchNorm2d(4, momentum=0.3).double()
    bn = cubn.from_torch(m)
    for _ in range(5):
        x = rng.standard_normal((3, 4, 2, 2)) + 1
        m(_t(x))
        bn(x)
    bn(x, is_training=False)  # inference does not count
    m.eval()
    m(_t(x))
    sd = cubn.to_torch_state_dict(bn)
    assert int(sd["num_batches_tracked"]) == int(m.num_batches_tracked) == 5
    m2 = torch.nn.BatchNorm2d(4).double()
    m2.load_state_dict({k: _t(v) for k, v in sd.items()})
    for k in ("running_mean", "running_var", "weight", "bias"):
        np.testing.assert_allclose(getattr(m2, k).detach().numpy(), getattr(m, k).detach().numpy(), rtol=1e-12)
    assert int(m2.num_batches_tracked) == 5


def test_from_torch_momentum_none_continues_the_average(rng):
    m = torch.nn.BatchNorm1d(3, momentum=None).double()
    for _ in range(3):
        m(_t(rng.standard_normal((5, 3))))
    bn = cubn.from_torch(m)
    assert bn.decay is None and bn.num_batches_tracked == 3
    x = rng.standard_normal((5, 3)) + 2
    m(_t(x))
    bn(x)
    np.testing.assert_allclose(bn.variables["moving_mean"], m.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(bn.variables["moving_variance"], m.running_var.numpy(), rtol=1e-12)
    sd = m.state_dict()
    bn2 = cubn.from_torch(sd, momentum="cumulative")
    assert bn2.decay is None and bn2.num_batches_tracked == 4


# test_nn.py test_batchnorm_raises_error_if_less_than_one_value_per_channel
def test_one_value_per_channel(rng):
    x = rng.random((1, 10, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.nn.BatchNorm1d(10)(_t(x))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cubn.from_torch(torch.nn.BatchNorm1d(10).double())(x)
    # inference is fine in both
    torch.nn.BatchNorm1d(10).double().eval()(_t(x))
    cubn.from_torch(torch.nn.BatchNorm1d(10).double())(x, is_training=False)
    # cubn's default follows TensorFlow: max(n - 1, 1), i.e. the variance of one value is 0, updated as such
    bn = cubn.BatchNorm(decay=0.0, updates_collections=None, data_format="NCHW")
    y = bn(x.astype(np.float32))
    np.testing.assert_array_equal(y, 0.0)
    np.testing.assert_array_equal(bn.variables["moving_variance"], 0.0)


# test_nn.py test_batchnorm_eval / test_batchnorm_affine: training then eval, affine True and False
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("module,shape", [(torch.nn.BatchNorm1d, (6, 3)), (torch.nn.BatchNorm1d, (6, 3, 4)),
                                          (torch.nn.BatchNorm2d, (4, 3, 2, 2)), (torch.nn.BatchNorm3d, (3, 3, 2, 2, 2))])
def test_modules_train_then_eval(backend, rng, affine, module, shape):
    m = module(3, eps=1e-4, momentum=0.2, affine=affine).double()
    if affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
    bn = cubn.from_torch(m)
    for _ in range(3):
        x = rng.standard_normal(shape) * 2 + 1
        want = m(_t(x)).detach().numpy()
        np.testing.assert_allclose(backend.to_numpy(bn(backend.asarray(x))), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(bn.variables["moving_variance"]), m.running_var.numpy(), rtol=1e-12)
    m.eval()
    x = rng.standard_normal(shape)
    np.testing.assert_allclose(backend.to_numpy(bn(backend.asarray(x), is_training=False)), m(_t(x)).detach().numpy(),
                               rtol=1e-10, atol=1e-10)


def test_cumulative_average_refuses_zero_debias():
    with pytest.raises(ValueError, match="zero_debias_moving_mean"):
        cubn.BatchNorm(decay=None, zero_debias_moving_mean=True)


# Chainer: L.BatchNormalization(size, decay=0.9, eps=2e-5)(x, finetune=True): N += 1, decay = 1 - 1/N;
# avg_var is fed the unbiased variance m/(m-1)·var (links/normalization/batch_normalization.py)
def test_chainer_finetune(train_backend, rng):
    size, eps = 3, 2e-5
    avg_mean, avg_var = np.zeros(size), np.ones(size)
    bn = cubn.BatchNorm(decay=None, epsilon=eps, unbiased_moving_variance=True, updates_collections=None)
    for n in range(1, 5):
        x = rng.standard_normal((7, size)) * n + n
        decay = 1.0 - 1.0 / n
        m = x.shape[0]
        avg_mean = decay * avg_mean + (1 - decay) * x.mean(0)
        avg_var = decay * avg_var + (1 - decay) * x.var(0) * m / max(m - 1, 1)
        y = bn(train_backend.asarray(x))
        # chainer.functions.batch_normalization: (x - mean) / sqrt(var + eps) with the biased batch variance
        np.testing.assert_allclose(train_backend.to_numpy(y), (x - x.mean(0)) / np.sqrt(x.var(0) + eps), rtol=1e-9,
                                   atol=1e-10)
    np.testing.assert_allclose(train_backend.to_numpy(bn.variables["moving_mean"]), avg_mean, rtol=1e-12)
    np.testing.assert_allclose(train_backend.to_numpy(bn.variables["moving_variance"]), avg_var, rtol=1e-12)


def test_save_and_load_keep_the_new_arguments(tmp_path, rng):
    """A from_torch layer with momentum=None round-trips through cubn.save / cubn.load, count included."""
    m = torch.nn.BatchNorm1d(3, momentum=None).double()
    bn = cubn.from_torch(m)
    for _ in range(2):
        x = rng.standard_normal((4, 3))
        bn(x)
        m(_t(x))
    cubn.save(tmp_path / "bn.npz", bn)
    back = cubn.load(tmp_path / "bn.npz")
    assert back.decay is None and back.convention == "torch" and back.num_batches_tracked == 2
    x = rng.standard_normal((4, 3))
    back(x)
    m(_t(x))
    np.testing.assert_allclose(back.variables["moving_mean"], m.running_mean.numpy(), rtol=1e-12)
    ghost = cubn.BatchNorm(virtual_batch_size=2, convention="keras3", updates_collections=None)
    ghost(rng.standard_normal((4, 3)).astype(np.float32))
    cubn.save(tmp_path / "g.npz", ghost)
    g2 = cubn.load(tmp_path / "g.npz")
    assert g2.virtual_batch_size == 2 and g2.convention == "keras3"


# The same rules (test_batchnorm_eval / test_batchnorm_affine, and autograd's gradients) at sizes the NumPy
# backend's compiled loops take (short runs, long runs, one batch entry, rows; and, where their direct calls
# are built, small inputs too: (8, 16), a batch of one 4x4 map, runs shorter than a vector), on data at an
# offset of 1e4 with a NaN channel, in float64 and float32
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("module,shape", [(torch.nn.BatchNorm2d, (24, 5, 9, 9)), (torch.nn.BatchNorm1d, (3, 4, 5000)),
                                          (torch.nn.BatchNorm2d, (1, 3, 80, 80)), (torch.nn.BatchNorm1d, (9000, 3)),
                                          (torch.nn.BatchNorm1d, (8, 16)), (torch.nn.BatchNorm2d, (1, 3, 4, 4)),
                                          (torch.nn.BatchNorm1d, (4, 6, 3))])
def test_modules_at_compiled_loop_sizes(rng, dtype, module, shape):
    m = module(shape[1], eps=1e-3, momentum=0.3).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    # the layer in the data's dtype; the float64 module is the reference (an offset of 1e4 costs float32
    # inputs about 2e-4 of a standard deviation in any implementation)
    bn = cubn.from_torch(copy.deepcopy(m).to(getattr(torch, dtype)))
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == "float64" else dict(rtol=1e-3, atol=2e-3)
    for step in range(2):
        x = (rng.standard_normal(shape) * 3 + 1e4).astype(dtype)
        x[0, 1, ...] = np.nan  # channel 1: NaN throughout its statistics, outputs and gradients
        dy = rng.standard_normal(shape).astype(dtype)
        xt = _t(x).double().requires_grad_(True)
        want = m(xt)
        want.backward(_t(dy).double())
        y = bn(x)
        np.testing.assert_allclose(np.asarray(y, np.float64), want.detach().numpy(), **tol)
        dx = bn.backward(dy)
        np.testing.assert_allclose(np.asarray(dx, np.float64), xt.grad.numpy(), **tol)
        # a channel's dgamma sums n products whose float32 x-hat is off by ~1e-4 each, in random directions
        gtol = tol if dtype == "float64" else dict(rtol=1e-3, atol=1e-3 * np.sqrt(x.size // shape[1]))
        np.testing.assert_allclose(np.asarray(bn.gradients["gamma"], np.float64), m.weight.grad.numpy(), **gtol)
        np.testing.assert_allclose(np.asarray(bn.gradients["beta"], np.float64), m.bias.grad.numpy(), **gtol)
        m.zero_grad()
    for name, ref in (("moving_mean", m.running_mean), ("moving_variance", m.running_var)):
        np.testing.assert_allclose(np.asarray(bn.variables[name], np.float64), ref.numpy(), **tol)
    m.eval()
    x = (rng.standard_normal(shape) * 3 + 1e4).astype(dtype)
    np.testing.assert_allclose(np.asarray(bn(x, is_training=False), np.float64), m(_t(x).double()).detach().numpy(),
                               **tol)
