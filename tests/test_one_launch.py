"""The one-launch training forward (kernels/one_launch.cu): when it is chosen,
and that it computes what the three-launch path computes, at the edges of
its register cache, with scalar and 16-byte accesses and partial column tiles.

The general training tests run both paths through the ``train_backend``
fixture; these tests aim at the boundaries.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import cubn
from conftest import assert_close, np_dtype
import reference as ref
from cubn.backends import one_launch
from cubn.backends._memory import alignment
from cubn.kernels import registry



def _train(x, fmt, act="relu", side=None, **kw):
    c = x.shape[-1] if fmt == "NHWC" else x.shape[1]
    g = np.linspace(0.5, 1.5, c).astype(np.float32 if x.dtype != np.float64 else np.float64)
    b = np.linspace(-1, 1, c).astype(g.dtype)
    return cubn.fused_batch_norm(x, g, b, data_format=fmt, activation=act, side_input=side, **kw), g, b


def _check(x, fmt, out, g, b, dtype_name, side=None):
    ax = ref.channel_axis(x.ndim, fmt)
    axes = ref.reduce_axes(x.ndim, ax)
    x64 = x.astype(np.float64)
    m, v = ref.moments(x64, axes)
    n = x.size // x.shape[ax]
    y, bm, bv = out
    assert_close(bm, m, dtype_name, what="batch_mean")
    assert_close(bv, v * n / max(n - 1, 1), dtype_name, what="batch_var")
    s64 = None if side is None else side.astype(np.float64)
    assert_close(y, ref.batch_norm(x64, m, v, b, g, 1e-3, ax, "relu", side=s64), dtype_name, what="y")


@pytest.fixture
def launches(emulated_launches):
    with cubn.use_backend("emulated"):
        yield emulated_launches


def _path(launches, fn):
    launches.clear()
    out = fn()
    return list(launches), out


# (data_format, shape, dtype, expected path): just inside and just outside the
# cache for each layout and vector width, partial column tiles, C < VEC.
CASES = [
    ("NCHW", (5, 1, 819), "float32", "one"),        # L = 4095 scalar vectors: fits
    ("NCHW", (1, 2, 4097), "float32", "three"),     # one scalar vector over
    ("NCHW", (4, 2, 32, 64), "float32", "one"),     # VEC 4, L = 8192 = 2048 vectors
    ("NCHW", (8, 3, 64, 64), "float16", "one"),     # VEC 8, L = 32768 = 512 threads x 8 vectors x 8
    ("NCHW", (9, 1, 64, 64), "float16", "three"),   # L = 36864 > 32768
    ("NCHW", (3, 2, 6), "float64", "one"),          # VEC 2 on doubles
    ("NHWC", (2048, 6), "float32", "one"),          # scalar columns (6 % 4 != 0), bx = 2, by = 256, 8 items
    ("NHWC", (2049, 6), "float32", "three"),        # by would be 512: bx * by > 512 (16 items: vectors only)
    ("NHWC", (4096, 8), "float32", "one"),          # 2 column vectors: 8 items need by = 512, 16 items by = 256
    ("NHWC", (4097, 8), "float32", "three"),        # 16 items, by would be 512
    ("NHWC", (4096, 4), "float32", "one"),          # one column vector: bx = 1, by = 512
    ("NHWC", (37, 20), "float32", "one"),           # partial tile: 5 column vectors in a bx = 8 block
    ("NHWC", (3, 5, 7, 24), "bfloat16", "one"),     # VEC 8 on 16-bit (4 items per thread)
    ("NHWC", (1024, 16), "float16", "one"),         # 2 column vectors: bx = 2, by = 256, 4 items: 1024 rows
    ("NHWC", (1025, 16), "float16", "three"),       # one row over
    ("NHWC", (16, 3), "float16", "one"),            # C < VEC: scalar columns
]


@pytest.mark.parametrize("fmt,shape,dtype,path", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_path_and_result_at_the_cache_edges(launches, rng, fmt, shape, dtype, path):
    x = (rng.standard_normal(shape) * 2 + 50).astype(np_dtype(dtype))
    side = rng.standard_normal(shape).astype(np_dtype(dtype))
    names, out = _path(launches, lambda: _train(x, fmt, side=side))
    want = ["cubn_bn_train_one_launch"] if path == "one" else [
        "cubn_moments_" + ("cl" if fmt == "NHWC" else "cf") + "_fused", "cubn_normalize"]
    assert names == want
    (y, bm, bv), g, b = out
    _check(x, fmt, (np.asarray(y), np.asarray(bm), np.asarray(bv)), g, b, dtype, side=side)


def test_both_paths_agree_on_every_output(launches, rng):
    """Moving statistics, renorm and zero-debias state written by the one launch
    equal those of statistics + finalize + normalize, step after step."""
    shape = (12, 5, 5, 6)
    init = {"moving_stddev": rng.uniform(0.5, 2.0, 6), "moving_mean": rng.standard_normal(6)}
    kw = dict(scale=True, decay=0.7, renorm=True, zero_debias_moving_mean=True, updates_collections=None,
              renorm_clipping={"rmax": 1.2, "rmin": 0.8, "dmax": 0.3}, activation_fn="gelu", param_initializers=init)
    one, three = cubn.BatchNorm(**kw), cubn.BatchNorm(**kw)
    for step in range(3):
        x = (rng.standard_normal(shape) * 3 + step).astype(np.float32)
        launches.clear()
        y1 = one(x, is_training=True)
        assert launches == ["cubn_bn_train_one_launch"]
        with cubn.use_one_launch(False):
            y3 = three(x, is_training=True)
        assert_close(y1, y3, "float32", what=f"y step {step}")
        for name, v in three.variables.items():
            assert_close(one.variables[name], v, "float32", what=f"{name} step {step}")
        dy = rng.standard_normal(shape).astype(np.float32)
        launches.clear()
        d1 = one.backward(dy)
        assert launches == ["cubn_bn_bwd_one_launch"]
        with cubn.use_one_launch(False):
            d3 = three.backward(dy)
        assert_close(d1, d3, "float32", what="dx")
        for name, gr in three.gradients.items():
            assert_close(one.gradients[name], gr, "float32", what=f"d{name}")


def test_not_chosen_for_weights_or_when_switched_off(launches, rng):
    x = rng.standard_normal((8, 4, 4, 3)).astype(np.float32)
    bn = cubn.BatchNorm(updates_collections=None)
    names, _ = _path(launches, lambda: bn(x, batch_weights=rng.random(8)))
    assert names == ["cubn_moments_cl_fused", "cubn_normalize"]
    with cubn.use_one_launch(False):
        names, _ = _path(launches, lambda: bn(x))
    assert names == ["cubn_moments_cl_fused", "cubn_normalize"]
    names, _ = _path(launches, lambda: bn(x))
    assert names == ["cubn_bn_train_one_launch"]


def test_nan_stays_in_its_channel(launches, rng):
    x = rng.standard_normal((64, 16)).astype(np.float32)
    x[7, 3] = np.nan
    names, ((y, bm, bv), g, b) = _path(launches, lambda: _train(x, "NHWC", act=None))
    assert names == ["cubn_bn_train_one_launch"]
    y, bm = np.asarray(y), np.asarray(bm)
    assert np.isnan(bm[3]) and np.all(np.isnan(y[:, 3]))
    keep = np.arange(16) != 3
    assert np.all(np.isfinite(y[:, keep])) and np.all(np.isfinite(bm[keep]))


@pytest.mark.parametrize("fmt,shape,expect", [
    ("NCHW", (64, 2048, 7, 7), True), ("NCHW", (256, 256, 14, 14), False), ("NHWC", (1024, 64), True),
    ("NHWC", (64, 7, 7, 2048), True), ("NHWC", (256, 1024), True), ("NCHW", (16, 3, 512, 512), False),
])
def test_which_benchmark_shapes_take_one_launch(fmt, shape, expect):
    """The configuration rule on a pretend H100, without touching memory."""
    from cubn._plan import plan_for_channels
    from cubn.backends.base import DeviceInfo

    h100 = DeviceInfo("H100", 132, 1024, 48 * 1024)
    plan = plan_for_channels(shape, fmt, "test")
    f32 = np.dtype(np.float32)
    launch = one_launch.decide(one_launch.FORWARD, plan, f32, f32, h100, alignment=16)
    assert (launch is not None) == expect
    if launch is not None:
        assert launch.block[0] * launch.block[1] <= registry.ONE_LAUNCH_THREADS
        assert launch.shared_bytes <= h100.max_shared_memory_per_block
    # what the options and the call allow, and what a device without one does not
    for kw in (dict(enabled=False), dict(weighted=True), dict(distributed=True), dict(same_dtypes=False)):
        assert one_launch.decide(one_launch.FORWARD, plan, f32, f32, h100, 16, **kw) is None
    assert one_launch.decide(one_launch.FORWARD, plan, f32, f32, None, 16) is None


@pytest.mark.parametrize("fmt,shape,dtype,path", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
@pytest.mark.parametrize("act", [None, "gelu"])
def test_backward_path_and_result_at_the_cache_edges(launches, rng, fmt, shape, dtype, path, act):
    """The one-launch backward (x and dy' in registers: fewer items per thread
    than the forward) against sums + finalize + apply on the same context."""
    from cubn._plan import plan_for_channels

    x = (rng.standard_normal(shape) * 2 + 50).astype(np_dtype(dtype))
    side = rng.standard_normal(shape).astype(np_dtype(dtype)) if act else None
    dy = rng.standard_normal(shape).astype(np_dtype(dtype))
    c = shape[-1] if fmt == "NHWC" else shape[1]
    acc = np.float64 if dtype == "float64" else np.float32
    g, b = rng.uniform(0.5, 1.5, c).astype(acc), rng.standard_normal(c).astype(acc)
    axes = tuple(ref.reduce_axes(x.ndim, ref.channel_axis(x.ndim, fmt)))
    m, v = x.astype(np.float64).mean(axis=axes).astype(acc), x.astype(np.float64).var(axis=axes).astype(acc)
    plan = plan_for_channels(shape, fmt, "test")
    backend = cubn._backend.get_backend("emulated")
    fits = one_launch.decide(one_launch.BACKWARD, plan, x.dtype, acc, backend.info, alignment(x)) is not None

    def run():
        return cubn.batch_norm_backward(dy, x, g, m, v, 1e-3, offset=b, data_format=fmt, activation=act,
                                        side_input=side)

    names, one = _path(launches, run)
    if fits:
        assert names == ["cubn_bn_finalize", "cubn_bn_bwd_one_launch"]
    else:
        assert names[-2:] == ["cubn_bwd_finalize", "cubn_bwd_apply"]
    with cubn.use_one_launch(False):
        three = run()
    for a1, a3, what in zip(one, three, ("dx", "dscale", "doffset", "dside_input")):
        if a3 is None:
            assert a1 is None
            continue
        scale = max(1.0, float(np.max(np.abs(np.asarray(a3, np.float64)))))
        assert_close(a1, a3, dtype, scale=scale, what=what)


def test_the_option_is_scoped_and_checked():
    from cubn._options import one_launch_enabled

    assert one_launch_enabled()
    with cubn.use_one_launch(False):
        assert not one_launch_enabled()
        with cubn.use_one_launch(True):
            assert one_launch_enabled()
        assert not one_launch_enabled()
        seen = []
        t = threading.Thread(target=lambda: seen.append(one_launch_enabled()))  # a new thread: the default
        t.start()
        t.join()
        assert seen == [True]
    assert one_launch_enabled()
    with pytest.raises(TypeError, match="use_one_launch: argument 'enabled': expected True or False"):
        with cubn.use_one_launch("off"):
            pass
