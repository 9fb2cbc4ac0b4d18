"""Keras BatchNormalization: tf-keras (Keras 2) and Keras 3.

Three sources, none of them cubn: the config dicts, weights and one training
step that the real tf-keras 2.21 and Keras 3.15 wrote
(``tests/peers/fixtures/*.json``, made by ``generate_keras_fixtures.py``; they
run in CI without TensorFlow); real Keras 3 layers (``keras`` on the torch
backend, when installed); real tf-keras layers (when TensorFlow is installed;
run by hand, log in ``tests/logs/``). Test names cite Keras 3's
``keras/src/layers/normalization/batch_normalization_test.py`` and tf-keras's
``tf_keras/src/layers/normalization/batch_normalization_test.py``.
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

import cubn

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras' own NumPy 2 notices
REFUSED = {"two_axes", "axis2_rank4"}


def _cases(which):
    data = json.loads((FIXTURES / f"{which}_batch_normalization.json").read_text())
    return data["cases"]


def _weights_by_name(case, after=False):
    return dict(zip(case["weight_names"], case["weights_after" if after else "weights"]))


@pytest.mark.parametrize("which", ["tf_keras", "keras3"])
def test_fixture_configs_reproduce_the_library(backend, which):
    """Each config dict + weights, one training call: the output and the moving statistics the library wrote."""
    for name, case in _cases(which).items():
        cfg = case["config"]
        weights = [np.asarray(w, np.float32) for w in case["weights"]]
        x = np.asarray(case["x"], np.float32)
        if name in REFUSED:
            with pytest.raises(ValueError, match="axis"):
                cubn.from_keras(cfg, weights, input_shape=x.shape)
            continue
        if case["fused"] is False and len(x.shape) == 4:
            # tf-keras does not serialize fused=False: re-created from this config, tf-keras resolves fused=None
            # to True on rank 4 and feeds the Bessel-corrected variance -- as cubn does with the bare config
            n = x.size // x.shape[-1]
            plain = cubn.from_keras(cfg, weights, input_shape=x.shape)
            plain(backend.asarray(x))
            bm, bv = x.astype(np.float64).mean((0, 1, 2)), x.astype(np.float64).var((0, 1, 2))
            np.testing.assert_allclose(backend.to_numpy(plain.variables["moving_variance"]),
                                       0.5 * np.asarray(weights[3]) + 0.5 * bv * n / (n - 1), rtol=1e-5)
            cfg = dict(cfg, fused=False)  # what from_keras(layer) reads from the layer itself
        bn = cubn.from_keras(cfg, weights, input_shape=x.shape)
        assert bn.convention == which, name
        y = backend.to_numpy(bn(backend.asarray(x)))
        np.testing.assert_allclose(y, np.asarray(case["y"]), rtol=1e-4, atol=1e-4, err_msg=name)
        after = _weights_by_name(case, after=True)
        for k in ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"):
            if k in after:
                np.testing.assert_allclose(backend.to_numpy(bn.variables[k]), np.asarray(after[k]).reshape(-1), rtol=1e-5,
                                           atol=1e-6, err_msg=f"{name}: {k}")


def test_keras_version_detection_and_conventions():
    tfk, k3 = _cases("tf_keras"), _cases("keras3")
    w = lambda c: [np.asarray(a, np.float32) for a in c["weights"]]  # noqa: E731
    # Keras 3 writes a DTypePolicy dict and 'synchronized'; tf-keras a dtype string and resolved axis lists
    assert cubn.from_keras(k3["rank2"]["config"], w(k3["rank2"])).convention == "keras3"
    assert cubn.from_keras(tfk["rank2"]["config"], w(tfk["rank2"])).convention == "tf_keras"
    # forcing it is possible, an unknown value is refused
    assert cubn.from_keras(tfk["rank2"]["config"], w(tfk["rank2"]), keras="keras3").convention == "keras3"
    with pytest.raises(ValueError, match="keras"):
        cubn.from_keras(tfk["rank2"]["config"], w(tfk["rank2"]), keras="keras2")
    bare = {k: v for k, v in k3["rank2"]["config"].items() if k not in ("dtype", "synchronized")}
    with pytest.raises(ValueError, match="cannot tell"):
        cubn.from_keras(bare, w(k3["rank2"]))
    # tf-keras rank 2: fused resolves to False there, so the moving variance is the biased one
    x = np.asarray(tfk["rank2"]["x"], np.float32)
    bn = cubn.from_keras(tfk["rank2"]["config"], w(tfk["rank2"]))
    bn(x)
    np.testing.assert_allclose(bn.variables["moving_variance"],
                               np.asarray(_weights_by_name(tfk["rank2"], after=True)["moving_variance"]), rtol=1e-5)


def test_axes_that_cannot_be_mapped_are_refused():
    tfk = _cases("tf_keras")
    c = tfk["rank4_channels_last"]
    w = [np.asarray(a, np.float32) for a in c["weights"]]
    with pytest.raises(ValueError, match="input_shape"):
        cubn.from_keras(c["config"], w)  # axis [3]: the last axis of rank 4, or an inner one of rank 5?
    assert cubn.from_keras(c["config"], w, input_shape=(2, 2, 2, 3)).data_format == "NHWC"
    with pytest.raises(ValueError, match="several axes"):
        cubn.from_keras(tfk["two_axes"]["config"], [np.asarray(a, np.float32) for a in tfk["two_axes"]["weights"]])
    cfg = dict(c["config"], axis=-2)
    with pytest.raises(ValueError, match="axis=-2"):
        cubn.from_keras(cfg, w, input_shape=(2, 2, 3, 2))
    assert cubn.from_keras(dict(c["config"], axis=-3), w, input_shape=(2, 3, 2, 2)).data_format == "NCHW"  # axis 1
    serialized = {"class_name": "BatchNormalization", "config": c["config"],
                  "build_config": {"input_shape": [None, 2, 2, 3]}}
    assert cubn.from_keras(serialized, w).data_format == "NHWC"


# ---------------------------------------------------------------------------
# Real Keras 3 (torch backend)
# ---------------------------------------------------------------------------
def _keras3():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as e:  # keras absent, or its backend (torch by default here) absent
        pytest.skip(f"Keras 3 with the {os.environ['KERAS_BACKEND']!r} backend is not importable ({e})")
    if int(keras.__version__.split(".")[0]) < 3:
        pytest.skip("keras 2 installed; these tests need Keras 3")
    try:
        keras.backend.backend()
    except Exception as e:  # pragma: no cover - backend not importable
        pytest.skip(f"no Keras backend: {e}")
    return keras


def _np(keras, t):
    return np.asarray(keras.ops.convert_to_numpy(t))


# batch_normalization_test.py test_correctness (axis -1 / 1, moving initializers, momentum)
@pytest.mark.parametrize("axis,shape", [(-1, (5, 2, 3)), (1, (5, 3, 3, 2)), (-1, (6, 4))])
@pytest.mark.parametrize("momentum,epsilon,center,scale", [(0.0, 1e-3, True, True), (0.7, 0.5, False, True),
                                                          (0.7, 1e-5, True, False)])
def test_keras3_layer_training_steps(backend, rng, axis, shape, momentum, epsilon, center, scale):
    keras = _keras3()
    if len(shape) == 3 and axis == 1:
        pytest.skip("axis 1 of a rank-3 input is NCW, covered by the rank-4 case")
    layer = keras.layers.BatchNormalization(axis=axis, momentum=momentum, epsilon=epsilon, center=center, scale=scale,
                                            beta_initializer="random_normal", gamma_initializer="random_uniform",
                                            moving_mean_initializer="random_normal")
    layer.build(shape)
    bn = cubn.from_keras(layer)
    assert bn.convention == "keras3"
    for step in range(3):
        x = (5 + 10 * rng.standard_normal(shape)).astype(np.float32)
        want = _np(keras, layer(x, training=True))
        y = backend.to_numpy(bn(backend.asarray(x)))
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
        for k in ("moving_mean", "moving_variance"):  # Keras 3: always the biased variance
            np.testing.assert_allclose(backend.to_numpy(bn.variables[k]), _np(keras, getattr(layer, k)), rtol=1e-5,
                                       atol=1e-5, err_msg=f"{k} step {step}")
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(backend.to_numpy(bn(backend.asarray(x), is_training=False)),
                               _np(keras, layer(x, training=False)), rtol=1e-5, atol=1e-5)


# batch_normalization_test.py test_masked_broadcast_normalization and test_bachnorm_ignore_masked_values
def test_keras3_mask(backend, rng):
    keras = _keras3()
    shape = (4, 5, 3)
    layer = keras.layers.BatchNormalization(axis=-1, momentum=0.5, epsilon=1e-3)
    layer.build(shape)
    bn = cubn.from_keras(layer)
    x = (2 + rng.standard_normal(shape)).astype(np.float32)
    mask = rng.random(shape[:-1]) > 0.3
    mask[0, 0] = True
    want = _np(keras, layer(x, training=True, mask=mask))
    y = backend.to_numpy(bn(backend.asarray(x), mask=backend.asarray(mask)))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    for k in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(backend.to_numpy(bn.variables[k]), _np(keras, getattr(layer, k)), rtol=1e-5,
                                   atol=1e-6)
    # a broadcastable mask, as in test_masked_broadcast_normalization: ones everywhere -> y == 0 for constant x
    ones = np.ones((1, 2, 3, 4), np.float32)
    b2 = cubn.BatchNorm(decay=0.0, updates_collections=None, convention="keras3")
    out = b2(backend.asarray(ones), mask=backend.asarray(np.ones((1, 2, 1), np.float32)))
    np.testing.assert_allclose(backend.to_numpy(out), 0.0, atol=1e-6)
    np.testing.assert_allclose(backend.to_numpy(b2.variables["moving_mean"]), 1.0, atol=1e-6)
    np.testing.assert_allclose(backend.to_numpy(b2.variables["moving_variance"]), 0.0, atol=1e-6)


def test_mask_ignores_padding_values(backend):
    """batch_normalization_test.py test_bachnorm_ignore_masked_values: the padded steps do not count."""
    data = np.array([[[1, 5], [2, 5], [9, 9], [9, 9]] for _ in range(10)], np.float32)
    mask = np.array([[True, True, False, False]] * 10)
    bn = cubn.BatchNorm(decay=0.0, updates_collections=None)
    bn(backend.asarray(data), mask=backend.asarray(mask))
    np.testing.assert_allclose(backend.to_numpy(bn.variables["moving_mean"]), [1.5, 5.0], rtol=1e-6)
    np.testing.assert_allclose(backend.to_numpy(bn.variables["moving_variance"]), [0.25, 0.0], atol=1e-6)


def test_mask_shape_is_checked(rng):
    bn = cubn.BatchNorm(updates_collections=None)
    with pytest.raises(ValueError, match="mask"):
        bn(rng.standard_normal((4, 5, 3)).astype(np.float32), mask=np.ones((4,)))


# batch_normalization_test.py test_renorm_correctness (Keras 3's numbers, through from_keras)
def test_keras3_renorm(backend, rng):
    keras = _keras3()
    layer = keras.layers.BatchNormalization(axis=-1, epsilon=1e-3, momentum=0.9, renorm=True, renorm_momentum=0.8,
                                            renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 1.0})
    layer.build((None, 3))
    for name in ("moving_mean", "renorm_mean", "beta"):
        getattr(layer, name).assign(rng.normal(0.0, 1.0, 3).astype(np.float32))
    for name in ("renorm_stddev", "gamma"):
        getattr(layer, name).assign(np.abs(rng.normal(1.0, 0.3, 3)).astype(np.float32))
    bn = cubn.from_keras(layer)
    x = np.array([[4.0, 6.0, 2.0], [8.0, -2.0, 5.0], [6.0, 4.0, 3.0]], np.float32)
    want = _np(keras, layer(x, training=True))
    np.testing.assert_allclose(backend.to_numpy(bn(backend.asarray(x))), want, rtol=1e-5, atol=1e-5)
    for k in ("renorm_mean", "renorm_stddev", "moving_mean", "moving_stddev", "moving_variance"):
        np.testing.assert_allclose(backend.to_numpy(bn.variables[k]), _np(keras, getattr(layer, k)), rtol=1e-5,
                                   atol=1e-5, err_msg=k)


def test_keras3_refuses_axis_2_of_rank_4():
    keras = _keras3()
    layer = keras.layers.BatchNormalization(axis=2)
    layer.build((2, 3, 4, 5))
    with pytest.raises(ValueError, match="axis"):
        cubn.from_keras(layer)


# ---------------------------------------------------------------------------
# Ghost batch normalization: tf-keras's virtual_batch_size (formulas of tf-keras's batch_normalization.py)
# ---------------------------------------------------------------------------
def _ghost_reference(x, vbs, momentum, gamma, beta, eps, moving_mean, moving_var, axis=-1):
    """tf-keras: x reshaped to (vbs, G, ...): group j holds items j, j+G, ...; moving statistics move once
    toward the mean over groups of the groups' means and biased variances."""
    n = x.shape[0]
    g = n // vbs
    axis = axis % x.ndim
    red = tuple(a for a in range(x.ndim) if a != axis)
    y = np.empty_like(x, dtype=np.float64)
    means, variances = [], []
    for j in range(g):
        xj = x[j::g].astype(np.float64)
        m, v = xj.mean(red, keepdims=True), xj.var(red, keepdims=True)
        y[j::g] = (xj - m) / np.sqrt(v + eps) * gamma + beta
        means.append(m.reshape(-1))
        variances.append(v.reshape(-1))
    new_mean = moving_mean * momentum + np.mean(means, 0) * (1 - momentum)
    new_var = moving_var * momentum + np.mean(variances, 0) * (1 - momentum)
    return y, new_mean, new_var


