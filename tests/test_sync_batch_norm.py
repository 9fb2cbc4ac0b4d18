"""cubn.SyncBatchNorm across real MPI processes on one machine.

Each test launches ``mpiexec -n K python -m mpi_worker ...`` (tests/mpi_worker.py,
mpi4py with the MPICH wheel from PyPI) and asserts what every rank reports:
SyncBatchNorm on uneven slices (one of them empty) equals BatchNorm on the
whole batch -- outputs, dx, d side_input, gradients, every state variable --
on the NumPy and emulated backends, with 2 and 4 ranks; inconsistent calls
raise the same clear error on every rank instead of hanging (a hang is a
timeout here). With a GPU the same checks run on CuPy arrays through MPI and
through NCCL. A few single-process tests (communicator size 1) cover the
argument handling.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cubn
from cubn.distributed import Communicator, MPIComm, as_communicator
from cubn.layers.sync_batch_norm import HEADER_WORDS, SyncBatchNorm
from conftest import backend_skip_reason

pytest.importorskip("mpi4py")

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"
TIMEOUT = 180  # generous: a hang is the failure being tested for, and CI machines are slow


def _mpiexec():
    # The launcher that belongs to the MPI mpi4py was built against (the mpich
    # wheel puts it next to the interpreter); a foreign mpiexec would start K
    # unrelated singletons.
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install 'cubn[mpi]')")


@pytest.fixture
def seed(request):
    s = int(np.random.SeedSequence().entropy % (2**31))
    request.node.user_properties.append(("seed", s))
    print(f"seed: {s}")  # shown with a failure, to replay it
    return s


def launch(k, args, tmp_path, script=None, timeout=TIMEOUT, python_options=()):
    """Run K ranks; returns (returncode, combined output, {rank: [lines]})."""
    target = [str(script)] if script else ["-m", "mpi_worker", *map(str, args), str(tmp_path)]
    cmd = [MPIEXEC, "-n", str(k), sys.executable, *python_options, *target]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and its ranks: the group we started
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout}s (a rank is waiting for the others):\n{out[-6000:]}")
    ranks = {}
    for r in range(k):
        f = tmp_path / f"rank{r}.txt"
        ranks[r] = f.read_text().splitlines() if f.exists() else []
    return proc.returncode, out, ranks


def _report(out):
    return "\n".join(line for line in out.splitlines() if "FAIL" in line or "Error" in line)[-6000:] or out[-6000:]


@pytest.fixture(scope="module")
def warm_emulator():
    """Build the emulated kernels once here, so K ranks do not all compile them at once."""
    reason = backend_skip_reason("emulated")
    if reason:
        pytest.skip(reason)
    # SyncBatchNorm always runs the three-launch kernels (its statistics go
    # through the exchange): warm those, for both layouts.
    with cubn.use_backend("emulated"), cubn.use_one_launch(False):
        for dt in ("float32", "float64"):
            for shape, fmt in (((4, 3), "NHWC"), ((4, 3, 2, 2), "NCHW")):
                bn = cubn.BatchNorm(updates_collections=None, data_format=fmt)
                x = np.arange(np.prod(shape), dtype=dt).reshape(shape)
                bn(x)
                bn.backward(x)


# ---------------------------------------------------------------------------
# SyncBatchNorm == BatchNorm on the concatenated batch
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("backend", ["numpy", "emulated"])
@pytest.mark.mpi
def test_equals_batch_norm_on_the_whole_batch(request, backend, k, seed, tmp_path):
    if backend == "emulated":
        request.getfixturevalue("warm_emulator")
    rc, out, ranks = launch(k, ["equal", backend, seed], tmp_path)
    assert rc == 0, f"mpiexec -n {k} exited {rc}:\n{_report(out)}"
    import mpi_worker

    names = [c[0] for c in mpi_worker.CONFIGS]
    sizes = str(mpi_worker.SPLITS[k])
    for r in range(k):
        ok = [line for line in ranks[r] if line.startswith(f"RANK {r} OK")]
        for name in names:
            assert any(f" {name} sizes {sizes}" in line for line in ok), f"rank {r}: no OK for {name}:\n{ranks[r]}"
        assert not [line for line in ranks[r] if " FAIL " in line], ranks[r]


# ---------------------------------------------------------------------------
# Inconsistent calls: the same clear error on every rank, no hang
# ---------------------------------------------------------------------------
SAME_MESSAGE = ["channels", "dtype", "data_format", "config", "out_of_step", "all_empty"]
RELAYED = ["local_failure", "local_failure_backward"]


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.mpi
def test_inconsistent_calls_raise_on_every_rank(k, seed, tmp_path):
    rc, out, ranks = launch(k, ["mismatch", "numpy", seed], tmp_path)
    assert rc == 0, f"mpiexec -n {k} exited {rc}:\n{_report(out)}"

    def message(r, case):
        lines = [ln for ln in ranks[r] if re.match(rf"RANK {r} OK {case} ", ln)]
        assert len(lines) == 1, f"rank {r}, case {case}: {ranks[r]}"
        return lines[0].split(f" OK {case} ", 1)[1]

    for case in SAME_MESSAGE:
        msgs = {message(r, case) for r in range(k)}
        assert len(msgs) == 1, f"{case}: the ranks raised different errors: {msgs}"
    for case in RELAYED:
        own = message(1, case)
        assert "rank 1" not in own  # rank 1 raises its own argument error ...
        others = {message(r, case) for r in range(k) if r != 1}
        assert len(others) == 1  # ... and every other rank the same relayed one, quoting it
        (relayed,) = others
        assert f"rank 1 of {k} failed" in relayed and own.split(": ", 1)[1] in relayed, (own, relayed)


# ---------------------------------------------------------------------------
# A rank that fails outside the layer: the others end within the timeout
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("scenario", ["fail-raise", "fail-exit"])
def test_a_failed_rank_never_leaves_the_others_waiting(k, scenario, seed, tmp_path):
    import mpi_worker

    t = mpi_worker.FAIL_TIMEOUT
    rc, out, ranks = launch(k, [scenario, "numpy", seed], tmp_path, timeout=120)
    phase = ("the consistency header of training call 2" if scenario == "fail-raise"
             else "the consistency header of the backward of training call 2")
    for r in range(k):
        if r == 1:
            continue
        lines = ranks[r]
        assert not [ln for ln in lines if " FAIL " in ln], lines
        timeouts = [re.match(rf"RANK {r} OK timeout after ([0-9.]+) s: (.*)", ln) for ln in lines]
        timeouts = [m for m in timeouts if m]
        assert len(timeouts) == 1, f"rank {r} did not report the timeout:\n{lines}\n{out[-3000:]}"
        waited, msg = float(timeouts[0][1]), timeouts[0][2]
        assert t <= waited < t + 15, f"rank {r} waited {waited} s with a timeout of {t} s"
        assert f"rank {r} of {k}: the other ranks did not join within {t:g} s" in msg, msg
        assert phase in msg and "python -m mpi4py" in msg and "cannot be used again" in msg, msg
        refused = [re.match(rf"RANK {r} OK refused after ([0-9.]+) s: (.*)", ln) for ln in lines]
        refused = [m for m in refused if m]
        assert len(refused) == 1 and float(refused[0][1]) < 1.0, lines
        assert "timed out and is still pending" in refused[0][2], refused[0][2]
    if scenario == "fail-raise":
        assert "rank 1's data loader failed" in out and rc != 0
    else:
        assert any("exiting before the backward" in ln for ln in ranks[1]), ranks[1]


def test_python_m_mpi4py_aborts_every_rank_when_one_raises(seed, tmp_path):
    """The launch the docs show: an uncaught exception on one rank ends the
    whole job at once, long before the layer's (here 600 s) timeout."""
    start = time.monotonic()
    rc, out, ranks = launch(2, ["fail-raise-abort", "numpy", seed], tmp_path, timeout=120,
                            python_options=("-m", "mpi4py"))
    assert rc != 0 and "rank 1's data loader failed" in out, out[-3000:]
    assert time.monotonic() - start < 100
    assert not any("timeout after" in ln for ln in ranks[0]), ranks[0]


