"""The fused statistics (moments.cu's cubn_moments_{cl,cf}_fused): one launch
computes the partials and, in the last block of each channel group to finish,
merges them and writes every finalize output. Checked on the emulator against
float64 references, for repeatability, for the counters it leaves, and on the
launch plans an H100 gets."""
from __future__ import annotations

import numpy as np
import pytest

import cubn
from cubn._backend import get_backend
from cubn.backends import kernel_backend as kb
from cubn.model import predict
from cubn.model.tracing import RecordingLauncher
from conftest import TOL, assert_close, backend_skip_reason
import reference as ref

pytestmark = pytest.mark.skipif(backend_skip_reason("emulated") is not None,
                                reason=str(backend_skip_reason("emulated")))

# (layout, shape): several channel groups and several blocks per group on the
# emulator's device (channels last: column groups x row splits; channels first:
# splits per channel; folded small C; a batch of one)
SHAPES = [("NHWC", (8, 16, 16, 64)), ("NC", (4096, 32)), ("NHWC", (16, 16, 16, 3)), ("NCHW", (16, 8, 32, 32)),
          ("NCHW", (3, 5, 9, 7)), ("NHWC", (1, 9, 9, 24)), ("NCHW", (1, 4, 33, 33))]


def _axes(layout, ndim):
    return tuple(range(ndim - 1)) if layout in ("NHWC", "NC") else (0,) + tuple(range(2, ndim))


def _caxis(layout, ndim):
    return ndim - 1 if layout in ("NHWC", "NC") else 1


def _adversarial(rng, layout, shape, dtype):
    """Per channel: offsets 1e4 .. 1e7 (float32/64) with a small spread, an
    all-equal channel, a NaN channel and an Inf channel (when C allows)."""
    ax = _caxis(layout, len(shape))
    C = shape[ax]
    x = rng.standard_normal(shape)
    big = dtype != "float16"
    offsets = 10.0 ** rng.uniform(4, 7, C) if big else rng.uniform(-50, 50, C)
    scale = 10.0 ** rng.uniform(-2, 1, C) if big else np.ones(C)
    x = x * ref.bcast(scale, len(shape), ax) + ref.bcast(offsets, len(shape), ax)
    xm = np.moveaxis(x, ax, 0)
    if C > 1:
        xm[1] = offsets[1]  # all equal
    if C > 2:
        xm[2].flat[rng.integers(xm[2].size)] = np.nan
    if C > 3:
        xm[3].flat[rng.integers(xm[3].size)] = np.inf
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("layout,shape", SHAPES, ids=lambda v: str(v))
def test_fused_moments_match_float64_and_repeat_bitwise(emulated_launches, rng, layout, shape, dtype):
    x = _adversarial(rng, layout, shape, dtype)
    axes = _axes(layout, x.ndim)
    with cubn.use_backend("emulated"):
        emulated_launches.clear()
        m, v = cubn.moments(x, axes)
        assert emulated_launches == ["cubn_moments_" + ("cl" if layout != "NCHW" else "cf") + "_fused"]
        again = [cubn.moments(x, axes) for _ in range(3)]  # seen, recorded, replayed
    m_ref, v_ref = ref.moments(x, axes)
    assert_close(m, m_ref, dtype, what="mean")
    C = x.shape[_caxis(layout, x.ndim)]
    if C > 1:  # the all-equal channel: every difference from its pivot is an exact 0
        equal = np.moveaxis(x, _caxis(layout, x.ndim), 0)[1].flat[0]
        assert v[1] == 0 and m[1] == equal
    # the others' variance relative to each channel's own spread (the offsets are far larger)
    fin = np.isfinite(v_ref)
    fin[1:2] = False
    s = np.where(fin & (v_ref > 0), v_ref, 1.0)
    rel = np.where(fin, np.abs(np.asarray(v, np.float64) - np.where(fin, v_ref, 0)) / s, 0)
    assert np.array_equal(np.isfinite(np.asarray(v, np.float64)), np.isfinite(v_ref)), "variance: non-finite pattern"
    assert rel.max() <= {"float32": 1e-4, "float16": 1e-2, "float64": 1e-10}[dtype]
    for m2, v2 in again:
        assert np.array_equal(m2, m, equal_nan=True) and np.array_equal(v2, v, equal_nan=True)
    counters = get_backend("emulated")._counter_buffers
    assert counters and all(not b.any() for b in counters.values()), "a counter was left non-zero"


