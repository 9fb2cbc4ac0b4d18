"""Cross-check against the real thing: PyTorch's batch_norm and tf-keras's
BatchNormalization (outputs, moving statistics, gradients), when installed.

CI installs torch (CPU); TensorFlow is heavy, so its half runs where it is
installed (see docs/conventions.md for how and when it was last run).
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from conftest import assert_close

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch)")

ACTS = {None: None, "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "silu": "silu", "tanh": "tanh",
        "sigmoid": "sigmoid", "elu": "elu", "leaky_relu": "leaky_relu", "relu6": "relu6"}


def _torch_act(name, z):
    F = torch.nn.functional
    return {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
            "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "elu": F.elu,
            "leaky_relu": lambda t: F.leaky_relu(t, 0.2), "relu6": F.relu6}[name](z)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
@pytest.mark.parametrize("activation", list(ACTS))
def test_matches_torch_functional_batch_norm(backend, rng, dtype, layout, activation):
    if backend.name == "emulated" and activation not in (None, "relu", "gelu"):
        pytest.skip("emulated: a representative subset of activations (all are covered elsewhere)")
    shape = {"NCHW": (6, 5, 4, 3), "NHWC": (6, 4, 3, 5), "NC": (12, 5)}[layout]
    x = (2 + 3 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = rng.standard_normal(5).astype(dtype), rng.standard_normal(5).astype(dtype)
    rm, rv = rng.standard_normal(5).astype(dtype), (rng.random(5) + 0.5).astype(dtype)
    momentum, eps = 0.3, 1e-5

    # PyTorch: NCHW tensors (channels_last memory format for NHWC)
    tx = torch.tensor(np.moveaxis(x, -1, 1) if layout == "NHWC" else x, requires_grad=True)
    if layout == "NHWC":
        tx = tx.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    tg, tb = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    ty = _torch_act(activation, torch.nn.functional.batch_norm(tx, trm, trv, tg, tb, training=True,
                                                                  momentum=momentum, eps=eps))
    tdy = torch.tensor(np.moveaxis(dy, -1, 1) if layout == "NHWC" else dy)
    ty.backward(tdy)
    back = (lambda a: np.moveaxis(a, 1, -1)) if layout == "NHWC" else (lambda a: a)

    bn = cubn.BatchNorm(decay=1 - momentum, epsilon=eps, scale=True, data_format="NCHW" if layout == "NCHW" else "NHWC",
                        updates_collections=None, unbiased_moving_variance=True, activation_fn=activation,
                        param_initializers={k: backend.asarray(v) for k, v in
                                            dict(gamma=gamma, beta=beta, moving_mean=rm, moving_variance=rv).items()})
    y = bn(backend.asarray(x))
    dx = bn.backward(backend.asarray(dy))
    assert_close(backend.to_numpy(y), back(ty.detach().numpy()), dtype, what="y")
    assert_close(backend.to_numpy(bn.variables["moving_mean"]), trm.numpy(), dtype, what="running_mean")
    assert_close(backend.to_numpy(bn.variables["moving_variance"]), trv.numpy(), dtype, what="running_var")
    assert_close(backend.to_numpy(dx), back(tx.grad.numpy()), dtype, scale=np.abs(tx.grad.numpy()).max(), what="dx")
    assert_close(backend.to_numpy(bn.gradients["gamma"]), tg.grad.numpy(), dtype, scale=np.abs(tg.grad.numpy()).max() + 1, what="dgamma")
    assert_close(backend.to_numpy(bn.gradients["beta"]), tb.grad.numpy(), dtype, scale=np.abs(tb.grad.numpy()).max() + 1, what="dbeta")
    # inference with the running statistics
    yi = bn(backend.asarray(x), is_training=False)
    tyi = _torch_act(activation, torch.nn.functional.batch_norm(tx.detach(), trm, trv, tg.detach(), tb.detach(),
                                                                   training=False, eps=eps))
    assert_close(backend.to_numpy(yi), back(tyi.numpy()), dtype, what="inference y")


def test_from_torch_module_round_trip(rng):
    m = torch.nn.BatchNorm2d(4, eps=1e-4, momentum=0.2).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    for _ in range(3):
        m(torch.tensor(rng.standard_normal((5, 4, 3, 3)) + 2))
    bn = cubn.from_torch(m)
    m.eval()
    x = rng.standard_normal((5, 4, 3, 3)) + 2
    assert_close(bn(x, is_training=False), m(torch.tensor(x)).detach().numpy(), "float64")
    m.train()
    x2 = rng.standard_normal((5, 4, 3, 3))
    want = m(torch.tensor(x2)).detach().numpy()
    assert_close(bn(x2), want, "float64")
    assert_close(bn.variables["moving_variance"], m.running_var.numpy(), "float64")
    sd = cubn.to_torch_state_dict(bn)
    m2 = torch.nn.BatchNorm2d(4).double()
    m2.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
    assert_close(m2.running_mean.numpy(), m.running_mean.numpy(), "float64")


# ---------------------------------------------------------------------------
# tf-keras
# ---------------------------------------------------------------------------
def _keras():
    try:
        import tensorflow as tf
        import tf_keras
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"tf-keras/TensorFlow not installed ({e}); see docs/conventions.md")
    return tf, tf_keras


KERAS_CASES = {
    "fused": dict(fused=True),
    "non_fused": dict(fused=False),
    "renorm": dict(renorm=True, renorm_clipping={"rmax": 1.2, "rmin": 0.8, "dmax": 0.3}, renorm_momentum=0.9),
    "renorm_unclipped": dict(renorm=True, renorm_momentum=0.9),
}


@pytest.mark.parametrize("case", sorted(KERAS_CASES))
@pytest.mark.parametrize("shape,axis", [((6, 4, 3, 5), -1), ((6, 5, 4, 3), 1), ((10, 5), -1), ((6, 7, 5), -1)])
def test_matches_tf_keras(backend, rng, case, shape, axis):
    tf, tfk = _keras()
    kw = KERAS_CASES[case]
    if kw.get("fused") and len(shape) not in (4, 5):
        pytest.skip("tf-keras refuses fused=True for inputs that are not 4-D or 5-D")
    layer = tfk.layers.BatchNormalization(axis=axis, momentum=0.8, epsilon=1e-3,
                                          beta_initializer="random_normal", gamma_initializer="random_uniform", **kw)
    x0 = (1 + 2 * rng.standard_normal(shape)).astype(np.float32)
    layer.build(shape)
    bn = cubn.from_keras(layer)
    for step in range(3):
        x = (x0 + step).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        tx = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(tx)
            ty = layer(tx, training=True)
        gx, gg, gb = tape.gradient(ty, [tx, layer.gamma, layer.beta], output_gradients=tf.constant(dy))
        y = bn(backend.asarray(x))
        dx = bn.backward(backend.asarray(dy))
        assert_close(backend.to_numpy(y), ty.numpy(), "float32", what=f"y step {step}")
        assert_close(backend.to_numpy(dx), gx.numpy(), "float32", scale=np.abs(gx.numpy()).max(), what="dx")
        assert_close(backend.to_numpy(bn.gradients["gamma"]), gg.numpy(), "float32", scale=np.abs(gg.numpy()).max() + 1, what="dgamma")
        assert_close(backend.to_numpy(bn.gradients["beta"]), gb.numpy(), "float32", scale=np.abs(gb.numpy()).max() + 1, what="dbeta")
        for name in ("moving_mean", "moving_variance"):
            assert_close(backend.to_numpy(bn.variables[name]), getattr(layer, name).numpy(), "float32", what=f"{name} step {step}")
        if kw.get("renorm"):
            for name in ("renorm_mean", "renorm_stddev", "moving_stddev"):
                assert_close(backend.to_numpy(bn.variables[name]), getattr(layer, name).numpy(), "float32", what=name)
    xi = (x0 * 0.5).astype(np.float32)
    assert_close(backend.to_numpy(bn(backend.asarray(xi), is_training=False)), layer(xi, training=False).numpy(), "float32")
