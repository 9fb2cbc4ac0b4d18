"""The ``cubn`` command's output when it is not a terminal: no progress-bar frames."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # bytes, not text: universal newlines would turn the "\r" we look for into "\n"
    return subprocess.run([sys.executable, "-m", "cubn", *args], env=env, capture_output=True, timeout=600)


def test_demo_writes_no_progress_frames_into_a_pipe():
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    r = _run("demo", "--epochs", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:].decode(errors="replace")
    assert b"\r" not in r.stdout + r.stderr
    assert b"epoch  1: loss" in r.stdout and b"final test accuracy" in r.stdout
