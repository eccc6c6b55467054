"""Long-stream perplexity: NLL against position past the trained context (issue 17).

For `full` up to the trained context and the bounded policies at each capacity under
`absolute` and `reindex` positions (docs/design.md §8), the mean NLL per bucket of
`--curve-every` tokens of one long text. The bounded policies of one (capacity,
positions) run fused as batch rows (`evaluate.sweep`). Each run's record is appended to
the JSONL file as soon as it ends, so an interrupted run keeps what it finished and a
rerun with the same --out skips it; the CSV and the PNG are redrawn after every run (and by
a rerun with nothing left to do).

    python -m benchmarks.long_stream [TEXT] [--tokens 32768] [--capacities 256,1024]
        [--policies window,sink,tova,h2o] [--full-tokens 8192] [--curve-every 512]
        [--out benchmarks/results/long-stream]

--quick: 600 tokens, C=32, on the embedded model (seconds), to rehearse the pipeline.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BOOK = "data/pg_jack_sheppard.txt"  # W. Harrison Ainsworth, Jack Sheppard (Project Gutenberg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", nargs="?", default=BOOK)
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--full-tokens", type=int, default=None, help="default: the trained context")
    ap.add_argument("--capacities", default="256,1024")
    ap.add_argument("--policies", default="window,sink,tova,h2o")
    ap.add_argument("--positions", default="absolute,reindex")
    ap.add_argument("--curve-every", type=int, default=512)
    ap.add_argument("--no-full", action="store_true", help="skip the full-cache run")
    ap.add_argument("--out", default="benchmarks/results/long-stream")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.full_tokens, args.capacities, args.curve_every = 600, 300, "32", 100

    import msrnn_jax as m
    from msrnn_jax.run.evaluate import sweep
    from msrnn_jax.run.plots import plot_nll_curve

    model = m.load_model(args.model)
    model_name = Path(str(model.source).split(" (")[0]).name.split(".")[0]  # e.g. SmolLM2-135M-Instruct
    ctx = model.cfg.max_position_embeddings
    ids = model.encode(Path(args.text).read_text(encoding="utf-8"))
    if len(ids) < args.tokens:
        sys.exit(f"{args.text} has {len(ids)} tokens, fewer than --tokens {args.tokens}")
    out = Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    done = [json.loads(l) for l in jsonl.read_text().splitlines()] if jsonl.exists() else []
    have = {(r["policy"], r["capacity"], r["positions"]) for r in done}
    full_n = min(args.full_tokens or ctx, args.tokens)
    policies = args.policies.split(",")

    def write_outputs():
        """The CSV and the PNG of every run in the JSONL."""
        with out.with_suffix(".csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["policy", "capacity", "positions", "tokens", "start", "end", "mean_nll"])
            for r in done:
                for c in r["curve"]:
                    w.writerow([r["policy"], r["capacity"], r["positions"], r["tokens"], c["start"], c["end"],
                                f"{c['mean_nll']:.5f}"])
        plot_nll_curve(done, str(out.with_suffix(".png")), context=ctx, by_capacity=True,
                       title=f"{Path(args.text).name}, {model_name}, NLL per {args.curve_every} tokens "
                             f"(dashed: absolute, solid: reindex)")

    def save(rec):
        done.append(rec)
        with jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        write_outputs()
        print(f"{rec['policy']:>8} C={rec['capacity']:<5} {rec['positions']:<8} mean NLL {rec['mean_nll']:.4f} "
              f"({rec['tokens_per_s']:.1f} tok/s)", flush=True)

    def record(res, positions, n):
        run = res.run
        return {"policy": m.policy_name(res.policy), "capacity": res.capacity, "positions": positions,
                "tokens": n, "mean_nll": run.mean_nll, "ppl": run.ppl, "tokens_per_s": run.tokens_per_s,
                "shared_with": res.shared_with, "model": model.source, "text": Path(args.text).name,
                "trained_context": ctx, "curve": run.curve(args.curve_every),
                "command": "python -m benchmarks.long_stream " + " ".join(argv or sys.argv[1:])}

    t0 = time.time()
    seen = [0]

    def progress(n):  # one line per compiled call (256 steps), to follow a long run
        seen[0] += n
        print(f"  {seen[0]} token-rows, {time.time() - t0:.0f} s", flush=True)

    for cap in [int(c) for c in args.capacities.split(",")]:
        for positions in args.positions.split(","):
            todo = [p for p in policies if (p, cap, positions) not in have]
            if not todo:
                continue
            for res in sweep(model, todo, [cap], [ids[:args.tokens]], positions=positions, progress=progress):
                save(record(res, positions, args.tokens))
    if not args.no_full and ("full", full_n, "absolute") not in have:
        for res in sweep(model, ["full"], [], [ids[:full_n]], progress=progress):
            save(record(res, "absolute", full_n))
    if done:
        write_outputs()  # also when every run was already done: a rerun redraws them
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
