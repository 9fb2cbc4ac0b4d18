"""Run the CPU benchmark (cubn's NumPy backend beside PyTorch and naive NumPy) and write a report folder.

    python bench/run_cpu_peers.py --out bench/results/DATE-cpu-numpy-peers [--quick] [--dtypes float32]

Writes results.json, table.txt and README.md (the machine, its load, the
targets met); see cubn/cpu_benchmarks.py for what each column is.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cubn import cpu_benchmarks as C  # noqa: E402
from cubn.benchmarking import QUICK, SUITE  # noqa: E402


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
    # smallest shapes first; results are written after every shape
    shapes = sorted(shapes, key=lambda ls: math.prod(ls[1]))
    env, records = C.run(shapes, tuple(a.dtypes.split(",")), tuple(a.ops.split(",")), budget_s=a.budget,
                         log=lambda s: print(s, flush=True), each=lambda e, r: C.write(a.out, e, r, a.notes))
    C.write(a.out, env, records, a.notes)
    print(C.table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
