"""Threads and call order: which forward a backward belongs to.

In earlier versions one layer used from 8 threads gave 7 of them another thread's dx,
and an inference call between a training forward and its backward silently
changed dx. Now each thread's ``bn.backward(dy)`` uses that thread's own last
call, ``bn.forward`` returns an explicit context for hand-written nets, and
the ambiguous case is an error. Expected gradients are the float64 reference
(``reference.batch_norm_grads``), never cubn's own.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import cubn
import reference as ref
from conftest import Backend, assert_close, backend_skip_reason

EPS = 1e-3
THREADS = 8


@pytest.fixture
def be(host_backend):
    """The backend; each thread enters it itself (``use_backend`` is per thread)."""
    return host_backend


def _batch(rng, n=6, c=3, scale=1.0):
    return (2 + scale * rng.standard_normal((n, c))).astype(np.float32)


def _run_threads(be, fn, n=THREADS):
    """``fn(i)`` on n threads at once (each thread enters the backend itself:
    a ``use_backend`` block is per thread, like every context variable)."""
    out, errors = [None] * n, []

    def work(i):
        try:
            with be.context():
                out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert not errors, errors
    return out


@pytest.mark.parametrize("in_place", [True, False])
def test_each_thread_gets_the_dx_of_its_own_forward(be, rng, in_place):
    gamma = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    bn = cubn.BatchNorm(scale=True, param_initializers={"gamma": gamma},
                        updates_collections=None if in_place else cubn.UpdateCollection())
    xs = [_batch(rng, scale=i + 1) for i in range(THREADS)]
    dys = [rng.standard_normal(x.shape).astype(np.float32) for x in xs]
    barrier = threading.Barrier(THREADS)

    def step(i):
        bn(xs[i])
        barrier.wait()  # every thread's forward happens before any backward
        return bn.backward(dys[i]), dict(bn.gradients)

    for i, (dx, grads) in enumerate(_run_threads(be, step)):
        rdx, rdg, rdb = ref.batch_norm_grads(xs[i], dys[i], gamma, EPS, 1)
        assert_close(dx, rdx, "float32", what=f"thread {i} dx")
        assert_close(grads["gamma"], rdg, "float32", scale=float(np.abs(rdg).max()) + 1, what=f"thread {i} dgamma")
        assert_close(grads["beta"], rdb, "float32", scale=float(np.abs(rdb).max()) + 1, what=f"thread {i} dbeta")


def test_concurrent_in_place_updates_are_none_lost(be, rng):
    """K concurrent in-place training calls on batches with the same statistics
    move the moving mean exactly K steps (a lost update would leave decay**(K-1))."""
    k, decay = 16, 0.5
    bn = cubn.BatchNorm(decay=decay, updates_collections=None, zero_debias_moving_mean=False)
    base = (10 + rng.standard_normal((8, 3))).astype(np.float64)
    perms = [rng.permutation(8) for _ in range(k)]
    bn.build(3, "float64")
    _run_threads(be, lambda i: bn(base[perms[i]]), n=k)
    m, _ = ref.moments(base, (0,))
    np.testing.assert_allclose(bn.variables["moving_mean"], m * (1 - decay**k), rtol=1e-12)
    deferred = cubn.BatchNorm(decay=decay, zero_debias_moving_mean=True, updates_collections=cubn.UpdateCollection())
    for i in range(k):
        deferred(base[perms[i]])
    coll = deferred.updates_collections
    ran = _run_threads(be, lambda i: cubn.run_updates(coll), n=4)
    assert sum(ran) == k and len(coll) == 0
    assert int(deferred.variables["moving_mean/local_step"]) == k
    np.testing.assert_allclose(deferred.variables["moving_mean"], m, rtol=1e-12)  # zero-debiased: the batch mean


def test_an_inference_call_between_forward_and_backward(be, rng):
    """bn.backward(dy) after an interleaved inference call is ambiguous: a clear
    error pointing to the explicit handle, which gives the training dx."""
    gamma = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    x, xv = _batch(rng), _batch(rng, n=4, scale=3.0)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    with be.context():
        bn = cubn.BatchNorm(scale=True, param_initializers={"gamma": gamma}, updates_collections=None)
        y, ctx = bn.forward(x, is_training=True)
        np.testing.assert_array_equal(y, cubn.BatchNorm(scale=True, param_initializers={"gamma": gamma},
                                                        updates_collections=None)(x))
        assert ctx.training and not ctx.side_input
        bn(xv, is_training=False)  # validation in between
        with pytest.raises(RuntimeError, match=r"ambiguous.*inference call.*bn\.backward\(dy, ctx\)"):
            bn.backward(dy)
        dx = bn.backward(dy, ctx)
        rdx, rdg, rdb = ref.batch_norm_grads(x, dy, gamma, EPS, 1)
        assert_close(dx, rdx, "float32", what="dx through the explicit handle")
        assert ctx.gradients is not None and set(ctx.gradients) == {"beta", "gamma"}
        assert_close(ctx.gradients["gamma"], rdg, "float32", scale=float(np.abs(rdg).max()) + 1)
        # Once the training call's backward has run, backward(dy) means the last call again: the inference one.
        dyv = rng.standard_normal(xv.shape).astype(np.float32)
        mm, mv = (np.asarray(bn.variables[k], np.float64) for k in ("moving_mean", "moving_variance"))
        bn(xv, is_training=False)
        rdxv, _, _ = ref.batch_norm_grads(xv, dyv, gamma, EPS, 1, training=False, mean=mm, var=mv)
        assert_close(bn.backward(dyv), rdxv, "float32", what="inference dx")


def test_simple_case_keeps_its_meaning(be, rng):
    gamma = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    x = _batch(rng)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    with be.context():
        bn = cubn.BatchNorm(scale=True, param_initializers={"gamma": gamma}, updates_collections=None)
        bn(x)
        rdx, _, _ = ref.batch_norm_grads(x, dy, gamma, EPS, 1)
        assert_close(bn.backward(dy), rdx, "float32")
        assert_close(bn.backward(dy), rdx, "float32", what="a second backward of the same call")
        # A training call whose backward never ran, then another training call: backward(dy) is the last one's.
        x2 = _batch(rng, scale=2.0)
        bn(x)
        bn(x2)
        assert_close(bn.backward(dy), ref.batch_norm_grads(x2, dy, gamma, EPS, 1)[0], "float32")


def test_explicit_contexts_interleave_and_are_checked(be, rng):
    gamma = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    xs = [_batch(rng, scale=s) for s in (1.0, 2.0, 3.0)]
    dys = [rng.standard_normal(x.shape).astype(np.float32) for x in xs]
    side = rng.standard_normal(xs[0].shape).astype(np.float32)
    with be.context():
        bn = cubn.BatchNorm(scale=True, param_initializers={"gamma": gamma}, updates_collections=None)
        ctxs = [bn.forward(x)[1] for x in xs]  # a layer shared three times in one net
        for x, dy, ctx in reversed(list(zip(xs, dys, ctxs))):
            assert_close(bn.backward(dy, ctx), ref.batch_norm_grads(x, dy, gamma, EPS, 1)[0], "float32")
        _, cs = bn.forward(xs[0], side_input=side)
        dx, dside = bn.backward(dys[0], cs)
        assert cs.side_input and dside.shape == side.shape
        # A context belongs to its layer and to the layer's current state.
        other = cubn.BatchNorm(scale=True, updates_collections=None)
        other(xs[0])
        with pytest.raises(ValueError, match="'ctx'.*another layer"):
            other.backward(dys[0], ctxs[0])
        with pytest.raises(TypeError, match="'ctx'"):
            bn.backward(dys[0], (ctxs[0],))
        bn.build(3, "float32")
        with pytest.raises(ValueError, match="'ctx'.*rebuilt or moved"):
            bn.backward(dys[0], ctxs[0])
        with pytest.raises(RuntimeError, match="call the layer"):
            bn.backward(dys[0])


def test_a_thread_that_never_called_the_layer_has_no_context(be, rng):
    bn = cubn.BatchNorm(updates_collections=None)
    with be.context():
        bn(_batch(rng))

    def other_thread(i):
        with pytest.raises(RuntimeError, match="call the layer"):
            bn.backward(np.ones((6, 3), np.float32))
        return bn.gradients

    assert _run_threads(be, other_thread, n=1) == [{}]


def test_contexts_can_cross_threads_explicitly(be, rng):
    gamma = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    bn = cubn.BatchNorm(scale=True, param_initializers={"gamma": gamma}, updates_collections=None)
    x = _batch(rng)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    with be.context():
        _, ctx = bn.forward(x)
    with ThreadPoolExecutor(1) as pool:
        dx = pool.submit(lambda: bn.backward(dy, ctx)).result()
    assert_close(dx, ref.batch_norm_grads(x, dy, gamma, EPS, 1)[0], "float32")


def test_the_emulators_kernel_cache_builds_once_under_threads(tmp_path, monkeypatch):
    """Eight threads asking for the same unbuilt kernels get the same module,
    built once (the launcher's cache is shared by every launcher of the process)."""
    if backend_skip_reason("emulated"):
        pytest.skip(backend_skip_reason("emulated"))
    from pathlib import Path

    from cubn.backends import emulated_launcher as emu

    monkeypatch.setenv("CUBN_CACHE_DIR", str(tmp_path))
    source = Path(__file__).resolve().parent / "emulator" / "kernels" / "toy.cu"
    names = ["block_sum<float>"]
    builds = []
    real = emu._build

    def counting(*a, **k):
        builds.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(emu, "_build", counting)
    barrier = threading.Barrier(THREADS)

    def get(i):
        barrier.wait()
        return emu.EmulatedLauncher().build_module(source, names)

    mods = _run_threads(Backend("numpy"), get)
    assert all(m is mods[0] for m in mods)
    assert builds.count("toy") == 1
    x = np.arange(256, dtype=np.float32)
    out = np.zeros(1, np.float32)
    emu.EmulatedLauncher().launch(mods[0]["block_sum<float>"], (1, 1, 1), (256, 1, 1), 0, (x, out, np.int64(256)))
    assert out[0] == x.sum()


def test_the_per_thread_state_is_transient(be, rng):
    """Copied or pickled, a layer's threading state (its contexts and lock)
    comes back fresh: no forward contexts, an unheld lock of its own."""
    import copy
    import pickle

    x = _batch(rng)
    with be.context():
        bn = cubn.BatchNorm(updates_collections=None)
        bn(x)
    assert bn._threads.local.last is not None
    for twin in (copy.deepcopy(bn._threads), pickle.loads(pickle.dumps(bn._threads))):
        assert twin.local.last is None and twin.local.pending is None and twin.local.gradients == {}
        assert twin.lock is not bn._threads.lock and twin.lock.acquire(blocking=False)
