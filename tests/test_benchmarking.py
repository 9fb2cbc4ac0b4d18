"""The benchmark report logic (no timing here: speed is measured by bench/)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cubn import benchmarking as B


def _rec(op, shape, peer, ms, roof=None, dtype="float32"):
    return B.Record(op, "NCHW", shape, dtype, peer, median_ms=ms, roofline=roof)


def test_summary_ratios_are_side_by_side_geomeans(rng):
    shapes = [(8, 4, 5, 5), (16, 2, 3, 3), (4, 8, 2, 2)]
    cubn_ms = rng.uniform(0.01, 1.0, 3)
    torch_ms = cubn_ms * rng.uniform(0.5, 2.0, 3)
    three_ms = cubn_ms * rng.uniform(1.0, 3.0, 3)
    roof = rng.uniform(0.3, 0.9, 3)
    recs = []
    for s, c, t, h, r in zip(shapes, cubn_ms, torch_ms, three_ms, roof):
        recs += [_rec("bn_train", s, "cubn", c, r), _rec("bn_train", s, "torch", t),
                 _rec("bn_train", s, "cubn_three_launch", h)]
    recs.append(_rec("moments", shapes[0], "cubn", 0.1, 0.5))
    recs.append(_rec("moments", shapes[0], "cubn_three_launch", None))
    summ = B.summarize(recs)
    geo = lambda v: math.exp(np.mean(np.log(v)))  # noqa: E731
    got = summ["bn_train/float32"]
    assert got["speedup_vs_torch_geomean"] == pytest.approx(geo(torch_ms / cubn_ms))
    assert got["speedup_vs_three_launch_geomean"] == pytest.approx(geo(three_ms / cubn_ms))
    assert got["roofline_geomean"] == pytest.approx(geo(roof))
    k = int(np.argmin(torch_ms / cubn_ms))
    assert got["slowest_vs_torch"] == pytest.approx(torch_ms[k] / cubn_ms[k])
    assert "speedup_vs_three_launch_geomean" not in summ["moments/float32"]
    lines = B.table(recs).splitlines()
    assert "three-launch" in lines[0] and len(lines) == 1 + 4


def test_three_launch_peer_runs_with_the_one_launch_path_off():
    from cubn._options import one_launch_enabled

    assert one_launch_enabled()
    with B.peer_context("cubn_three_launch"):
        assert not one_launch_enabled()
        with B.peer_context("cubn"):
            assert not one_launch_enabled()  # peers add options, never undo the caller's
    assert one_launch_enabled()
    with pytest.raises(B.SameAsCubn):
        B.PEERS["cubn_three_launch"].build("moments", None)


def test_peers_are_pluggable(monkeypatch):
    """A registered peer is run by the suite, skipped where it says so, and gets its own table column."""
    monkeypatch.setitem(B.PEERS, "plain_numpy", None)  # removed again after the test
    calls = []

    def build(op, inp):
        calls.append((op, inp.shape))
        return lambda i: inp.x[i].sum()

    B.register(B.Peer("plain_numpy", build, device="cpu", label="plain",
                      skip=lambda layout, shape, dtype, gpu: None if dtype == "float32" else "float32 only"))
    env, bw, recs = B.run_suite([("NC", (64, 8))], ("float32", "float16"), ("moments",), peers=["plain_numpy"])
    assert calls == [("moments", (64, 8))]
    ok = [r for r in recs if r.median_ms is not None]
    assert [(r.peer, r.dtype) for r in ok] == [("plain_numpy", "float32")] and ok[0].bytes == 64 * 8 * 4
    assert [r.error for r in recs if r.median_ms is None] == ["skipped: float32 only"]
    assert "plain" in B.table(recs).splitlines()[0]


def test_cli_bench_without_a_gpu_runs_the_cpu_peers_side_by_side(tmp_path, monkeypatch, capsys):
    """``cubn bench`` on a CPU-only machine: the NumPy backend beside torch CPU (1 and N threads) and naive
    NumPy, each its own column, with the copy bandwidth of the same run and peak memory; tiny shapes, no timing
    asserted."""
    import json

    import cubn
    from cubn import cli
    from cubn import cpu_benchmarks as C

    monkeypatch.setattr(cubn, "gpu_available", lambda: False)
    out = tmp_path / "bench"
    shapes = ["NC:64,8", "NCHW:2,3,5,5"]
    rc = cli.main(["bench", "--out", str(out), *sum((["--shape", s] for s in shapes), []), "--dtypes",
                   "float32,float64", "--ops", "moments,bn_infer,bn_add_relu,backward", "--repeat", "2",
                   "--budget", "0", "--copy-mib", "4"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["kind"] == "cpu-peers"
    env = data["environment"]
    assert env["copy_gbps_start"] > 0 and env["copy_gbps_end"] > 0 and env["copy_bytes"] == 4 << 20
    recs = data["records"]
    keys = {(r["layout"], tuple(r["shape"]), r["dtype"], r["op"], r["peer"]) for r in recs}
    want = {(lay, shp, dt, op, p) for lay, shp in (("NC", (64, 8)), ("NCHW", (2, 3, 5, 5)))
            for dt in ("float32", "float64") for op in ("moments", "bn_infer", "bn_add_relu", "backward")
            for p in C.PEERS}
    assert keys == want and len(recs) == len(want)
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    for r in recs:
        assert r["threads"] == (1 if r["peer"].endswith("-1t") else C.all_threads())
        if r["peer"].startswith("torch") and not have_torch:
            assert r["median_ms"] is None and "torch" in r["error"]
            continue
        assert r["error"] is None and r["median_ms"] > 0 and r["rounds"] >= 2
        assert r["copy_gbps"] > 0 and r["roofline"] == pytest.approx(r["gbps"] / r["copy_gbps"])
        assert r["bytes"] == B.TENSOR_PASSES[r["op"]] * math.prod(r["shape"]) * np.dtype(r["dtype"]).itemsize
        if r["peer"].startswith("cubn") or r["peer"] == "numpy":
            assert r["peak_memory"] is not None
    head = (out / "table.txt").read_text().splitlines()[0].split()
    for col in ("cubn-1t", "cubn-Nt", "torch-1t", "torch-Nt", "numpy", "1t/torch", "Nt/torch", "1t/numpy", "copy%"):
        assert col in head
    assert "Copy bandwidth" in (out / "README.md").read_text()
    printed = capsys.readouterr().out
    assert "results in" in printed and "torch-1t ms" in printed


def test_cli_bench_picks_the_cpu_benchmark_only_without_a_gpu_or_with_cpu(tmp_path, monkeypatch):
    import cubn
    from cubn import cli
    from cubn import cpu_benchmarks as C
    from cubn.benchmarking import command

    called = []
    monkeypatch.setattr(C, "main", lambda args: called.append(("cpu", args.dtypes, args.shapes)) or 0)
    monkeypatch.setattr(command, "main", lambda args: called.append(("gpu", args.dtypes, args.shapes)) or 0)
    monkeypatch.setattr(B, "main", command.main)
    monkeypatch.setattr(cubn, "gpu_available", lambda: True)
    assert cli.main(["bench", "--out", str(tmp_path)]) == 0
    assert cli.main(["bench", "--out", str(tmp_path), "--cpu", "--shape", "nhwc:2,3,3,4"]) == 0
    monkeypatch.setattr(cubn, "gpu_available", lambda: False)
    assert cli.main(["bench", "--out", str(tmp_path)]) == 0
    assert called == [("gpu", "float32,float16,bfloat16", None), ("cpu", None, [("NHWC", (2, 3, 3, 4))]),
                      ("cpu", None, None)]
    with pytest.raises(SystemExit, match="--shape"):
        cli.main(["bench", "--out", str(tmp_path), "--shape", "NC:4,x"])
