"""Grid sizing from the variants' real occupancy (cubn/backends/occupancy.py)
and the elementwise kernels' per-thread channels (kernels/elementwise.cuh):
the occupancy arithmetic against the hardware's limits, the committed
register table against NVRTC, the grids' invariant on the benchmark's launch
plans, and the emulated kernels' results independent of the grid."""
from __future__ import annotations

import math

import numpy as np
import pytest

import cubn
from cubn.backends import kernel_backend, occupancy
from cubn.kernels import registry
from cubn.kernels.spec import element
from conftest import np_dtype

ELEMENTWISE = ("cubn_normalize", "cubn_bwd_apply")


def test_blocks_per_sm_follow_the_limits():
    h = occupancy.SM90
    assert h.blocks_per_sm(256, 48) == 5      # 48 x 256 registers: 5 blocks in 64K
    assert h.blocks_per_sm(256, 80) == 3
    assert h.blocks_per_sm(256, 33) == 6      # allocated per warp in units of 256: 33 -> 40 per thread
    assert h.blocks_per_sm(256, 32) == 8      # thread-limited
    assert h.blocks_per_sm(256, None) == 8    # unknown registers: threads, blocks, shared memory only
    assert h.blocks_per_sm(32, 16) == 32      # block-limited
    assert h.blocks_per_sm(256, 32, 100 * 1024) == 2  # shared memory (228 KiB per SM, 1 KiB reserved per block)
    assert occupancy.SM80.blocks_per_sm(256, 32, 100 * 1024) == 1  # 164 KiB on sm_80
    assert h.blocks_per_sm(1024, 255) == 0    # cannot launch
    assert occupancy.limits_for(None) is h and occupancy.limits_for(80) is occupancy.SM80
    with pytest.raises(ValueError, match="threads_per_block"):
        h.blocks_per_sm(0, 32)


def test_the_table_knows_every_sized_variant():
    from cubn.backends._register_table import TABLE

    for arch in ("sm_80", "sm_90"):
        for src in occupancy.SIZED_SOURCES:
            missing = [v.name_expression for v in registry.variants_for_source(src)
                       if v.name_expression not in TABLE[arch]]
            assert not missing, f"{arch}: {len(missing)} variants of {src} missing, e.g. {missing[:3]} " \
                                "(python -m cubn.model.register_table --write)"


@pytest.mark.nvrtc
def test_the_table_is_what_nvrtc_gives():
    """A sample of the committed registers against a fresh NVRTC build (the
    table goes stale when a kernel changes: regenerate it)."""
    pytest.importorskip("cuda.bindings.nvrtc")
    from cubn.model import sass

    if sass.available() is not None:
        pytest.skip(sass.available())
    f32, f16 = element("float32"), element("float16")
    sample = [registry.NORMALIZE.variant(T=f32, ACT=0, VEC=4, RAW=0, POS=1, SIDE=0, IDX32=1),
              registry.NORMALIZE.variant(T=f16, ACT=1, VEC=8, RAW=0, POS=2, SIDE=1, IDX32=0),
              registry.BWD_APPLY.variant(T=f32, ACT=0, VEC=4, POS=2, IDX32=1),
              registry.BWD_REDUCE_CL.variant(T=f32, ACT=0, VEC=4),
              registry.BWD_REDUCE_CF.variant(T=f16, ACT=1, VEC=8),
              registry.MOMENTS_CL.variant(T=f32, WMODE=0, VEC=4)]
    for arch in ("sm_80", "sm_90"):
        st = sass.stats_for([(v, None) for v in sample], arch)
        for v in sample:
            s = next(x for (ne, _), x in st.items() if ne == v.name_expression)
            assert occupancy.table_registers(v, arch) == (s.registers, s.shared_static), (arch, v.name_expression)


