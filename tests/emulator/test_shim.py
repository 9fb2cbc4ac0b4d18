"""The emulated backend's shim and launcher against NumPy, one CUDA feature at a time.

The kernels are in kernels/toy.cu (correct) and kernels/broken.cu (misuse).
"""

import math
import os
import pathlib
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from cubn.backends import emulated_launcher
from cubn.backends.emulated_launcher import NULL, DeviceInfo, EmulatedLauncher

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
TOY = HERE / "kernels" / "toy.cu"
BROKEN = HERE / "kernels" / "broken.cu"

SHUFFLE_TYPES = {
    "int": np.int32,
    "unsigned int": np.uint32,
    "long long": np.int64,
    "unsigned long long": np.uint64,
    "float": np.float32,
    "double": np.float64,
}
TOY_KERNELS = [
    "block_sum<float>",
    "block_sum<double>",
    "welford_rows<float>",
    "welford_rows<double>",
    *(f"shuffles<{t}>" for t in SHUFFLE_TYPES),
    "shuffle_after_exit",
    "votes",
    "indices",
    "reverse_chunks<float>",
    "reverse_chunks<double>",
    "read_shared",
    "half_types",
    "atomics",
    "grid_sum",
    "math_float",
    "math_double",
    "int_intrinsics",
    "scalars",
    "vectors",
]
BROKEN_KERNELS = re.findall(r"__global__ void (\w+)\(", BROKEN.read_text())


def line_of(snippet, source=BROKEN):
    """Where ``snippet`` is in ``source``, as the emulator's messages write it."""
    for number, line in enumerate(source.read_text().splitlines(), 1):
        if snippet in line:
            return f"{source.name}:{number}"
    raise AssertionError(f"{snippet!r} is not in {source}")


@pytest.fixture(scope="module")
def launcher():
    return EmulatedLauncher(sanitize=os.environ.get("CUBN_EMULATOR_SANITIZE") or None)


@pytest.fixture(scope="module")
def toy(launcher):
    return launcher.build_module(TOY, TOY_KERNELS)


@pytest.fixture(scope="module")
def broken(launcher):
    return launcher.build_module(BROKEN, BROKEN_KERNELS)


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


def ff(dtype):
    """The value whose bytes are all 0xFF (NaN for floats, -1 for signed ints)."""
    return np.frombuffer(b"\xff" * np.dtype(dtype).itemsize, dtype)[0]


def bits(a):
    """Bit patterns, so that NaNs compare equal to themselves."""
    a = np.asarray(a)
    return a.view(f"u{a.itemsize}")


# ---------------------------------------------------------------- launcher basics


def test_device_info(launcher):
    info = launcher.device_info()
    assert isinstance(info, DeviceInfo)
    assert (info.multiprocessor_count, info.max_threads_per_block) == (2, 1024)
    assert (info.max_shared_memory_per_block, info.warp_size) == (48 * 1024, 32)
    assert launcher.name == "emulated" and launcher.xp is np


def test_sanitize_mode_is_checked():
    with pytest.raises(ValueError, match="sanitize must be None, 'address' or 'thread'"):
        EmulatedLauncher(sanitize="memory")
    # This process was not started with the runtime of the other sanitizer preloaded.
    other = "thread" if os.environ.get("CUBN_EMULATOR_SANITIZE") == "address" else "address"
    with pytest.raises(RuntimeError, match=rf"run Python in a subprocess .*sanitizer_env\('{other}'\)"):
        EmulatedLauncher(sanitize=other)


def test_empty_is_filled_with_ff(launcher):
    a = launcher.empty((3, 5), np.float32)
    assert a.shape == (3, 5) and a.dtype == np.float32 and np.isnan(a).all()
    assert (launcher.empty(7, np.int64) == -1).all()


