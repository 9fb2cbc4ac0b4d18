"""``cubn model``: the model's records for the benchmark's ops and shapes.

Each op runs exactly the call the benchmark times (the same builder), on a
``KernelBackend`` whose launcher is a [`TracingLauncher`][cubn.model.tracing.TracingLauncher]
for the chosen device, with inputs of the full size that stay unallocated
(``numpy.zeros``) except for the sampled blocks' share. Records follow the
schema in docs/performance.md ("The model"); a ``details`` list beside them
holds, per record, each launch's time terms and the sampling's exactness.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
from pathlib import Path

from . import _adapter, access, predict, sampling, sass
from .devices import Device, get_device
from .plans import DTYPES, ModelInputs, make_inputs, plan, run_case  # noqa: F401 - re-exported
from .tracing import TracingLauncher


class Model:
    """Traces ops on one device and turns them into records."""

    def __init__(self, device: Device | str = "h100", policy: sampling.SamplePolicy = sampling.SamplePolicy(),
                 use_sass: bool = True):
        self.device = get_device(device) if isinstance(device, str) else device
        self.launcher = TracingLauncher(self.device, policy)
        self.backend = _adapter.kernel_backend(self.launcher)
        why = sass.available() if use_sass else "switched off"
        self.sass_unavailable = why

    def trace(self, op: str, layout: str, shape, dtype, one_launch: bool = True):
        """The traced launches of one call of ``op`` (traffic per launch)."""
        inputs = make_inputs(layout, shape, dtype)
        run_case(self.launcher, self.backend, op, inputs, one_launch)
        traces = list(self.launcher.traces)
        self.launcher.clear()
        return inputs, [access.analyze(t) for t in traces]

    def sass_for(self, traffic):
        if self.sass_unavailable:
            return {}
        wanted = {(_variant(t.launch), predict.streamed_tensors(t)) for t in traffic}
        return sass.stats_for(sorted(wanted, key=lambda p: (p[0].name_expression, p[1])), self.device.arch)

    def record(self, op: str, layout: str, shape, dtype: str, one_launch: bool = True):
        """``(record, details)`` for one (op, shape, dtype)."""
        inputs, traffic = self.trace(op, layout, shape, dtype, one_launch)
        stats = self.sass_for(traffic)
        l2 = predict.L2(self.device)
        launches, details = [], []
        total = 0.0
        for t in traffic:
            st = stats.get((t.launch.name_expression, predict.streamed_tensors(t)))
            if st is None:
                st = _no_sass(t)
            lt = predict.launch_time(t, st, self.device, l2)
            total += lt.total_us
            launches.append({
                "kernel": t.launch.name_expression,
                "grid": list(t.launch.grid),
                "block": list(t.launch.block),
                "read_bytes": t.read_bytes,
                "write_bytes": t.write_bytes,
                "streams": [{"array": s.array, "direction": s.direction, "bytes": s.bytes,
                             "sectors_per_request": s.sectors_per_request,
                             "ideal_sectors_per_request": s.ideal_sectors_per_request} for s in t.streams],
                "instructions_per_16B": st.instructions_per_16B if not self.sass_unavailable else None,
            })
            details.append({**lt.to_json(), "sampled_blocks": t.sampled_blocks, "roles": t.trace.roles,
                            "exact": t.exact, "max_spread": max((s.spread for s in t.streams), default=0.0),
                            "registers": st.registers, "dram_bytes_per_stream": {
                                f"{s.array}:{s.direction}": s.dram_bytes for s in t.streams},
                            "coalescing": {f"{s.array}:{s.direction}": s.efficiency for s in t.streams}})
        rec = {"op": op, "layout": layout, "shape": list(shape), "dtype": dtype, "launches": launches,
               "predicted_us": total,
               "roofline_us": predict.roofline_us(op, inputs.nbytes, self.device, _adapter.tensor_passes())}
        return rec, {"op": op, "layout": layout, "shape": list(shape), "dtype": dtype,
                     "one_launch_allowed": one_launch, "launches": details}


def _variant(launch):
    return _adapter.make_variant(launch.source, launch.kernel, launch.template_args)


def _no_sass(traffic):
    """Stand-in statistics when NVRTC or the disassembler is missing: DRAM and overhead only."""
    return sass.SassStats(traffic.launch.name_expression, "none", 0, 0, 0, 0, 0, False, 0.0, 0, 0.0, 0)


# ---------------------------------------------------------------- the command
def parse_shape(text: str):
    """``LAYOUT:D1,D2,...:DTYPE`` → (layout, shape, dtype); the dtype part is optional."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"--shape {text!r}: expected LAYOUT:D1,D2,...[:DTYPE], e.g. NHWC:32,112,112,64:float16")
    layout = parts[0].upper()
    if layout not in ("NCHW", "NHWC", "NC"):
        raise ValueError(f"--shape {text!r}: layout must be NCHW, NHWC or NC, not {parts[0]!r}")
    try:
        shape = tuple(int(d) for d in parts[1].split(","))
    except ValueError:
        raise ValueError(f"--shape {text!r}: dimensions must be integers") from None
    if any(d <= 0 for d in shape) or len(shape) < 2 or (layout == "NC") != (len(shape) == 2):
        raise ValueError(f"--shape {text!r}: NC takes 2 positive dimensions, NCHW/NHWC 3 or more")
    dtype = parts[2] if len(parts) == 3 else None
    if dtype is not None and dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise ValueError(f"--shape {text!r}: dtype must be float16, bfloat16, float32 or float64")
    return layout, shape, dtype


