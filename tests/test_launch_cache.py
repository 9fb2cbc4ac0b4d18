"""Launch programs (cubn._launch_cache): a replayed call does what the ordinary code does.

The references are the ordinary code with the cache off (the same kernels:
results must agree bit for bit) and the NumPy backend (float64 formulas of
its own). Launch sequences are compared on the model's recording launcher,
which runs nothing, at full size.
"""
from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import cubn
from cubn import _launch_cache as lc
from cubn.model import _adapter
from cubn.model.tracing import RecordingLauncher

from conftest import backend_skip_reason


@pytest.fixture
def emulated():
    reason = backend_skip_reason("emulated")
    if reason:
        pytest.skip(reason)
    return lambda: cubn.use_backend("emulated")


@pytest.fixture
def fresh_cache():
    lc.clear()
    yield
    lc.set_enabled(True)


def _uncached(fn):
    lc.set_enabled(False)
    try:
        return fn()
    finally:
        lc.set_enabled(True)


def _layout(launches):
    return [(l.name_expression, l.grid, l.block, l.shared_bytes,
             [(a.name, a.kind, a.value if a.kind == "scalar" else a.nbytes) for a in l.args]) for l in launches]


def _data(rng, shape, offset=0.0):
    return (rng.standard_normal(shape) * 3 + offset).astype(np.float32)


# ---------------------------------------------------------------------------
# Results: replay == ordinary code, bit for bit (emulated kernels)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("one_launch", [True, False])
@pytest.mark.parametrize("fmt,shape", [("NHWC", (6, 3, 5, 8)), ("NCHW", (4, 6, 3, 5)), ("NHWC", (7, 12))])
def test_fused_batch_norm_replay_matches(rng, emulated, fresh_cache, one_launch, fmt, shape):
    c = shape[1] if fmt == "NCHW" and len(shape) > 2 else shape[-1]
    g, b = rng.random(c).astype(np.float32) + 0.5, rng.standard_normal(c).astype(np.float32)
    rm, rv = rng.standard_normal(c).astype(np.float32), rng.random(c).astype(np.float32) + 0.1
    side = _data(rng, shape)

    def train(x):
        return cubn.fused_batch_norm(x, g, b, rm, rv, 1e-3, fmt, exponential_avg_factor=0.25,
                                     activation="relu", side_input=side)

    def infer(x):
        return cubn.fused_batch_norm(x, g, b, rm, rv, 1e-3, fmt, is_training=False)

    with emulated(), cubn.use_one_launch(one_launch):
        for fn in (train, infer):
            for _ in range(2):  # seen, then recorded
                train(_data(rng, shape)), infer(_data(rng, shape))
            n = lc.size()
            for _ in range(2):
                x = _data(rng, shape, offset=1e4)
                got = fn(x)
                want = _uncached(lambda: fn(x))
                assert lc.size() == n  # replayed, nothing recorded
                assert got[0] is not want[0]
                for a, w in zip(got, want):
                    np.testing.assert_array_equal(a, w)
    with cubn.use_backend("numpy"):
        x = _data(rng, shape)
        ref = train(x)
    with emulated(), cubn.use_one_launch(one_launch):
        got = train(x)
    for a, r in zip(got, ref):
        np.testing.assert_allclose(a, r, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("one_launch", [True, False])
def test_layer_forward_backward_replay_matches(rng, emulated, fresh_cache, one_launch):
    shape = (5, 4, 3, 6)

    def steps(xs, dys):
        bn = cubn.BatchNorm(scale=True, decay=0.9, updates_collections=None, activation_fn="relu")
        out = []
        for x, dy in zip(xs, dys):
            y, ctx = bn.forward(x)
            dx = bn.backward(dy, ctx)
            out += [y, dx, bn.gradients["gamma"], bn.gradients["beta"]]
            yi = bn(x, is_training=False)
            out += [yi, bn.backward(dy)]
        return out + [bn.variables["moving_mean"], bn.variables["moving_variance"]]

    xs = [_data(rng, shape, offset=50.0) for _ in range(3)]
    dys = [_data(rng, shape) for _ in range(3)]
    before = dict(lc.stats)
    with emulated(), cubn.use_one_launch(one_launch):
        got = steps(xs, dys)  # the first step is seen, the second records, the third replays
        # training and inference forward and backward: four programs, every one cacheable
        assert lc.stats["recorded"] - before["recorded"] == 4 == lc.size()
        assert lc.stats["uncacheable"] == before["uncacheable"]
        want = _uncached(lambda: steps(xs, dys))
    for a, w in zip(got, want):
        np.testing.assert_array_equal(a, w)
    with cubn.use_backend("numpy"):
        ref = steps(xs, dys)
    for a, r in zip(got, ref):
        np.testing.assert_allclose(a, r, rtol=1e-3, atol=1e-3)


def test_moments_replay_matches_and_uncacheable_dtypes_still_run(rng, emulated, fresh_cache):
    x = _data(rng, (6, 5, 7), offset=1e5)
    with emulated():
        for axes, keep in (([0, 1], False), ([0, 2], True), ([0], False)):
            first = cubn.moments(x, axes, keepdims=keep)
            again = cubn.moments(x + 1, axes, keepdims=keep)
            want = _uncached(lambda: cubn.moments(x + 1, axes, keepdims=keep))
            for a, w in zip(again, want):
                np.testing.assert_array_equal(a, w)
            assert first[0].shape == want[0].shape
        h = _data(rng, (6, 5, 7), offset=100.0).astype(np.float16)  # float32 statistics cast on the host side
        a = cubn.moments(h, [0, 1])
        b = cubn.moments(h, [0, 1])
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1].astype(np.float64), h.astype(np.float64).var((0, 1)), rtol=1e-2)


