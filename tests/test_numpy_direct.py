"""The ops' direct route to the compiled loops (``cubn.backends.numpy_direct``).

Small float32/float64 calls of ``moments``, ``fused_batch_norm`` and
``batch_norm_backward`` skip the small path and call the loops' extension
straight from the op. Each must give the bits of the longer route to the
same C functions (``numpy_direct.disabled()``), every output, on the
layouts, the optional arguments and adversarial data; inputs the route does
not take (byte-swapped, non-contiguous, large, 16-bit, another activation)
must still be computed by the ordinary code; and the results must match
float64 formulas written here.
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from cubn.backends import numpy_direct as direct
from cubn.backends import numpy_native as native

needs_direct = pytest.mark.skipif(
    not (native.build() and native._calls is not None), reason=f"direct calls: {native.status()}")

DTYPES = [np.float32, np.float64]
# (shape, data_format, reduced axes of moments): rows, short runs, one sample, one channel
LAYOUTS = [((8, 16), "NHWC", [0]), ((4, 6, 3, 3), "NCHW", [0, 2, 3]), ((5, 3, 3, 7), "NHWC", [0, 1, 2]),
           ((1, 9), "NHWC", [0]), ((2, 1, 4, 4), "NCHW", [0, 2, 3]), ((900, 33), "NHWC", [0])]
KINDS = ["plain", "offset 1e5", "nonfinite", "equal channel", "quantized"]


def _data(rng, shape, dt, kind):
    x = rng.standard_normal(shape) * 2
    if kind == "offset 1e5":
        x += 1e5
    elif kind == "nonfinite":
        x.flat[1] = np.nan
        x.flat[-2] = np.inf
    elif kind == "equal channel":
        x[..., 0] = 3.5
    elif kind == "quantized":
        x = np.round(x * 4) / 4 + 300
    return x.astype(dt)


def _bits(out):
    if out is None:
        return None
    if isinstance(out, tuple):
        return tuple(_bits(o) for o in out)
    a = np.asarray(out)
    return a.dtype.str, a.shape, a.tobytes()


def _count_direct(monkeypatch):
    """Counts the direct route's calls (the functions still run)."""
    seen = []
    for name in ("moments", "fused_train", "infer", "backward"):
        real = getattr(direct, name)
        monkeypatch.setattr(direct, name, lambda *a, _real=real, _name=name, **k: (seen.append(_name), _real(*a, **k))[1])
    return seen


def _calls(rng, shape, fmt, axes, dt, kind):
    x = _data(rng, shape, dt, kind)
    c = shape[1] if fmt == "NCHW" else shape[-1]
    g, b = (rng.standard_normal(c).astype(dt) for _ in range(2))
    g[0] = 0.0  # a zero scale
    if c > 2:
        g[2] = -1.5  # a negative one
    side, dy = (rng.standard_normal(shape).astype(dt) for _ in range(2))
    m = (rng.standard_normal(c) + (1e5 if kind == "offset 1e5" else 0)).astype(dt)
    v = rng.uniform(0.5, 2, c).astype(dt)
    eps = float(rng.choice([1e-3, 1e-5]))
    return [
        ("moments", lambda: cubn.moments(x, axes)),
        ("moments keepdims", lambda: cubn.moments(x, axes, keepdims=True)),
        ("train", lambda: cubn.fused_batch_norm(x, g, b, epsilon=eps, data_format=fmt)),
        ("train relu side, no affine", lambda: cubn.fused_batch_norm(x, None, None, data_format=fmt,
                                                                     activation="relu", side_input=side)),
        ("train blended", lambda: cubn.fused_batch_norm(x, g, None, m, v, data_format=fmt,
                                                        exponential_avg_factor=0.3)),
        ("infer relu", lambda: cubn.fused_batch_norm(x, g, b, m, v, epsilon=eps, data_format=fmt,
                                                     is_training=False, activation="relu")),
        ("infer side, offset only", lambda: cubn.fused_batch_norm(x, None, b, m, v, data_format=fmt,
                                                                  is_training=False, side_input=side)),
        ("backward", lambda: cubn.batch_norm_backward(dy, x, g, m, v, epsilon=eps, data_format=fmt)),
        ("backward relu side", lambda: cubn.batch_norm_backward(dy, x, g, m, v, offset=b, data_format=fmt,
                                                                activation="relu", side_input=side)),
        ("backward inference", lambda: cubn.batch_norm_backward(dy, x, None, m, v, data_format=fmt,
                                                                is_training=False, offset=b, side_input=side)),
        ("backward inference relu", lambda: cubn.batch_norm_backward(dy, x, g, m, v, data_format=fmt,
                                                                     is_training=False, activation="relu")),
    ]


@needs_direct
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[1]}{l[0]}")
def test_direct_route_gives_the_longer_routes_bits(rng, monkeypatch, layout, dt, kind):
    shape, fmt, axes = layout
    calls = _calls(rng, shape, fmt, axes, dt, kind)
    seen = _count_direct(monkeypatch)
    for what, call in calls:
        with np.errstate(all="ignore"):
            call()  # (a process's first call makes the backend: it takes the ordinary route)
            del seen[:]
            fast = call()
            assert seen, f"{what}: the direct route was not taken"
            with direct.disabled():
                del seen[:]
                slow = call()
                assert not seen, what
        assert _bits(fast) == _bits(slow), what


