"""cubn.compat: tf.contrib.layers.batch_norm's signature, scope/reuse, slim's normalizer_fn pattern."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import cubn
from cubn import compat


@pytest.fixture(autouse=True)
def fresh_graph():
    compat.reset_default_graph()
    yield
    compat.reset_default_graph()


SEED_000_SIGNATURE = (
    "inputs, decay=0.999, center=True, scale=False, epsilon=0.001, activation_fn=None, "
    "param_initializers=None, param_regularizers=None, updates_collections=UPDATE_OPS, is_training=True, "
    "reuse=None, variables_collections=None, outputs_collections=None, trainable=True, batch_weights=None, "
    "fused=None, data_format=DATA_FORMAT_NHWC, zero_debias_moving_mean=False, scope=None, renorm=False, "
    "renorm_clipping=None, renorm_decay=0.99, adjustment=None"
)


def test_signature_is_seed_000():
    params = inspect.signature(compat.batch_norm).parameters
    want = [p.split("=")[0].strip() for p in SEED_000_SIGNATURE.split(",")]
    assert list(params) == want
    defaults = {p.split("=")[0].strip(): p.split("=")[1].strip() for p in SEED_000_SIGNATURE.split(",") if "=" in p}
    # tf.GraphKeys.UPDATE_OPS is the string "update_ops", and that collection is cubn.UPDATE_OPS
    assert params["updates_collections"].default == compat.GraphKeys.UPDATE_OPS == "update_ops"
    assert compat.get_collection(params["updates_collections"].default) is cubn.UPDATE_OPS
    assert params["data_format"].default == "NHWC"
    for k, v in defaults.items():
        if k not in ("updates_collections", "data_format"):
            assert repr(params[k].default) == v, k


def fully_connected(x, w, normalizer_fn=None, normalizer_params=None, scope=None):
    """A slim-style layer written the way slim.fully_connected uses normalizer_fn."""
    with compat.variable_scope(scope):
        y = x @ w
        if normalizer_fn is not None:
            y = normalizer_fn(y, **(normalizer_params or {}))
        return np.maximum(y, 0)


def test_slim_normalizer_fn_pattern(rng):
    is_training = True
    batch_norm_params = {  # as slim code writes them
        "is_training": is_training,
        "zero_debias_moving_mean": True,
        "decay": 0.9,
        "epsilon": 1e-5,
        "scale": True,
        "updates_collections": compat.GraphKeys.UPDATE_OPS,
    }
    w1, w2 = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)

    def net(x, training):
        params = dict(batch_norm_params, is_training=training)
        h = fully_connected(x, w1, normalizer_fn=compat.batch_norm, normalizer_params=params, scope="fc1")
        return fully_connected(h, w2, normalizer_fn=compat.batch_norm, normalizer_params=params, scope="fc2")

    for _ in range(5):
        x = (3 + rng.standard_normal((32, 8))).astype(np.float32)
        net(x, True)
        update_ops = compat.get_collection(compat.GraphKeys.UPDATE_OPS)
        assert len(update_ops) == 2  # one per batch_norm, deferred as in TF
        cubn.run_updates(update_ops)
    assert sorted(compat._layers) == ["fc1/BatchNorm", "fc2/BatchNorm"]
    l1 = compat.get_layer("fc1/BatchNorm")
    assert l1.zero_debias_moving_mean and l1.scale and l1.decay == 0.9
    assert float(l1.variables["moving_mean/local_step"]) == 5.0
    assert not np.allclose(l1.variables["moving_mean"], 0)
    net(x, False)  # inference adds no update
    assert len(compat.get_collection(compat.GraphKeys.UPDATE_OPS)) == 0
    names = [n for n, _ in compat.get_collection(compat.GraphKeys.GLOBAL_VARIABLES)]
    assert "fc1/BatchNorm/moving_mean" in names and "fc2/BatchNorm/gamma" in names


def test_scope_reuse_rules(rng):
    x = rng.standard_normal((6, 3)).astype(np.float32)
    compat.batch_norm(x, scope="bn", updates_collections=None)
    with pytest.raises(ValueError, match="already exists"):
        compat.batch_norm(x, scope="bn", reuse=False)
    compat.batch_norm(x, scope="bn", reuse=True, updates_collections=None)
    with pytest.raises(ValueError, match="does not exist"):
        compat.batch_norm(x, scope="other", reuse=True)
    with pytest.raises(ValueError, match="cannot be used without a scope"):
        compat.batch_norm(x, reuse=True)
    with pytest.raises(ValueError, match="scale=False.*scale=True"):
        compat.batch_norm(x, scope="bn", scale=True)
    with compat.variable_scope("block", reuse=True):
        with pytest.raises(ValueError, match="does not exist"):
            compat.batch_norm(x, scope="bn")


def test_unscoped_calls_are_named_by_call_site(rng):
    x = rng.standard_normal((6, 3)).astype(np.float32)
    for _ in range(3):  # the same two lines, three "steps"
        compat.batch_norm(x, updates_collections=None)
        compat.batch_norm(x * 2, updates_collections=None)
    assert sorted(compat._layers) == ["BatchNorm", "BatchNorm_1"]


def test_collections_and_outputs(rng):
    x = rng.standard_normal((6, 3)).astype(np.float32)
    mine, outs = [], []
    y = compat.batch_norm(x, scope="bn", variables_collections=mine, outputs_collections=outs,
                          updates_collections="my_updates")
    assert {n for n, _ in mine} == {"bn/beta", "bn/moving_mean", "bn/moving_variance"}
    assert outs[0] is y
    assert len(compat.get_collection("my_updates")) == 1
    cubn.run_updates(compat.get_collection("my_updates"))
