"""Compile cubn's kernel variants with NVRTC from PyPI (no GPU needed).

Used by tests/test_nvrtc.py and runnable by hand:
    python tests/nvrtc_compile.py sm_90
"""
from __future__ import annotations

import sys
from pathlib import Path


def nvrtc_include_dirs():
    """cuda_fp16.h / cuda_bf16.h from the nvidia-cuda-runtime wheel."""
    import nvidia

    dirs = []
    for base in nvidia.__path__:
        for inc in sorted(Path(base).glob("cu*/include")) + sorted(Path(base).glob("cuda_runtime/include")):
            if (inc / "cuda_fp16.h").is_file():
                dirs.append(str(inc))
    return dirs


def options_for(arch: str):
    from cubn.kernels import registry

    return (
        list(registry.NVRTC_OPTIONS)
        + list(registry.define_options())
        + list(registry.CUPY_ADDED_OPTIONS)
        + [f"--gpu-architecture={arch}", f"-I{registry.KERNEL_DIR}"]
        + [f"-I{d}" for d in nvrtc_include_dirs()]
    )


# Sources whose register use matters enough to check for spills (ptxas -v).
PTXAS_VERBOSE = ("one_launch.cu", "normalize.cu", "backward.cu")


def split_ptxas_info(log: str):
    """(ptxas info lines, every other line) of a log compiled with ptxas -v."""
    info, other = [], []
    for line in log.splitlines():
        (info if line.startswith("ptxas info") or line.startswith("ptxas         .") else other).append(line)
    return info, [l for l in other if l.strip()]


def spills(info_lines, lowered):
    """{name expression: spill bytes} for every kernel whose ptxas report shows spills."""
    import re

    by_mangled = {v: k for k, v in lowered.items()}
    out, cur = {}, None
    for line in info_lines:
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = by_mangled.get(m.group(1), m.group(1))
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur and (int(m.group(1)) or int(m.group(2))):
            out[cur] = int(m.group(1)) + int(m.group(2))
    return out


def compile_source(source: str, name_expressions, arch: str, ptxas_verbose: bool = False):
    """Compile one .cu with the given instantiations; returns (ok, log, lowered names).
    ``ptxas_verbose`` adds ptxas's register/spill report to the log (no change
    to the generated code)."""
    from cuda.bindings import nvrtc
    from cubn.kernels import registry

    code = (registry.KERNEL_DIR / source).read_bytes()
    err, prog = nvrtc.nvrtcCreateProgram(code, source.encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    try:
        for ne in name_expressions:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, ne.encode())
            assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, (ne, err)
        opts = [o.encode() for o in options_for(arch) + (["--ptxas-options=-v"] if ptxas_verbose else [])]
        (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        err, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        log = log.decode(errors="replace").rstrip("\x00").strip()
        ok = res == nvrtc.nvrtcResult.NVRTC_SUCCESS
        lowered = {}
        if ok:
            for ne in name_expressions:
                err, name = nvrtc.nvrtcGetLoweredName(prog, ne.encode())
                lowered[ne] = name.decode() if name else None
            err, n = nvrtc.nvrtcGetCUBINSize(prog)
            ok = ok and n > 0
        return ok, log, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def main(arch="sm_90"):
    from cubn.kernels import registry
    import time

    bad = 0
    for src in registry.SOURCES:
        vs = registry.variants_for_source(src)
        if not vs:
            continue
        t = time.time()
        ok, log, low = compile_source(src, [v.name_expression for v in vs], arch)
        print(f"{src}: {len(vs)} variants, {'ok' if ok else 'FAILED'} in {time.time() - t:.1f}s")
        if log:
            print(log[:4000])
        bad += (not ok) or bool(log)
    return bad


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
