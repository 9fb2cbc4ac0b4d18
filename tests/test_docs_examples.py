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
