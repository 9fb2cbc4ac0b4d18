"""The NumPy backend's chunked, threaded execution (cubn/backends/numpy_tiles.py).

Shapes are built from the chunking constants so that every layout (one small
chunk; rows with wide rows, a tail and column blocks; runs of one channel, cut
into pieces) and the sizes just around each boundary are exercised, against
float64 references; results must be bitwise identical for any thread count;
accuracy at large offsets is held to NumPy's own float32 pairwise two-pass;
NaN/Inf stay in their channel; and no op allocates more than a quarter of its
input beyond its outputs.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import cubn
from cubn.backends import numpy_native
from cubn.backends import numpy_tiles as tiles
from conftest import BF16, assert_close, np_dtype
import reference as ref


@pytest.fixture(autouse=True)
def numpy_code(request):
    """These tests are of the NumPy code (chunks, folding, its memory and accuracy): the compiled
    loops (``tests/test_numpy_native.py``) stay off, but where a test is parametrized ``loops=True``."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("loops"):
        if not numpy_native.build():
            pytest.skip(f"compiled loops: {numpy_native.status()}")
        yield
        return
    with numpy_native.disabled():
        yield

CHUNK = tiles.chunk_elements(4)  # float32 elements per chunk
SMALL = tiles.SMALL_ELEMENTS


