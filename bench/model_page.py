"""The model's sections of docs/performance.md (called by make_performance_page.py).

Reads the committed model runs, ``bench/results/<name>/model.json`` (written
by ``cubn model``), and the GPU runs (``results.json`` with a device), and
writes: the model's predictions for the suite beside the columns measured
GPU numbers fill, and the calibration table (model against measurement, per
shape) once a GPU run exists.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")
ROOFLINE_TARGET = 0.85
ROOFLINE_OPS = ("moments", "bn_infer", "bn_train", "bn_relu")


def _fmt(v, spec="{:.1f}"):
    return spec.format(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else ""


def _geomean(v):
    v = [x for x in v if x and x > 0]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None


def sections(results_dir: Path) -> list:
    model_runs = sorted(results_dir.glob("*/model.json"))
    gpu_runs = [p for p in sorted(results_dir.glob("*/results.json"))
                if json.loads(p.read_text())["environment"].get("device")]
    out = ["\n## The model (no GPU measurement)\n",
           "Predictions of cubn's traced traffic and instruction model ([The performance model](model.md)), "
           "**labelled as a model**: no number in this section was measured. The *measured* columns are "
           "filled from GPU runs committed under `bench/results/`; the model is trusted only once the "
           "calibration table below shows it matching them.\n"]
    if not model_runs:
        out.append("No model run is committed yet: `cubn model --json bench/results/model-DATE-h100/model.json`.\n")
        return out + _calibration([], gpu_runs)
    measured = _measured(gpu_runs[-1]) if gpu_runs else {}
    for path in model_runs:
        data = json.loads(path.read_text())
        recs = data["records"]
        dev = data["model"]["device"]
        out.append(f"### `{path.parent.name}`: {dev['name']}\n")
        out.append(f"{data['model']['date']}; copy bandwidth {dev['copy_bandwidth'] / 1e12:.1f} TB/s, "
                   f"{dev['sms']} SMs, {dev['launch_overhead_us']:.1f} µs per launch (model constants); "
                   f"instruction counts: {data['model']['sass']}; one-launch kernels "
                   f"{'allowed' if data['model'].get('one_launch_allowed', True) else 'off'}.\n")
        # targets: modelled time >= 85% of the roofline
        out.append(f"Modelled share of the roofline (roofline µs / model µs; target ≥ {ROOFLINE_TARGET:.0%} "
                   "for moments, inference and training forward):\n")
        out.append("| op | " + " | ".join(DTYPES) + " | shapes at target |")
        out.append("|---|" + "---|" * (len(DTYPES) + 1))
        for op in sorted({r["op"] for r in recs}, key=lambda o: ("moments", "bn_train", "bn_infer", "bn_relu",
                                                                 "bn_add_relu", "backward").index(o)):
            cells, met, n = [], 0, 0
            for dt in DTYPES:
                fr = [r["roofline_us"] / r["predicted_us"] for r in recs if r["op"] == op and r["dtype"] == dt]
                g = _geomean(fr)
                cells.append(f"{100 * g:.0f}% (geomean)" if g else "")
                met += sum(f >= ROOFLINE_TARGET for f in fr)
                n += len(fr)
            out.append(f"| {op} | " + " | ".join(cells) + f" | {met}/{n} |")
        out.append("")
        out.append("| op | layout | shape | launches | " + " | ".join(f"model µs {d}" for d in DTYPES)
                   + " | model % of roofline (float32) | " + " | ".join(f"measured µs {d}" for d in DTYPES) + " |")
        out.append("|---|---|---|---|" + "---|" * (2 * len(DTYPES) + 1))
        rows = {}
        for r in recs:
            rows.setdefault((r["op"], r["layout"], tuple(r["shape"])), {})[r["dtype"]] = r
        for (op, lay, shp), by in rows.items():
            f32 = by.get("float32")
            model = [_fmt(by[d]["predicted_us"]) if d in by else "" for d in DTYPES]
            meas = [_fmt(measured.get((op, lay, shp, d))) for d in DTYPES]
            roof = f"{100 * f32['roofline_us'] / f32['predicted_us']:.0f}%" if f32 else ""
            nl = len((f32 or next(iter(by.values())))["launches"])
            out.append(f"| {op} | {lay} | {'×'.join(map(str, shp))} | {nl} | " + " | ".join(model) + f" | {roof} | "
                       + " | ".join(meas) + " |")
        out.append("")
    return out + _calibration(model_runs, gpu_runs)


def _measured(path: Path) -> dict:
    data = json.loads(path.read_text())
    out = {}
    for r in data["records"]:
        if r["peer"] == "cubn" and r.get("median_ms") is not None:
            out[(r["op"], r["layout"], tuple(r["shape"]), r["dtype"])] = 1e3 * r["median_ms"]
    return out


def _calibration(model_runs, gpu_runs) -> list:
    out = ["\n## Calibration\n"]
    if not gpu_runs or not model_runs:
        out.append("No GPU run is committed yet, so the model is uncalibrated. Once `bash bench/gpu_session.sh` "
                   "has run on a GPU (it also writes `cubn model` for the same device), commit its results and "
                   "rerun `python bench/make_performance_page.py`: this section then lists, per shape, model µs "
                   "against measured µs and their ratio, and the constants adjusted from it.\n")
        return out
    measured = _measured(gpu_runs[-1])
    device = json.loads(gpu_runs[-1].read_text())["environment"].get("device", "")
    model = None
    for path in model_runs:  # the model run for the measured device, if any
        data = json.loads(path.read_text())
        if data["model"]["device"]["name"].split(" (")[0].split()[1:2] == device.split()[1:2]:
            model = data
    if model is None:
        out.append(f"The GPU run ({device}) has no model run for the same device committed beside it.\n")
        return out
    out.append(f"Model ({model['model']['device']['name']}) against `{gpu_runs[-1].parent.name}` ({device}):\n")
    out.append("| op | layout | shape | dtype | model µs | measured µs | measured / model |")
    out.append("|---|---|---|---|---|---|---|")
    ratios = []
    for r in model["records"]:
        m = measured.get((r["op"], r["layout"], tuple(r["shape"]), r["dtype"]))
        if m is None:
            continue
        ratios.append(m / r["predicted_us"])
        out.append(f"| {r['op']} | {r['layout']} | {'×'.join(map(str, r['shape']))} | {r['dtype']} | "
                   f"{r['predicted_us']:.1f} | {m:.1f} | {m / r['predicted_us']:.2f} |")
    g = _geomean(ratios)
    out.append(f"\nGeometric mean of measured / model: {g:.2f} over {len(ratios)} cases.\n" if g else "")
    return out
