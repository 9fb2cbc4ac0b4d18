"""NVRTC (from PyPI, no GPU) compiles every kernel variant cubn can launch,
for sm_80 and sm_90, with the options the CuPy path uses; any error or
warning fails. The variant list is the registry the backends draw from."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings is not installed")
import nvrtc_compile  # noqa: E402

from cubn import activations  # noqa: E402
from cubn.kernels import registry  # noqa: E402

ARCHS = ("sm_80", "sm_90")


def _job(args):
    source, arch = args
    names = [v.name_expression for v in registry.variants_for_source(source)]
    verbose = source in nvrtc_compile.PTXAS_VERBOSE
    ok, log, lowered = nvrtc_compile.compile_source(source, names, arch, ptxas_verbose=verbose)
    spilled = {}
    if verbose:
        info, other = nvrtc_compile.split_ptxas_info(log)
        spilled = nvrtc_compile.spills(info, lowered)
        log = "\n".join(other)
    return source, arch, ok, log, {k: v for k, v in lowered.items() if not v}, len(names), spilled


@pytest.fixture(scope="module")
def compiled():
    try:
        nvrtc_compile.nvrtc_include_dirs()
    except ImportError:
        pytest.skip("nvidia-cuda-runtime (cuda_fp16.h) is not installed")
    jobs = [(s, a) for s in registry.SOURCES if registry.variants_for_source(s) for a in ARCHS]
    with cf.ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as ex:
        return {(s, a): r for s, a, *r in ex.map(_job, jobs)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [s for s in registry.SOURCES if registry.variants_for_source(s)])
@pytest.mark.nvrtc
def test_every_variant_compiles_cleanly(compiled, source, arch):
    ok, log, unlowered, n, spilled = compiled[(source, arch)]
    assert ok, f"{source} for {arch}: compilation failed:\n{log}"
    assert not log, f"{source} for {arch}: NVRTC printed warnings:\n{log}"
    assert not unlowered, f"{source}: no lowered name for {sorted(unlowered)}"
    assert n == len(registry.variants_for_source(source))
    # The one-launch kernels keep x (and dy') in registers: a spill would put
    # them in local memory, i.e. back in DRAM traffic. float64 variants are
    # exempt: their division and erf slow paths are called subroutines whose
    # calling convention saves registers to the stack, which ptxas reports as
    # spills (float64 is not a speed target). Elsewhere a spill is a local
    # memory round trip, in the loop for the cases _spill_bound bounds.
    spilled = {k: v for k, v in spilled.items() if "<double," not in k}
    over = {k: v for k, v in spilled.items() if v > _spill_bound(k, arch)}
    assert not over, f"{source} for {arch}: register spills (bytes): {over}"


_IDX64 = re.compile(r"^cubn_(normalize|bwd_apply)<.*, 0>$")
_EXP_ERF = {a.kernel_id for a in (activations.sigmoid, activations.gelu, activations.silu)}
_REDUCE_16BIT = re.compile(r"^cubn_bwd_reduce_c[lf]<(__half|__nv_bfloat16), (\d+), (\d+)>$")


def _spill_bound(name, arch):
    """Spill bytes tolerated in ``name`` (ptxas -v, NVRTC 12); 0 elsewhere.

    - The 64-bit-index elementwise variants (IDX32 = 0) with an activation
      of several steps (sigmoid, GELU, SiLU on sm_80): with the 64-bit loop's
      live registers ptxas keeps one value in local memory, stored before
      the loop and reloaded once per iteration (an L1 hit): 8-12 bytes.
    - The 16-bit backward sums with an activation built on exp/erf
      (sigmoid, GELU, SiLU) at 2 blocks per SM (<= 128 registers, backward.cu's
      ReduceClBlocks / ReduceCfBlocks): 8-16 bytes on sm_90. Without the
      cap ptxas keeps them at 80 registers and spills more (sm_80: up to
      140 bytes); at 1 block per SM (up to 183 registers) nothing, but with
      half the resident warps.
    """
    if _IDX64.match(name):
        return 16
    m = _REDUCE_16BIT.match(name)
    if m and arch == "sm_90" and int(m.group(2)) in _EXP_ERF:
        return 16
    return 0


def test_registry_is_complete_and_unique():
    vs = registry.all_variants()
    assert len(set(vs)) == len(vs)
    # every kernel template defined in a source is registered at least once
    import re

    for src in registry.SOURCES:
        path = registry.KERNEL_DIR / src
        if not path.exists():
            continue
        defined = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(", path.read_text()))
        registered = {v.kernel for v in registry.variants_for_source(src)}
        assert defined <= registered, f"{src}: kernels never registered: {sorted(defined - registered)}"


def test_backend_cannot_launch_unregistered_variants():
    with pytest.raises(KeyError, match="not registered"):
        registry.NORMALIZE.variant(T=registry.element("float32"), ACT=42, VEC=4, RAW=0, POS=1, SIDE=0, IDX32=0)


def test_spill_report_is_read():
    """The spill check reads ptxas's report (a made-up log in its format)."""
    log = "\n".join([
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'",
        "ptxas         .     8 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads",
        "ptxas info    : Compiling entry function '_Z1jv' for 'sm_90'",
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
        "warning: something else",
    ])
    info, other = nvrtc_compile.split_ptxas_info(log)
    assert other == ["warning: something else"]
    assert nvrtc_compile.spills(info, {"k<1>": "_Z1kv", "j<1>": "_Z1jv"}) == {"k<1>": 20}
