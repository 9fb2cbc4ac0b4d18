"""Memory the kernels cannot read raw, at every entry point.

A kernel reads raw bytes: a big-endian array would be read as garbage (the
emulated ``moments`` of a ``>f4`` array once came out ~3e32), and a float
at an address that is not a multiple of its size faults on a GPU. Every
public function must therefore convert such inputs before launch, and give
the float64 truth of the same values on the NumPy and emulated backends.
Each layout below holds exactly the values of a plain contiguous array; the
result must match the float64 reference, and be the same bits as the plain
array's result on the same backend.
"""
from __future__ import annotations

import numpy as np
import pytest

import cubn
import reference as ref
from conftest import assert_close, backend_skip_reason

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")

LAYOUTS = ["big-endian", "misaligned", "packed-record", "negative-strides", "read-only", "strided-view",
           "matrix-subclass"]


def relayout(a, kind):
    """An array with ``a``'s values (and shape) laid out as ``kind`` says."""
    a = np.ascontiguousarray(a)
    if kind == "big-endian":
        out = a.astype(a.dtype.newbyteorder(">"))
        assert not out.dtype.isnative
    elif kind == "misaligned":  # np.frombuffer at an odd byte offset
        buf = np.zeros(a.nbytes + 1, np.uint8)
        out = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
        out[...] = a
        assert not out.flags.aligned
    elif kind == "packed-record":  # a field of a packed record array: misaligned strides
        rec = np.zeros(a.shape, dtype=[("tag", "u1"), ("v", a.dtype)])
        rec["v"] = a
        out = rec["v"]
        assert not out.flags.aligned
    elif kind == "negative-strides":
        out = np.ascontiguousarray(a[::-1])[::-1]
        assert out.strides[0] < 0
    elif kind == "read-only":
        out = a.copy()
        out.flags.writeable = False
    elif kind == "strided-view":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., 1::2] = a
        out = big[..., 1::2]
        assert not out.flags.c_contiguous
    elif kind == "matrix-subclass":
        if a.ndim != 2:
            return relayout(a, "read-only")
        out = np.asmatrix(a)
    else:
        raise KeyError(kind)
    np.testing.assert_array_equal(np.asarray(out), a)
    return out


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype.isnative and a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}")), "differs from the plain array's result"


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_moments_and_weighted_moments(host_backend, rng, kind, dtype):
    x = (10 + rng.standard_normal((12, 5))).astype(dtype)  # (large offsets: the kernel-accuracy tests)
    w = rng.uniform(0.5, 2.0, 12).astype(dtype)
    m, v = cubn.moments(relayout(x, kind), [0])
    rm, rv = ref.moments(x, (0,))
    assert_close(m, rm, dtype, what="mean")
    assert_close(v, rv, dtype, scale=max(1.0, float(rv.max())), what="variance")
    for a, b in zip((m, v), cubn.moments(x, [0])):
        same_bits(a, b)
    wm, wv = cubn.weighted_moments(relayout(x, kind), [0], relayout(w, kind))
    rwm, rwv = ref.moments(x, (0,), weights=w[:, None])
    assert_close(wm, rwm, dtype, what="weighted mean")
    assert_close(wv, rwv, dtype, scale=max(1.0, float(rwv.max())), what="weighted variance")