@pytest.mark.parametrize("shape,fmt", [((8, 3), "NHWC"), ((6, 2, 2, 3), "NHWC"), ((6, 3, 2, 2), "NCHW")])
@pytest.mark.parametrize("in_place", [True, False])
def test_virtual_batch_size_forward_and_moving_statistics(train_backend, rng, shape, fmt, in_place):
    vbs = 2
    x = (3 + 2 * rng.standard_normal(shape)).astype(np.float32)
    c = shape[-1] if fmt == "NHWC" else shape[1]
    gamma, beta = rng.random(c).astype(np.float32) + 0.5, rng.standard_normal(c).astype(np.float32)
    coll = cubn.UpdateCollection()
    bn = cubn.BatchNorm(decay=0.6, scale=True, virtual_batch_size=vbs, data_format=fmt,
                        updates_collections=None if in_place else coll,
                        param_initializers={"gamma": train_backend.asarray(gamma), "beta": train_backend.asarray(beta)})
    axis = -1 if fmt == "NHWC" else 1
    bshape = [1] * len(shape)
    bshape[axis] = c
    want_y, want_m, want_v = _ghost_reference(x, vbs, 0.6, gamma.reshape(bshape), beta.reshape(bshape), 1e-3,
                                              np.zeros(c), np.ones(c), axis)
    y = bn(train_backend.asarray(x))
    if not in_place:
        assert len(coll) == 1
        cubn.run_updates(coll)
    np.testing.assert_allclose(train_backend.to_numpy(y), want_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(train_backend.to_numpy(bn.variables["moving_mean"]), want_m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(train_backend.to_numpy(bn.variables["moving_variance"]), want_v, rtol=1e-5, atol=1e-6)
    # inference ignores the ghost batches
    yi = bn(train_backend.asarray(x), is_training=False)
    m, v = want_m.reshape(bshape), want_v.reshape(bshape)
    np.testing.assert_allclose(train_backend.to_numpy(yi), (x - m) / np.sqrt(v + 1e-3) * gamma.reshape(bshape)
                               + beta.reshape(bshape), rtol=1e-4, atol=1e-4)


def test_virtual_batch_size_backward_matches_torch(train_backend, rng):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    x = (1 + rng.standard_normal((6, 4))).astype(np.float64)
    dy = rng.standard_normal(x.shape)
    gamma = rng.random(4) + 0.5
    bn = cubn.BatchNorm(scale=True, virtual_batch_size=3, updates_collections=None, activation_fn="relu",
                        param_initializers={"gamma": train_backend.asarray(gamma)})
    y = bn(train_backend.asarray(x))
    dx = bn.backward(train_backend.asarray(dy))
    tx = torch.tensor(x, requires_grad=True)
    tg, tb = torch.tensor(gamma, requires_grad=True), torch.zeros(4, dtype=torch.float64, requires_grad=True)
    out = torch.empty_like(tx)
    parts = []
    for j in range(2):  # groups: rows j, j+2, j+4
        parts.append(torch.relu(torch.nn.functional.batch_norm(tx[j::2], None, None, tg, tb, training=True, eps=1e-3)))
    out = torch.stack(parts, 1).reshape(6, 4)
    out.backward(torch.tensor(dy))
    np.testing.assert_allclose(train_backend.to_numpy(y), out.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(train_backend.to_numpy(dx), tx.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(train_backend.to_numpy(bn.gradients["gamma"]), tg.grad.numpy(), rtol=1e-9)
    np.testing.assert_allclose(train_backend.to_numpy(bn.gradients["beta"]), tb.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_virtual_batch_size_errors(rng):
    x = rng.standard_normal((6, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="multiple of virtual_batch_size=4"):
        cubn.BatchNorm(virtual_batch_size=4)(x)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="virtual_batch_size"):
            cubn.BatchNorm(virtual_batch_size=bad)
    with pytest.raises(ValueError, match="renorm"):
        cubn.BatchNorm(virtual_batch_size=2, renorm=True)
    with pytest.raises(ValueError, match="adjustment"):
        cubn.BatchNorm(virtual_batch_size=2, adjustment=lambda s: (1, 0))
    with pytest.raises(ValueError, match="batch_weights"):
        cubn.BatchNorm(virtual_batch_size=2)(x, batch_weights=np.ones(6))


# ---------------------------------------------------------------------------
# Real tf-keras (TensorFlow installed by hand; see tests/logs/)
# ---------------------------------------------------------------------------
def _tf_keras():
    try:
        import tensorflow as tf
        import tf_keras
    except ImportError as e:
        pytest.skip(f"tf-keras/TensorFlow not installed ({e}); run by hand, see docs/conventions.md")
    return tf, tf_keras


@pytest.mark.parametrize("shape,axis,kw", [
    ((8, 3), -1, dict(virtual_batch_size=2)),
    ((6, 2, 2, 3), -1, dict(virtual_batch_size=3)),
    ((6, 3, 2, 2), 1, dict(virtual_batch_size=2)),
    ((8, 3), -1, dict()),
    ((6, 2, 2, 3), -1, dict()),
    ((6, 4, 3), -1, dict()),
])
def test_tf_keras_layers(backend, rng, shape, axis, kw):
    tf, tfk = _tf_keras()
    layer = tfk.layers.BatchNormalization(axis=axis, momentum=0.7, beta_initializer="random_normal",
                                          gamma_initializer="random_uniform", **kw)
    layer.build(shape)
    bn = cubn.from_keras(layer)
    assert bn.convention == "tf_keras" and bn.virtual_batch_size == kw.get("virtual_batch_size")
    for step in range(3):
        x = (1 + 2 * rng.standard_normal(shape) + step).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        tx = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(tx)
            ty = layer(tx, training=True)
        gx = tape.gradient(ty, tx, output_gradients=tf.constant(dy))
        y = bn(backend.asarray(x))
        dx = bn.backward(backend.asarray(dy))
        np.testing.assert_allclose(backend.to_numpy(y), ty.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(backend.to_numpy(dx), gx.numpy(), rtol=1e-3, atol=1e-4)
        for k in ("moving_mean", "moving_variance"):
            np.testing.assert_allclose(backend.to_numpy(bn.variables[k]), getattr(layer, k).numpy().reshape(-1),
                                       rtol=1e-5, atol=1e-5, err_msg=f"{k} step {step}")
