"""The 8-bit state's quality table: perplexity on an int8 and an fp8 state against the
float32 state, per book, policy and capacity, from `msrnn ppl --json` runs.

    for book in pg_news_from_nowhere pg_jack_sheppard; do for d in float32 int8 fp8; do
      msrnn ppl data/$book.txt --policy full,window,sink,tova,tova-head,h2o,h2o-head \\
        --capacity 64,128,256,512 --tokens 2048 --state-dtype $d --json \\
        > benchmarks/results/quantized/$book-$d.jsonl
    done; done
    python -m benchmarks.quantized_table benchmarks/results/quantized

The long-context tasks on the same states (`--eval`: accuracy over every depth, from
`msrnn eval TASK --json` runs saved as TASK-DTYPE.jsonl):

    for task in passkey niah; do for d in float32 int8 fp8; do
      msrnn eval $task --policy full,tova,h2o,sink,window --capacity 128,256 --lengths 1024 \
        --samples 4 --state-dtype $d --json > benchmarks/results/quantized/eval/$task-$d.jsonl
    done; done
    python -m benchmarks.quantized_table --eval benchmarks/results/quantized/eval

Beside transformers' quantized KV cache on the same tokens (`benchmarks.hf_quantized`'s
BOOK.jsonl files; `full` alone, since transformers does not evict):

    python -m benchmarks.hf_quantized --out benchmarks/results/quantized/hf
    python -m benchmarks.quantized_table benchmarks/results/quantized --hf benchmarks/results/quantized/hf
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


def eval_table(folder: Path) -> str:
    """Accuracy (correct / samples over every depth) per task, policy and capacity, on
    each state dtype: TASK-DTYPE.jsonl files of `msrnn eval --json` lines."""
    acc = {}  # (task, policy, capacity) -> {dtype: [correct, samples]}
    for path in sorted(folder.glob("*.jsonl")):
        _, dtype = path.stem.rsplit("-", 1)
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                c = acc.setdefault((r["task"], r["policy"], r["capacity"]), {}).setdefault(dtype, [0, 0])
                c[0] += r["correct"]
                c[1] += r["samples"]
    dtypes = [d for d in DTYPES if any(d in v for v in acc.values())]
    out = ["| task | policy | C | " + " | ".join(dtypes) + " |", "|---|---|---|" + "---:|" * len(dtypes)]
    for (task, pol, cap), by in sorted(acc.items(), key=lambda kv: (kv[0][0], kv[0][1] != "full", kv[0][1], kv[0][2])):
        cells = [f"{by[d][0]}/{by[d][1]}" if d in by else "" for d in dtypes]
        out.append(f"| {task} | {pol} | {cap} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def hf_table(runs: dict, hf_folder: Path) -> str:
    """Each book's perplexity with every token read from the stored cache, `full` (nothing
    evicted): msrnn's float32 state and its int8 / fp8 deltas, beside transformers' float32
    `DynamicCache` and the deltas of its `QuantizedCache` backends (BOOK.jsonl of
    benchmarks.hf_quantized)."""
    out = ["| book | tokens | msrnn float32 ppl | int8 | fp8 | transformers float32 ppl | "
           + "cache: delta |", "|---|---:|---:|---:|---:|---:|---|"]
    for path in sorted(hf_folder.glob("*.jsonl"), reverse=True):
        book = path.stem
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        done = {r["cache"]: r for r in rows if "ppl" in r}
        base = done.get("float32")
        mine = {d: next((r for (p, _), r in runs.get((book, d), {}).items() if p == "full"), None) for d in DTYPES}
        if base is None or mine["float32"] is None or mine["float32"]["tokens"] != base["tokens"]:
            continue  # not the same tokens
        ours = [f"{100 * (mine[d]['ppl'] / mine['float32']['ppl'] - 1):+.2f}%" if mine[d] else "" for d in DTYPES[1:]]
        theirs = "; ".join([f"{name} {100 * (r['ppl'] / base['ppl'] - 1):+.2f}%" for name, r in done.items()
                            if name != "float32"] + [f"{r['cache']} not run ({r['skipped']})" for r in rows
                                                     if "skipped" in r])
        out.append(f"| {book} | {base['tokens']} | {mine['float32']['ppl']:.2f} | {ours[0]} | {ours[1]} | "
                   f"{base['ppl']:.2f} | {theirs} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quantized_table")
    ap.add_argument("folder", type=Path)
    ap.add_argument("--eval", action="store_true", help="the folder holds `msrnn eval --json` runs (TASK-DTYPE.jsonl)")
    ap.add_argument("--hf", type=Path, default=None,
                    help="also the table beside transformers' quantized cache (benchmarks.hf_quantized's folder)")
    args = ap.parse_args(argv)
    if args.eval:
        print(eval_table(args.folder))
    else:
        runs = load(args.folder)
        print(table(runs))
        if args.hf is not None:
            print("\n" + hf_table(runs, args.hf))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