# -- the grids -------------------------------------------------------------------------
def test_elementwise_grids_keep_each_threads_channels():
    """On the H100 plan of every benchmark shape: each normalize/apply launch
    with fixed per-thread channels has a stride that is a multiple of
    C * inner, or a thread for every vector; 32-bit indices only where they
    cannot overflow; the grid fills whole waves at the variant's occupancy
    when it loops."""
    from cubn.model import _adapter, devices
    from cubn.model.plans import plan
    from cubn.model.tracing import RecordingLauncher

    dev = devices.H100
    seen = 0
    for layout, shape in _adapter.benchmark_suite():
        for dtype in ("float32", "float16"):
            launcher = RecordingLauncher(dev)
            for op in ("bn_train", "bn_infer", "bn_add_relu", "backward"):
                for l in plan(launcher, op, layout, shape, dtype, one_launch=False):
                    if l.kernel not in ELEMENTWISE:
                        continue
                    seen += 1
                    v = _adapter.make_variant(l.source, l.kernel, l.template_args)
                    vec, pos, idx32 = v.params["VEC"], v.params["POS"], v.params["IDX32"]
                    n, C, inner = l.named["n"], l.named["C"], l.named["inner"]
                    threads = l.blocks * l.threads_per_block
                    stride = threads * vec
                    nvec = -(-n // vec)
                    if pos != registry.POS_ELEMENT:
                        assert stride % (C * inner) == 0 or threads >= nvec, (l.name_expression, l.grid)
                    if pos == registry.POS_CHANNEL:
                        assert vec == 1 or inner % vec == 0
                    if idx32:
                        assert n + stride + vec < 2**31
                    regs, static = occupancy.variant_resources(v, 90)
                    per_sm = occupancy.SM90.blocks_per_sm(l.threads_per_block, regs, static)
                    waves = l.blocks / (dev.sms * per_sm)
                    if threads < nvec and C * inner <= 4096:  # looping, and a period that allows it
                        assert waves / math.ceil(waves) >= kernel_backend.WHOLE_WAVE_FILL, (l.name_expression, waves)
    assert seen


def test_periodic_blocks():
    f = kernel_backend._periodic_blocks
    assert f(1, 1056, 10**6) == 4224        # any count: four whole waves
    assert f(98, 1056, 10**6) == 4214       # 43 periods: 99.8% of four waves
    assert f(3000, 1056, 10**6) % 3000 == 0
    assert f(3000, 1056, 2000) == 2000      # fewer blocks cover every vector
    assert f(10**7, 1056, 10**6) == 10**6


# -- results independent of the grid (emulated) -------------------------------------------
CASES = [  # (layout, shape, dtype): channels-last patterns, channels straddling vectors, one channel per vector
    ("NHWC", (128, 8, 8, 12), "float32"), ("NCHW", (128, 16, 7, 7), "float32"),
    ("NCHW", (64, 8, 16, 16), "float32"), ("NHWC", (64, 8, 8, 24), "float16"),
    ("NHWC", (97, 5, 9, 3), "bfloat16"),
]


@pytest.fixture
def cover_grids(monkeypatch):
    """Every elementwise launch with a thread per vector: each thread finds its
    channels from its one vector, the reference for the looping grids."""
    real = kernel_backend.KernelBackend._elementwise_grid

    def cover(self, n, vec, variant=None, period=None):
        grid, block = real(self, n, vec, variant, period)
        return (max(1, -(-(-(-n // vec)) // block[0])), 1, 1), block

    def use(on):
        monkeypatch.setattr(kernel_backend.KernelBackend, "_elementwise_grid", cover if on else real)
    return use


@pytest.mark.parametrize("layout,shape,dtype", CASES, ids=lambda v: str(v))
def test_emulated_results_do_not_depend_on_the_grid(cover_grids, rng, layout, shape, dtype):
    """The emulator's 2 SMs give these shapes looping grids (several vectors per
    thread, channels kept from the first): bitwise the results of a thread per
    vector, forward with a residual and activation, inference, backward."""
    np_dt = np_dtype(dtype)
    C = shape[-1] if layout == "NHWC" else shape[1]
    x = (rng.standard_normal(shape) * 3 + 1e4 * (dtype == "float32")).astype(np_dt)
    side = rng.standard_normal(shape).astype(np_dt)
    dy = rng.standard_normal(shape).astype(np_dt)
    g = rng.uniform(0.5, 2, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    mean, var = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)

    def run():
        out = []
        with cubn.use_backend("emulated"), cubn.use_one_launch(False):
            y, m, v = cubn.fused_batch_norm(x, g, b, data_format=layout, activation="relu", side_input=side)[:3]
            out += [y, m, v]
            out.append(cubn.fused_batch_norm(x, g, b, mean, var, data_format=layout, is_training=False)[0])
            grads = cubn.batch_norm_backward(dy, x, g, mean, var, data_format=layout, offset=b,
                                             activation="relu", side_input=side)
            out += [grads.dx, grads.dside_input, grads.dscale]
        return [np.asarray(a) for a in out]

    cover_grids(False)
    looped = run()
    cover_grids(True)
    covered = run()
    for a, c in zip(looped, covered):
        assert a.tobytes() == c.tobytes()
