"""CPU perplexity throughput of the embedded SmolLM2 (fp32) beside transformers (issue 3).

Prints, and writes as JSON and Markdown:
  * tokens/s of `msrnn ppl --policy tova --capacity 256` at batch 1 and batch 8 beside
    transformers' own PyTorch incremental decoding (DynamicCache, one token per forward)
    of the same tokens, in the same run;
  * whether a bounded policy's per-token cost stays flat with the text's length: tova
    C=256 tokens/s over --long tokens vs over --short tokens, and the same for `full`.

    python -m benchmarks.cpu_ppl [TEXT] [--short 512] [--long 4096] [--out benchmarks/results]

Tokens/s count next-token predictions per second (rows x (T - 1)), steady state: ours
excludes compilation (a warm-up call on a throwaway state); transformers' excludes the
first forward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

BOOK = "data/pg_news_from_nowhere.txt"  # William Morris, News from Nowhere (Project Gutenberg)


def ours(model, policy, capacity, rows):
    from msrnn_jax.run.evaluate import run_policy

    run = run_policy(model, policy, capacity, rows)
    return {"impl": "msrnn-jax", "policy": policy, "capacity": capacity, "batch": int(rows.shape[0]),
            "tokens": int(rows.shape[1]), "mean_nll": run.mean_nll, "tokens_per_s": run.tokens_per_s,
            "compile_s": run.compile_seconds}


def transformers_dynamic_cache(hf_model, rows):
    """transformers' incremental decoding: one token per forward with a DynamicCache."""
    import torch
    from transformers import DynamicCache

    ids = torch.as_tensor(rows, dtype=torch.long)
    B, T = ids.shape
    nll = []
    with torch.no_grad():
        cache = DynamicCache(config=hf_model.config)
        out = hf_model(ids[:, :1], past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]
        t0 = time.perf_counter()
        for t in range(1, T):
            nll.append(torch.nn.functional.cross_entropy(logits.float(), ids[:, t], reduction="none"))
            out = hf_model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
        seconds = time.perf_counter() - t0
    mean_nll = float(torch.stack(nll).mean())
    return {"impl": "transformers DynamicCache", "policy": "full", "capacity": T, "batch": B, "tokens": T,
            "mean_nll": mean_nll, "tokens_per_s": B * (T - 1) / seconds}


def rerender(path):
    """Rewrite the Markdown of a results JSON (no measuring)."""
    data = json.loads(Path(path).read_text())
    Path(path).with_suffix(".md").write_text(render(data["meta"], data["results"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("text", nargs="?", default=BOOK, help=f"a long UTF-8 text (default: {BOOK})")
    ap.add_argument("--short", type=int, default=512)
    ap.add_argument("--long", type=int, default=4096)
    ap.add_argument("--peer-tokens", type=int, default=512, help="tokens per row for the batch-1/8 comparison")
    ap.add_argument("--skip-growth", action="store_true", help="only the batch 1/8 comparison")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    import torch
    import transformers

    from msrnn_jax.convert import default_model_path
    from msrnn_jax.run import api

    torch.set_num_threads(os.cpu_count() or 1)
    model = api.load_model()
    gguf = default_model_path()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = np.asarray(model.encode(Path(args.text).read_text(encoding="utf-8")), np.int32)

    results = []

    def record(r):
        results.append(r)
        print(json.dumps(r), flush=True)

    n = args.peer_tokens
    for batch in (1, 8):
        rows = ids[: n * batch].reshape(batch, n)
        record(ours(model, "tova", 256, rows))
        record(transformers_dynamic_cache(hf_model, rows))
    if not args.skip_growth:
        for policy in ("tova", "full"):
            for T in (args.short, args.long):
                record(ours(model, policy, 256 if policy == "tova" else None, ids[None, :T]))

    stamp = datetime.date.today().isoformat()
    meta = {"command": "python -m benchmarks.cpu_ppl " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": stamp, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "jax": __import__("jax").__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "model": model.source}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cpu_ppl-{stamp}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / f"cpu_ppl-{stamp}.md").write_text(render(meta, results))
    print(render(meta, results))


def render(meta, results):
    lines = [f"# CPU perplexity throughput ({meta['date']})", "",
             f"`{meta['command']}`", "",
             f"{meta['machine']}; JAX {meta['jax']}, PyTorch {meta['torch']}, transformers "
             f"{meta['transformers']}; model {meta['model']} (fp32).", "",
             "| implementation | policy | C | batch | tokens | mean NLL | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['impl']} | {r['policy']} | {r['capacity']} | {r['batch']} | {r['tokens']} | "
                     f"{r['mean_nll']:.4f} | {r['tokens_per_s']:.2f} |")
    lines.append("")
    for i, p in enumerate(results):  # each transformers row follows the run of ours it is paired with
        if p["impl"] != "msrnn-jax" and i and results[i - 1]["impl"] == "msrnn-jax":
            o = results[i - 1]
            lines.append(f"- batch {p['batch']}: tova C=256 {o['tokens_per_s']:.2f} tokens/s vs transformers "
                         f"{p['tokens_per_s']:.2f} -> {o['tokens_per_s'] / p['tokens_per_s']:.2f}x (same tokens, same run)")
    growth = results[4:] if len(results) > 4 else []
    for pol in ("tova", "full"):
        runs = sorted((r for r in growth if r["policy"] == pol), key=lambda r: r["tokens"])
        if len(runs) >= 2:
            lines.append(f"- {pol}: tokens/s over {runs[-1]['tokens']} tokens / over {runs[0]['tokens']} "
                         f"tokens = {runs[-1]['tokens_per_s'] / runs[0]['tokens_per_s']:.2f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
