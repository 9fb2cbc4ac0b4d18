"""slim: ``arg_scope`` / ``add_arg_scope`` (TF 1.x
``tensorflow/contrib/framework/python/ops/arg_scope_test.py``), TF's naming and
reuse inside variable scopes (``tensorflow/python/kernel_tests/variable_scope_test.py``
and the slim habit of building a tower twice), ``fully_connected`` with
``normalizer_fn`` (``layers_test.py`` FCTest) and slim's model-building pattern, run
literally, forward and backward (gradients checked against PyTorch's autograd).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import cubn
from cubn import compat, regularizers
from cubn.compat import add_arg_scope, arg_scope


@pytest.fixture(autouse=True)
def fresh_graph():
    compat.reset_default_graph()
    yield
    compat.reset_default_graph()


@add_arg_scope
def func1(*args, **kwargs):
    return (args, kwargs)


@add_arg_scope
def func2(*args, **kwargs):
    return (args, kwargs)


@add_arg_scope
def func3(args, a=None, b=1, c=2):
    return (args, a, b, c)


def _key(f):
    return f._key_op


# arg_scope_test.py testEmptyArgScope / testClearArgScope
def test_empty_and_cleared_scope():
    assert compat.current_arg_scope() == {}
    key_op = _key(func1)
    with arg_scope([func1], a=1):
        assert compat.current_arg_scope() == {key_op: {"a": 1}}
        with arg_scope({}):
            assert compat.current_arg_scope() == {}
    assert compat.current_arg_scope() == {}


# arg_scope_test.py testNonDecorated / testUnexpectedArg
def test_non_decorated_and_unknown_argument():
    def plain(a=None):
        return a

    with pytest.raises(ValueError, match="add_arg_scope"):
        with arg_scope([plain], a=1):
            pass
    with pytest.raises(TypeError, match="'d'"):
        with arg_scope([func3], d=1):
            pass


# arg_scope_test.py testCurrentArgScope / testArgScopedArguments / testDocString
def test_current_scope_and_scoped_arguments():
    with arg_scope([func1], a=1, b=None, c=[1]) as sc:
        assert sc == {_key(func1): {"a": 1, "b": None, "c": [1]}}
    assert compat.arg_scoped_arguments(func3) == ["args", "a", "b", "c"]
    assert func3.__name__ == "func3"
    assert compat.has_arg_scope(compat.batch_norm) and compat.has_arg_scope(compat.fully_connected)


# arg_scope_test.py testSimpleArgScope / testSimpleArgScopeWithTuple
@pytest.mark.parametrize("ops", [[func1], (func1,)])
def test_simple_scope(ops):
    with arg_scope(ops, a=1, b=None, c=[1]):
        args, kwargs = func1(0)
    assert args == (0,) and kwargs == {"a": 1, "b": None, "c": [1]}


# arg_scope_test.py testOverwriteArgScope (the call site wins)
def test_call_site_overrides():
    with arg_scope([func1], a=1, b=None, c=[1]):
        args, kwargs = func1(0, b=2)
    assert kwargs == {"a": 1, "b": 2, "c": [1]}


# arg_scope_test.py testNestedArgScope / testSharedArgScope / testPartiallySharedArgScope
def test_nested_and_shared_scopes():
    with arg_scope([func1, func2], a=1, b=None, c=[1]):
        assert func1(0)[1] == func2(0)[1] == {"a": 1, "b": None, "c": [1]}
        with arg_scope([func2], b=2, d=[2]):
            assert func1(0)[1] == {"a": 1, "b": None, "c": [1]}
            assert func2(0)[1] == {"a": 1, "b": 2, "c": [1], "d": [2]}
        assert func2(0)[1] == {"a": 1, "b": None, "c": [1]}


# arg_scope_test.py testReuseArgScope / testReuseArgScopeNested (re-entering a saved scope)
def test_reenter_saved_scope():
    with arg_scope([func1], a=1, b=None, c=[1]) as sc1:
        pass
    with arg_scope([func2], b=2) as outer:
        with arg_scope(sc1):
            assert compat.current_arg_scope() == sc1
            assert func1(0)[1] == {"a": 1, "b": None, "c": [1]}
        assert compat.current_arg_scope() == outer
    with pytest.raises(ValueError, match="no keywords"):
        with arg_scope(sc1, a=2):
            pass


def test_slim_scope_function_pattern(rng):
    """slim's saved scope: ``def new_arg_sc(): with slim.arg_scope(...) as sc: return sc`` then ``with arg_scope(new_arg_sc())``."""
    def new_arg_sc():
        with arg_scope([compat.fully_connected], trainable=True, activation_fn="relu",
                       weights_initializer=compat.truncated_normal_initializer(stddev=0.01),
                       weights_regularizer=regularizers.l2_regularizer(0.0001)):
            with arg_scope([compat.batch_norm], decay=0.9, updates_collections=None, scale=True) as sc:
                return sc

    x = rng.standard_normal((16, 5)).astype(np.float32)
    with arg_scope(new_arg_sc()):
        y = compat.fully_connected(x, 4, normalizer_fn=compat.batch_norm, scope="fc1")
    layer = compat.get_layer("fc1/BatchNorm")
    assert layer.decay == 0.9 and layer.scale and layer.updates_collections is None
    w = compat.get_layer("fc1").variables["weights"]
    assert np.abs(w).max() <= 0.02 + 1e-7  # truncated normal: within two standard deviations
    assert len(compat.get_collection(compat.GraphKeys.REGULARIZATION_LOSSES)) == 1
    assert (y >= 0).all()