def test_timeout_argument(tmp_path):
    assert SyncBatchNorm(comm=_Recorder()).timeout == 600.0
    assert SyncBatchNorm(comm=_Recorder(), timeout=None).timeout is None
    for bad, err in ((0, ValueError), (-1, ValueError), (float("inf"), ValueError), ("soon", TypeError)):
        with pytest.raises(err, match="'timeout'"):
            SyncBatchNorm(comm=_Recorder(), timeout=bad)

    class Old(Communicator):  # written before collectives took a timeout
        def allgather(self, a):
            return a.reshape(1, -1)

        def allreduce(self, a):
            return a

    with pytest.raises(TypeError, match="'comm'.*timeout"):
        SyncBatchNorm(comm=Old())


def test_a_single_rank_timeout_is_clear_and_final():
    """A communicator whose collective never completes (one rank waiting for
    a partner that is gone): ExchangeTimeout after the timeout, then refusal."""
    class Stuck(Communicator):
        name = "stuck"
        rank, size = 0, 2

        def allgather(self, a, timeout=None):
            self._check_usable("an allgather")
            time.sleep(timeout)
            raise self._timed_out("allgather", timeout, (a,))

        allreduce = allgather

    bn = SyncBatchNorm(comm=Stuck(), timeout=0.2, updates_collections=None)
    x = np.ones((4, 3), np.float32)
    with pytest.raises(cubn.distributed.ExchangeTimeout, match=r"rank 0 of 2.*within 0.2 s.*training call 1"):
        bn(x)
    with pytest.raises(RuntimeError, match="timed out and is still pending"):
        bn(x)