def cases(shapes, dtypes, ops):
    out = []
    for layout, shape, dt in shapes:
        for d in ([dt] if dt else dtypes):
            for op in ops:
                out.append((op, layout, tuple(shape), d))
    return out


def run(args) -> int:
    ops = tuple(args.ops.split(",")) if args.ops else _adapter.benchmark_ops()
    unknown = [o for o in ops if o not in _adapter.benchmark_ops()]
    if unknown:
        print(f"cubn model: unknown op(s) {', '.join(unknown)}; choose from {', '.join(_adapter.benchmark_ops())}",
              file=sys.stderr)
        return 2
    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else DTYPES
    try:
        if args.shape:
            shapes = [parse_shape(s) for s in args.shape]
        else:
            suite = _adapter.benchmark_quick() if args.quick else _adapter.benchmark_suite()
            shapes = [(lay, shp, None) for lay, shp in suite]
    except ValueError as e:
        print(f"cubn model: {e}", file=sys.stderr)
        return 2
    todo = cases(shapes, dtypes, ops)
    model = Model(args.device, sampling.SamplePolicy(extra=args.extra_samples))
    out = {"model": {"device": asdict_device(model.device), "kind": "model (no GPU measurement)",
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "one_launch_allowed": not args.three_launch,
                     "sass": model.sass_unavailable or f"counted from NVRTC's {model.device.arch} cubin"},
           "records": [], "details": []}
    path = Path(args.json)
    bar = _progress(len(todo), not args.no_progress)
    try:
        for op, layout, shape, dt in todo:
            if bar is not None:
                bar.set_description(f"{op} {layout} {'x'.join(map(str, shape))} {dt}")
            rec, det = model.record(op, layout, shape, dt, one_launch=not args.three_launch)
            out["records"].append(rec)
            out["details"].append(det)
            _write(path, out)  # progressively: a cut run keeps what it did
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    _write(path, out)
    if not args.quiet:
        print(summary_table(out["records"]))
    return 0


def asdict_device(d: Device) -> dict:
    from dataclasses import asdict

    return asdict(d)


def _write(path: Path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _progress(total, wanted):
    if not wanted or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="case", file=sys.stderr)


def summary_table(records) -> str:
    lines = [f"{'op':11s} {'layout':6s} {'shape':22s} {'dtype':8s} {'launches':>8s} {'model us':>9s} "
             f"{'roofline':>9s} {'% roof':>6s}"]
    for r in records:
        frac = r["roofline_us"] / r["predicted_us"] if r["predicted_us"] else math.nan
        lines.append(f"{r['op']:11s} {r['layout']:6s} {str(tuple(r['shape'])):22s} {r['dtype']:8s} "
                     f"{len(r['launches']):8d} {r['predicted_us']:9.1f} {r['roofline_us']:9.1f} {100 * frac:5.0f}%")
    return "\n".join(lines)