# ---------------------------------------------------------------------------
# Names and reuse inside variable scopes
# ---------------------------------------------------------------------------
def _tower(x):
    h = compat.batch_norm(x, updates_collections=None)
    return compat.batch_norm(h * 2, updates_collections=None)


def test_names_in_creation_order_and_reuse_by_order(rng):
    """variable_scope_test.py (default names are counted per scope entry): the second tower,
    built from other lines under reuse=True, resolves to the first tower's layers by order."""
    x = rng.standard_normal((8, 3)).astype(np.float32)
    with compat.variable_scope("tower"):
        _tower(x)
    assert sorted(compat._layers) == ["tower/BatchNorm", "tower/BatchNorm_1"]
    with compat.variable_scope("tower", reuse=True):
        a = compat.batch_norm(x, updates_collections=None)  # a different line than the creating call
        b = compat.batch_norm(a * 2, updates_collections=None)
    assert sorted(compat._layers) == ["tower/BatchNorm", "tower/BatchNorm_1"]
    with compat.variable_scope("tower", reuse=True):
        _tower(x)
        with pytest.raises(ValueError, match="tower/BatchNorm_2.*does not exist"):
            compat.batch_norm(x)


def test_build_the_net_twice_siamese(rng):
    """slim's habit: net(x1) then net(x2) with reuse=True shares every layer."""
    def net(x, reuse=None):
        with compat.variable_scope("siamese", reuse=reuse):
            h = compat.fully_connected(x, 4, normalizer_fn=compat.batch_norm,
                                       normalizer_params={"updates_collections": None})
            return compat.fully_connected(h, 2, activation_fn=None)

    x1, x2 = rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    net(x1)
    before = sorted(compat._layers)
    net(x2, reuse=True)
    assert sorted(compat._layers) == before == ["siamese/fully_connected", "siamese/fully_connected/BatchNorm",
                                                "siamese/fully_connected_1"]


def test_training_loop_reuses_its_layers(rng):
    x = rng.standard_normal((8, 3)).astype(np.float32)
    for _ in range(3):  # the same lines every step, no scope
        compat.batch_norm(x, updates_collections=None)
        compat.batch_norm(x * 2, updates_collections=None)
    assert sorted(compat._layers) == ["BatchNorm", "BatchNorm_1"]
    with compat.variable_scope("model"):
        for _ in range(3):
            compat.batch_norm(x, updates_collections=None)
    assert "model/BatchNorm" in compat._layers and "model/BatchNorm_1" not in compat._layers


def test_rerun_cell_warns(rng):
    """The same code run again from another file (what a re-run notebook cell is) creates new layers, and says so."""
    x = rng.standard_normal((8, 3)).astype(np.float32)
    src = "y = compat.batch_norm(x, updates_collections=None)\n"

    def run_cell(filename):  # one place runs every cell, as a notebook kernel does
        exec(compile(src, filename, "exec"), {"compat": compat, "x": x})

    seen = []
    for cell in ("<cell-1>", "<cell-2>", "<cell-2>"):  # the third: the same cell again, reused silently
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_cell(cell)
        seen.append([str(w.message) for w in caught if issubclass(w.category, compat.LayerCreatedAgainWarning)])
    assert seen[0] == [] and seen[2] == []
    assert len(seen[1]) == 1 and "'BatchNorm'" in seen[1][0] and "'BatchNorm_1'" in seen[1][0]
    assert sorted(compat._layers) == ["BatchNorm", "BatchNorm_1"]


def test_reuse_rules(rng):
    x = rng.standard_normal((6, 3)).astype(np.float32)
    compat.batch_norm(x, scope="bn", updates_collections=None)
    with pytest.raises(ValueError, match="already exists"):
        compat.batch_norm(x, scope="bn", reuse=False)
    compat.batch_norm(x, scope="bn", reuse=compat.AUTO_REUSE, updates_collections=None)
    with pytest.raises(ValueError, match="without a scope"):
        compat.batch_norm(x, reuse=True)
    with compat.variable_scope(None, default_name="block") as sc:
        assert sc.name == "block"
    with compat.variable_scope(None, default_name="block") as sc2:
        assert sc2.name == "block_1"
    with compat.variable_scope(sc, reuse=True):
        pass


