"""The Python examples in the docs run (NumPy only)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ["getting-started.md", "migrating.md", "preprocessing.md", "torch.md"]


def _blocks(page):
    text = (DOCS / page).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_examples_run(page, tmp_path, monkeypatch):
    if not (DOCS / page).exists():
        pytest.skip(f"{page} not written")
    if page == "torch.md":
        pytest.importorskip("torch", reason="torch is not installed")
    import cubn

    monkeypatch.chdir(tmp_path)
    cubn.compat.reset_default_graph()
    ns = {}
    for code in _blocks(page):
        if "import cupy" in code or "dask" in code and "distributed" in code:
            continue  # GPU / cluster examples are covered by their own tests
        exec(compile(code, f"{page}", "exec"), ns)
    cubn.compat.reset_default_graph()


def test_docstrings_link_with_mkdocstrings_not_sphinx_roles():
    """The reference pages render docstrings with mkdocstrings, which links
    [`Name`][path] and prints a Sphinx role such as :class:`X` literally."""
    import re
    from pathlib import Path

    import cubn

    role = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc):`")
    found = [f"{p.relative_to(Path(cubn.__file__).parent.parent)}:{i}"
             for p in sorted(Path(cubn.__file__).parent.rglob("*.py"))
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if role.search(line)]
    assert not found, "Sphinx roles in docstrings (write [`Name`][dotted.path]): " + ", ".join(found)
