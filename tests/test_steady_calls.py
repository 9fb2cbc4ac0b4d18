"""Steady calls of a layer: a repeated signature replays its launch program
without the layer's ordinary code (``BatchNorm._steady``), and never serves
what a state change made stale.

References are float64 formulas (batch normalization with TensorFlow's
moving update), independent of cubn.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import cubn
from cubn import _launch_cache as lc
from cubn.layers.batch_norm import BatchNorm

from conftest import backend_skip_reason


@pytest.fixture
def emulated():
    reason = backend_skip_reason("emulated")
    if reason:
        pytest.skip(reason)
    lc.clear()
    yield lambda: cubn.use_backend("emulated")
    lc.set_enabled(True)


@pytest.fixture
def ordinary_calls(monkeypatch):
    """Counts the calls that ran the layer's ordinary code."""
    count = [0]
    real = BatchNorm._forward

    def counting(self, *args, **kwargs):
        count[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BatchNorm, "_forward", counting)
    return count


def _ref_train(x, gamma, beta, mm, mv, eps, decay):
    """y, new moving mean, new moving variance (Bessel-corrected batch variance), in float64."""
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    n = x.shape[0]
    mean, var = x.mean(0), x.var(0)
    y = (x - mean) / np.sqrt(var + eps) * gamma + beta
    a = 1.0 - decay
    return y, mm - (mm - mean) * a, mv - (mv - var * n / (n - 1)) * a


def _ref_infer(x, gamma, beta, mm, mv, eps):
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    return (x - mm) / np.sqrt(mv + eps) * gamma + beta


def _state(bn):
    v = bn.variables
    return [v[k].astype(np.float64) for k in ("gamma", "beta", "moving_mean", "moving_variance")]


def _check_train(bn, x, tol=2e-5):
    g, b, mm, mv = _state(bn)
    want_y, want_mm, want_mv = _ref_train(x, g, b, mm, mv, bn.epsilon, bn.decay)
    y = bn(x)
    np.testing.assert_allclose(y.reshape(want_y.shape), want_y, rtol=tol, atol=tol)
    np.testing.assert_allclose(bn.variables["moving_mean"], want_mm, rtol=tol, atol=tol)
    np.testing.assert_allclose(bn.variables["moving_variance"], want_mv, rtol=tol, atol=tol)