def _cases():
    """(name, data_format, shape, layout kind) around every boundary of the chunking."""
    g16 = tiles.WIDE // 16                  # rows of 16 channels per wide row
    rows_per_chunk = CHUNK // (g16 * 16) * g16
    return [
        ("small-limit", "NHWC", (SMALL // 16, 16), "whole"),
        ("small-limit+1", "NHWC", (SMALL // 16 + 1, 16), "rows"),
        ("wide+tail", "NHWC", (5 * rows_per_chunk + 7, 16), "rows"),
        ("wide-exact", "NHWC", (4 * rows_per_chunk, 16), "rows"),
        ("c3", "NHWC", (4, 40, 41, 3), "rows"),
        ("blocks", "NHWC", (40, tiles.WIDE_MAX + 10), "rows"),
        ("blocks-7x7", "NCHW", (20, 300, 7, 7), "rows"),
        ("inner<run", "NCHW", (7, 3, tiles.RUN_MIN - 1), "rows"),
        ("inner=run", "NCHW", (7, 3, tiles.RUN_MIN), "runs"),
        ("runs", "NCHW", (50, 4, 40, 40), "runs"),
        ("piece-1", "NCHW", (2, 3, CHUNK - 1), "runs"),
        ("piece", "NCHW", (2, 3, CHUNK), "runs"),
        ("piece+1", "NCHW", (2, 3, CHUNK + 1), "runs"),
        ("one-channel", "NHWC", (CHUNK + 3, 1), "runs"),
    ]


CASES = _cases()
IDS = [c[0] for c in CASES]


def _plan_kind(fmt, shape, itemsize=4):
    from cubn._plan import plan_for_channels

    p = plan_for_channels(shape, fmt, "test")
    return tiles.layout(p.outer, p.channels, p.inner, itemsize).kind


def test_cases_cover_every_layout():
    for name, fmt, shape, kind in CASES:
        assert _plan_kind(fmt, shape) == kind, name
    panels = {pn.kind for _, fmt, shape, kind in CASES if kind == "rows"
              for pn in _layout_of(fmt, shape).panels}
    assert panels == {"wide", "tail", "block"}


def _layout_of(fmt, shape):
    from cubn._plan import plan_for_channels

    p = plan_for_channels(shape, fmt, "test")
    return tiles.layout(p.outer, p.channels, p.inner, 4)


def _axis(fmt, shape):
    return ref.channel_axis(len(shape), fmt)


def _ref_backward(dy, x, gamma, beta, side, axis, act, w=None):
    """float64 gradients of act(gamma (x - m)/sqrt(v + eps) + beta + side) with batch statistics
    (frequency-weighted by w over axis 0): dx, dgamma, dbeta, dside."""
    nd = x.ndim
    axes = ref.reduce_axes(nd, axis)
    wb = np.ones(x.shape) if w is None else np.broadcast_to(w.reshape((-1,) + (1,) * (nd - 1)), x.shape)
    n = wb.sum(axis=axes, keepdims=True)
    m = (wb * x).sum(axis=axes, keepdims=True) / n
    v = (wb * (x - m) ** 2).sum(axis=axes, keepdims=True) / n
    sd = np.sqrt(v + 1e-3)
    xhat = (x - m) / sd
    g = ref.bcast(gamma, nd, axis)
    z = g * xhat + ref.bcast(beta, nd, axis) + (0 if side is None else side)
    dz = dy * (1 - np.tanh(z) ** 2) if act == "tanh" else dy
    s1 = dz.sum(axis=axes, keepdims=True)
    s2 = (dz * xhat).sum(axis=axes, keepdims=True)
    dx = g / sd * (dz - wb * s1 / n - wb * xhat * s2 / n)
    return dx, s2.reshape(-1), s1.reshape(-1), dz


# ---------------------------------------------------------------------------
# Every layout and boundary against float64
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,fmt,shape,kind", CASES, ids=IDS)
def test_moments_at_chunk_boundaries(rng, dtype, name, fmt, shape, kind):
    x = (7.0 + 3 * rng.standard_normal(shape)).astype(dtype)
    axes = ref.reduce_axes(len(shape), _axis(fmt, shape))
    m, v = cubn.moments(x, axes)
    rm, rv = ref.moments(x, axes)
    assert_close(m, rm, dtype, what="mean")
    assert_close(v, rv, dtype, what="variance")
    # the same on a transposed (non-contiguous) view of the same data
    xt = np.ascontiguousarray(x.T).T
    mt, vt = cubn.moments(xt, axes)
    assert np.array_equal(mt, m) and np.array_equal(vt, v)


@pytest.mark.parametrize("name,fmt,shape,kind", CASES, ids=IDS)
def test_weighted_moments_at_chunk_boundaries(rng, name, fmt, shape, kind):
    x = (-4.0 + rng.standard_normal(shape)).astype(np.float32)
    axes = ref.reduce_axes(len(shape), _axis(fmt, shape))
    wb = rng.random(shape[0]) * (rng.random(shape[0]) > 0.3)
    wb[0] = 0.0
    x[0] = np.inf  # under a zero weight: skipped
    m, v = cubn.weighted_moments(x, axes, wb)
    rm, rv = ref.moments(np.where(np.isfinite(x), x, 0), axes, weights=wb.reshape((-1,) + (1,) * (len(shape) - 1)))
    # finite data: the reference is NaN only where the weights sum to 0, where TF's div_no_nan gives 0
    rm, rv = np.nan_to_num(rm), np.nan_to_num(rv)
    assert_close(m, rm, "float32", what="batch-weighted mean")
    assert_close(v, rv, "float32", what="batch-weighted variance")
    wf = rng.random(shape) * (rng.random(shape) > 0.3)
    m, v = cubn.weighted_moments(np.where(np.isfinite(x), x, 1.0).astype(np.float32), axes, wf)
    rm, rv = (np.nan_to_num(r) for r in ref.moments(np.where(np.isfinite(x), x, 1.0), axes, weights=wf))
    assert_close(m, rm, "float32", what="full-weighted mean")
    assert_close(v, rv, "float32", what="full-weighted variance")


@pytest.mark.parametrize("name,fmt,shape,kind", CASES, ids=IDS)
def test_training_forward_and_backward_at_chunk_boundaries(rng, name, fmt, shape, kind):
    ax = _axis(fmt, shape)
    c = shape[ax]
    x = (2.0 + rng.standard_normal(shape)).astype(np.float32)
    side = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    g, b = rng.standard_normal(c), rng.standard_normal(c)
    y, bm, bv = cubn.fused_batch_norm(x, g, b, data_format=fmt, activation="relu", side_input=side)
    axes = ref.reduce_axes(len(shape), ax)
    m, v = ref.moments(x, axes)
    n = x.size // c
    assert_close(bm, m, "float32", what="batch mean")
    assert_close(bv, v * n / max(n - 1, 1), "float32", what="batch variance")
    assert_close(y, ref.batch_norm(x, m, v, b, g, 1e-3, ax, "relu", side=side), "float32", what="y")
    # tanh: smooth, so float32 and float64 pre-activations give the same derivative (a ReLU's mask may flip)
    grads = cubn.batch_norm_backward(dy, x, g, bm, v.astype(np.float32), data_format=fmt, offset=b, activation="tanh",
                                     side_input=side)
    rdx, rdg, rdb, rds = _ref_backward(dy.astype(np.float64), x.astype(np.float64), g, b, side, ax, "tanh")
    assert_close(grads.dx, rdx, "float32", what="dx")
    assert_close(grads.dscale, rdg, "float32", what="dscale")
    assert_close(grads.doffset, rdb, "float32", what="doffset")
    assert_close(grads.dside_input, rds, "float32", what="dside")


@pytest.mark.parametrize("name,fmt,shape,kind", [c for c in CASES if c[3] != "whole"][::3], ids=IDS[1::3])
def test_weighted_backward_and_inference_at_chunk_boundaries(rng, name, fmt, shape, kind):
    ax = _axis(fmt, shape)
    c = shape[ax]
    x = (-1.0 + 2 * rng.standard_normal(shape)).astype(np.float64)
    dy = rng.standard_normal(shape)
    g, b = rng.standard_normal(c), rng.standard_normal(c)
    w = rng.random(shape[0]) + 0.1
    m, v = ref.moments(x, ref.reduce_axes(len(shape), ax), weights=w.reshape((-1,) + (1,) * (len(shape) - 1)))
    grads = cubn.batch_norm_backward(dy, x, g, m, v, data_format=fmt, offset=b, batch_weights=w)
    rdx, rdg, rdb, _ = _ref_backward(dy, x, g, b, None, ax, None, w=w)
    assert_close(grads.dx, rdx, "float64", what="weighted dx")
    assert_close(grads.dscale, rdg, "float64", what="weighted dscale")
    y, _, _ = cubn.fused_batch_norm(x, g, b, m, v, data_format=fmt, is_training=False, activation="silu")
    assert_close(y, ref.batch_norm(x, m, v, b, g, 1e-3, ax, "silu"), "float64", what="inference y")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name,fmt,shape,kind", [CASES[2], CASES[6], CASES[9], CASES[12]],
                         ids=[CASES[i][0] for i in (2, 6, 9, 12)])
def test_16_bit_inputs_at_chunk_boundaries(rng, dtype, name, fmt, shape, kind):
    dt = np_dtype(dtype)
    ax = _axis(fmt, shape)
    c = shape[ax]
    x = (1.0 + rng.standard_normal(shape)).astype(dt)
    g, b = rng.standard_normal(c), rng.standard_normal(c)
    y, bm, bv = cubn.fused_batch_norm(x, g, b, data_format=fmt, activation="relu")
    assert y.dtype == dt and bm.dtype == np.float32
    m, v = ref.moments(x, ref.reduce_axes(len(shape), ax))
    assert_close(bm, m, dtype, what="batch mean")
    assert_close(y, ref.batch_norm(x, m, v, b, g, 1e-3, ax, "relu"), dtype, what="y")


# ---------------------------------------------------------------------------
# Thread count: bitwise identical results
# ---------------------------------------------------------------------------
@pytest.fixture
def threads():
    before = cubn.get_num_threads()
    yield cubn.set_num_threads
    cubn.set_num_threads(None)
    assert cubn.get_num_threads() == before


def _all_ops(x, fmt, rng):
    ax = _axis(fmt, x.shape)
    c = x.shape[ax]
    axes = ref.reduce_axes(x.ndim, ax)
    g, b = rng.standard_normal(c), rng.standard_normal(c)
    side = rng.standard_normal(x.shape).astype(x.dtype)
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    wb = rng.random(x.shape[0])
    wf = rng.random(x.shape)

    def run():
        out = list(cubn.moments(x, axes))
        out += cubn.weighted_moments(x, axes, wb)
        out += cubn.weighted_moments(x, axes, wf)
        y, bm, bv = cubn.fused_batch_norm(x, g, b, data_format=fmt, activation="relu", side_input=side)
        out += [y, bm, bv]
        out.append(cubn.fused_batch_norm(x, g, b, bm, bv, data_format=fmt, is_training=False)[0])
        out += [a for a in cubn.batch_norm_backward(dy, x, g, bm, bv, data_format=fmt, offset=b, activation="relu",
                                                    side_input=side, batch_weights=wb)]
        layer = cubn.BatchNorm(decay=0.9, scale=True, activation_fn="relu", updates_collections=None,
                               data_format="NCHW" if fmt == "NCHW" else "NHWC", renorm=True)
        out.append(layer(x, is_training=True))
        out.append(layer.backward(dy))
        out += [np.array(layer.variables[k]) for k in ("moving_mean", "moving_variance", "renorm_mean", "renorm_stddev")]
        out += [layer.gradients["beta"], layer.gradients["gamma"]]
        return out

    return run


@pytest.mark.parametrize("name,fmt,shape,kind", [c for c in CASES if c[3] != "whole"][::2],
                         ids=[c[0] for c in CASES if c[3] != "whole"][::2])
def test_results_do_not_depend_on_the_thread_count(rng, threads, name, fmt, shape, kind):
    x = (100.0 + rng.standard_normal(shape)).astype(np.float32)
    run = _all_ops(x, fmt, rng)
    threads(1)
    one = run()
    for n in (2, 3, 5):
        threads(n)
        many = run()
        for k, (a, b) in enumerate(zip(one, many)):
            if a is None:
                assert b is None
                continue
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes(), f"output {k} differs with {n} threads"


SMALL_CASES = [("NHWC", (8, 16)), ("NHWC", (SMALL // 16, 16)), ("NCHW", (4, 3, 5, 5)), ("NCHW", (2, 7, 1, 300))]


@pytest.mark.parametrize("fmt,shape", SMALL_CASES, ids=[f"{f}-{'x'.join(map(str, s))}" for f, s in SMALL_CASES])
def test_the_small_path_agrees_with_the_chunked_path(rng, threads, monkeypatch, fmt, shape):
    """Small arrays run as one chunk in the calling thread; forced through the chunked path (rows or runs,
    on the pool), every op gives the same results up to the order of the sums, and the small path's
    results are bitwise the same for any thread count."""
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    assert _plan_kind(fmt, shape) == "whole"
    run = _all_ops(x, fmt, rng)
    threads(1)
    small = run()
    for n in (2, 5):
        threads(n)
        for k, (a, b) in enumerate(zip(small, run())):
            assert (a is None and b is None) or a.tobytes() == b.tobytes(), f"output {k} differs with {n} threads"
    monkeypatch.setattr(tiles, "SMALL_ELEMENTS", 0)
    tiles.layout.cache_clear()
    try:
        assert _plan_kind(fmt, shape) != "whole"
        threads(2)
        chunked = run()
    finally:
        monkeypatch.undo()
        tiles.layout.cache_clear()
    for k, (a, b) in enumerate(zip(small, chunked)):
        if a is None:
            assert b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = np.max(np.abs(np.asarray(b, np.float64))) if a.size else 1.0
        assert_close(a, b, "float32", scale=scale, what=f"output {k}, small vs chunked path")


def test_set_num_threads_checks_its_argument(threads):
    threads(3)
    assert cubn.get_num_threads() == 3
    for bad, exc in ((0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)):
        with pytest.raises(exc, match="set_num_threads: argument 'n'"):
            cubn.set_num_threads(bad)
    assert cubn.get_num_threads() == 3
    threads(None)
    assert cubn.get_num_threads() >= 1


def test_an_error_in_a_chunk_reaches_the_caller(threads):
    from cubn import _threads

    threads(3)
    seen = []

    def task(i):
        seen.append(i)
        if i == 5:
            raise RuntimeError("chunk 5")

    with pytest.raises(RuntimeError, match="chunk 5"):
        _threads.run(40, task)
    assert 5 in seen
    # the pool still works afterwards
    done = []
    _threads.run(10, done.append)
    assert sorted(done) == list(range(10))


# ---------------------------------------------------------------------------
# Accuracy at large offsets: NumPy's float32 pairwise two-pass is the bar
# ---------------------------------------------------------------------------
OFFSETS = [1e3, 1e4, 1e5, 1e6, 1e7]
STDS = [1.0, 1e-1, 1e-2]
ACCURACY_CASES = [
    ("NHWC", (16, 32, 32, 16)),   # rows, wide
    ("NHWC", (64, 64, 64, 3)),    # rows, three channels
    ("NCHW", (32, 64, 7, 7)),     # rows, column blocks
    ("NCHW", (8, 4, 64, 64)),     # runs
    ("NCHW", (2, 2, 3 * CHUNK // 2)),  # runs, pieces
    ("NHWC", (8, 16)),            # one small chunk, the calling thread
    ("NCHW", (4, 3, 5, 5)),       # one small chunk, feature maps
]


def _pairwise_two_pass(x, axes, acc):
    """NumPy's two-pass on contiguous per-channel rows: pairwise sums in ``acc``."""
    kept = [a for a in range(x.ndim) if a not in axes]
    rows = np.moveaxis(x, kept, list(range(len(kept)))).astype(acc)
    rows = np.ascontiguousarray(rows).reshape(int(np.prod([x.shape[a] for a in kept])), -1)
    m = rows.mean(axis=1, dtype=acc)
    v = ((rows - m[:, None]) ** 2).mean(axis=1, dtype=acc)
    return m, v


def _finfo(dt):
    if BF16 is not None and dt == BF16:
        import ml_dtypes

        return ml_dtypes.finfo(dt)
    return np.finfo(dt)


def _truth(x, axes):
    xl = x.astype(np.longdouble)
    m = xl.mean(axis=axes)
    return m, ((xl - np.expand_dims(m, axes)) ** 2).mean(axis=axes)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("fmt,shape", ACCURACY_CASES, ids=[f"{f}-{'x'.join(map(str, s))}" for f, s in ACCURACY_CASES])
def test_accuracy_at_large_offsets_matches_the_pairwise_two_pass(rng, dtype, fmt, shape):
    dt = np_dtype(dtype)
    acc = np.dtype(np.float64 if dtype == "float64" else np.float32)
    axes = ref.reduce_axes(len(shape), _axis(fmt, shape))
    offsets = OFFSETS if dtype != "float16" else [1e2, 1e3, 1e4]
    for off in offsets:
        for sd in STDS:
            x = (off + sd * rng.standard_normal(shape)).astype(dt)  # quantized by the dtype's spacing
            if dtype == "float64":
                x = x + rng.standard_normal(shape) * sd * 1e-9  # not float32-representable
            tm, tv = _truth(x, axes)
            bm, bv = _pairwise_two_pass(x, axes, acc)
            m, v = cubn.moments(x, axes)
            _, bm2, bv2 = cubn.fused_batch_norm(x, data_format=fmt)
            n = x.size // bm2.shape[0]
            out_eps = float(_finfo(dt).eps)  # moments come back in x's dtype
            acc_eps = float(np.finfo(acc).eps)
            for what, mine, bar, truth, floor in (
                ("mean", m, bm.astype(dt), tm, 2 * out_eps * abs(off)),
                ("variance", v, bv.astype(dt), tv, (8 * acc_eps + out_eps) * tv),
                ("batch mean", bm2, bm, tm, 2 * acc_eps * abs(off)),
                ("batch variance", bv2 * ((n - 1) / n), bv, tv, 8 * acc_eps * tv),
            ):
                err = np.abs(np.asarray(mine, np.longdouble) - truth)
                bar_err = np.abs(np.asarray(bar, np.longdouble) - truth)
                limit = np.maximum(2 * bar_err, floor)
                assert np.all(err <= limit), (
                    f"{what} at offset {off:g}, std {sd:g}: error {float(np.max(err)):.3g} > "
                    f"{float(np.max(limit[err > limit])):.3g} (pairwise two-pass: {float(np.max(bar_err)):.3g})")


def test_a_pivot_far_from_the_mean_is_corrected(rng):
    """Every sampled pivot an outlier: the statistics are computed again about the mean."""
    shape = (64, 64, 64, 3)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    x[0, 0, 0, :] = x[32, 32, 32, :] = x[-1, -1, -1, :] = 1e4 + 3000  # first, middle and last elements
    tm, tv = _truth(x, (0, 1, 2))
    bm, bv = _pairwise_two_pass(x, (0, 1, 2), np.float32)
    m, v = cubn.moments(x, (0, 1, 2))
    assert np.all(np.abs(v - tv) <= np.maximum(2 * np.abs(bv - tv), 8 * np.finfo(np.float32).eps * tv))
    assert np.all(np.abs(m - tm) <= np.maximum(2 * np.abs(bm - tm), np.spacing(np.float32(1e4))))


# ---------------------------------------------------------------------------
# NaN and Inf stay in their channel
# ---------------------------------------------------------------------------
NAN_CASES = ("small-limit", "wide+tail", "blocks-7x7", "runs", "piece+1")


@pytest.mark.parametrize("name,fmt,shape,kind", [c for c in CASES if c[0] in NAN_CASES], ids=list(NAN_CASES))
def test_nan_and_inf_stay_in_their_channel(rng, name, fmt, shape, kind):
    ax = _axis(fmt, shape)
    c = shape[ax]
    x = (5.0 + rng.standard_normal(shape)).astype(np.float32)
    xm = np.moveaxis(x, ax, 0)  # a view: channel first
    bad = {0: np.nan, 1: np.inf, 2: "both"}
    def put(channel, k, value):  # the k-th element of a channel (in memory order)
        xm[channel][np.unravel_index(k % xm[channel].size, xm[channel].shape)] = value

    put(0, xm[0].size // 2, np.nan)  # middle of channel 0
    put(1, 0, np.inf)                # channel 1's first element (in its pivot sample)
    put(2, -1, np.inf)               # channel 2: +Inf and -Inf
    put(2, 1, -np.inf)
    good = [k for k in range(c) if k not in bad]
    axes = ref.reduce_axes(len(shape), ax)
    m, v = cubn.moments(x, axes)
    y, bm, bv = cubn.fused_batch_norm(x, data_format=fmt)
    dx = cubn.batch_norm_backward(rng.standard_normal(shape).astype(np.float32), x, None, bm, bv,
                                  data_format=fmt).dx
    rm, rv = ref.moments(np.take(x, good, axis=ax), axes)
    assert_close(m[good], rm, "float32")
    assert_close(v[good], rv, "float32")
    assert np.isnan(m[0]) and np.isnan(v[0])
    assert m[1] == np.inf and np.isnan(v[1])
    assert np.isnan(m[2]) and np.isnan(v[2])
    for arr in (y, dx):
        am = np.moveaxis(arr, ax, 0)
        assert np.isfinite(am[good]).all()
        assert not np.isfinite(am[:3].reshape(3, -1)).all(axis=1).any()


# ---------------------------------------------------------------------------
# Peak memory: at most a quarter of the input beyond the outputs
# ---------------------------------------------------------------------------
# 4M elements each (16 MiB in float32): the threads' chunk buffers (about 1 MiB a thread,
# allocated on a thread's first chunk and kept) are small beside a quarter of that.
MEMORY_CASES = [("NHWC", (16, 64, 64, 64)), ("NHWC", (16, 256, 256, 4)), ("NCHW", (64, 1280, 7, 7)),
                ("NCHW", (4, 4, 512, 512))]


def _peak_beyond_outputs(f):
    f()  # warm
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = f()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    roots = {}
    for a in (out if isinstance(out, tuple) else (out,)):
        while isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        if isinstance(a, np.ndarray):
            roots[id(a)] = a.nbytes
    return peak - sum(roots.values())


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("fmt,shape", MEMORY_CASES, ids=[f"{f}-{'x'.join(map(str, s))}" for f, s in MEMORY_CASES])
@pytest.mark.parametrize("loops", [False, True], ids=["numpy code", "compiled loops"])
def test_peak_memory_beyond_outputs(rng, dtype, fmt, shape, loops):
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ax = _axis(fmt, shape)
    c = shape[ax]
    axes = ref.reduce_axes(len(shape), ax)
    g, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    mean, var = np.zeros(c, np.float32), np.ones(c, np.float32)
    layer = cubn.BatchNorm(data_format="NCHW" if fmt == "NCHW" else "NHWC", scale=True)
    layer(x, is_training=True)
    ops = {
        "moments": lambda: cubn.moments(x, axes),
        "training forward": lambda: cubn.fused_batch_norm(x, g, b, mean, var, data_format=fmt, exponential_avg_factor=0.1),
        "inference": lambda: cubn.fused_batch_norm(x, g, b, mean, var, data_format=fmt, is_training=False),
        "BN+ReLU": lambda: cubn.fused_batch_norm(x, g, b, data_format=fmt, activation="relu"),
        "BN+add+ReLU": lambda: cubn.fused_batch_norm(x, g, b, data_format=fmt, activation="relu", side_input=dy),
        "backward": lambda: tuple(cubn.batch_norm_backward(dy, x, g, mean, var, data_format=fmt, activation="relu",
                                                           side_input=x)),
        "layer backward": lambda: layer.backward(dy),
    }
    for name, f in ops.items():
        extra = _peak_beyond_outputs(f)
        assert extra <= 0.25 * x.nbytes, f"{name}: {extra / x.nbytes:.3f}x the input beyond the outputs"


# ---------------------------------------------------------------------------
# Folding a channel's mean into its shift: (x - m) * s + h as x * s + (h - m s)
# where that is accurate, the mean subtracted first elsewhere
# ---------------------------------------------------------------------------
FOLD_CASES = [c for c in CASES if c[3] != "whole" and c[0] in ("wide+tail", "c3", "blocks", "blocks-7x7", "runs",
                                                                 "piece+1", "one-channel")]
FOLD_IDS = [c[0] for c in FOLD_CASES]
# per channel: offsets that fold (within a few std of 0), near the bound, and large ones that do not
FOLD_OFFSETS = [0.0, 0.5, -1.0, 2.0, 3.0, -4.0, 1e4, 1e5, -1e6, 1e7]


def _mixed(rng, fmt, shape, dtype=np.float32):
    ax = _axis(fmt, shape)
    off = np.resize(np.asarray(FOLD_OFFSETS), shape[ax])
    rng.shuffle(off)
    return (ref.bcast(off, len(shape), ax) + rng.standard_normal(shape)).astype(dtype)


@pytest.fixture(autouse=True)
def _fold_small_inputs_too(request, monkeypatch):
    """The folding tests' shapes are below the size where folding starts to pay: fold them anyway."""
    if "fold" in request.node.name or "never_written" in request.node.name:
        from cubn.backends import numpy_backend as nb

        monkeypatch.setattr(nb, "FOLD_MIN_ELEMENTS", 0)


@pytest.fixture
def unfolded(monkeypatch):
    """Run the NumPy backend with no channel folding (its former form), inside ``with unfolded():``."""
    import contextlib

    from cubn.backends import numpy_backend as nb

    @contextlib.contextmanager
    def ctx():
        with monkeypatch.context() as m:
            m.setattr(nb, "_fold_offsets", lambda mean, coef, const, acc, spread, sigmas=0: (mean, const))
            yield

    return ctx


def _channel_errors(a, truth, ax):
    """Largest absolute error per channel, float64."""
    e = np.abs(np.asarray(a, np.float64) - truth)
    return np.moveaxis(e, ax, 0).reshape(e.shape[ax], -1).max(axis=1)


def _channel_spacing(truth, ax, dt):
    m = np.moveaxis(np.abs(truth), ax, 0).reshape(truth.shape[ax], -1).max(axis=1)
    return np.spacing(m.astype(dt)).astype(np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,fmt,shape,kind", FOLD_CASES, ids=FOLD_IDS)
def test_folded_channels_keep_the_accuracy_of_subtracting_the_mean_first(rng, unfolded, dtype, name, fmt, shape, kind):
    """At offsets from 0 to 1e7 (channels folded, near the bound and not), inference, the training
    forward (ReLU, residual) and the backward stay within twice the error of the unfolded form."""
    dt = np.dtype(dtype)
    ax = _axis(fmt, shape)
    c = shape[ax]
    x = _mixed(rng, fmt, shape, dt)
    side = rng.standard_normal(shape).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    g, b = rng.uniform(0.5, 1.5, c).astype(dt), (0.5 * rng.standard_normal(c)).astype(dt)
    axes = ref.reduce_axes(len(shape), ax)
    m64, v64 = ref.moments(x, axes)
    mean, var = m64.astype(dt), v64.astype(dt)

    def run():
        yi = cubn.fused_batch_norm(x, g, b, mean, var, data_format=fmt, is_training=False)[0]
        yt = cubn.fused_batch_norm(x, g, b, data_format=fmt, activation="relu", side_input=side)[0]
        gr = cubn.batch_norm_backward(dy, x, g, mean, var, data_format=fmt, offset=b, activation="tanh", side_input=side)
        return yi, yt, gr.dx

    folded = run()
    with unfolded():
        bar = run()
    truths = (ref.batch_norm(x, mean, var, b, g, 1e-3, ax),
              ref.batch_norm(x, m64, v64, b, g, 1e-3, ax, "relu", side=side),
              _ref_backward(dy.astype(np.float64), x.astype(np.float64), g, b, side, ax, "tanh")[0])
    # units in the last place of each channel's largest output (before the ReLU, which may zero a channel)
    units = (truths[0], ref.batch_norm(x, m64, v64, b, g, 1e-3, ax, side=side), truths[2])
    for what, mine, theirs, truth, unit in zip(("inference", "training forward", "dx"), folded, bar, truths, units):
        # in those units: the worst channel within twice the unfolded form's worst (plus 2), and no
        # channel far beyond its own unfolded error
        sp = _channel_spacing(unit, ax, dt)
        err, bar_err = _channel_errors(mine, truth, ax) / sp, _channel_errors(theirs, truth, ax) / sp
        assert err.max() <= 2 * bar_err.max() + 2, f"{what}: {err.max():.3g} ulp > 2 x {bar_err.max():.3g} + 2"
        bad = err > 2 * bar_err + 16
        assert not bad.any(), f"{what}: channel errors {err[bad]} ulp (unfolded: {bar_err[bad]})"


def test_folding_runs_both_forms_in_one_chunk(rng):
    """Mixed channels in one parameter row: folded ones take the short form, the others are patched,
    and each channel's bits are those of its own form alone."""
    from cubn.backends import numpy_backend as nb

    fmt, shape = "NHWC", (4 * CHUNK // 16, 16)
    x = _mixed(rng, fmt, shape)
    g, b = np.ones(16, np.float32), np.zeros(16, np.float32)
    mean, var = ref.moments(x, (0,))
    mean, var = mean.astype(np.float32), var.astype(np.float32)
    seen = []
    real = nb._unfolded_columns

    def spy(m, memo):
        cols = real(m, memo)
        seen.append(cols if cols is None or cols is True else len(cols))
        return cols

    nb._unfolded_columns = spy
    try:
        y = cubn.fused_batch_norm(x, g, b, mean, var, data_format=fmt, is_training=False)[0]
    finally:
        nb._unfolded_columns = real
    assert any(isinstance(s, int) and 0 < s for s in seen), seen  # some columns patched, not the whole chunk
    for k in range(16):  # channel k alone: the same bits
        yk = cubn.fused_batch_norm(np.ascontiguousarray(np.repeat(x[:, k : k + 1], 16, axis=1)), g, b,
                                   np.full(16, mean[k]), np.full(16, var[k]), data_format=fmt, is_training=False)[0]
        assert y[:, k].tobytes() == yk[:, 0].tobytes(), f"channel {k}"


@pytest.mark.parametrize("name,fmt,shape,kind", FOLD_CASES[::2], ids=FOLD_IDS[::2])
def test_folded_results_do_not_depend_on_the_thread_count(rng, threads, name, fmt, shape, kind):
    x = _mixed(rng, fmt, shape)
    run = _all_ops(x, fmt, rng)
    threads(1)
    one = run()
    for n in (2, 3):
        threads(n)
        for k, (a, b) in enumerate(zip(one, run())):
            assert (a is None and b is None) or a.tobytes() == b.tobytes(), f"output {k} differs with {n} threads"


@pytest.mark.parametrize("name,fmt,shape,kind", CASES, ids=IDS)
def test_inputs_are_never_written(rng, name, fmt, shape, kind):
    x = _mixed(rng, fmt, shape)
    saved = x.copy()
    run = _all_ops(x, fmt, rng)
    run()
    assert x.tobytes() == saved.tobytes()
