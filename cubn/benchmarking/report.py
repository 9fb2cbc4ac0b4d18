"""The benchmark report: per-op summaries, the text table, the results folder."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

from .cases import DTYPES, ONE_LAUNCH_OPS, OPS
from .peers import PEERS


def summarize(records):
    """Per (op, dtype): geometric means of cubn's speedup over torch and of its roofline fraction."""
    by = {}
    for r in records:
        if r.median_ms is not None:
            by[(r.op, r.layout, r.shape, r.dtype, r.peer)] = r
    out = {}
    for op in OPS:
        for dt in DTYPES:
            speed, roof, worst = [], [], None
            for (o, lay, shp, d, p), r in by.items():
                if o != op or d != dt or p != "cubn":
                    continue
                if r.roofline:
                    roof.append(r.roofline)
                t = by.get((o, lay, shp, d, "torch"))
                if t:
                    s = t.median_ms / r.median_ms
                    speed.append(s)
                    if worst is None or s < worst[0]:
                        worst = (s, lay, shp)
            if speed or roof:
                out[f"{op}/{dt}"] = {
                    "speedup_vs_torch_geomean": _geomean(speed), "roofline_geomean": _geomean(roof),
                    "slowest_vs_torch": worst[0] if worst else None,
                    "slowest_case": f"{worst[1]} {worst[2]}" if worst else None, "cases": len(roof) or len(speed)}
                if op in ONE_LAUNCH_OPS:
                    # cubn (one launch where the shape allows) over its three-launch path
                    gains = [by[(o, lay, shp, d, "cubn_three_launch")].median_ms / r.median_ms
                             for (o, lay, shp, d, p), r in by.items()
                             if o == op and d == dt and p == "cubn" and (o, lay, shp, d, "cubn_three_launch") in by]
                    out[f"{op}/{dt}"]["speedup_vs_three_launch_geomean"] = _geomean(gains)
    return out


def _geomean(v):
    v = [x for x in v if x and x > 0]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None


def table(records):
    """A text table: one row per (op, shape, dtype), the peers' median ms side by side
    (a column per registered peer that has a record), then cubn's speedup over torch and
    its roofline fraction."""
    rows = {}
    for r in records:
        rows.setdefault((r.op, r.layout, r.shape, r.dtype), {})[r.peer] = r
    present = {r.peer for r in records}
    columns = [n for n in PEERS if n in present] + sorted(present - set(PEERS))
    width = max([9] + [len(PEERS[n].column) if n in PEERS else len(n) for n in columns])

    def head(n):
        return f"{PEERS[n].column if n in PEERS else n:>{width}s}"

    lines = [f"{'op':11s} {'layout':6s} {'shape':22s} {'dtype':8s} " + " ".join(head(n) for n in columns)
             + f" {'x torch':>8s} {'roofline':>8s}   (median ms)"]
    for (op, lay, shp, dt), peers in rows.items():
        def ms(p):
            r = peers.get(p)
            return f"{r.median_ms:{width}.4f}" if r and r.median_ms is not None else f"{'-':>{width}s}"
        c, t = peers.get("cubn"), peers.get("torch")
        sp = f"{t.median_ms / c.median_ms:8.2f}" if c and t and c.median_ms and t.median_ms else f"{'-':>8s}"
        rf = f"{100 * c.roofline:7.1f}%" if c and c.roofline else f"{'-':>8s}"
        if all(p.median_ms is None for p in peers.values()):
            continue
        lines.append(f"{op:11s} {lay:6s} {str(shp):22s} {dt:8s} " + " ".join(ms(n) for n in columns) + f" {sp} {rf}")
    return "\n".join(lines)


def write_results(folder, env, records):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"environment": env, "summary": summarize(records), "records": [dataclasses.asdict(r) for r in records]}
    (folder / "results.json").write_text(json.dumps(data, indent=1))
    (folder / "table.txt").write_text(table(records) + "\n")
    try:
        from .chart import chart

        chart(data, folder / "chart.png")
    except Exception as e:  # matplotlib missing: the JSON and table still stand
        print(f"no chart: {e}", file=sys.stderr)
    return data
