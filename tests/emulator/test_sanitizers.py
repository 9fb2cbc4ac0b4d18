"""The sanitizer runs of the emulated backend can fail, and pass on correct kernels.

Each run is a child Python process started with the sanitizer runtime
preloaded (sanitizer_env); a sanitized kernel library cannot be loaded into
this process.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from cubn.backends.emulated_launcher import sanitizer_env

pytestmark = pytest.mark.sanitizer

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
BROKEN = HERE / "kernels" / "broken.cu"
BROKEN_KERNELS = re.findall(r"__global__ void (\w+)\(", BROKEN.read_text())  # as test_shim.py: one shared build

# Runs one kernel of broken.cu on correct-sized arrays: x (256 floats), y (1000 floats).
RUN_BROKEN = """
import sys, numpy as np
from cubn.backends.emulated_launcher import EmulatedLauncher
source, names, kernel = sys.argv[1], sys.argv[2].split(";"), sys.argv[3]
launcher = EmulatedLauncher()  # the sanitizer comes from CUBN_EMULATOR_SANITIZE
module = launcher.build_module(source, names)
x = np.random.default_rng(0).standard_normal(256).astype(np.float32)
y = np.zeros(1000, np.float32)
if kernel == "oob_global_write":
    launcher.launch(module[kernel], (4,), (256,), 0, (y, np.int32(len(y))))
else:
    launcher.launch(module[kernel], (2,), (256,), 0, (x, y))
print("finished without a report")
"""


def run_under(mode, args):
    try:
        env = {**os.environ, **sanitizer_env(mode)}
    except RuntimeError as exc:
        pytest.skip(str(exc))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # sys.executable is the interpreter itself (never a shell shim) for the preload to reach.
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def line_of(snippet):
    for number, line in enumerate(BROKEN.read_text().splitlines(), 1):
        if snippet in line:
            return f"broken.cu:{number}"
    raise AssertionError(f"{snippet!r} is not in {BROKEN}")


def run_broken(mode, kernel):
    return run_under(mode, ["-c", RUN_BROKEN, str(BROKEN), ";".join(BROKEN_KERNELS), kernel])


@pytest.mark.parametrize(
    "kernel, error, culprit",
    [
        ("oob_global_write", "heap-buffer-overflow", "if (i <= n) y[i] = 1.0f;"),
        ("shared_off_by_one", "global-buffer-overflow", "tile[t + 1] = x[t];"),
    ],
)
def test_address_sanitizer_flags_out_of_bounds_writes(kernel, error, culprit):
    proc = run_broken("address", kernel)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert f"ERROR: AddressSanitizer: {error}" in proc.stderr, proc.stderr[-5000:]
    assert f"in {kernel}" in proc.stderr and line_of(culprit) in proc.stderr
    assert "finished without a report" not in proc.stdout


def test_thread_sanitizer_flags_a_missing_syncthreads():
    proc = run_broken("thread", "missing_syncthreads")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "WARNING: ThreadSanitizer: data race" in proc.stderr, proc.stderr[-5000:]
    assert "in missing_syncthreads" in proc.stderr or "missing_syncthreads(" in proc.stderr
    assert line_of("y[t] = tile[(t + 1) % blockDim.x];") in proc.stderr
    assert "finished without a report" not in proc.stdout


@pytest.mark.parametrize("mode", ["address", "thread"])
def test_correct_kernels_run_clean(mode):
    # test_shim.py's kernel tests, less those that check the launcher's own
    # error paths (compiler errors, registry, watchdog child process).
    proc = run_under(
        mode,
        [
            "-m", "pytest", str(HERE / "test_shim.py"), "-q",
            "-s",  # the sanitizer's report goes to the real stderr, not pytest's capture
            "-p", "no:cacheprovider",
            "-k", "not hang_aborts and not compile_errors and not get_builds",
        ],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Sanitizer" not in proc.stderr, proc.stderr[-5000:]
    assert re.search(r"\d+ passed", proc.stdout) and "failed" not in proc.stdout