# ---------------------------------------------------------------------------
# fully_connected
# ---------------------------------------------------------------------------
# layers_test.py FCTest.testCreateFC / testCreateFCWithScope / testCreateFcCreatesWeightsAndBiasesVars
def test_fully_connected_variables_and_names(backend, rng):
    x = backend.asarray(rng.standard_normal((5, 3)).astype(np.float32))
    y = compat.fully_connected(x, 7, scope="fc1")
    assert y.shape == (5, 7)
    names = sorted(n for n, _ in compat.get_collection(compat.GraphKeys.TRAINABLE_VARIABLES))
    assert names == ["fc1/biases", "fc1/weights"]
    y2 = compat.fully_connected(x, 7)
    assert "fully_connected" in compat._layers
    w = backend.to_numpy(compat.get_layer("fully_connected").variables["weights"])
    limit = np.sqrt(6 / (3 + 7))  # xavier_initializer(): Glorot uniform
    assert np.abs(w).max() <= limit and w.std() > limit / 10
    np.testing.assert_allclose(backend.to_numpy(y2), np.maximum(backend.to_numpy(x) @ w, 0), rtol=1e-6, atol=1e-6)


# layers_test.py FCTest.testCreateFCWithBN: with a normalizer there are no biases
def test_fully_connected_with_batch_norm_has_no_biases(rng):
    x = rng.standard_normal((5, 3)).astype(np.float32)
    compat.fully_connected(x, 4, normalizer_fn=compat.batch_norm, normalizer_params={"scale": True}, scope="fc1")
    assert sorted(compat.get_layer("fc1").variables) == ["weights"]
    assert sorted(compat.get_layer("fc1/BatchNorm").variables) == ["beta", "gamma", "moving_mean", "moving_variance"]


def test_slim_normalizer_pattern_forward_and_backward(rng):
    """slim's batch_norm_params dict passed literally as normalizer_params; gradients as PyTorch's autograd."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    is_training = True
    batch_norm_params = {
        "is_training": is_training,
        "zero_debias_moving_mean": True,
        "decay": 0.9,
        "epsilon": 1e-5,
        "scale": True,
        "updates_collections": compat.GraphKeys.UPDATE_OPS,
    }
    x = (3 + rng.standard_normal((16, 5))).astype(np.float64)
    with arg_scope([compat.fully_connected], activation_fn="relu", normalizer_fn=compat.batch_norm,
                   normalizer_params=batch_norm_params):
        h = compat.fully_connected(x, 6, scope="fc1")
        y = compat.fully_connected(h, 3, scope="fc2", activation_fn=None, normalizer_fn=None)
    assert len(compat.get_collection(compat.GraphKeys.UPDATE_OPS)) == 1
    dy = rng.standard_normal(y.shape)
    dh = compat.get_layer("fc2").backward(dy)
    dx = compat.get_layer("fc1").backward(dh)
    cubn.run_updates()

    fc1, bn1, fc2 = compat.get_layer("fc1"), compat.get_layer("fc1/BatchNorm"), compat.get_layer("fc2")
    T = lambda a: torch.tensor(np.asarray(a), requires_grad=True)  # noqa: E731
    tx, w1, w2, b2 = T(x), T(fc1.variables["weights"]), T(fc2.variables["weights"]), T(fc2.variables["biases"])
    g, b = T(np.ones(6)), T(np.zeros(6))
    z = tx @ w1
    zn = torch.nn.functional.batch_norm(z, torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64),
                                        g, b, training=True, eps=1e-5)
    ty = torch.relu(zn) @ w2 + b2
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fc1.gradients["weights"], w1.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fc2.gradients["weights"], w2.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fc2.gradients["biases"], b2.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(bn1.gradients["gamma"], g.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(bn1.gradients["beta"], b.grad.numpy(), rtol=1e-9, atol=1e-10)
    # zero-debiased moving mean after one update is the batch mean of z
    np.testing.assert_allclose(bn1.variables["moving_mean"], z.detach().numpy().mean(0), rtol=1e-10)


def test_fully_connected_errors(rng):
    x = rng.standard_normal((5, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="num_outputs"):
        compat.fully_connected(x, 0)
    compat.fully_connected(x, 4, scope="fc")
    with pytest.raises(ValueError, match="num_outputs=4"):
        compat.fully_connected(x, 5, scope="fc")
    with pytest.raises(ValueError, match="3 features"):
        compat.fully_connected(rng.standard_normal((5, 2)).astype(np.float32), 4, scope="fc")
    plain = compat.fully_connected(x, 2, activation_fn=lambda z: z * 2, scope="plain")
    with pytest.raises(TypeError, match="no backward"):
        compat.get_layer("plain").backward(np.ones_like(plain))
