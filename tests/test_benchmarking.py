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
