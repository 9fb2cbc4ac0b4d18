"""The kernel specs (cubn/kernels/registry.py) against the CUDA sources they describe.

The C signatures are parsed from the .cu/.cuh files (macros such as
CUBN_FINALIZE_PARAMS expanded) and compared with each spec: template
parameters, then every argument's name, order, type, pointer-ness and
const-ness. The launch constants reach the kernels only as -D defines, and
the argument builders order, convert and check by name.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cubn import _dtypes, activations
from cubn.kernels import registry, spec

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# A small reader of the kernels' C signatures
# ---------------------------------------------------------------------------
def _strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _macros(texts):
    """Function-like macros: name -> (parameter, body)."""
    out = {}
    for text in texts:
        joined = text.replace("\\\n", " ")
        for m in re.finditer(r"^\s*#define\s+(\w+)\((\w+)\)\s+(.*)$", joined, flags=re.M):
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def _matching(text, i):
    """Index just past the parenthesis that closes the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return j + 1
    raise ValueError("unbalanced parentheses")


def _split_top(text):
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts]


def _expand(params, macros):
    for name, (formal, body) in macros.items():
        while True:
            m = re.search(rf"\b{name}\(", params)
            if m is None:
                break
            end = _matching(params, m.end() - 1)
            actual = params[m.end():end - 1].strip()
            params = params[:m.start()] + re.sub(rf"\b{formal}\b", actual, body) + params[end:]
    return params


def _normalize(param):
    p = param.replace("__restrict__", " ")
    for c_spelling, _ in spec.ACC_RULES.values():
        if c_spelling:
            p = p.replace(c_spelling, "A")
    p = re.sub(r"\s*\*\s*", "* ", p)
    p = re.sub(r"\s+", " ", p).strip()
    m = re.fullmatch(r"(const )?(\w+)(\*)? (\w+)", p)
    assert m, f"cannot read C parameter {param!r}"
    const, ctype, star, name = m.groups()
    return name, ctype, bool(star), bool(const)


def c_kernels():
    """Every __global__ template of the kernel directory: name -> (template params, arguments)."""
    texts = {p.name: _strip_comments(p.read_text()) for p in sorted(registry.KERNEL_DIR.glob("*.cu*"))}
    macros = _macros(texts.values())
    out = {}
    pattern = re.compile(r"template\s*<([^<>]*)>\s*__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(")
    for fname, text in texts.items():
        for m in pattern.finditer(text):
            end = _matching(text, m.end() - 1)
            params = _expand(text[m.end():end - 1], macros)
            template = tuple((kind == "typename", name) for kind, name in (t.split() for t in _split_top(m.group(1))))
            out[m.group(2)] = (fname, template, tuple(_normalize(p) for p in _split_top(params)))
    return out


C_KERNELS = c_kernels()


def _includes(source):
    """The kernel files ``source`` includes (transitively), itself first."""
    seen, todo = [], [source]
    while todo:
        s = todo.pop()
        if s in seen:
            continue
        seen.append(s)
        todo += re.findall(r'#include\s+"([\w.]+\.cuh?)"', (registry.KERNEL_DIR / s).read_text())
    return seen


@pytest.mark.parametrize("kernel", registry.KERNELS, ids=lambda k: f"{k.source}:{k.name}")
def test_spec_matches_the_c_signature(kernel):
    assert kernel.name in C_KERNELS, f"{kernel.name} is not defined in any kernel source"
    defined_in, template, args = C_KERNELS[kernel.name]
    assert defined_in in _includes(kernel.source), f"{kernel.source} does not include {defined_in}"
    assert template == tuple((p.is_type, p.name) for p in kernel.template), f"{kernel.name}: template parameters"
    got = tuple((a.name, a.ctype, a.pointer, a.const) for a in kernel.arguments)
    for i, (g, c) in enumerate(zip(got, args)):
        assert g == c, f"{kernel.name}: argument {i}: spec says {g}, the C signature {c}"
    assert len(got) == len(args), f"{kernel.name}: {len(got)} arguments in the spec, {len(args)} in C"


def test_every_c_kernel_has_a_spec():
    assert set(C_KERNELS) == {k.name for k in registry.KERNELS}


def test_variants_are_unique_and_named_by_their_template_arguments():
    vs = registry.all_variants()
    assert len(set(vs)) == len(vs)
    for v in vs:
        assert v.name_expression == f"{v.kernel}<{', '.join(v.targs)}>"
        assert len(v.targs) == len(v.spec.template)


