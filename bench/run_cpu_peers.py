"""Run the CPU benchmark (cubn's NumPy backend beside PyTorch and naive NumPy) and write a report folder.

    python bench/run_cpu_peers.py --out bench/results/DATE-cpu-numpy-peers [--quick] [--dtypes float32]

Writes results.json, table.txt and README.md (the machine, its load, the
targets met); see cubn/cpu_benchmarks.py for what each column is.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cubn import cpu_benchmarks as C  # noqa: E402
from cubn.benchmarking import QUICK, SUITE  # noqa: E402


def readme(env, data, notes):
    s = data["summary"]
    lines = [
        "# CPU benchmark: cubn's NumPy backend beside PyTorch and naive NumPy",
        "",
        f"- Date: {env['date']}; cubn {env['cubn']}, NumPy {env['numpy']}, PyTorch {env.get('torch')}, "
        f"Python {env['python']}.",
        f"- Machine: {env.get('processor')} ({env['machine']}), {env['cpus_available']} CPUs available to the process "
        f"(of {env['cpu_count']}); 'Nt' columns ran on {env['cpus_available']} threads.",
        f"- Load average at start {tuple(round(v, 1) for v in env.get('loadavg_start', ()))}, "
        f"at end {tuple(round(v, 1) for v in env.get('loadavg_end', ()))}.",
        f"- Copy bandwidth (np.copyto, 256 MiB, read + write): {env['copy_gbps_start']:.1f} GB/s at the start, "
        f"{env['copy_gbps_end']:.1f} GB/s at the end; each case's roofline uses the copy timed in its own rounds.",
        "",
        notes.strip(),
        "",
        "Columns: times (median of interleaved rounds) per peer; `1t/torch`, `Nt/torch`: cubn's time over",
        "PyTorch's on 1 and on N threads; `1t/numpy`, `Nt/numpy`: over the naive NumPy formula; `Nt copy%`:",
        "cubn-Nt's tensor traffic (moments 1, inference 2, training 3, +1 with a residual, backward 5 tensor",
        "passes) per second, over the copy bandwidth; `mem`: cubn-Nt's peak allocation beyond its outputs, as a",
        "fraction of the input (tracemalloc).",
        "",
        "## Targets per op and dtype (cases meeting them / cases)",
        "",
        "| op/dtype | <= torch 1t | <= torch Nt | <= numpy | >= 50% copy | worst ratio to torch | worst to numpy | lowest copy fraction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, v in s.items():
        f = lambda x, pct=False: "-" if x is None else (f"{100 * x:.0f}%" if pct else f"{x:.2f}")  # noqa: E731
        lines.append(f"| {k} | {v['torch_1t_met']}/{v['cases']} | {v['torch_Nt_met']}/{v['cases']} | "
                     f"{v['numpy_met']}/{v['cases']} | {v['copy50_met']}/{v['cases']} | {f(v['worst_vs_torch'])} | "
                     f"{f(v['worst_vs_numpy'])} | {f(v['lowest_copy_fraction'], True)} |")
    lines += ["", "## Table", "", "```", (Path(data["folder"]) / "table.txt").read_text().rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="the suite's quick shapes only")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--ops", default=",".join(C.OPS))
    p.add_argument("--budget", type=float, default=2.0, help="seconds of rounds per case (at least 5 rounds)")
    p.add_argument("--notes", default="", help="what else to say about the run (e.g. the machine's other load)")
    a = p.parse_args(argv)
    shapes = QUICK if a.quick else SUITE
    env, records = C.run(shapes, tuple(a.dtypes.split(",")), tuple(a.ops.split(",")), budget_s=a.budget,
                         log=lambda s: print(s, flush=True))
    data = C.write(a.out, env, records)
    data["folder"] = a.out
    (Path(a.out) / "README.md").write_text(readme(env, data, a.notes))
    print(C.table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
