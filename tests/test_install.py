"""The install check (tests/install_check.py) as the suite can run it.

CI runs the script itself in a fresh virtual environment made with
``pip install .`` alone. Here it runs in a subprocess whose optional
packages (ml_dtypes, SciPy) are made unimportable, which is what that
environment looks like to cubn: every kernel-backend call must work without
ml_dtypes (bfloat16 stays optional), and the erf GELU without SciPy.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cubn
from conftest import backend_skip_reason

SCRIPT = Path(__file__).resolve().parent / "install_check.py"
CUBN_ROOT = Path(cubn.__file__).resolve().parent.parent

BLOCKED = ("ml_dtypes", "scipy")
RUNNER = f"""
import runpy, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # "import name" now raises ImportError, as when it is not installed
sys.argv = ["install_check.py", "--backends", sys.argv[1]]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""


@pytest.mark.parametrize("backend", ["numpy", "emulated"])
def test_install_check_passes_without_the_optional_packages(backend, tmp_path):
    reason = backend_skip_reason(backend)
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, PYTHONPATH=str(CUBN_ROOT))
    proc = subprocess.run([sys.executable, "-c", RUNNER, backend], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "all agree with the float64 reference" in out, out[-4000:]
    assert f"from {CUBN_ROOT}" in out  # the cubn under test


def test_bfloat16_is_optional():
    """Without ml_dtypes cubn imports, registers its bfloat16 kernels, and names
    the dtypes it accepts without bfloat16."""
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"
            "import numpy as np, cubn\n"
            "from cubn import _dtypes\n"
            "from cubn.kernels import registry\n"
            "assert _dtypes.bfloat16 is None\n"
            "assert any(v.targs[0] == '__nv_bfloat16' for v in registry.all_variants())\n"
            "assert _dtypes.vector_widths('bfloat16') == (1, 2, 4, 8)\n"
            "try:\n"
            "    cubn.moments(np.zeros(3, np.int32), [0])\n"
            "except TypeError as e:\n"
            "    assert 'bfloat16' not in str(e) and 'float16, float32, float64' in str(e), e\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(CUBN_ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