# ---------------------------------------------------------------------------
# What the key holds: options, alignment, aliasing
# ---------------------------------------------------------------------------
def _model(launcher):
    return _adapter.routed_to(_adapter.kernel_backend(launcher))


def test_use_one_launch_and_alignment_change_the_program(fresh_cache):
    launcher = RecordingLauncher("h100")
    c = 64
    x = np.zeros((32, 8, 8, c), np.float32)
    g = np.ones(c, np.float32)
    buf = np.zeros(x.size + 1, np.float32)
    shifted = buf[1:].reshape(x.shape)  # 4 bytes off 16: the vectorized variants do not apply

    def call(a):
        launcher.clear()
        cubn.fused_batch_norm(a, g, g * 0, g * 0, g, 1e-3, "NHWC", exponential_avg_factor=0.5)
        return _layout(launcher.launches)

    with _model(launcher):
        plans = {}
        for one in (True, False):
            with cubn.use_one_launch(one):
                for name, a in (("aligned", x), ("shifted", shifted)):
                    first = _uncached(lambda: call(a))
                    call(a)  # seen
                    call(a)  # recorded
                    plans[one, name] = call(a)  # replayed
                    assert plans[one, name] == first
    assert len(plans[True, "aligned"]) == 1 and len(plans[False, "aligned"]) == 2  # fused statistics + normalize
    assert plans[True, "aligned"] != plans[True, "shifted"]
    assert plans[False, "aligned"] != plans[False, "shifted"]


def test_aliased_arguments_are_never_confused(rng, emulated, fresh_cache):
    c = 6
    x = _data(rng, (9, c))
    v = rng.random(c).astype(np.float32) + 0.5
    with emulated():
        same = cubn.fused_batch_norm(x, v, v, v, v, 1e-3, exponential_avg_factor=0.5)  # one array, four slots
        g, b, m, s = (rng.random(c).astype(np.float32) + 0.5 for _ in range(4))
        got = cubn.fused_batch_norm(x, g, b, m, s, 1e-3, exponential_avg_factor=0.5)
        again = cubn.fused_batch_norm(x, v, v, v, v, 1e-3, exponential_avg_factor=0.5)
        want = _uncached(lambda: cubn.fused_batch_norm(x, g, b, m, s, 1e-3, exponential_avg_factor=0.5))
    for a, w in zip(got, want):
        np.testing.assert_array_equal(a, w)
    for a, w in zip(again, same):
        np.testing.assert_array_equal(a, w)


