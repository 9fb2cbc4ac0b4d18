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
    return subprocess.run([sys.executable, "-m", "cubn", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_demo_writes_no_progress_frames_into_a_pipe():
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    r = _run("demo", "--epochs", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stdout + r.stderr
    assert "epoch  1: loss" in r.stdout and "final test accuracy" in r.stdout
