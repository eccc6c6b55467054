"""The README's long-context tables, and the CSV and plot of an `msrnn eval --json` run,
from its JSON lines (also for a run stopped before its end, whose CSV and plot `msrnn
eval` never wrote).

    python -m benchmarks.eval_report benchmarks/results/eval/eval-passkey.jsonl [--csv F] [--plot F]

Prints one markdown table per length: a row per policy, a column per capacity, each cell
the depths at which the answer was right (✓ all, · none).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

from msrnn_jax.run.longcontext import CSV_KEYS
from msrnn_jax.run.plots import POLICY_ORDER

ORDER = ["full", *POLICY_ORDER]


def cell(recs, depths) -> str:
    """The depths whose answers were right (with the fraction, when several samples)."""
    recs = sorted(recs, key=lambda r: r["depth"])
    if len(recs) == len(depths) and all(r["accuracy"] == 1.0 for r in recs):
        return "✓ all"
    hits = [f"{r['depth']:g}" + ("" if r["accuracy"] == 1.0 else f" ({r['accuracy']:.2f})")
            for r in recs if r["accuracy"] > 0]
    return ", ".join(hits) or "· none"


def tables(records) -> str:
    out = []
    for task in sorted({r["task"] for r in records}):
        mine = [r for r in records if r["task"] == task]
        depths = sorted({r["depth"] for r in mine})
        for n in sorted({r["length"] for r in mine}):
            at = [r for r in mine if r["length"] == n]
            caps = sorted({r["capacity"] for r in at if r["policy"] != "full"})
            out += [f"**{task}, {n} tokens** (cells: the depths {', '.join(f'{d:g}' for d in depths)} "
                    f"where the answer was right; ✓ all, · none)", "",
                    "| policy | " + " | ".join(f"C={c}" for c in caps) + " |",
                    "|---|" + "---|" * len(caps)]
            groups = defaultdict(list)
            for r in at:
                groups[(r["policy"], None if r["policy"] == "full" else r["capacity"])].append(r)
            for pol in sorted({r["policy"] for r in at}, key=lambda p: ORDER.index(p) if p in ORDER else 99):
                if pol == "full":
                    c = cell(groups[("full", None)], depths)
                    out.append("| full (C = length) | " + " | ".join([c] * len(caps)) + " |")
                else:
                    out.append(f"| {pol} | " + " | ".join(cell(groups[(pol, c)], depths) if groups.get((pol, c))
                                                            else "–" for c in caps) + " |")
            out.append("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("--csv")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    records = [json.loads(line) for f in args.jsonl for line in Path(f).read_text().splitlines() if line.strip()]
    if not records:
        sys.exit("no records")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_KEYS, extrasaction="ignore")
            w.writeheader()
            w.writerows(records)
    if args.plot:
        from msrnn_jax.run.plots import plot_eval  # matplotlib only when asked
        tasks = sorted({r["task"] for r in records})
        plot_eval(records, args.plot, title=f"{', '.join(tasks)}, {Path(records[0]['model'].split(' (')[0]).name}")
    print(tables(records))


if __name__ == "__main__":
    main()