@pytest.mark.parametrize(
    "dtype, block, grid",
    [
        (np.float32, (256,), (5,)),
        (np.float64, (1024,), (3,)),  # the largest block
        (np.float32, (32, 8), (2, 3)),  # 2-D
        (np.float64, (4, 4, 4), (3, 2, 2)),  # 3-D block and grid
        (np.float32, (7,), (9,)),  # a partial warp
    ],
)
def test_block_sum(launcher, toy, rng, dtype, block, grid):
    nblocks, nthreads = math.prod(grid), math.prod(block)
    n = nblocks * nthreads - nthreads // 3  # the last block is partly empty
    x = rng.standard_normal(n).astype(dtype)
    out = launcher.empty(nblocks, dtype)
    kernel = toy[f"block_sum<{'float' if dtype == np.float32 else 'double'}>"]
    launcher.launch(kernel, grid, block, 0, (x, out, np.int64(n)))
    padded = np.zeros(nblocks * nthreads, dtype)
    padded[:n] = x
    expected = padded.reshape(nblocks, nthreads).astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(out, expected, rtol=1e-5 if dtype == np.float32 else 1e-13, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", [(7,), (40,), (256,), (16, 6)])
def test_welford_shuffle_merge(launcher, toy, rng, dtype, block):
    rows, cols = 5, 999
    x = (rng.standard_normal((rows, cols)) * 3 + rng.uniform(-10, 10, (rows, 1))).astype(dtype)
    out = launcher.empty((rows, 3), dtype)
    name = f"welford_rows<{'float' if dtype == np.float32 else 'double'}>"
    launcher.launch(toy[name], (rows,), block, 0, (x, out, np.int32(cols)))
    x64 = x.astype(np.float64)
    expected = np.stack([np.full(rows, cols), x64.mean(axis=1), x64.var(axis=1) * cols], axis=1)
    np.testing.assert_allclose(out, expected, rtol=1e-5 if dtype == np.float32 else 1e-12)


# ---------------------------------------------------------------- warp operations


def expected_shuffles(v, src, delta, lane_mask, width):
    """CUDA's documented semantics for one block of values v (linear thread order)."""
    n, missing = len(v), ff(v.dtype)
    out = np.empty((n, 4), v.dtype)
    for t in range(n):
        lane = t % 32
        base, seg = t - lane, lane - lane % width

        def at(j):
            return v[base + j] if base + j < n else missing

        out[t, 0] = at(seg + src % width)
        out[t, 1] = at(lane - delta) if lane % width >= delta else v[t]
        out[t, 2] = at(lane + delta) if lane % width + delta < width else v[t]
        j = lane ^ lane_mask  # earlier groups can be read, later ones give the own value
        out[t, 3] = at(j) if j < seg + width else v[t]
    return out


SHUFFLE_CASES = [  # (src_lane, delta, lane_mask, width)
    (5, 1, 1, 32),
    (21, 3, 8, 16),
    (39, 5, 4, 8),
    (3, 2, 16, 8),
    (2, 1, 2, 4),
    (1, 1, 1, 2),
    (0, 1, 1, 1),
]


@pytest.mark.parametrize("ctype", list(SHUFFLE_TYPES))
@pytest.mark.parametrize("block", [(7,), (40,), (64,), (5, 3), (8, 4, 2)])
def test_shuffles(launcher, toy, rng, ctype, block):
    dtype = np.dtype(SHUFFLE_TYPES[ctype])
    nthreads, grid = math.prod(block), 2
    if dtype.kind == "f":
        x = rng.standard_normal(grid * nthreads).astype(dtype)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, grid * nthreads, dtype=dtype, endpoint=True)
    for src, delta, lane_mask, width in SHUFFLE_CASES:
        out = launcher.empty((grid * nthreads, 4), dtype)
        args = (x, out, np.int32(src), np.uint32(delta), np.int32(lane_mask), np.int32(width))
        launcher.launch(toy[f"shuffles<{ctype}>"], (grid,), block, 0, args)
        expected = np.concatenate(
            [expected_shuffles(x[b * nthreads : (b + 1) * nthreads], src, delta, lane_mask, width) for b in range(grid)]
        )
        np.testing.assert_array_equal(bits(out), bits(expected), err_msg=f"width={width}")


