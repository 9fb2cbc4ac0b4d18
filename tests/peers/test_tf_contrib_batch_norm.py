"""tf.contrib.layers.batch_norm, one test (at least) per argument, ported from TF 1.x
``tensorflow/contrib/layers/python/layers/layers_test.py`` (class BatchNormTest).

Expected values come from the formulas those tests use (NumPy in float64 and
TF's update rules), never from cubn.
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from cubn import compat, regularizers
from conftest import assert_close
import reference as ref


@pytest.fixture(autouse=True)
def fresh_graph():
    compat.reset_default_graph()
    yield
    compat.reset_default_graph()


def _images(rng, fmt="NHWC", n=10, hw=2, c=3, offset=0.0):
    shape = (n, hw, hw, c) if fmt == "NHWC" else (n, c, hw, hw)
    axes = (0, 1, 2) if fmt == "NHWC" else (0, 2, 3)
    return (rng.random(shape) + offset).astype(np.float32), axes


# layers_test.py BatchNormTest.testInvalidDataFormat
def test_data_format_invalid_is_a_value_error(rng):
    with pytest.raises(ValueError, match="data_format"):
        compat.batch_norm(rng.random((2, 3, 3, 3)).astype(np.float32), data_format="CHWN")


# layers_test.py BatchNormTest.testUnknownShape (rank must be known: here, >= 2)
def test_inputs_rank_checked(rng):
    with pytest.raises(ValueError, match="rank"):
        compat.batch_norm(rng.random(5).astype(np.float32))


# layers_test.py BatchNormTest._testNoneUpdatesCollections (NHWC / NCHW, fused and not)
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("fused", [False, True])
def test_decay_and_none_updates_collections_converge(train_backend, rng, fmt, fused):
    x, axes = _images(rng, fmt)
    expected_mean, expected_var = x.astype(np.float64).mean(axes), x.astype(np.float64).var(axes)
    if fused:  # _addBesselsCorrection
        n = x.size // 3
        expected_var = expected_var * n / (n - 1)
    for _ in range(10):
        compat.batch_norm(train_backend.asarray(x), decay=0.1, updates_collections=None, fused=fused, data_format=fmt)
    assert compat.get_collection(compat.GraphKeys.UPDATE_OPS) == []
    v = compat.get_layer("BatchNorm").variables
    assert_close(train_backend.to_numpy(v["moving_mean"]), expected_mean, "float32")
    assert_close(train_backend.to_numpy(v["moving_variance"]), expected_var, "float32")


# layers_test.py BatchNormTest._testDelayedUpdateMovingVars and testUpdatesCollection
def test_updates_collections_delayed_and_named(train_backend, rng):
    x, axes = _images(rng)
    for _ in range(10):
        compat.batch_norm(train_backend.asarray(x), decay=0.1, fused=False)
        update_ops = compat.get_collection(compat.GraphKeys.UPDATE_OPS)
        assert len(update_ops) == 1  # one callable for both statistics (TF: two assign ops)
        cubn.run_updates()  # the default collection, by name, is the same list
    v = compat.get_layer("BatchNorm").variables
    assert_close(train_backend.to_numpy(v["moving_mean"]), x.astype(np.float64).mean(axes), "float32")
    assert_close(train_backend.to_numpy(v["moving_variance"]), x.astype(np.float64).var(axes), "float32")
    compat.batch_norm(train_backend.asarray(x), updates_collections="my_update_ops", scope="other")
    assert len(compat.get_collection("my_update_ops")) == 1
    assert len(compat.get_collection("update_ops")) == 0


def test_updates_collections_string_update_ops_reaches_run_updates(rng):
    """``updates_collections=tf.GraphKeys.UPDATE_OPS`` spelled as its value, "update_ops"."""
    x, axes = _images(rng, offset=5.0)
    compat.batch_norm(x, decay=0.0, updates_collections="update_ops", fused=False)
    assert len(cubn.UPDATE_OPS) == 1
    assert cubn.run_updates() == 1
    np.testing.assert_allclose(compat.get_layer("BatchNorm").variables["moving_mean"], x.mean(axes), rtol=1e-5)
    bn = cubn.BatchNorm(updates_collections="update_ops")  # the layer takes names too
    bn(x)
    assert len(cubn.UPDATE_OPS) == 1
    cubn.run_updates("update_ops")
    assert len(cubn.UPDATE_OPS) == 0


# layers_test.py BatchNormTest.testReuseUpdateOps: each call under reuse adds its updates
def test_reuse_update_ops_accumulate(rng):
    x, _ = _images(rng)
    with compat.arg_scope([compat.batch_norm], updates_collections="update_ops"):
        compat.batch_norm(x, scope="bn")
        assert len(compat.get_collection("update_ops")) == 1
        compat.batch_norm(x, scope="bn", reuse=True)
        assert len(compat.get_collection("update_ops")) == 2


# layers_test.py BatchNormTest.testCreateVariables / testMovingAverageVariables / testCreateMovingVars
@pytest.mark.parametrize("center,scale", [(True, True), (True, False), (False, True), (False, False)])
def test_center_scale_variables(rng, center, scale):
    x, _ = _images(rng)
    compat.batch_norm(x, center=center, scale=scale, updates_collections=None)
    names = sorted(n for n, _ in compat.get_collection(compat.GraphKeys.GLOBAL_VARIABLES))
    want = sorted(["BatchNorm/moving_mean", "BatchNorm/moving_variance"] + (["BatchNorm/beta"] if center else [])
                  + (["BatchNorm/gamma"] if scale else []))
    assert names == want
    assert len(compat.get_collection(compat.GraphKeys.MODEL_VARIABLES)) == len(want)
    assert sorted(n for n, _ in compat.get_collection(compat.GraphKeys.MOVING_AVERAGE_VARIABLES)) == \
        ["BatchNorm/moving_mean", "BatchNorm/moving_variance"]


# layers_test.py BatchNormTest.testMovingAverageVariablesZeroDebias / testZeroDebiasMovingMean
def test_zero_debias_moving_mean(train_backend, rng):
    x, axes = _images(rng, n=10, hw=3)
    for i in range(10):
        compat.batch_norm(train_backend.asarray(x), decay=0.1, updates_collections=None, zero_debias_moving_mean=True,
                          fused=False)
        # with one batch repeated, the debiased mean is the batch mean after every update
        v = compat.get_layer("BatchNorm").variables
        assert float(train_backend.to_numpy(v["moving_mean/local_step"])) == i + 1
        assert_close(train_backend.to_numpy(v["moving_mean"]), x.astype(np.float64).mean(axes), "float32")
    assert_close(train_backend.to_numpy(v["moving_mean/biased"]), x.astype(np.float64).mean(axes), "float32")
    assert_close(train_backend.to_numpy(v["moving_variance"]), x.astype(np.float64).var(axes), "float32")
    names = {n for n, _ in compat.get_collection(compat.GraphKeys.GLOBAL_VARIABLES)}
    assert {"BatchNorm/moving_mean/biased", "BatchNorm/moving_mean/local_step"} <= names


# layers_test.py BatchNormTest.testCustomInitializer: (9 - 5) / sqrt(4) * 2 + 5 == 9
def test_param_initializers_and_epsilon(backend, rng):
    x = np.full((5, 3, 3, 3), 9.0, np.float32)
    c = lambda v: (lambda shape: np.full(shape, v, np.float32))  # noqa: E731
    y = compat.batch_norm(backend.asarray(x), is_training=False, scale=True, epsilon=0.0,
                          param_initializers={"beta": c(5.0), "gamma": c(2.0), "moving_mean": c(5.0),
                                              "moving_variance": c(4.0)})
    np.testing.assert_allclose(backend.to_numpy(y), x)


# layers_test.py BatchNormTest._runBatchNormalizationWithFormat (epsilon=0.5, arange initializers)
@pytest.mark.parametrize("shape", [(7, 3, 5), (5, 2, 3, 4), (11, 3, 2, 4, 5)])
@pytest.mark.parametrize("is_training", [False, True])
def test_nhwc_and_nchw_produce_the_same_output(backend, shape, is_training):
    c = shape[-1]
    images = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    init = {"beta": np.arange(2, c + 2, dtype=np.float32), "gamma": np.arange(10, c + 10, dtype=np.float32) * 2,
            "moving_mean": np.arange(3, c + 3, dtype=np.float32) * 5,
            "moving_variance": np.arange(1, c + 1, dtype=np.float32) * 4}
    axis = len(shape) - 1
    if is_training:
        m, v = ref.moments(images, ref.reduce_axes(len(shape), axis))
    else:
        m, v = init["moving_mean"], init["moving_variance"]
    want = ref.batch_norm(images, m, v, init["beta"], init["gamma"], 0.5, axis)
    outs = []
    for fmt in ("NHWC", "NCHW"):
        x = images if fmt == "NHWC" else np.moveaxis(images, -1, 1).copy()
        kw = {k: backend.asarray(a) for k, a in init.items()}
        y = compat.batch_norm(backend.asarray(x), is_training=is_training, scale=True, epsilon=0.5,
                              param_initializers=kw, data_format=fmt, scope=fmt, updates_collections=None)
        y = backend.to_numpy(y)
        outs.append(y if fmt == "NHWC" else np.moveaxis(y, 1, -1))
    for y in outs:
        assert_close(y, want, "float32", scale=np.abs(want).max())


# layers_test.py BatchNormTest.testCreateOpBetaRegularizer / testCreateOpGammaRegularizer
@pytest.mark.parametrize("which", ["beta", "gamma"])
def test_param_regularizers_fill_regularization_losses(rng, which):
    x, _ = _images(rng)
    init = rng.standard_normal(3).astype(np.float32)
    reg = regularizers.l2_regularizer(0.1)
    compat.batch_norm(x, param_regularizers={which: reg}, scale=True, param_initializers={which: init},
                      updates_collections=None)
    losses = compat.get_collection(compat.GraphKeys.REGULARIZATION_LOSSES)
    assert len(losses) == 1 and losses[0].name == f"BatchNorm/{which}/Regularizer"
    want = 0.1 * 0.5 * float((init.astype(np.float64) ** 2).sum())  # tf.contrib's l2: scale * sum(w^2) / 2
    np.testing.assert_allclose(float(losses[0]), want, rtol=1e-6)
    np.testing.assert_allclose(compat.get_regularization_loss(), want, rtol=1e-6)
    np.testing.assert_allclose(sum(compat.losses.get_regularization_losses()), want, rtol=1e-6)
    # reuse does not add the loss again; the loss follows the variable's value
    compat.batch_norm(x, param_regularizers={which: reg}, scale=True, scope="BatchNorm", reuse=True,
                      updates_collections=None)
    assert len(compat.get_collection(compat.GraphKeys.REGULARIZATION_LOSSES)) == 1
    compat.get_layer("BatchNorm")._vars[which][...] = 2.0
    np.testing.assert_allclose(float(losses[0]), 0.1 * 0.5 * 4.0 * 3, rtol=1e-6)
    assert compat.get_regularization_losses(scope="nothing") == []


# layers_test.py BatchNormTest._testCreateOp: no regularizer, no loss
def test_no_param_regularizers_no_losses(rng):
    compat.batch_norm(_images(rng)[0])
    assert compat.get_collection(compat.GraphKeys.REGULARIZATION_LOSSES) == []
    assert compat.get_regularization_loss() == 0.0


# layers_test.py BatchNormTest.testEvalMovingVars / testNoUpdatesWhenIsTrainingFalse / testNoneUpdatesCollectionNoTraining
@pytest.mark.parametrize("updates_collections", ["update_ops", None])
def test_is_training_false_uses_and_keeps_moving_vars(backend, rng, updates_collections):
    x, axes = _images(rng, hw=3)
    m, v = x.astype(np.float64).mean(axes), x.astype(np.float64).var(axes)
    init = {"moving_mean": backend.asarray(m.astype(np.float32)), "moving_variance": backend.asarray(v.astype(np.float32))}
    for _ in range(3):
        y = compat.batch_norm(backend.asarray(rng.random(x.shape).astype(np.float32)), decay=0.1, is_training=False,
                              param_initializers=init, updates_collections=updates_collections)
    assert compat.get_collection(compat.GraphKeys.UPDATE_OPS) == []
    vars_ = compat.get_layer("BatchNorm").variables
    assert_close(backend.to_numpy(vars_["moving_mean"]), m, "float32")
    assert_close(backend.to_numpy(vars_["moving_variance"]), v, "float32")
    assert y.shape == x.shape


# layers_test.py BatchNormTest._testIsTrainingVariable: after convergence training == inference
def test_is_training_outputs_agree_after_convergence(train_backend, rng):
    x, axes = _images(rng, fmt="NCHW")
    out_true = compat.batch_norm(train_backend.asarray(x), decay=0.1, data_format="NCHW", fused=False, scope="bn")
    out_false = compat.batch_norm(train_backend.asarray(x), decay=0.1, data_format="NCHW", fused=False, is_training=False, scope="bn")
    assert not np.allclose(train_backend.to_numpy(out_true), train_backend.to_numpy(out_false))
    cubn.run_updates()
    for _ in range(10):
        compat.batch_norm(train_backend.asarray(x), decay=0.1, data_format="NCHW", fused=False, scope="bn")
        cubn.run_updates()
    out_true = compat.batch_norm(train_backend.asarray(x), decay=0.1, data_format="NCHW", fused=False, scope="bn")
    cubn.UPDATE_OPS.clear()
    out_false = compat.batch_norm(train_backend.asarray(x), decay=0.1, data_format="NCHW", fused=False, is_training=False, scope="bn")
    np.testing.assert_allclose(train_backend.to_numpy(out_true), train_backend.to_numpy(out_false), atol=1e-3)


# layers_test.py BatchNormTest.testReuseVariables / _testReuseVars
def test_reuse_and_scope(rng):
    x, axes = _images(rng)
    compat.batch_norm(x, scale=True, scope="bn")
    compat.batch_norm(x, scale=True, scope="bn", reuse=True)
    names = [n for n, _ in compat.get_collection(compat.GraphKeys.GLOBAL_VARIABLES)]
    assert sorted(names) == ["bn/beta", "bn/gamma", "bn/moving_mean", "bn/moving_variance"]
    train = compat.batch_norm(x, decay=0.1, is_training=True, scope="BN")
    evl = compat.batch_norm(x, decay=0.1, is_training=False, scope="BN", reuse=True)
    assert not np.allclose(train, evl)
    with pytest.raises(ValueError, match="does not exist"):
        compat.batch_norm(x, scope="missing", reuse=True)


# layers_test.py BatchNormTest.testVariablesCollections
def test_variables_collections_by_variable(rng):
    spec = {"beta": ["beta"], "gamma": ["gamma"], "moving_mean": ["moving_mean"], "moving_variance": ["moving_variance"]}
    compat.batch_norm(_images(rng)[0], scale=True, variables_collections=spec)
    for var, colls in spec.items():
        coll = compat.get_collection(colls[0])
        assert len(coll) == 1 and coll[0][0] == f"BatchNorm/{var}"


# layers_test.py AvgPool2DTest.testCollectOutputs (the outputs_collections convention)
def test_outputs_collections(rng):
    y = compat.batch_norm(_images(rng)[0], outputs_collections="outputs")
    assert compat.get_collection("outputs")[0] is y


# layers_test.py BatchNormTest (trainable): trainable adds beta/gamma to TRAINABLE_VARIABLES
@pytest.mark.parametrize("trainable", [True, False])
def test_trainable(rng, trainable):
    x, _ = _images(rng)
    y = compat.batch_norm(x, scale=True, trainable=trainable, updates_collections=None)
    names = sorted(n for n, _ in compat.get_collection(compat.GraphKeys.TRAINABLE_VARIABLES))
    assert names == (["BatchNorm/beta", "BatchNorm/gamma"] if trainable else [])
    compat.get_layer("BatchNorm").backward(np.ones_like(y))
    assert sorted(compat.get_layer("BatchNorm").gradients) == (["beta", "gamma"] if trainable else [])


# layers_test.py BatchNormTest.testWeightedMomentsFused: TF refuses weights with fused=True;
# cubn computes the weighted statistics (tf.nn.weighted_moments' formulas) on every path.
def test_batch_weights_weighted_statistics(train_backend, rng):
    x, axes = _images(rng, n=6, offset=1e4)
    w = rng.random(6)
    w[2] = 0.0
    compat.batch_norm(train_backend.asarray(x), batch_weights=train_backend.asarray(w), decay=0.0,
                      updates_collections=None)
    m, v = ref.moments(x, axes, weights=w[:, None, None, None])
    vars_ = compat.get_layer("BatchNorm").variables
    assert_close(train_backend.to_numpy(vars_["moving_mean"]), m, "float32", scale=1e4)
    # biased (weights never take TF's fused path); float32 at offset 1e4: absolute error ~ eps32 * offset
    np.testing.assert_allclose(train_backend.to_numpy(vars_["moving_variance"]), v, rtol=1e-4, atol=1e-6 * 1e4)


# tf.contrib's activation_fn is applied after the normalization
def test_activation_fn(backend, rng):
    x, axes = _images(rng)
    y = compat.batch_norm(backend.asarray(x), activation_fn="relu", updates_collections=None)
    m, v = ref.moments(x, axes)
    assert_close(backend.to_numpy(y), np.maximum(ref.batch_norm(x, m, v, None, None, 1e-3, 3), 0), "float32")


# Batch renormalization (tf.contrib passes renorm / renorm_clipping / renorm_decay to tf.layers, whose
# normalization_test.py checks r = clip(sd / rs), d = clip((mean - rm) / rs)); the first step from the initial
# renorm statistics (mean 0, stddev 1).
def test_renorm_clipping_and_decay(train_backend, rng):
    x, axes = _images(rng, offset=3.0)
    clip = {"rmax": 1.5, "rmin": 0.5, "dmax": 0.25}
    y = compat.batch_norm(train_backend.asarray(x), renorm=True, renorm_clipping=clip, renorm_decay=0.5,
                          decay=0.9, updates_collections=None, epsilon=1e-3)
    m, v = ref.moments(x, axes)
    sd = np.sqrt(v + 1e-3)
    r = np.clip(sd / 1.0, 0.5, 1.5)
    d = np.clip((m - 0.0) / 1.0, -0.25, 0.25)
    want = ((x - m) / sd) * r + d
    assert_close(train_backend.to_numpy(y), want, "float32")
    vars_ = compat.get_layer("BatchNorm").variables
    assert_close(train_backend.to_numpy(vars_["renorm_mean"]), 0.5 * m, "float32")
    assert_close(train_backend.to_numpy(vars_["renorm_stddev"]), 1 - 0.5 * (1 - sd), "float32")


# tf.contrib's adjustment(shape) -> (scale, bias), applied to the normalized value in training only
def test_adjustment(backend, rng):
    x, axes = _images(rng)
    a_s, a_b = np.float32([1.05, 0.95, 1.0]), np.float32([0.1, -0.1, 0.0])
    y = compat.batch_norm(backend.asarray(x), adjustment=lambda shape: (backend.asarray(a_s), backend.asarray(a_b)),
                          updates_collections=None)
    m, v = ref.moments(x, axes)
    assert_close(backend.to_numpy(y), ref.batch_norm(x, m, v, a_b, a_s, 1e-3, 3), "float32")
    yi = compat.batch_norm(backend.asarray(x), adjustment=lambda shape: (a_s, a_b), is_training=False,
                           scope="BatchNorm", reuse=True)
    mm = backend.to_numpy(compat.get_layer("BatchNorm").variables["moving_mean"])
    mv = backend.to_numpy(compat.get_layer("BatchNorm").variables["moving_variance"])
    assert_close(backend.to_numpy(yi), ref.batch_norm(x, mm, mv, None, None, 1e-3, 3), "float32")