def _reference(x, g, b, eps, axes, dt):
    """float64 mean and variance; y from the mean rounded to the data's type (the type x - mean is
    computed in: at an offset of 1e5 a float32 mean is 0.004 off, whichever library rounds it)."""
    x64 = x.astype(np.float64)
    m = x64.mean(axis=tuple(axes), keepdims=True)
    v = ((x64 - m) ** 2).mean(axis=tuple(axes), keepdims=True)
    y = (x64 - m.astype(dt)) / np.sqrt(v + eps) * g + b
    return m, v, y


@needs_direct
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[1]}{l[0]}")
def test_direct_route_matches_float64_formulas(rng, layout, dt):
    shape, fmt, axes = layout
    x = _data(rng, shape, dt, "offset 1e5")
    c = shape[1] if fmt == "NCHW" else shape[-1]
    bshape = (1, c, 1, 1) if fmt == "NCHW" else (c,)
    g, b = rng.standard_normal(c).astype(dt), rng.standard_normal(c).astype(dt)
    m, v, y = _reference(x, g.reshape(bshape).astype(np.float64), b.reshape(bshape).astype(np.float64), 1e-3, axes, dt)
    n = x.size // c
    tol = 2e-4 if dt == np.float32 else 1e-10
    mean, var = cubn.moments(x, axes, keepdims=True)
    np.testing.assert_allclose(mean, m, rtol=1e-6 if dt == np.float32 else 1e-14)
    np.testing.assert_allclose(var, v, rtol=tol)
    yy, bm, bv = cubn.fused_batch_norm(x, g, b, data_format=fmt)
    np.testing.assert_allclose(yy, y, atol=tol * 10, rtol=tol)
    if n > 1:
        np.testing.assert_allclose(bv, v.reshape(-1) * n / (n - 1), rtol=tol)
    # the backward: d/dx of sum(dy * y) by the closed form of the batch-statistics gradient
    dy = rng.standard_normal(shape).astype(dt)
    grads = cubn.batch_norm_backward(dy, x, g, mean.reshape(-1), var.reshape(-1), data_format=fmt)
    d64 = dy.astype(np.float64)
    mg, vg = (a.astype(np.float64).reshape(m.shape) for a in (mean, var))  # the statistics it was given
    xhat = (x.astype(np.float64) - mg) / np.sqrt(vg + 1e-3)
    db = d64.sum(axis=tuple(axes))
    dg = (d64 * xhat).sum(axis=tuple(axes))
    dx = (g.reshape(bshape) / np.sqrt(vg + 1e-3)) * (d64 - db.reshape(bshape) / n - xhat * dg.reshape(bshape) / n)
    np.testing.assert_allclose(grads.doffset, db, atol=1e-3 if dt == np.float32 else 1e-9)
    np.testing.assert_allclose(grads.dscale, dg, atol=1e-2 if dt == np.float32 else 1e-8)
    np.testing.assert_allclose(grads.dx, dx, atol=1e-3 if dt == np.float32 else 1e-9)


@needs_direct
def test_inputs_the_direct_route_does_not_take_run_the_ordinary_code(rng, monkeypatch):
    seen = _count_direct(monkeypatch)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    g = np.ones(32, np.float32)
    cubn.moments(x, [0])  # (a process's first call makes the backend: it takes the ordinary route)
    cases = {
        "byte-swapped": x.astype(x.dtype.newbyteorder()),
        "non-contiguous": np.asfortranarray(x),
        "strided": rng.standard_normal((64, 64)).astype(np.float32)[:, ::2],
        "float16": x.astype(np.float16),
        "one task or more": rng.standard_normal((native.TASK_BYTES // 128, 32)).astype(np.float32),
    }
    for what, a in cases.items():
        del seen[:]
        mean, var = cubn.moments(a, [0])
        y, _, _ = cubn.fused_batch_norm(a, g.astype(mean.dtype) if a.dtype != np.float16 else g, None)
        assert not seen, what
        a64 = np.asarray(a, np.float64)
        np.testing.assert_allclose(mean, a64.mean(0), rtol=1e-5, atol=1e-6 if a.dtype != np.float16 else 1e-3)
        np.testing.assert_allclose(var, a64.var(0), rtol=1e-4 if a.dtype != np.float16 else 1e-2)
        assert y.shape == a.shape
    del seen[:]
    cubn.fused_batch_norm(x, g, None, activation="elu")  # the loops take no ELU
    cubn.moments(x, [1])  # (64,) kept: one run of 32 per channel, taken
    assert seen == ["moments"]
    with native.disabled():
        del seen[:]
        cubn.moments(x, [0])
        assert not seen


@needs_direct
def test_direct_route_in_threads_gives_each_thread_its_own_results(rng):
    """Two threads on the direct route at once (the GIL is released in the C call)."""
    import threading

    xs = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(2)]
    want = [cubn.fused_batch_norm(x, None, None) for x in xs]
    errors = []

    def work(k):
        try:
            for _ in range(2000):
                got = cubn.fused_batch_norm(xs[k], None, None)
                if _bits(got) != _bits(want[k]):
                    errors.append(k)
                    return
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    ts = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts) and not errors, errors
