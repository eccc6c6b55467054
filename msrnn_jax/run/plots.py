"""Figures: perplexity against capacity (the paper's Figure 3), kept-position maps, and the
notebooks' other pictures (state size, per-layer statistics, bars, histograms)."""

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


# -- figures for the notebooks ---------------------------------------------------------
# These return a matplotlib Figure built without pyplot (no global state, no backend
# switch): a notebook shows it as a cell's last expression, a script calls fig.savefig.
def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=100, layout="constrained")


def plot_state_bytes(tokens_read, curves, title=""):
    """State size against tokens read. curves: {label: bytes per point of tokens_read}."""
    fig = _figure((6.4, 3.8))
    ax = fig.subplots()
    for label, nbytes in curves.items():
        ax.plot(tokens_read, [b / 2**20 for b in nbytes], label=label)
    ax.set_xlabel("tokens read")
    ax.set_ylabel("state size (MiB)")
    ax.set_title(title or "state size against tokens read")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def plot_kept_maps(maps, ncols=None, title="", panel_size=2.2):
    """A grid of kept-position maps. maps: {panel title: bool [steps, positions]} (see
    `analysis.kept_map`); step runs down, position across, kept positions dark."""
    n = len(maps)
    ncols = ncols or min(n, 6)
    nrows = -(-n // ncols)
    fig = _figure((panel_size * ncols, panel_size * nrows + (0.4 if title else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    for ax, (name, m) in zip(axes.flat, maps.items()):
        ax.imshow(m, cmap="Greys", interpolation="nearest", aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("position", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("step", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_lines(x, series, xlabel, ylabel, title="", logy=False, marker=None):
    """Lines over a shared x. series: {label: values, one per x}."""
    fig = _figure((6.4, 3.6))
    ax = fig.subplots()
    for label, vals in series.items():
        ax.plot(x, vals, marker=marker, markersize=3, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def plot_per_layer(series, ylabel, title="", logy=False):
    """Lines over layers. series: {label: values [L]}."""
    n = len(next(iter(series.values())))
    return plot_lines(range(n), series, "layer", ylabel, title, logy, marker="o")


def plot_bars(values, ylabel, title="", annotations=None):
    """One bar per key. values: {label: number}; annotations: {label: text above the bar}."""
    fig = _figure((6.4, 3.6))
    ax = fig.subplots()
    labels = list(values)
    ax.bar(labels, [values[k] for k in labels], color="tab:blue")
    for i, k in enumerate(labels):
        if annotations and k in annotations:
            ax.annotate(annotations[k], (i, values[k]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def plot_histograms(samples, xlabel, title="", bins=40):
    """Overlaid histograms (as step lines, density). samples: {label: 1-D array}; bins: a
    count or the bin edges (e.g. `np.arange(n + 1) - 0.5` for integers 0..n-1)."""
    fig = _figure((6.4, 3.6))
    ax = fig.subplots()
    for label, x in samples.items():
        ax.hist(x, bins=bins, histtype="step", density=True, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def plot_nll_curve(results, out, title="", context=None, by_capacity=False):
    """results: dicts with policy, capacity, curve ([{"start", "end", "mean_nll"}], as
    `msrnn ppl --curve-every N --json` prints) and optionally positions: mean NLL against
    position, one line per (policy, capacity, positions), dashed for absolute; `context`
    (the trained context) becomes a vertical line. by_capacity: one panel per capacity
    (`full` drawn in each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if r.get("curve")]
    caps = sorted({r["capacity"] for r in results if r["policy"] != "full"}) if by_capacity else [None]
    caps = caps or [None]
    fig, axes = plt.subplots(1, len(caps), figsize=(8.0 * len(caps) ** 0.75, 4.8), dpi=120, squeeze=False,
                             sharey=True)
    colors = {}
    for ax, cap in zip(axes[0], caps):
        for r in results:
            if cap is not None and r["policy"] != "full" and r["capacity"] != cap:
                continue
            curve = r["curve"]
            x = [(c["start"] + c["end"]) / 2 for c in curve]
            y = [c["mean_nll"] for c in curve]
            pos = r.get("positions", "absolute")
            label = r["policy"] if r["policy"] == "full" else f"{r['policy']} C={r['capacity']} {pos}"
            key = r["policy"] if by_capacity else (r["policy"], r["capacity"] if r["policy"] != "full" else None)
            color = colors.setdefault(key, f"C{len(colors) % 10}")
            ax.plot(x, y, color="black" if r["policy"] == "full" else color,
                    linestyle="--" if pos == "absolute" and r["policy"] != "full" else "-",
                    linewidth=1.2, label=label)
        if context:
            ax.axvline(context, color="grey", linestyle=":", linewidth=1, label=f"trained context {context}")
        ax.set_xlabel("position in the text (tokens)")
        ax.set_title(f"C = {cap}" if cap is not None else (title or "NLL against position"))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("mean NLL per bucket (nats)")
    if caps != [None] and title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


POLICY_ORDER = ["window", "sink", "h2o", "h2o-head", "tova", "tova-head"]  # the paper's order


def plot_eval(results, out, title=""):
    """results: dicts with task, policy, capacity, length, depth, accuracy (as `msrnn eval
    --json` prints). A grid of accuracy heat maps over length x depth: a row per bounded
    policy, a column per capacity; the top row holds `full` and accuracy (the mean over
    lengths and depths) against capacity for each policy, `full` as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = defaultdict(dict)  # (policy, capacity) -> {(length, depth): accuracy}
    for r in results:
        key = ("full", None) if r["policy"] == "full" else (r["policy"], r["capacity"])
        cells[key][(r["length"], r["depth"])] = r["accuracy"]
    lengths = sorted({r["length"] for r in results})
    depths = sorted({r["depth"] for r in results})
    policies = sorted({p for p, c in cells if p != "full"},
                      key=lambda p: (POLICY_ORDER.index(p) if p in POLICY_ORDER else 99, p))  # others after
    caps = sorted({c for p, c in cells if p != "full"})
    ncols = max(len(caps), 2)
    fig, axes = plt.subplots(1 + len(policies), ncols, figsize=(2.3 * ncols + 1.2, 2.0 * (1 + len(policies)) + 0.6),
                             dpi=110, squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_axis_off()

    def heat(ax, key, label):
        ax.set_axis_on()
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (n, d), acc in cells[key].items():
            grid[depths.index(d), lengths.index(n)] = acc
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("length (tokens)", fontsize=7)
        ax.set_ylabel("depth", fontsize=7)
        return ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")

    image = heat(axes[0, 0], ("full", None), "full (C = length)") if ("full", None) in cells else None
    for i, pol in enumerate(policies, 1):
        for j, cap in enumerate(caps):
            if (pol, cap) in cells:
                image = heat(axes[i, j], (pol, cap), f"{pol} C={cap}")
    ax = axes[0, 1]
    ax.set_axis_on()
    lines = defaultdict(list)
    for (pol, cap), vals in cells.items():
        if pol == "full":
            ax.axhline(np.mean(list(vals.values())), color="black", linestyle="--", linewidth=1, label="full")
        else:
            lines[pol].append((cap, np.mean(list(vals.values()))))
    for pol, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([c for c, _ in pts], [a for _, a in pts], marker="o", markersize=3, label=pol)
    if caps:
        ax.set_xscale("log", base=2)
        ax.set_xticks(caps, [str(c) for c in caps], fontsize=7)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("capacity C", fontsize=7)
    ax.set_ylabel("accuracy", fontsize=7)
    ax.set_title("accuracy against capacity", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="upper left")
    if image is not None:
        fig.colorbar(image, ax=axes[1:, -1].tolist() if len(policies) else axes[0, 0], shrink=0.6,
                     label="accuracy")
    fig.suptitle(title or "long-context accuracy")
    fig.savefig(out, format="png")
    plt.close(fig)