def test_launch_constants_reach_the_kernels_only_as_defines():
    """No kernel source defines a launch constant itself, and every constant it uses is a registry define."""
    defines = dict(registry.DEFINES)
    used = set()
    for p in registry.KERNEL_DIR.glob("*.cu*"):
        text = _strip_comments(p.read_text())
        own = set(re.findall(r"#define\s+(\w+)", text))
        assert not own & set(defines), f"{p.name} defines {sorted(own & set(defines))} itself"
        used |= set(re.findall(r"\bCUBN_[A-Z0-9_]+\b", text)) - own
    macros = set(_macros(_strip_comments(p.read_text()) for p in registry.KERNEL_DIR.glob("*.cu*")))
    objectlike = {n for p in registry.KERNEL_DIR.glob("*.cu*")
                  for n in re.findall(r"#define\s+(\w+)", _strip_comments(p.read_text()))}
    assert used - objectlike - macros - {"CUBN_EMULATED"} <= set(defines)
    assert set(defines) <= used, f"defines no kernel reads: {sorted(set(defines) - used)}"
    assert registry.define_options() == tuple(f"-D{k}={v}" for k, v in registry.DEFINES)


def test_activation_ids_have_one_source():
    """cubn.activations states each id once; the kernels' enum takes every one from its define."""
    common = _strip_comments((registry.KERNEL_DIR / "common.cuh").read_text())
    enum = dict(re.findall(r"(ACT_\w+)\s*=\s*(CUBN_ACT_\w+)", common))
    assert enum == {f"ACT_{n.upper()}": f"CUBN_ACT_{n.upper()}" for n in registry.ACTIVATIONS}
    ids = [activations.NONE_ID] + [a.kernel_id for a in activations.ALL]
    assert len(set(ids)) == len(ids) and activations.NONE_ID == 0
    assert dict(registry.DEFINES)["CUBN_ACT_GELU_TANH"] == activations.gelu_tanh.kernel_id


def test_one_launch_items_are_a_template_argument():
    seen = {}
    for v in registry.TRAIN_ONE_LAUNCH.variants():
        T, vec, cl, items = v.params["T"], v.params["VEC"], v.params["CL"], v.params["ITEMS"]
        assert items in registry.one_launch_items(T.dtype, cl, vec)
        seen.setdefault((T.dtype, vec, cl), set()).add(items)
    for (dt, vec, cl), items in seen.items():  # every registered cache size is built, for every activation
        want = (8,) if not cl else (4,) if _dtypes.itemsize(dt) != 4 else (8, 16) if vec > 1 else (8,)
        assert tuple(sorted(items)) == registry.one_launch_items(dt, cl, vec) == want
    for v in registry.BWD_ONE_LAUNCH.variants():
        assert v.params["ITEMS"] == registry.one_launch_backward_items(v.params["T"].dtype, v.params["VEC"])


# ---------------------------------------------------------------------------
# Arguments by name
# ---------------------------------------------------------------------------
def _normalize_variant(dtype="float32"):
    return registry.NORMALIZE.variant(T=spec.element(dtype), ACT=1, VEC=1, RAW=0, POS=1, SIDE=0, IDX32=0)


def test_arguments_are_ordered_and_converted_by_the_spec():
    v = _normalize_variant("float16")
    x, y, m, s, t = (np.zeros(4, np.float16), np.zeros(4, np.float16), *(np.zeros(2, np.float32) for _ in range(3)))
    args = v.args(y=y, x=x, mean=m, p1=s, p2=t, n=4, C=2, inner=1, alpha=0.5)
    assert [a.name for a in registry.NORMALIZE.arguments][:3] == ["x", "side", "y"]
    assert args[0] is x and args[1] is None and args[2] is y and args[6] is m
    # scalars become the NumPy scalar of their C type (A: float32 for 16-bit data)
    assert [type(a) for a in args[3:6]] == [np.int64, np.int32, np.int64]
    assert type(args[-1]) is np.float32 and args[-1] == np.float32(0.5)
    assert type(args[-2]) is np.float32 and args[-2] == 0  # eps: the spec's default