@pytest.mark.parametrize("kind", LAYOUTS)
def test_normalization_ops_and_their_parameters(host_backend, rng, kind):
    x = (5 + 2 * rng.standard_normal((6, 2, 3, 4))).astype(np.float32)  # NHWC, C = 4
    side = rng.standard_normal(x.shape).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    mean, var = rng.normal(size=4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
    o = lambda a: relayout(a, kind)  # noqa: E731

    y = cubn.batch_normalization(o(x), o(mean), o(var), o(beta), o(gamma), 1e-3)
    assert_close(y, ref.batch_norm(x, mean, var, beta, gamma, 1e-3, 3), "float32", what="batch_normalization")
    same_bits(y, cubn.batch_normalization(x, mean, var, beta, gamma, 1e-3))

    y, bm, bv = cubn.fused_batch_norm(o(x), o(gamma), o(beta), side_input=o(side), activation="relu")
    m, v = ref.moments(x, (0, 1, 2))
    assert_close(y, ref.batch_norm(x, m, v, beta, gamma, 1e-3, 3, "relu", side), "float32", what="fused training")
    same_bits(y, cubn.fused_batch_norm(x, gamma, beta, side_input=side, activation="relu")[0])

    y, _, _ = cubn.fused_batch_norm(o(x), o(gamma), o(beta), o(mean), o(var), is_training=False)
    assert_close(y, ref.batch_norm(x, mean, var, beta, gamma, 1e-3, 3), "float32", what="fused inference")

    g = cubn.batch_norm_backward(o(dy), o(x), o(gamma), o(m.astype(np.float32)), o(v.astype(np.float32)),
                                 offset=o(beta), side_input=o(side), activation="relu")
    plain = cubn.batch_norm_backward(dy, x, gamma, m.astype(np.float32), v.astype(np.float32),
                                     offset=beta, side_input=side, activation="relu")
    for a, b in zip(g, plain):
        if a is None or b is None:  # gradients this call does not produce
            assert a is None and b is None
            continue
        same_bits(a, b)
    z = ref.batch_norm(x, m, v, beta, gamma, 1e-3, 3, None, side)
    dz = dy * (z > 0)
    assert_close(g.dside_input, dz, "float32", what="d side_input")
    assert_close(g.doffset, dz.sum(axis=(0, 1, 2)), "float32", scale=float(np.abs(dz).sum(axis=(0, 1, 2)).max()))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_layer_inputs_initializers_and_state(host_backend, rng, kind):
    x = (3 + rng.standard_normal((8, 3))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    side = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.uniform(0.5, 2, 8).astype(np.float32)
    init = {"gamma": rng.uniform(0.5, 2, 3).astype(np.float32), "moving_variance": np.full(3, 2.0, np.float32)}
    o = lambda a: relayout(a, kind)  # noqa: E731

    odd = cubn.BatchNorm(scale=True, updates_collections=None, param_initializers={k: o(v) for k, v in init.items()})
    plain = cubn.BatchNorm(scale=True, updates_collections=None, param_initializers=init)
    y = odd(o(x), batch_weights=o(w), side_input=o(side))
    same_bits(y, plain(x, batch_weights=w, side_input=side))
    m, v = ref.moments(x, (0,), weights=w[:, None])
    assert_close(y, ref.batch_norm(x, m, v, 0, init["gamma"], 1e-3, 1, side=side), "float32")
    for a, b in zip(odd.backward(o(dy)), plain.backward(dy)):
        same_bits(a, b)
    for k in plain.variables:
        same_bits(odd.variables[k], plain.variables[k])

    state = {k: rng.uniform(0.5, 2, 3).astype(np.float32) for k in plain.variables}
    odd.load_state_dict({k: o(a) for k, a in state.items()})
    for k, a in state.items():
        same_bits(odd.variables[k], a)


def test_initializer_arrays_are_copied_never_shared(host_backend, rng):
    """The layer's state never aliases the caller's array (two layers built
    from one initializer dict must not share their moving statistics)."""
    init = {"moving_mean": np.zeros(3, np.float32), "moving_variance": np.ones(3, np.float32)}
    before = {k: a.copy() for k, a in init.items()}
    a = cubn.BatchNorm(updates_collections=None, decay=0.5, param_initializers=init)
    b = cubn.BatchNorm(updates_collections=None, decay=0.5, param_initializers=init)
    a((5 + rng.standard_normal((6, 3))).astype(np.float32))
    for k in init:
        np.testing.assert_array_equal(init[k], before[k])
        np.testing.assert_array_equal(b.variables[k] if b.built else before[k], before[k])
    b((rng.standard_normal((6, 3))).astype(np.float32))
    assert not np.shares_memory(a.variables["moving_mean"], b.variables["moving_mean"])
    assert not np.array_equal(a.variables["moving_mean"], b.variables["moving_mean"])


@pytest.mark.parametrize("kind", LAYOUTS)
def test_preprocessing_entry_points(host_backend, rng, kind):
    x = (100 + 7 * rng.standard_normal((10, 4))).astype(np.float32)
    w = rng.uniform(0.5, 2, 10)
    o = lambda a: relayout(a, kind)  # noqa: E731

    rm = cubn.RunningMoments(axis=0).update(o(x), weights=o(w))
    m, v = ref.moments(x, (0,), weights=w[:, None])
    assert_close(rm.mean, m, "float32", what="RunningMoments mean")
    assert_close(rm.var, v, "float32", scale=float(v.max()), what="RunningMoments var")

    s = cubn.Standardizer().fit(o(x), sample_weight=o(w))
    assert_close(s.mean_, m, "float64" if kind != "big-endian" else "float32", scale=100.0)
    z = s.transform(o(x))
    same_bits(z, cubn.Standardizer().fit(x, sample_weight=w).transform(x))
    assert_close(z, (x - m) / np.sqrt(v), "float32", what="Standardizer.transform")

    images = rng.integers(0, 256, (2, 3, 4, 3)).astype(np.uint16)
    mean, std = np.array([100.0, 120.0, 90.0]), np.array([50.0, 60.0, 70.0])
    y = cubn.normalize_images(o(images), o(mean), o(std))
    same_bits(y, cubn.normalize_images(images, mean, std))
    expect = ((images.astype(np.float64) - mean) / std).transpose(0, 3, 1, 2)
    assert_close(y, expect, "float32", what="normalize_images")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_zero_strides_from_broadcast_to(host_backend, rng, dtype):
    """A broadcast view (stride 0) is read as the array it stands for: all-equal
    channels, variance 0. (That they normalize to beta *exactly* on every path
    is the kernel-numerics tests' business; here: to rounding.)"""
    row = (1e4 + rng.standard_normal(5)).astype(dtype)
    x = np.broadcast_to(row, (9, 5))
    assert x.strides[0] == 0
    m, v = cubn.moments(x, [0])
    np.testing.assert_array_equal(m, row)
    np.testing.assert_array_equal(v, np.zeros(5, dtype))
    w = np.broadcast_to(np.float32(2.0), (9,))
    wm, wv = cubn.weighted_moments(x, [0], w)
    np.testing.assert_array_equal(wm, row)
    beta = rng.normal(size=5).astype(np.float32)
    small = np.broadcast_to((1 + rng.standard_normal(5)).astype(dtype), (9, 5))  # (1e4 + ...: the numerics tests)
    y, _, _ = cubn.fused_batch_norm(small, offset=np.broadcast_to(beta, (5,)), is_training=True)
    assert_close(y, np.broadcast_to(beta, x.shape), dtype, scale=100.0, what="all-equal channels")


def test_masked_arrays_are_refused(host_backend, rng):
    """A masked array's mask would be ignored by every backend: refused, naming the argument."""
    x = np.ma.masked_array(rng.standard_normal((4, 3)), mask=np.zeros((4, 3), bool))
    with pytest.raises(TypeError, match="'x'.*masked array"):
        cubn.moments(x, [0])
    with pytest.raises(TypeError, match="'batch_weights'.*masked array"):
        cubn.BatchNorm()(np.ones((4, 3)), batch_weights=np.ma.masked_array(np.ones(4)))


def test_the_emulator_refuses_what_a_gpu_cannot_read(rng):
    """The emulated launcher models the GPU: a kernel argument that is
    byte-swapped, misaligned or not contiguous is an error, not a silent read."""
    reason = backend_skip_reason("emulated")
    if reason:
        pytest.skip(reason)
    from cubn._backend import get_backend
    from cubn.kernels import registry

    b = get_backend("emulated")
    ok = np.zeros(2, np.float32)
    kernel = b.launcher.get(registry.MERGE_SUMS.variant(A=registry.element(np.float32)))
    good = (np.int32(2), np.int32(1), np.int32(1), ok, ok.copy(), np.zeros(2, np.float32), np.zeros(2, np.float32))
    b.launcher.launch(kernel, (1, 1, 1), (128, 1, 1), 0, good)
    for kind, msg in (("big-endian", "non-native byte order"), ("misaligned", "misaligned"),
                      ("strided-view", "not C-contiguous")):
        bad = list(good)
        bad[3] = relayout(np.ones(2, np.float32), kind)
        with pytest.raises(TypeError, match=f"argument 3 .*{msg}"):
            b.launcher.launch(kernel, (1, 1, 1), (128, 1, 1), 0, tuple(bad))