def test_state_changed_in_place_between_steady_calls(rng, emulated, ordinary_calls):
    x = (rng.standard_normal((9, 6)) * 2 + 40).astype(np.float32)
    bn = BatchNorm(scale=True, decay=0.8, updates_collections=None).build(6)
    with emulated():
        for _ in range(3):  # seen, recorded, then learned by the layer
            _check_train(bn, x)
        assert bn._plans, "the layer learned no plan"
        ran = ordinary_calls[0]
        _check_train(bn, x)
        assert ordinary_calls[0] == ran, "a steady call ran the ordinary code"
        # values written in place: the replay reads them at its launches
        bn.variables["gamma"][...] = rng.uniform(0.5, 2.0, 6).astype(np.float32)
        bn.variables["beta"][...] = rng.standard_normal(6).astype(np.float32)
        bn.variables["moving_mean"][...] = 7.0
        bn.variables["moving_variance"][::2] = 3.0
        _check_train(bn, x)
        assert ordinary_calls[0] == ran
        bn.load_state_dict({k: np.full(6, v, np.float32) for k, v in
                            (("gamma", 1.5), ("beta", -1.0), ("moving_mean", 2.0), ("moving_variance", 0.5))})
        _check_train(bn, x)
        g, b, mm, mv = _state(bn)
        np.testing.assert_allclose(bn(x, is_training=False).reshape(-1, 6), _ref_infer(x, g, b, mm, mv, bn.epsilon),
                                   rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("attr,value", [("epsilon", 0.5), ("decay", 0.3)])
def test_assigned_arguments_are_obeyed(rng, emulated, ordinary_calls, attr, value):
    x = (rng.standard_normal((7, 5)) * 3 - 10).astype(np.float32)
    bn = BatchNorm(scale=True, decay=0.9, updates_collections=None).build(5)
    with emulated():
        for _ in range(4):
            bn(x)
        ran = ordinary_calls[0]
        setattr(bn, attr, value)
        assert not bn._plans
        _check_train(bn, x)
        assert ordinary_calls[0] == ran + 1
        for _ in range(3):
            _check_train(bn, x)


def test_other_signatures_take_the_ordinary_path(rng, emulated, ordinary_calls):
    base = (rng.standard_normal((8, 4)) * 2 + 5).astype(np.float32)
    bn = BatchNorm(scale=True, decay=0.9, updates_collections=None).build(4)
    with emulated():
        for _ in range(4):
            _check_train(bn, base)
        ran = ordinary_calls[0]
        strided = np.repeat(base, 2, axis=0)[::2]            # same shape, other strides
        assert strided.strides != base.strides
        _check_train(bn, strided)
        raw = np.zeros(base.size * 4 + 8, np.uint8)           # same shape, an address off by 4 bytes
        shifted = raw[4: 4 + base.nbytes].view(np.float32).reshape(base.shape)
        shifted[...] = base
        _check_train(bn, shifted)
        _check_train(bn, base[:5])                            # another batch size
        assert ordinary_calls[0] == ran + 3
        with pytest.raises(TypeError, match="accumulates in float32"):
            bn(base.astype(np.float64))
        with pytest.raises(ValueError, match="4 channels"):
            bn(base[:, :3].copy())
        ran = ordinary_calls[0]
        lc.clear()  # programs forgotten: the layer's plans are not used either
        _check_train(bn, base)
        assert ordinary_calls[0] == ran + 1


def test_deferred_updates_and_inference_replays(rng, emulated, ordinary_calls):
    x = (rng.standard_normal((10, 3)) + 2).astype(np.float32)
    coll = []
    bn = BatchNorm(scale=True, decay=0.5, updates_collections=coll).build(3)
    with emulated():
        for step in range(5):
            g, b, mm, mv = _state(bn)
            want_y, want_mm, want_mv = _ref_train(x, g, b, mm, mv, bn.epsilon, bn.decay)
            y = bn(x)
            assert len(coll) == 1
            np.testing.assert_allclose(bn.variables["moving_mean"], mm)  # not yet
            cubn.run_updates(coll)
            np.testing.assert_allclose(y, want_y, rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(bn.variables["moving_mean"], want_mm, rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(bn.variables["moving_variance"], want_mv, rtol=2e-5, atol=2e-5)
            yi = bn(x, is_training=False)
            g, b, mm, mv = _state(bn)
            np.testing.assert_allclose(yi, _ref_infer(x, g, b, mm, mv, bn.epsilon), rtol=2e-5, atol=2e-5)
        assert bn.num_batches_tracked == 5
        ran = ordinary_calls[0]
        bn(x)
        with pytest.warns(UserWarning, match="wait in"):
            bn(x, is_training=False)  # the pending update is still reported on a steady call
        assert ordinary_calls[0] == ran
        cubn.run_updates(coll)


@pytest.mark.parametrize("backend", ["numpy", "emulated"])
def test_two_threads_share_one_layer(rng, request, backend):
    if backend == "emulated":
        request.getfixturevalue("emulated")
    x = (rng.standard_normal((16, 8)) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal((16, 8)).astype(np.float32)
    bn = BatchNorm(scale=True, decay=0.9, updates_collections=None)
    n_calls = 25
    with cubn.use_backend(backend):
        for _ in range(3):
            bn(x)
        assert bn._plans
    bn.load_state_dict({k: np.full(8, v, np.float32) for k, v in
                        (("gamma", 1.0), ("beta", 0.0), ("moving_mean", 0.0), ("moving_variance", 1.0))})
    step0 = bn.num_batches_tracked
    start, errors = threading.Barrier(2), []
    g, b, mm, mv = _state(bn)
    want_y, _, _ = _ref_train(x, g, b, mm, mv, bn.epsilon, bn.decay)

    def work():
        try:
            start.wait()
            with cubn.use_backend(backend):
                for _ in range(n_calls):
                    y, ctx = bn.forward(x)
                    np.testing.assert_allclose(y, want_y, rtol=2e-5, atol=2e-5)
                    assert bn.backward(dy, ctx).shape == x.shape
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert bn.num_batches_tracked == step0 + 2 * n_calls
    # every update moved toward the same batch: none lost, none doubled
    xd = x.astype(np.float64)
    k = 0.9 ** (2 * n_calls)
    np.testing.assert_allclose(bn.variables["moving_mean"], xd.mean(0) * (1 - k), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.variables["moving_variance"], k + xd.var(0, ddof=1) * (1 - k), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fmt,shape", [("NHWC", (6, 3, 5, 8)), ("NCHW", (4, 6, 3, 5)), ("NHWC", (7, 12))])
def test_batch_norm_backward_replay_matches(rng, emulated, training, fmt, shape):
    """cubn.batch_norm_backward replayed (the given statistics folded and the backward, one program)
    gives the ordinary code's results bit for bit, whatever the statistics hold at each call."""
    c = shape[1] if fmt == "NCHW" and len(shape) > 2 else shape[-1]
    x = (rng.standard_normal(shape) * 2 + 30).astype(np.float32)
    side = rng.standard_normal(shape).astype(np.float32)
    g, b = rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    m, v = x.reshape(-1, c).mean(0) if fmt == "NHWC" or len(shape) == 2 else x.mean((0, 2, 3)), np.ones(c, np.float32)
    m = np.ascontiguousarray(m, np.float32)
    before = dict(lc.stats)

    def call(dy):
        return cubn.batch_norm_backward(dy, x, g, m, v, 1e-3, offset=b, data_format=fmt, is_training=training,
                                        activation=cubn.activations.relu, side_input=side)

    with emulated():
        for step in range(4):
            dy = rng.standard_normal(shape).astype(np.float32)
            v[...] = rng.uniform(0.5, 3.0, c)  # statistics written in place between calls
            got = call(dy)
            want = _uncached(lambda: call(dy))
            for a, w in zip(got, want):
                if w is None:
                    assert a is None
                else:
                    np.testing.assert_array_equal(a, w)
            with cubn.use_backend("numpy"):
                ref = call(dy)
            for a, r in zip(got, ref):
                if r is not None:
                    np.testing.assert_allclose(a, r, rtol=2e-4, atol=2e-4)
    assert lc.stats["recorded"] > before["recorded"]
    assert lc.stats["uncacheable"] == before["uncacheable"]


def _uncached(fn):
    lc.set_enabled(False)
    try:
        return fn()
    finally:
        lc.set_enabled(True)


def test_a_backend_slot_given_another_backend_is_obeyed(rng, emulated):
    """A plan holds its backend: when the slot use_backend picks holds another
    backend object (the model routes calls to its own launchers), the call goes there."""
    from cubn.model import _adapter
    from cubn.model.tracing import NullLauncher

    x = (rng.standard_normal((8, 4)) + 1).astype(np.float32)
    bn = BatchNorm(scale=True, decay=0.9, updates_collections=None).build(4)
    with emulated():
        for _ in range(3):
            bn(x)
        assert bn._plans
    launcher = NullLauncher("h100")
    with _adapter.routed_to(_adapter.kernel_backend(launcher)):
        bn(x)
    assert launcher.launches, "the call replayed the other backend's program"
    with emulated():
        _check_train(bn, x)