# ---------------------------------------------------------------------------
# Bounded, shared by threads, recorded at most so often
# ---------------------------------------------------------------------------
def test_cache_is_bounded(fresh_cache, monkeypatch):
    monkeypatch.setattr(lc, "MAX_ENTRIES", 5)
    launcher = RecordingLauncher("h100")
    with _model(launcher):
        for n in range(2, 14):
            x = np.zeros((n, 8), np.float32)
            cubn.moments(x, [0])
            assert lc.size() <= 5
        assert lc.size() == 5
    del launcher
    gc.collect()  # (a recording and its copy of the backend refer to each other)
    assert lc.size() == 0  # the programs go with their backend


def test_a_scalar_that_changes_every_call_stops_recording(fresh_cache, monkeypatch):
    monkeypatch.setattr(lc, "MAX_RECORDINGS_PER_GROUP", 3)
    launcher = RecordingLauncher("h100")
    x = np.zeros((16, 8), np.float32)
    g = np.ones(8, np.float32)
    b, m, v = (np.ones(8, np.float32) for _ in range(3))
    before = lc.stats["recorded"]
    with _model(launcher):
        for t in range(1, 10):
            for _ in range(3):  # seen, recorded (while the group may), replayed
                cubn.fused_batch_norm(x, g, b, m, v, 1e-3, exponential_avg_factor=1.0 / (t + 1))
    assert lc.stats["recorded"] - before == 3


def test_threads_share_programs(rng, emulated, fresh_cache):
    shapes = [(8, 4), (6, 5, 3), (4, 3, 2, 5)]
    xs = {s: _data(rng, s) for s in shapes}
    c = {s: s[-1] for s in shapes}
    with emulated():
        want = {s: _uncached(lambda s=s: cubn.fused_batch_norm(xs[s], np.ones(c[s], np.float32))) for s in shapes}
    errors = []

    def work(k):
        try:
            with cubn.use_backend("emulated"):
                for i in range(6):
                    s = shapes[(k + i) % len(shapes)]
                    got = cubn.fused_batch_norm(xs[s], np.ones(c[s], np.float32))
                    for a, w in zip(got, want[s]):
                        np.testing.assert_array_equal(a, w)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_errors_are_the_ordinary_ones_after_a_replay(rng, emulated, fresh_cache):
    x = _data(rng, (8, 4))
    g = np.ones(4, np.float32)
    with emulated():
        cubn.fused_batch_norm(x, g, g, g, g)
        cubn.fused_batch_norm(x, g, g, g, g)
        with pytest.raises(ValueError, match="epsilon"):
            cubn.fused_batch_norm(x, g, g, g, g, -1.0)
        with pytest.raises(ValueError, match="'scale'"):
            cubn.fused_batch_norm(x, np.ones(5, np.float32), g, g, g)
        with pytest.raises(ValueError, match="exponential_avg_factor"):
            cubn.fused_batch_norm(x, g, g, g, g, exponential_avg_factor=2.0)
        with pytest.raises(TypeError, match="'side_input'"):
            cubn.fused_batch_norm(x, g, g, g, g, side_input=x.astype(np.float64))
        with pytest.raises(ValueError, match="when is_training=False"):
            cubn.fused_batch_norm(x, g, g, None, g, is_training=False)


def test_one_context_backward_from_threads_while_recording(rng, emulated, fresh_cache):
    """Threads calling backward with one forward context, the first of them
    recording: each gets the ordinary result (no thread runs on another's recording)."""
    x, dy = _data(rng, (12, 5), offset=10.0), _data(rng, (12, 5))
    bn = cubn.BatchNorm(scale=True, updates_collections=None)
    with emulated():
        _, ctx = bn.forward(x)
        want = _uncached(lambda: bn.backward(dy, ctx))
    start, errors = threading.Barrier(4), []

    def work():
        try:
            start.wait()
            with cubn.use_backend("emulated"):
                for _ in range(3):
                    np.testing.assert_array_equal(bn.backward(dy, ctx), want)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
