"""Figures: perplexity against capacity (the paper's Figure 3), kept-position maps."""

from __future__ import annotations

from collections import defaultdict


def plot_ppl_vs_capacity(results, out, title=""):
    """results: dicts with policy, capacity, ppl (as `msrnn ppl --json` prints). `full`
    becomes a horizontal reference line; every other policy a line over capacities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    lines = defaultdict(list)
    full = None
    for r in results:
        if r["policy"] == "full":
            full = r["ppl"]
        else:
            lines[r["policy"]].append((r["capacity"], r["ppl"]))
    for name, pts in lines.items():
        pts.sort()
        ax.plot([c for c, _ in pts], [p for _, p in pts], marker="o", label=name)
    if full is not None:
        ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full (unbounded)")
    ax.set_xscale("log", base=2)
    caps = sorted({c for pts in lines.values() for c, _ in pts})
    if caps:
        ax.set_xticks(caps, [str(c) for c in caps])
    ax.set_xlabel("capacity C (kept tokens per layer)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "perplexity against capacity")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
