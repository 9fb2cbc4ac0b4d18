"""cubn's real kernels under AddressSanitizer and ThreadSanitizer.

A reduced set of the op tests (every kernel, both layouts, folded and split
reductions, unaligned inputs, weights, renorm, side inputs) re-runs on the
emulated backend in a child process with the sanitizer preloaded; the run
must pass and print no sanitizer report. tests/emulator/test_sanitizers.py
shows each sanitizer does flag broken kernels.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cubn.backends.emulated_launcher import sanitizer_env

pytestmark = pytest.mark.sanitizer
REPO = Path(__file__).resolve().parent.parent

SELECTION = (
    "test_one_launch and (37x20 or 3x2x6 or agree) or "
    "emulated and float32 and ("
    "test_moments or test_weighted_moments or test_many_blocks_per_channel or test_unaligned"
    " or (test_fused_batch_norm_training and NHWC) or (test_fused_batch_norm_training and NCHW and not three_launch)"
    " or (test_fused_batch_norm_inference and gelu)"
    " or (test_low_precision_backward and relu and not three_launch) or test_fused_moments"
    ") or emulated and (test_gradients_match_finite_differences and relu"
    " and (renorm and not three_launch or weighted and three_launch))"
    " or emulated and test_channels_last_backward_sums_against_float64 and three_launch and spread"
)

PREPROCESSING = (
    "emulated and (test_running_moments_batches and (uint8 or float32) or test_running_moments_weighted"
    " or test_normalize_images_shapes or (test_normalize_images_exact and uint8 and float16)"
    " or (test_normalize_images_exact and float64 and float32) or test_standardizer_images)"
)


@pytest.mark.parametrize("mode", ["address", "thread"])
def test_kernels_are_clean_under_sanitizer(mode):
    try:
        env = {**os.environ, **sanitizer_env(mode)}
    except RuntimeError as e:
        pytest.skip(str(e))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-o", "addopts=",
           "tests/test_forward.py", "tests/test_backward.py", "tests/test_preprocessing.py", "tests/test_one_launch.py",
           "tests/test_fused_statistics.py",
           "-k", f"({SELECTION}) or ({PREPROCESSING})"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    out = r.stdout + r.stderr
    tail = out[-6000:]
    assert "Sanitizer" not in out, f"{mode} sanitizer report:\n{tail}"
    assert r.returncode == 0, f"sanitized run failed (exit {r.returncode}):\n{tail}"
    assert " passed" in out and "failed" not in out.split("\n")[-2], tail
