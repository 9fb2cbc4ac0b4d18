"""``cubn bench``: run the suite with a progress bar, write the results folder, print the table."""
from __future__ import annotations

import json

from .cases import OPS, QUICK, SUITE
from .peers import PEERS
from .report import table, write_results
from .suite import run_suite


def main(args) -> int:
    try:
        from tqdm import tqdm
    except ImportError as e:
        raise SystemExit("cubn bench needs tqdm for its progress bar: pip install 'cubn[bench]'") from e

    shapes = getattr(args, "shapes", None) or (QUICK if args.quick else SUITE)
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    ops = tuple(args.ops.split(",")) if args.ops else OPS
    peers = tuple(args.peers.split(",")) if getattr(args, "peers", None) else tuple(PEERS)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise SystemExit(f"cubn bench --peers: unknown {', '.join(unknown)} (known: {', '.join(PEERS)})")
    # disable=None: no bar when stderr is not a terminal (a log file, a pipe)
    with tqdm(total=len(shapes) * len(dtypes) * len(ops) * len(peers), desc="bench", unit="case", disable=None) as bar:
        env, bw, records = run_suite(shapes, dtypes, ops, peers, progress=bar.update, reps=args.repeat)
    data = write_results(args.out, env, records)
    print(table(records))
    if bw:
        print(f"\ndevice-to-device copy: {bw:.0f} GB/s (read + write) on {env.get('device')}")
    print(json.dumps(data["summary"], indent=1))
    print(f"results in {args.out}/ (results.json, table.txt, chart.png)")
    return 0
