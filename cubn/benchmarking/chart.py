"""Charts of a benchmark run (matplotlib, headless)."""
from __future__ import annotations

from .cases import OPS


def chart(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = data["summary"]
    keys = [k for k in summ if summ[k]["speedup_vs_torch_geomean"]]
    if not keys and not any(summ[k]["roofline_geomean"] for k in summ):
        return cpu_chart(data, path)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    ax.barh(keys, [summ[k]["speedup_vs_torch_geomean"] for k in keys], color="tab:green")
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlabel("speedup over PyTorch (geometric mean over shapes)")
    ax = axes[1]
    keys2 = [k for k in summ if summ[k]["roofline_geomean"]]
    ax.barh(keys2, [100 * summ[k]["roofline_geomean"] for k in keys2], color="tab:blue")
    ax.set_xlabel("% of the copy-bandwidth roofline (geometric mean)")
    ax.set_xlim(0, 100)
    env = data["environment"]
    fig.suptitle(f"cubn {env.get('cubn')} on {env.get('device', 'CPU')} ({env.get('date', '')[:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_chart(data, path):
    """Without a GPU run: the NumPy backend's throughput per op and shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in data["records"] if r["peer"] == "numpy" and r["median_ms"]]
    if not recs:
        return
    labels = sorted({f"{r['layout']} {'x'.join(map(str, r['shape']))}" for r in recs})
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(OPS)
    for k, op in enumerate(OPS):
        vals = []
        for lab in labels:
            hit = [r for r in recs if r["op"] == op and f"{r['layout']} {'x'.join(map(str, r['shape']))}" == lab]
            vals.append(hit[0]["gbps"] if hit else 0)
        ax.bar([i + k * width for i in range(len(labels))], vals, width, label=op)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_ylabel("GB/s of tensor traffic (NumPy backend, 1 CPU thread)")
    ax.legend(ncol=3, fontsize=8)
    env = data["environment"]
    fig.suptitle(f"cubn {env.get('cubn')} NumPy backend on {env.get('machine')} ({env.get('date', '')[:10]}): no GPU in this run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