def test_arguments_are_checked_by_name():
    v = _normalize_variant()
    base = dict(x=np.zeros(2, np.float32), y=np.zeros(2, np.float32), mean=np.zeros(1, np.float32),
                p1=np.zeros(1, np.float32), n=2, C=1, inner=2)
    v.args(**base)
    with pytest.raises(TypeError, match="'const T\\* x' may not be None"):
        v.args(**{**base, "x": None})
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'mean'"):
        v.args(**{k: a for k, a in base.items() if k != "mean"})
    with pytest.raises(TypeError, match="unexpected keyword argument 'gamma'"):
        v.args(**base, gamma=None)
    with pytest.raises(OverflowError):
        v.args(**{**base, "C": 2**40})  # an int argument cannot hold it
    f = registry.BN_FINALIZE.variant(A=spec.element("float64"))
    args = f.args(C=3)
    assert len(args) == len(registry.BN_FINALIZE.arguments) == 42
    names = [a.name for a in registry.BN_FINALIZE.arguments]
    assert args[names.index("rmax")] == np.inf and type(args[names.index("rmax")]) is np.float64
    assert args[names.index("zd_factor")] == 1 and all(args[names.index(n)] is None for n in ("gamma", "o_mean"))


def _chosen(v):
    """The template arguments a caller gives for variant ``v`` (the derived ones are computed)."""
    return {k: x for k, x in v.params.items() if k not in v.spec.derived}


@pytest.mark.parametrize("kernel", registry.KERNELS, ids=lambda k: f"{k.source}:{k.name}")
def test_every_variant_is_found_by_its_template_arguments(kernel):
    for v in kernel.variants():
        assert kernel.variant(**_chosen(v)) is v


def test_unregistered_variants_are_refused():
    f32 = spec.element("float32")
    normalize = _chosen(registry.NORMALIZE.variant(T=f32, ACT=0, VEC=1, RAW=0, POS=1, SIDE=0, IDX32=0))
    with pytest.raises(KeyError, match="not registered"):
        registry.NORMALIZE.variant(**{**normalize, "ACT": len(registry.ACTIVATIONS)})
    moments = _chosen(next(v for v in registry.MOMENTS_CL.variants() if v.params["T"] == f32))
    with pytest.raises(KeyError, match="not registered"):
        registry.MOMENTS_CL.variant(**{**moments, "VEC": 8})  # 32 bytes: wider than a vector
    with pytest.raises(TypeError, match="template argument RAW missing"):
        registry.NORMALIZE.variant(**{k: x for k, x in normalize.items() if k != "RAW"})


def test_statistics_kernels_for_every_preprocessing_input():
    for name in _dtypes.PREPROCESSING_INPUT_NAMES:
        acc = _dtypes.stats_acc(name)
        cl, cf = registry.moments_kernels(name, acc)
        T = spec.element(name, acc)
        v = next(v for v in cl.variants() if v.params["T"] == T)
        assert v.acc == acc and any(w.params["T"] == T for w in cf.variants())
        assert v.source == ("moments.cu" if _dtypes.TABLE[name].acc == acc.name else "preprocess.cu")


# ---------------------------------------------------------------------------
# The dtype table: no ml_dtypes needed for the other dtypes
# ---------------------------------------------------------------------------
def test_dtype_table_facts():
    t = _dtypes.TABLE
    assert _dtypes.FLOAT_NAMES == ("float16", "bfloat16", "float32", "float64")
    assert [t[n].sync_code for n in _dtypes.FLOAT_NAMES] == [0, 1, 2, 3]
    for name, row in t.items():
        if row.numpy is not None:
            assert row.numpy.itemsize == row.itemsize and row.numpy.kind in (row.kind, "V")
        assert row.vector_widths[-1] * row.itemsize == 16
    assert _dtypes.acc_dtype("bfloat16") == np.float32 and _dtypes.stats_acc("float32") == np.float64
    assert _dtypes.kernel_ctype("float32", "float64") == "cubn_f32_wide"
    assert _dtypes.kernel_ctype("float32", "float32") == "float"


def test_kernels_run_without_ml_dtypes(tmp_path):
    """Enumerating the variants and launching float32 kernels must not need bfloat16's NumPy dtype."""
    script = (
        "import sys\n"
        "sys.modules['ml_dtypes'] = None  # as if it were not installed\n"
        "import numpy as np, cubn\n"
        "from cubn import _dtypes\n"
        "from cubn.kernels import registry\n"
        "assert _dtypes.bfloat16 is None\n"
        "assert len(registry.all_variants()) > 1000\n"
        "assert 'bfloat16' not in _dtypes.supported_names()\n"
        "x = np.arange(24, dtype=np.float32).reshape(4, 6)\n"
        "with cubn.use_backend('emulated'):\n"
        "    m, v = cubn.moments(x, [0])\n"
        "np.testing.assert_allclose(m, x.mean(0), rtol=1e-6)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    from conftest import backend_skip_reason

    if backend_skip_reason("emulated"):
        script = script.split("x = np.arange")[0] + "print('ok')\n"
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-4000:]
