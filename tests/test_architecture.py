"""The structure of the code itself: the import graph of cubn, and what the
objects handed down to ops and backends may touch of the layer above.

The import graph is read with ``ast`` from every module, module-level and
function-level imports alike (an import inside a function is a dependency
too, paid on first call). It has no cycle, and the lower layers -- the
kernel specs (``cubn.kernels``) and the backends (``cubn.backends``) --
import nothing above them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import cubn

PKG = Path(cubn.__file__).resolve().parent


def _modules():
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


MODULES = _modules()


def import_graph():
    """module -> the cubn modules it imports (``from pkg import mod`` names the module ``pkg.mod``)."""
    graph = {}
    for name, (path, is_pkg) in MODULES.items():
        package = name if is_pkg else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for a in node.names:
                    targets.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
        graph[name] = {t for t in targets if t in MODULES and t != name}
    return graph


GRAPH = import_graph()


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    """A known function-level import and a known module-level one are found."""
    assert "cubn.backends.kernel_backend" in GRAPH["cubn._backend"]  # inside get_backend()
    assert "cubn.kernels.registry" in GRAPH["cubn.backends.kernel_backend"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


# Self-contained descriptions and helpers that anything may use: dtypes, argument
# errors, Welford merges, the activations' descriptors (names, kernel ids, NumPy math).
FOUNDATION = {"cubn._dtypes", "cubn._checks", "cubn._welford", "cubn._threads", "cubn._version", "cubn.activations"}


def test_the_foundation_imports_only_the_foundation():
    for m in FOUNDATION:
        assert GRAPH[m] <= FOUNDATION, f"{m} imports {sorted(GRAPH[m] - FOUNDATION)}"


@pytest.mark.parametrize("layer,allowed", [
    ("cubn.kernels", ("cubn.kernels",)),
    ("cubn.backends", ("cubn.backends", "cubn.kernels")),
])
def test_lower_layers_import_nothing_above_them(layer, allowed):
    bad = {}
    for m, deps in GRAPH.items():
        if m == layer or m.startswith(layer + "."):
            up = {d for d in deps if d not in FOUNDATION and not any(d == a or d.startswith(a + ".") for a in allowed)}
            if up:
                bad[m] = sorted(up)
    assert not bad, f"{layer} imports from above it: {bad}"


def test_dask_depends_on_preprocessing_one_way():
    assert "cubn.preprocessing.running_moments" in GRAPH["cubn.dask"]
    users = sorted(m for m, deps in GRAPH.items() if "cubn.dask" in deps)
    assert users == [], f"{users} import cubn.dask"
    # cubn.dask reads no private state of the preprocessing objects (it may call their methods)
    tree = ast.parse(MODULES["cubn.dask"][0].read_text())
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    private = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
               and not n.attr.startswith("__") and id(n) not in called]
    assert private == [], f"cubn.dask reads {private}"


def test_import_cubn_imports_no_optional_dependency():
    import subprocess
    import sys

    code = ("import sys, cubn; heavy = [m for m in ('dask', 'cupy', 'torch', 'tqdm', 'mpi4py', 'matplotlib') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(PKG.parent)})
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------
# What goes down gets callbacks, not the layer
# ---------------------------------------------------------------------------
def test_deferred_update_runs_through_callbacks(rng):
    coll = cubn.UpdateCollection()
    bn = cubn.BatchNorm(decay=0.5, zero_debias_moving_mean=True, updates_collections=coll)
    x = rng.standard_normal((16, 3)).astype(np.float32)
    bn(x)
    bn(x + 1)
    assert len(coll) == 2 and repr(coll[0]) == f"<update of {bn!r}>"
    assert not any(isinstance(v, cubn.BatchNorm) for v in vars(coll[0]).values())
    assert float(bn.variables["moving_mean/local_step"]) == 0
    cubn.run_updates(coll)
    assert float(bn.variables["moving_mean/local_step"]) == 2
    # TF's zero-debiased mean after two steps of decay 0.5: (0.5 m1 + m2) / 1.5 ... over 1 - 0.5**2
    m1, m2 = x.mean(0).astype(np.float64), (x + 1).mean(0).astype(np.float64)
    biased = 0.5 * (0.5 * m1) + 0.5 * m2
    np.testing.assert_allclose(bn.variables["moving_mean"], biased / (1 - 0.5**2), rtol=1e-5, atol=1e-6)


def test_sync_exchange_holds_no_layer():
    from cubn.layers.sync_batch_norm import _Exchange

    ex = _Exchange(comm=None, call=3)
    assert ex.check_sums is None and ex.call == 3
    assert set(vars(ex)) == {"comm", "call", "check_sums", "timeout"}