# ---------------------------------------------------------------------------
# The example of docs/distributed.md runs as written
# ---------------------------------------------------------------------------
@pytest.mark.mpi
def test_docs_example_runs_under_mpiexec(tmp_path):
    if not hasattr(cubn, "SyncBatchNorm"):
        pytest.skip("cubn.SyncBatchNorm is not exported from cubn/__init__.py yet")
    text = (DOCS / "distributed.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "mpiexec" in b and "import cupy" not in b]
    assert blocks, "docs/distributed.md has no runnable mpiexec example"
    script = tmp_path / "train.py"
    script.write_text(blocks[0])
    rc, out, _ = launch(2, [], tmp_path, script=script, python_options=("-m", "mpi4py"))  # as the docs launch it
    assert rc == 0, out[-6000:]


# ---------------------------------------------------------------------------
# GPU: CuPy arrays through MPI (host staging) and through NCCL
# ---------------------------------------------------------------------------
def _gpus():
    if not cubn.gpu_available():
        pytest.skip("no CUDA device: " + cubn._backend.gpu_status())
    import cupy

    return cupy.cuda.runtime.getDeviceCount()


@pytest.mark.gpu
@pytest.mark.mpi
def test_gpu_cupy_arrays_through_mpi(seed, tmp_path):
    _gpus()
    rc, out, ranks = launch(2, ["gpu-mpi", "cupy", seed], tmp_path)
    assert rc == 0, _report(out)
    assert all(any(" OK " in ln for ln in ranks[r]) for r in range(2)), ranks


@pytest.mark.gpu
@pytest.mark.mpi
def test_gpu_nccl(seed, tmp_path):
    pytest.importorskip("cupy.cuda.nccl")
    from cupy.cuda import nccl

    if not nccl.available:
        pytest.skip("CuPy was built without NCCL")
    k = min(2, _gpus())  # NCCL wants one GPU per rank; with one GPU the path still runs (1 rank)
    rc, out, ranks = launch(k, ["gpu-nccl", "cupy", seed], tmp_path)
    assert rc == 0, _report(out)
    assert all(any(" OK " in ln for ln in ranks[r]) for r in range(k)), ranks


# ---------------------------------------------------------------------------
# One process (a communicator of size 1): arguments and the exchange plumbing
# ---------------------------------------------------------------------------
class _Recorder(Communicator):
    """A size-1 communicator that records what goes through it."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def allgather(self, a, timeout=None):
        self.calls.append(("allgather", a.dtype.name, a.shape))
        return a.reshape(1, -1).copy()

    def allreduce(self, a, timeout=None):
        self.calls.append(("allreduce", a.dtype.name, a.shape))
        return a


@pytest.fixture
def three_launch():
    """Bitwise equality needs the same kernels: SyncBatchNorm always takes the
    three-launch path (its statistics go through the exchange), so BatchNorm must too."""
    with cubn.use_one_launch(False):
        yield


@pytest.mark.parametrize("backend_name", ["numpy", "emulated"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_single_rank_equals_batch_norm_and_exchanges_what_the_docs_say(request, backend_name, dtype, rng,
                                                                         three_launch):
    if backend_name == "emulated":
        request.getfixturevalue("warm_emulator")
    c = 5
    x = (3 + 2 * rng.standard_normal((6, 2, 3, c))).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    comm = _Recorder()
    with cubn.use_backend(backend_name):
        s = SyncBatchNorm(comm=comm, scale=True, updates_collections=None)
        b = cubn.BatchNorm(scale=True, updates_collections=None)
        np.testing.assert_array_equal(s(x), b(x))
        np.testing.assert_array_equal(s.backward(dy), b.backward(dy))
        for k in b.gradients:
            np.testing.assert_array_equal(s.gradients[k], b.gradients[k])
        for k in b.variables:
            np.testing.assert_array_equal(s.variables[k], b.variables[k])
        s(x, is_training=False)  # inference: nothing exchanged
    # per training step: header + (count, mean - pivot, M2, pivot) forward, header + (S1, S2) backward
    assert comm.calls == [("allgather", "int64", (HEADER_WORDS,)), ("allgather", dtype, (4 * c,)),
                          ("allgather", "int64", (HEADER_WORDS,)), ("allreduce", dtype, (2 * c,))]
    quiet = _Recorder()
    with cubn.use_backend(backend_name):
        q = SyncBatchNorm(comm=quiet, verify=False, updates_collections=None)
        q(x)
        q.backward(dy)
    assert quiet.calls == [("allgather", dtype, (4 * c,)), ("allreduce", dtype, (2 * c,))]


def test_empty_local_batch_is_fine_but_an_empty_global_batch_is_not():
    bn = SyncBatchNorm(comm=_Recorder(), updates_collections=None)
    with pytest.raises(ValueError, match="empty batch on all 1 ranks"):
        bn(np.ones((0, 4), np.float32))


def test_comm_argument():
    from mpi4py import MPI

    assert isinstance(as_communicator(MPI.COMM_WORLD), MPIComm)
    assert isinstance(as_communicator(None), MPIComm)
    mine = _Recorder()
    assert as_communicator(mine) is mine
    assert isinstance(SyncBatchNorm().comm, MPIComm)  # None: MPI.COMM_WORLD
    with pytest.raises(TypeError, match="argument 'comm'"):
        SyncBatchNorm(comm="world")


def test_nccl_communicator_refuses_host_arrays():
    class FakeNccl(_Recorder):
        name = "nccl"
        device_only = True

    bn = SyncBatchNorm(comm=FakeNccl(), updates_collections=None)
    with pytest.raises(TypeError, match="GPU memory only"):
        bn(np.ones((4, 3), np.float32))


def test_batch_norm_arguments_and_state_are_inherited(tmp_path):
    coll = cubn.UpdateCollection()
    bn = SyncBatchNorm(comm=_Recorder(), decay=0.5, scale=True, data_format="NCHW", renorm=True,
                       updates_collections=coll)
    assert isinstance(bn, cubn.BatchNorm)
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    bn(x)
    assert cubn.run_updates(coll) == 1
    assert set(bn.variables) >= {"gamma", "beta", "moving_mean", "moving_variance", "renorm_mean"}
    cubn.save(tmp_path / "s.npz", {"bn": bn})
    loaded = cubn.load(tmp_path / "s.npz")["bn"]  # saved and loaded as a BatchNorm: the same state
    np.testing.assert_array_equal(loaded.variables["moving_mean"], bn.variables["moving_mean"])


@pytest.fixture
def three_launch():
    with cubn.use_one_launch(False):  # the same kernels as SyncBatchNorm's, for bitwise equality
        yield


def test_explicit_context_and_interleaved_inference(rng, three_launch):
    """SyncBatchNorm.backward(dy, ctx) after an inference call: the training dx,
    with the backward exchange of that training call; backward(dy) alone is refused."""
    x = (3 + rng.standard_normal((6, 4))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    comm = _Recorder()
    s = SyncBatchNorm(comm=comm, scale=True, updates_collections=None)
    b = cubn.BatchNorm(scale=True, updates_collections=None)
    _, ctx = s.forward(x)
    b(x)
    s(x[:2], is_training=False)
    with pytest.raises(RuntimeError, match="ambiguous"):
        s.backward(dy)
    np.testing.assert_array_equal(s.backward(dy, ctx), b.backward(dy))
    assert [c[0] for c in comm.calls] == ["allgather", "allgather", "allgather", "allreduce"]