@pytest.mark.parametrize("layout,shape", [("NHWC", (8, 16, 16, 64)), ("NCHW", (16, 8, 32, 32))], ids=str)
def test_fused_training_forward_equals_numpy_and_the_two_launch_outputs(emulated_launches, rng, layout, shape):
    """Two launches (statistics with finalize, normalize) on the emulator; the
    batch statistics, output and moving statistics agree with the NumPy
    backend and the float64 reference."""
    x = (rng.standard_normal(shape) * 3 + 100).astype(np.float32)
    ax = _caxis(layout, x.ndim)
    C = shape[ax]
    g = rng.random(C).astype(np.float32) + 0.5
    b = rng.standard_normal(C).astype(np.float32)
    fmt = "NHWC" if layout == "NC" else layout
    outs = {}
    for name in ("emulated", "numpy"):
        with cubn.use_backend(name), cubn.use_one_launch(False):
            emulated_launches.clear()
            mm, mv = np.zeros(C, np.float32), np.ones(C, np.float32)
            y, bm, bv = cubn.fused_batch_norm(x, g, b, mm, mv, 1e-3, fmt, exponential_avg_factor=0.25)[:3]
            outs[name] = (np.asarray(y), np.asarray(bm), np.asarray(bv))
            if name == "emulated":
                assert emulated_launches == ["cubn_moments_" + ("cl" if layout != "NCHW" else "cf") + "_fused",
                                             "cubn_normalize"]
    m_ref, v_ref = ref.moments(x, _axes(layout, x.ndim))
    n = x.size / C
    # exponential_avg_factor 0.25 from (0, 1): the moving mean and the Bessel-corrected moving variance
    want_m, want_v = 0.25 * m_ref, 0.75 + 0.25 * v_ref * n / (n - 1)
    y_ref = ref.batch_norm(x, m_ref, v_ref, b, g, 1e-3, ax)
    for name, (y, mm, mv) in outs.items():
        assert_close(y, y_ref, "float32", what=f"y ({name})")
        np.testing.assert_allclose(np.asarray(mm, np.float64), want_m, rtol=TOL["float32"])
        np.testing.assert_allclose(np.asarray(mv, np.float64), want_v, rtol=1e-4)
    assert_close(outs["emulated"][0], outs["numpy"][0], "float32", what="y")


def _plan(op, layout, shape, dtype):
    from cubn.model.plans import plan

    return plan(RecordingLauncher("h100"), op, layout, shape, dtype, one_launch=False)


def _suite():
    from cubn.model import _adapter

    return [pytest.param(layout, tuple(shape), id=f"{layout}-{'x'.join(map(str, shape))}")
            for layout, shape in _adapter.benchmark_suite()]


@pytest.mark.parametrize("layout,shape", _suite())
def test_fused_plans_on_h100_merge_few_partials_and_their_tail_is_not_free(layout, shape):
    """On an H100's plans (recorded, not run) moments are one launch and the
    three-launch training forward two; a group's last block merges at most
    FUSED_MAX_MERGES partials (MAX_PARTIALS per channel); the model charges
    its merge after the grid."""
    from cubn.model import devices

    for dtype in ("float32", "float16"):
        mom = _plan("moments", layout, shape, dtype)
        assert [l.kernel for l in mom] == ["cubn_moments_" + ("cf" if layout == "NCHW" else "cl") + "_fused"]
        train = _plan("bn_train", layout, shape, dtype)
        assert [l.kernel for l in train] == [mom[0].kernel, "cubn_normalize"]
        launch = mom[0]
        chunks, steps, walkers = predict.fused_merge_shape(launch)
        if launch.kernel == "cubn_moments_cf_fused":
            channels, per_channel = 1, launch.named["nsplit"]
        else:
            folded = launch.named["cols"] != launch.named["C"]
            channels = launch.named["C"] if folded else min(launch.block[0] * int(launch.template["VEC"]),
                                                            launch.named["C"])
            per_channel = launch.grid[1] * (launch.grid[0] if folded else 1)
        assert per_channel <= kb.MAX_PARTIALS and channels * per_channel <= kb.FUSED_MAX_MERGES
        assert chunks * steps <= 2 * kb.FUSED_MAX_MERGES // 256  # partials each walker merges (idle lanes: 2x)
        assert predict.last_block_cycles(launch, devices.H100) > 3 * devices.H100.l2_latency_cycles


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("layout,shape", SHAPES[:4], ids=str)
def test_fused_statistics_are_bitwise_the_two_launch_ones(emulated_launches, monkeypatch, rng, layout, shape, dtype):
    """The last block merges in finalize's order: the fused moments and the
    training forward's moving statistics equal those of statistics + finalize
    bit for bit (what single-rank SyncBatchNorm relies on)."""
    from cubn import _launch_cache
    from cubn.backends.kernel_backend import KernelBackend

    x = _adversarial(rng, layout, shape, dtype)
    axes = _axes(layout, x.ndim)
    C = x.shape[_caxis(layout, x.ndim)]
    fmt = "NHWC" if layout == "NC" else layout
    g = np.ones(C, dtype)

    def run():
        with cubn.use_backend("emulated"), cubn.use_one_launch(False):
            m, v = cubn.moments(x, axes)
            out = cubn.fused_batch_norm(x, g, g, g * 0, g, 1e-3, fmt, exponential_avg_factor=0.5)[:3]
        return [np.asarray(a) for a in (m, v, *out)]

    was = _launch_cache.enabled()
    _launch_cache.set_enabled(False)
    try:
        emulated_launches.clear()
        fused = run()
        assert emulated_launches[0].endswith("_fused")
        monkeypatch.setattr(KernelBackend, "fused_statistics", lambda self, *a: None)
        emulated_launches.clear()
        two = run()
        assert "cubn_bn_finalize" in emulated_launches
    finally:
        _launch_cache.set_enabled(was)
    for a, b in zip(fused, two):
        assert np.array_equal(a, b, equal_nan=True)