def test_shuffle_from_exited_lane(launcher, toy, rng):
    x = rng.integers(0, 1000, 32, dtype=np.int32)
    out = launcher.empty(32, np.int32)
    launcher.launch(toy["shuffle_after_exit"], (1,), (32,), 0, (x, out, np.uint32(20)))
    np.testing.assert_array_equal(out[:19], x[1:20])
    assert out[19] == -1  # lane 20 has returned: 0xFF bytes
    assert (out[20:] == -1).all()  # never written (launcher.empty)


@pytest.mark.parametrize("mask", [0xFFFFFFFF, 0x0F0F00FF])
def test_votes(launcher, toy, rng, mask):
    nthreads, grid = 40, 3
    pred = (rng.random(grid * nthreads) < 0.6).astype(np.int32) * rng.integers(1, 9, grid * nthreads, dtype=np.int32)
    pred[32:40] = 5  # a partial warp where every lane votes yes
    pred[nthreads : nthreads + 32] = 0  # a full warp where none does
    ballot = launcher.empty(grid * nthreads, np.uint32)
    any_ = launcher.empty(grid * nthreads, np.int32)
    all_ = launcher.empty(grid * nthreads, np.int32)
    launcher.launch(toy["votes"], (grid,), (nthreads,), 0, (pred, np.uint32(mask), ballot, any_, all_))
    for b in range(grid):
        for w0 in range(0, nthreads, 32):
            lanes = range(min(32, nthreads - w0))
            present = sum(1 << lane for lane in lanes) & mask
            votes = sum(1 << lane for lane in lanes if pred[b * nthreads + w0 + lane]) & mask
            sl = slice(b * nthreads + w0, b * nthreads + w0 + len(lanes))
            assert (ballot[sl] == votes).all()
            assert (any_[sl] == int(votes != 0)).all()
            assert (all_[sl] == int(votes == present)).all()


def test_indices_2d_3d(launcher, toy):
    grid, block = (3, 2, 2), (4, 3, 2)
    nthreads = math.prod(block)
    out = launcher.empty((math.prod(grid), nthreads, 12), np.uint32)
    launcher.launch(toy["indices"], grid, block, 0, (out,))
    for bz, by, bx in np.ndindex(grid[2], grid[1], grid[0]):
        b = bx + grid[0] * (by + grid[1] * bz)
        for tz, ty, tx in np.ndindex(block[2], block[1], block[0]):
            t = tx + block[0] * (ty + block[1] * tz)
            assert list(out[b, t]) == [tx, ty, tz, bx, by, bz, *block, *grid]


# ---------------------------------------------------------------- shared memory


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dynamic_shared_memory(launcher, toy, rng, dtype):
    block, grid = 128, 5
    x = rng.standard_normal(grid * block).astype(dtype)
    y = launcher.empty(grid * block, dtype)
    name = f"reverse_chunks<{'float' if dtype == np.float32 else 'double'}>"
    launcher.launch(toy[name], (grid,), (block,), block * x.itemsize, (x, y))
    np.testing.assert_array_equal(y, x.reshape(grid, block)[:, ::-1].ravel())


def test_dynamic_shared_memory_starts_as_ff_in_every_block(launcher, toy):
    n, grid = 100, 3
    out_f = launcher.empty((grid, n), np.float32)
    out_i = launcher.empty((grid, n), np.int32)
    out_f[...] = 0.0
    out_i[...] = 0
    launcher.launch(toy["read_shared"], (grid,), (64,), n * 8, (out_f, out_i, np.int32(n)))
    np.testing.assert_array_equal(out_f[0], np.arange(n, dtype=np.float32))
    np.testing.assert_array_equal(out_i[0], np.arange(n, dtype=np.int32))
    assert np.isnan(out_f[1:]).all() and (out_i[1:] == -1).all()


