"""Decode step time of `reindex` positions against `absolute` (issue 17, docs/design.md §8).

Llama-2-7B shape, random bf16 weights made on the device (`testing.device_params`, split
layers: the fast GPU layout), a fabricated full state (`testing.fabricate_state`) at
position 4096, tova at capacity C. For each batch and step implementation, both modes
run `testing.greedy_decode` (n steps in one compiled scan, the state donated); the step
time is the median of --repeats timed calls after a warm-up. The target: reindex at most
1.15x absolute at batch 1 and at the largest batch.

    PYTHONPATH=. python -m benchmarks.positions_bench --out $OUT            # 1 x H200, ~3-5 min
    PYTHONPATH=. python -m benchmarks.positions_bench --impls einsum,reduce,pallas --batches 1,128,256 --out $OUT
    PYTHONPATH=. python -m benchmarks.positions_bench --quick --out /tmp/x  # tiny model, CPU, seconds

Writes <out>/positions-<date>.json (every figure, the command, versions, device) and
<out>/positions-<date>.md (the table, the target met or missed), rewritten after every
configuration, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--batches", default="1,128",
                    help="batch 1 and a large batch (128 rows of C=512 hold a 34 GiB state)")
    ap.add_argument("--impls", default="einsum,einsum/copy",
                    help="StepImpl attention variants, each optionally /copy or /fused: how reindex "
                         "scores rotate the keys (the default off the CPU: fused, inside the product; "
                         "copy: a rotated copy of each layer's keys, then the product)")
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--position", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="tiny model, C=64, batches 1,8")
    ap.add_argument("--profile", action="store_true",
                    help="also trace one timed call of each row with the JAX profiler and keep its "
                         "kernels by total time (the row's 'profile' in the JSON)")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.capacity, args.batches, args.steps, args.repeats = "tiny", 64, "1,8", 8, 3

    import jax
    import jax.numpy as jnp

    from benchmarks.common import now_tag
    from benchmarks.jax_bench import profile_call
    from msrnn_jax.fast.attention import StepImpl
    from msrnn_jax.fast.layouts import split_layers
    from msrnn_jax.core.policies import make_policy
    from msrnn_jax.config import preset
    from msrnn_jax.testing import device_params, fabricate_state, greedy_decode

    cfg = preset(args.model)
    params = device_params(cfg, jnp.bfloat16)
    if jax.default_backend() != "cpu":
        params = split_layers(params)  # unrolled layers, weights read in place (attention.py)
    pol = make_policy(args.policy)
    C = args.capacity
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = now_tag()
    rows = []
    meta = {"command": "python -m benchmarks.positions_bench " + " ".join(argv or sys.argv[1:]),
            "date": tag, "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "jax": jax.__version__, "model": args.model, "capacity": C, "policy": args.policy,
            "position": args.position, "steps_per_call": args.steps, "repeats": args.repeats}

    def write():
        (out / f"positions-{tag}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        lines = [f"# reindex vs absolute decode step, {args.model}, {args.policy} C={C}, {meta['device']}", "",
                 f"`{meta['command']}`", "",
                 "| batch | attention | absolute ms/step | reindex ms/step | ratio | target <= 1.15x |",
                 "|---:|---|---:|---:|---:|---|"]
        by = {}
        for r in (r for r in rows if "ms_per_step" in r):
            by.setdefault((r["batch"], r["attention"]), {})[r["positions"]] = r
        for (b, a), d in by.items():
            if "absolute" not in d and "/" in a:  # reindex_scores variants share the plain absolute
                d = {**by.get((b, a.split("/")[0]), {}), **d}
            if "absolute" in d and "reindex" in d:
                ratio = d["reindex"]["ms_per_step"] / d["absolute"]["ms_per_step"]
                lines.append(f"| {b} | {a} | {d['absolute']['ms_per_step']:.3f} | {d['reindex']['ms_per_step']:.3f} "
                             f"| {ratio:.3f}x | {'met' if ratio <= 1.15 else 'missed'} |")
            else:
                for pm, r in d.items():
                    lines.append(f"| {b} | {a} | {r['ms_per_step']:.3f} ({pm} only) | | | |")
        lines += [f"\nfailed: B={r['batch']} {r['attention']} {r['positions']}: {r['error']}"
                  for r in rows if "error" in r]
        (out / f"positions-{tag}.md").write_text("\n".join(lines) + "\n")

    for batch in [int(b) for b in args.batches.split(",")]:
        for attention in args.impls.split(","):
            att, _, scores = attention.partition("/")  # e.g. einsum/copy: reindex from a rotated copy
            impl = StepImpl(layer_loop="unroll" if jax.default_backend() != "cpu" else "scan",
                            attention=att, reindex_scores=scores or "auto")
            for positions in ("absolute", "reindex"):
                if scores and positions == "absolute":
                    continue  # reindex_scores changes nothing under absolute
                try:
                    state = fabricate_state(cfg, batch, C, args.position)
                    tok = jnp.zeros((batch,), jnp.int32)
                    t0 = time.perf_counter()
                    toks, state = greedy_decode(params, cfg, pol, args.steps, state, tok, impl, positions)
                    toks.block_until_ready()
                    compile_s = time.perf_counter() - t0
                    times = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        toks, state = greedy_decode(params, cfg, pol, args.steps, state, toks[:, -1], impl,
                                                    positions)
                        toks.block_until_ready()
                        times.append((time.perf_counter() - t0) / args.steps)
                    ms = 1000 * statistics.median(times)
                    rows.append({"batch": batch, "attention": attention, "positions": positions,
                                 "ms_per_step": ms, "tokens_per_s": batch * 1000 / ms,
                                 "compile_and_first_call_s": compile_s, "ms_all": [1000 * t for t in times]})
                    if args.profile:
                        holder = {"toks": toks, "state": state}

                        def go():
                            t, s = greedy_decode(params, cfg, pol, args.steps, holder["state"],
                                                 holder["toks"][:, -1], impl, positions)
                            t.block_until_ready()
                            holder.update(toks=t, state=s)

                        with tempfile.TemporaryDirectory() as d:
                            rows[-1]["profile"] = profile_call(go, d)
                        toks, state = holder["toks"], holder["state"]
                        del holder
                    print(f"B={batch:<4} {attention:<7} {positions:<8} {ms:8.3f} ms/step "
                          f"(compile+first {compile_s:.1f} s)", flush=True)
                    del state, toks
                except Exception as e:  # noqa: BLE001  e.g. out of memory at a batch: say so, go on
                    rows.append({"batch": batch, "attention": attention, "positions": positions,
                                 "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                    print(f"B={batch} {attention} {positions}: {rows[-1]['error']}", flush=True)
                write()
    print((out / f"positions-{tag}.md").read_text())


if __name__ == "__main__":
    main()
