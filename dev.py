#!/usr/bin/env python3
"""Set up and run cubn's two main jobs with nothing but Python and pip.

    python3 dev.py demo     # .venv with cubn[demo], then `cubn demo`
    python3 dev.py test     # .venv with cubn[test,docs,cuda13], then pytest and mkdocs build --strict

`python3 dev.py test --quick` runs the tests but not the MPI ranks, the dask
cluster, the NVRTC compilation of every kernel variant, the sanitizer runs or
the docs build (a few minutes on two cores). Extra arguments after `test` go
to pytest (e.g. `python3 dev.py test -k layer`).
CUBN_CROSSCHECK=1 also installs PyTorch (CPU) so the PyTorch cross-checks and
the cubn.torch tests run (CI sets it).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")


def sh(*cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, **kw).returncode


def ensure_venv():
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
        sh(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")


def ensure_installed(extras: str, extra_packages=()):
    """pip install -e .[extras] when pyproject.toml (or the request) changed since last time."""
    ensure_venv()
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode() + " ".join(extra_packages).encode()).hexdigest()
    stamp = VENV / f".installed-{extras.replace(',', '-')}"
    if stamp.exists() and stamp.read_text() == key:
        return
    rc = sh(PY, "-m", "pip", "install", "--quiet", "-e", f".[{extras}]", *extra_packages)
    if rc:
        sys.exit(rc)
    stamp.write_text(key)


def demo(args):
    ensure_installed("demo")
    return sh(BIN / "cubn", "demo", "--min-accuracy", "0.9", *args)


# Deselected by --quick: the markers are declared in pyproject.toml.
QUICK_DESELECT = "not (mpi or dask_cluster or nvrtc or sanitizer)"


def test(args):
    quick = "--quick" in args
    args = [a for a in args if a != "--quick"]
    extra = ("torch==2.13.0",) if os.environ.get("CUBN_CROSSCHECK") == "1" else ()
    ensure_installed("test,docs,cuda13", extra)
    rc = sh(PY, "-m", "pytest", *(["-m", QUICK_DESELECT] if quick else []), *args)
    if rc or quick:
        return rc
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return sh(PY, "-m", "mkdocs", "build", "--strict", "--site-dir", str(VENV / "site"), env=env)


if __name__ == "__main__":
    jobs = {"demo": demo, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in jobs:
        print(__doc__)
        sys.exit(2)
    sys.exit(jobs[sys.argv[1]](sys.argv[2:]))
