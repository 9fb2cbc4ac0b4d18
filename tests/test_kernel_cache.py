"""The emulated backend's on-disk kernel cache is verified before every load.

In earlier versions a cached shared object that was truncated or overwritten was
loaded as it was: the process failed on every run ("file too short") or
crashed (SIGBUS). Now each object has a SHA-256 digest beside it, written at
build time; a missing or mismatching digest rebuilds the object (built under
a private name and renamed, as before). Each step runs in a fresh process,
as a user's would: a damaged object must never be mapped into this one.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cubn
from conftest import backend_skip_reason

HERE = Path(__file__).resolve().parent
CUBN_ROOT = Path(cubn.__file__).resolve().parent.parent  # the cubn under test, in the subprocesses too
TOY = HERE / "emulator" / "kernels" / "toy.cu"

pytestmark = pytest.mark.skipif(backend_skip_reason("emulated") is not None,
                                reason=backend_skip_reason("emulated") or "")

SCRIPT = textwrap.dedent(f"""
    import numpy as np
    from cubn.backends import emulated_launcher as emu
    launcher = emu.EmulatedLauncher()
    k = launcher.build_module({str(TOY)!r}, ["block_sum<double>"])["block_sum<double>"]
    x = np.arange(100, dtype=np.float64)
    out = np.zeros(1)
    launcher.launch(k, (1, 1, 1), (128, 1, 1), 0, (x, out, np.int64(100)))
    assert out[0] == 4950.0, out
    print("OK")
""")


def _run(cache):
    env = dict(os.environ, CUBN_CACHE_DIR=str(cache), PYTHONPATH=os.pathsep.join(
        p for p in (str(CUBN_ROOT), os.environ.get("PYTHONPATH")) if p))
    env.pop("LD_PRELOAD", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _objects(cache):
    return sorted((cache / "emulated").glob("toy-*.so"))


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "digest missing", "digest wrong", "empty"])
def test_a_damaged_cached_object_is_rebuilt(tmp_path, damage):
    rc, out = _run(tmp_path)
    assert rc == 0 and "OK" in out, out
    (so,) = _objects(tmp_path)
    digest = so.with_name(so.name + ".sha256")
    good = so.read_bytes()
    if damage == "truncated":
        so.write_bytes(good[: len(good) // 3])
    elif damage == "overwritten":  # same size, different bytes (e.g. a disk error)
        b = bytearray(good)
        mid = len(b) // 2
        b[mid : mid + 4096] = bytes(len(b[mid : mid + 4096]))
        so.write_bytes(bytes(b))
    elif damage == "digest missing":
        digest.unlink(missing_ok=True)
    elif damage == "digest wrong":
        digest.write_text("0" * 64 + "\n")
    else:
        so.write_bytes(b"")
    rc, out = _run(tmp_path)
    assert rc == 0 and "OK" in out, f"exit {rc}:\n{out[-3000:]}"
    (again,) = _objects(tmp_path)
    assert again == so and again.read_bytes() != b"" and len(again.read_bytes()) == len(good)
    assert digest.read_text().strip() == __import__("hashlib").sha256(again.read_bytes()).hexdigest()
    assert not list((tmp_path / "emulated").glob(".*.tmp*")), "a staged file was left behind"
