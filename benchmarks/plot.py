"""Plot benchmark rows (JSON lines from `fastvlm bench --out`): one panel per mode, speed-up over eager per shape.

    python benchmarks/plot.py benchmarks/results/H100.jsonl -o benchmarks/results/H100.png
"""
import argparse
import json
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(args.results) if line.strip()]
    latest = {}
    for r in rows:  # keep the newest row per (shape, mode, provider)
        latest[(r["shape"], r["mode"], r["provider"])] = r
    modes = sorted({k[1] for k in latest})
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        by_prov = defaultdict(dict)
        for (shape, m, prov), r in latest.items():
            if m == mode:
                by_prov[prov][shape] = r["speedup_vs_eager"]
        shapes = sorted({s for d in by_prov.values() for s in d})
        width = 0.8 / max(1, len(by_prov))
        for i, (prov, d) in enumerate(sorted(by_prov.items())):
            ax.bar([j + i * width for j in range(len(shapes))], [d.get(s, 0) for s in shapes], width, label=prov)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=30, ha="right")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(f"{mode}: speed-up over transformers eager ({rows[-1]['device']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = args.output or args.results.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
