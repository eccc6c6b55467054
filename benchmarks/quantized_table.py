"""The 8-bit state's quality table: perplexity on an int8 and an fp8 state against the
float32 state, per book, policy and capacity, from `msrnn ppl --json` runs.

    for book in pg_news_from_nowhere pg_jack_sheppard; do for d in float32 int8 fp8; do
      msrnn ppl data/$book.txt --policy full,window,sink,tova,tova-head,h2o,h2o-head \\
        --capacity 64,128,256,512 --tokens 2048 --state-dtype $d --json \\
        > benchmarks/results/quantized/$book-$d.jsonl
    done; done
    python -m benchmarks.quantized_table benchmarks/results/quantized
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DTYPES = ("float32", "int8", "fp8")


def load(folder: Path) -> dict:
    """{(book, dtype): {(policy, capacity): record}} from BOOK-DTYPE.jsonl files."""
    runs = {}
    for path in sorted(folder.glob("*.jsonl")):
        book, dtype = path.stem.rsplit("-", 1)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs[(book, dtype)] = {(r["policy"], r["capacity"]): r for r in rows}
    return runs


def table(runs: dict) -> str:
    books = sorted({b for b, _ in runs}, reverse=True)  # the book with every capacity first
    head = "| policy | C | " + " | ".join(
        f"{b} float32 ppl | int8 | fp8" for b in books) + " |"
    out = [head, "|---|---|" + "---:|---:|---:|" * len(books)]
    keys = list(dict.fromkeys(k for b in books for k in runs[(b, "float32")]))
    keys.sort(key=lambda k: (k[0] != "full", k[1] if k[0] != "full" else 0))
    for key in keys:
        cells = []
        for b in books:
            base = runs[(b, "float32")].get(key)
            cells.append("" if base is None else f"{base['ppl']:.2f}")
            for d in DTYPES[1:]:
                r = runs.get((b, d), {}).get(key)
                cells.append("" if r is None or base is None else f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%")
        out.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    sizes = [(d, runs[(b, d)].get(("tova", 256))) for b in books[-1:] for d in DTYPES if (b, d) in runs]
    out += ["", "State bytes of one row at C=256: "
            + ", ".join(f"{d} {r['state_bytes']:,}" for d, r in sizes if r is not None) + "."]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quantized_table")
    ap.add_argument("folder", type=Path)
    print(table(load(ap.parse_args(argv).folder)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
