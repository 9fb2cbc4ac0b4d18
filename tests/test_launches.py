"""Kernel launches per op, counted on the emulated launcher (the CuPy path
runs the same orchestration): what docs/kernels.md promises."""
from __future__ import annotations

import numpy as np
import pytest

import cubn


@pytest.fixture(params=[True, False], ids=["one_launch", "three_launch"])
def one_launch(request):
    with cubn.use_one_launch(request.param):
        yield request.param


@pytest.fixture
def launches(emulated_launches, one_launch):
    with cubn.use_backend("emulated"):
        yield emulated_launches


@pytest.mark.parametrize("shape,fmt", [((4, 3, 5, 6), "NHWC"), ((4, 6, 5, 3), "NCHW")])
def test_launch_counts(launches, rng, shape, fmt, one_launch):
    """Small tensors take the one-launch training forward and backward
    (one_launch.cu); with them switched off, the fused statistics (finalize
    inside) + normalize, and sums + finalize + apply. Moments are one launch."""
    x = rng.standard_normal(shape).astype(np.float32)
    c = shape[-1] if fmt == "NHWC" else shape[1]
    g, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    train_launches = 1 if one_launch else 2

    def count(fn):
        launches.clear()
        fn()
        return list(launches)

    fused = "cubn_moments_cl_fused" if fmt == "NHWC" else "cubn_moments_cf_fused"
    assert count(lambda: cubn.moments(x, [0, 1, 2] if fmt == "NHWC" else [0, 2, 3])) == [fused]
    train = count(lambda: cubn.fused_batch_norm(x, g, b, data_format=fmt, activation="relu", side_input=x))
    assert len(train) == train_launches
    assert train[0] == ("cubn_bn_train_one_launch" if one_launch else fused)
    assert len(count(lambda: cubn.fused_batch_norm(x, g, b, g, g, data_format=fmt, is_training=False))) == 1
    assert len(count(lambda: cubn.batch_normalization(x, 0.5, 2.0, None, None, 1e-3))) == 1
    bn = cubn.BatchNorm(scale=True, data_format=fmt, updates_collections=None, zero_debias_moving_mean=True)
    assert len(count(lambda: bn(x))) == train_launches  # the in-place update rides in the finalize step
    assert len(count(lambda: bn.backward(x))) == (1 if one_launch else 3)
    deferred = cubn.BatchNorm(data_format=fmt, updates_collections=cubn.UpdateCollection())
    assert len(count(lambda: deferred(x))) == train_launches
    assert count(lambda: cubn.run_updates(deferred.updates_collections)) == ["cubn_bn_update"]