# ---------------------------------------------------------------- types, atomics, math


def test_half_and_bfloat16(launcher, toy, rng):
    x = np.concatenate(
        [
            rng.standard_normal(200) * 10.0 ** rng.integers(-8, 6, 200),
            [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 1e-8, 5.960464477539063e-08],
            1.0 + np.arange(1, 9) * 2.0**-11,  # ties at half precision
            1.0 + np.arange(1, 9) * 2.0**-8,  # ties at bfloat16 precision
        ]
    ).astype(np.float32)
    n = len(x)
    h_bits, b_bits = launcher.empty(n, np.uint16), launcher.empty(n, np.uint16)
    h_back, b_back, h_sum = (launcher.empty(n, np.float32) for _ in range(3))
    launcher.launch(toy["half_types"], ((n + 63) // 64,), (64,), 0, (x, h_bits, h_back, b_bits, b_back, h_sum, np.int32(n)))
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf, inf - inf: wanted
        half = x.astype(np.float16)
        half_sum = (half + np.roll(half, -1)).astype(np.float32)
    np.testing.assert_array_equal(h_bits, half.view(np.uint16))
    np.testing.assert_array_equal(bits(h_back), bits(half.astype(np.float32)))
    np.testing.assert_array_equal(bits(h_sum), bits(half_sum))
    assert np.isnan(b_back[np.isnan(x)]).all()
    ml_dtypes = pytest.importorskip("ml_dtypes")
    ok = ~np.isnan(x)
    np.testing.assert_array_equal(b_bits[ok], x[ok].astype(ml_dtypes.bfloat16).view(np.uint16))
    np.testing.assert_array_equal(b_back[ok], x[ok].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_atomics(launcher, toy, rng):
    n = 1000
    x = rng.integers(-1000, 1000, n, dtype=np.int32)
    i_out = np.array([0, 0, np.iinfo(np.int32).min, np.iinfo(np.int32).max, 0], np.int32)
    u_out = np.array([0, 0, 0xFFFFFFFF, 0], np.uint32)
    ull_out = np.zeros(2, np.uint64)
    launcher.launch(toy["atomics"], (4,), (256,), 0, (x, i_out, u_out, ull_out, np.int32(n)))
    u = x.view(np.uint32)
    assert list(i_out) == [x.sum(), -x.sum(), x.max(), x.min(), n]
    assert list(u_out) == [n, u.max(), u.min(), 7]
    assert list(ull_out) == [u.astype(np.uint64).sum(), u.max()]


def test_last_block_done_grid_sum(launcher, toy, rng):
    n, block = 5000, 128
    grid = (n + block - 1) // block
    x = rng.standard_normal(n)
    partial = launcher.empty(grid, np.float64)
    ticket = np.zeros(1, np.uint32)
    result = launcher.empty(1, np.float64)
    for _ in range(2):  # the last block resets the ticket for the next launch
        launcher.launch(toy["grid_sum"], (grid,), (block,), 0, (x, partial, ticket, result, np.int32(n)))
        assert result[0] == pytest.approx(x.sum(), rel=1e-12, abs=1e-12)
        assert ticket[0] == 0


def test_math_float(launcher, toy, rng):
    x = rng.uniform(-4, 4, 300).astype(np.float32)
    out = launcher.empty((len(x), 20), np.float32)
    launcher.launch(toy["math_float"], (5,), (64,), 0, (x, out, np.int32(len(x))))
    v = x.astype(np.float64)
    a = np.abs(v) + 0.5
    erf = np.vectorize(math.erf)(v)
    expected = [
        1 / np.sqrt(a), np.sqrt(a), np.exp(v), np.exp2(v), np.log(a), np.log1p(a), np.expm1(v), erf, 1 - erf,
        np.tanh(v), np.maximum(v, 0.25) + np.minimum(v, -0.25), v * v + 1, a**1.5, np.exp(v) + np.log(a),
        v / a + 1 / a + np.sqrt(a), np.maximum(v, 0) + np.minimum(v, 0), np.sqrt(a), np.full_like(v, 7),
        np.maximum(3, np.trunc(v)) + 2 + 2 + 7, np.full_like(v, 8),
    ]  # fmt: skip
    np.testing.assert_allclose(out, np.stack(expected, axis=1), rtol=2e-6, atol=2e-6)


def test_math_double(launcher, toy, rng):
    x = np.concatenate([rng.uniform(-4, 4, 200), [np.nan, np.inf, -np.inf]])
    out = launcher.empty((len(x), 14), np.float64)
    launcher.launch(toy["math_double"], (4,), (64,), 0, (x, out, np.int32(len(x))))
    v, fin = x[:200], out[:200]
    a = np.abs(v) + 0.5
    erf = np.vectorize(math.erf)(v)
    expected = [
        1 / np.sqrt(a), np.sqrt(a), np.exp(v), np.log(a), np.log1p(a), np.expm1(v), erf, np.vectorize(math.erfc)(v),
        np.tanh(v), np.maximum(v, 0.25) + np.minimum(v, -0.25), v * v + 1, a**1.5,
        np.maximum(v, 0) + np.minimum(v, 0), np.full_like(v, 4),
    ]  # fmt: skip
    np.testing.assert_allclose(fin, np.stack(expected, axis=1), rtol=1e-14, atol=1e-15)
    assert list(out[200:, 13]) == [1, 2, 2]  # isnan, isinf, isinf


def test_integer_intrinsics(launcher, toy, rng):
    n = 100
    x = rng.integers(0, 2**32, n, dtype=np.uint32)
    x[:3] = [0, 1, 0x80000000]
    y = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    out = launcher.empty((n, 6), np.uint64)
    launcher.launch(toy["int_intrinsics"], (2,), (64,), 0, (x, y, out, np.int32(n)))
    for i in range(n):
        a, b = int(x[i]), int(x[(i + 1) % n])
        signed = [v - 2**32 if v >= 2**31 else v for v in (a, b)]
        ffs = (a & -a).bit_length()
        expected = [(a * b) >> 32, (int(y[i]) * int(y[(i + 1) % n])) >> 64, bin(a).count("1"), 32 - a.bit_length(), ffs, min(signed) % 2**64]
        assert list(map(int, out[i])) == expected


def test_vector_types(launcher, toy, rng):
    x = rng.standard_normal((32, 4)).astype(np.float32)
    y = launcher.empty((32, 4), np.float32)
    d = launcher.empty((32, 2), np.float64)
    u = launcher.empty((32, 4), np.uint32)
    f2 = launcher.empty((32, 2), np.float32)
    launcher.launch(toy["vectors"], (1,), (32,), 0, (x, y, d, u, f2))
    np.testing.assert_array_equal(y, x[:, ::-1])
    np.testing.assert_array_equal(d, x[:, :2].astype(np.float64))
    np.testing.assert_array_equal(u, np.arange(32)[:, None] * np.arange(1, 5))
    np.testing.assert_array_equal(f2, np.stack([x[:, 0] + x[:, 1], x[:, 2] + x[:, 3]], axis=1))


# ---------------------------------------------------------------- arguments and launch checks

GOOD_SCALARS = (np.int32(-7), np.uint32(4000000000), np.int64(-2**40), np.uint64(2**63 + 5), np.float32(1.5), np.float64(0.1))


def test_scalar_arguments(launcher, toy):
    out = launcher.empty(6, np.float64)
    launcher.launch(toy["scalars"], (1,), (1,), 0, (out, *GOOD_SCALARS))
    assert list(out) == [-7, 4000000000, -(2**40), float(2**63 + 5), 1.5, 0.1]
    assert toy["scalars"].parameters == ("p", "i4", "u4", "i8", "u8", "f4", "f8")


@pytest.mark.parametrize(
    "index, bad, message",
    [
        (6, np.float32(0.1), r"argument 6 \(double\) expects numpy.float64, got numpy.float32"),
        (3, np.int32(1), r"argument 3 \(long long\) expects numpy.int64, got numpy.int32"),
        (2, np.int32(1), r"argument 2 \(unsigned int\) expects numpy.uint32, got numpy.int32"),
        (1, 3, r"argument 1 \(int\) expects numpy.int32 \(a Python number has no fixed size\), got int"),
        (5, 1.5, r"argument 5 \(float\) expects numpy.float32 .*got float"),
        (1, np.zeros(1, np.int32), r"argument 1 \(int\) expects numpy.int32, got a numpy array of int32"),
        (0, np.float64(1.0), r"argument 0 \(pointer\) expects a numpy array or NULL/None, got numpy.float64"),
        (0, [1.0], r"argument 0 \(pointer\) expects a numpy array or NULL/None, got list"),
    ],
)
def test_wrong_argument_types_are_rejected(launcher, toy, index, bad, message):
    args = [launcher.empty(6, np.float64), *GOOD_SCALARS]
    args[index] = bad
    with pytest.raises(TypeError, match=message):
        launcher.launch(toy["scalars"], (1,), (1,), 0, tuple(args))


def test_null_pointer_and_argument_count(launcher, toy):
    assert repr(NULL) == "NULL" and type(NULL)() is NULL
    x = np.zeros(32, np.float32)
    for null in (NULL, None):
        out = launcher.empty(1, np.float32)
        launcher.launch(toy["block_sum<float>"], (1,), (32,), 0, (null, out, np.int64(0)))  # n = 0: x is never read
        assert out[0] == 0
    with pytest.raises(TypeError, match="takes 3 arguments, got 2"):
        launcher.launch(toy["block_sum<float>"], (1,), (32,), 0, (x, x))


@pytest.mark.parametrize(
    "grid, block, shared, message",
    [
        ((1,), (1025,), 0, r"block.x=1025 is outside \[1, 1024\]"),
        ((1,), (32, 32, 2), 0, "more than 1024 threads"),
        ((0,), (32,), 0, r"grid.x=0 is outside"),
        ((1, 65536), (32,), 0, r"grid.y=65536 is outside"),
        ((1,), (1, 1, 65), 0, r"block.z=65 is outside"),
        ((1,), (32,), 48 * 1024 + 1, "shared_bytes=49153"),
        ((1, 1, 1, 1), (32,), 0, "1 to 3 dimensions"),
    ],
)
def test_invalid_launch_configurations(launcher, toy, grid, block, shared, message):
    x = np.zeros(32, np.float32)
    with pytest.raises(ValueError, match=message):
        launcher.launch(toy["block_sum<float>"], grid, block, shared, (x, x, np.int64(32)))


def test_compile_errors_are_reported(launcher, tmp_path):
    source = tmp_path / "bad.cu"
    source.write_text("__global__ void k(float* y) { y[0] = undeclared_name; }\n")
    with pytest.raises(RuntimeError, match="(?s)building bad.*undeclared_name"):
        launcher.build_module(source, ["k"])


def test_get_builds_every_variant_of_the_source(launcher, monkeypatch):
    built = []

    def load_module(source, names, *rest):
        built.append((source.name, names))
        return real_load_module(source, names, *rest)

    real_load_module = emulated_launcher._load_module
    monkeypatch.setattr(emulated_launcher, "_load_module", load_module)
    monkeypatch.setattr(emulated_launcher, "_modules", {})
    monkeypatch.setattr(emulated_launcher, "KERNELS_DIR", TOY.parent)
    import cubn.kernels.registry as registry  # patch the loaded module itself: it may be imported already

    monkeypatch.setattr(registry, "variants_for_source", lambda source: [
        types.SimpleNamespace(name_expression=n) for n in (TOY_KERNELS if source == "toy.cu" else [])
    ])
    requested = types.SimpleNamespace(source="toy.cu", name_expression="block_sum<double>")
    assert launcher.get(requested).name_expression == "block_sum<double>"
    assert EmulatedLauncher().get(types.SimpleNamespace(source="toy.cu", name_expression="votes")).parameters == (
        "p", "u4", "p", "p", "p",
    )  # fmt: skip
    assert built == [("toy.cu", TOY_KERNELS)]  # one build for every variant, shared by both launchers


# ---------------------------------------------------------------- misuse


def test_divergent_syncthreads_is_reported(launcher, toy, broken):
    y = launcher.empty(128, np.float32)
    with pytest.raises(RuntimeError) as excinfo:
        launcher.launch(broken["divergent_syncthreads"], (2,), (64,), 0, (y,))
    message = str(excinfo.value)
    assert "__syncthreads reached at different places" in message
    assert "block (1,0,0) of divergent_syncthreads" in message
    assert f"threads (0,0,0)..(15,0,0) [linear 0..15]: waiting in __syncthreads at {line_of('barrier A')}" in message
    assert f"threads (16,0,0)..(63,0,0) [linear 16..63]: waiting in __syncthreads at {line_of('barrier B')}" in message
    # The pool recovers: the next launch runs normally.
    x = np.arange(64, dtype=np.float32)
    out = launcher.empty(1, np.float32)
    launcher.launch(toy["block_sum<float>"], (1,), (64,), 0, (x, out, np.int64(64)))
    assert out[0] == x.sum()


def test_deadlock_is_reported(launcher, broken):
    y = launcher.empty(128, np.float32)
    with pytest.raises(RuntimeError) as excinfo:
        launcher.launch(broken["deadlock"], (2,), (64,), 0, (y,))
    message = str(excinfo.value)
    assert "deadlock in block (1,0,0) of deadlock" in message
    assert f"threads (0,0,0)..(15,0,0) [linear 0..15]: waiting in __syncthreads at {line_of('% 32 < 16) __syncthreads')}" in message
    assert f"threads (16,0,0)..(31,0,0) [linear 16..31]: waiting in __syncwarp at {line_of('else __syncwarp')}" in message


def test_bad_shuffle_width_is_reported(launcher, broken):
    y = launcher.empty(32, np.float32)
    with pytest.raises(RuntimeError, match=r"__shfl_sync with width 3 \(must be a power of 2 up to 32\)"):
        launcher.launch(broken["bad_shuffle_width"], (1,), (32,), 0, (y,))


def test_hang_aborts_with_the_stragglers_named(broken):
    # Thread 0 never reaches the barrier: the watchdog must abort the process,
    # so this runs in a child process.
    script = (
        "import sys, numpy as np\n"
        "from cubn.backends.emulated_launcher import EmulatedLauncher\n"
        "launcher = EmulatedLauncher()\n"
        "m = launcher.build_module(sys.argv[1], sys.argv[2].split(';'))\n"
        "launcher.launch(m['spin_forever'], (1,), (64,), 0, (np.zeros(1, np.int32),))\n"
    )
    env = {**os.environ, "CUBN_EMU_BARRIER_TIMEOUT": "0.5", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(BROKEN), ";".join(BROKEN_KERNELS)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "block (0,0,0) of spin_forever made no progress for 0.5 s" in proc.stderr
    assert "thread (0,0,0) [linear 0]: running (not at a barrier)" in proc.stderr
    assert f"threads (1,0,0)..(63,0,0) [linear 1..63]: waiting in __syncthreads at {line_of('the others wait here')}" in proc.stderr
