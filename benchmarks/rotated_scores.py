"""The reindex score product alone: q . (kept keys rotated by their ranks), per form.

Under `reindex` positions (docs/design.md §8) the step rotates each kept key by its rank
inside the product with the query (`attention.rotated_scores`), so no rotated copy of the
keys is stored. This times that product for one layer's slots, Llama-2-7B shape (32 KV
heads, D=128, one query head each), bf16 keys, C=512, beside the plain product of
`absolute` positions: each form ("sum", "query") with ranks per KV head ([B,Hkv,C], the
head-wise policies) and shared by the heads ([B,1,C], the layer-wise ones). Eight layers'
slots are scanned in one compiled call; a figure is the median of --repeats calls over 8.

    PYTHONPATH=. python -m benchmarks.rotated_scores --out $OUT           # 1 x H200, ~1 min
    PYTHONPATH=. python -m benchmarks.rotated_scores --quick --out /tmp/x  # CPU, seconds

Writes <out>/rotated-scores-<date>.json and .md (microseconds per layer, with the command).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="batch 2, 4 heads, C=64: seconds on a CPU")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.heads, args.capacity, args.head_dim, args.repeats = 2, 4, 64, 16, 3

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import device_info, median_seconds, now_tag, write_json
    from msrnn_jax.fast.attention import rotated_scores
    from msrnn_jax.core.layers import rope_table

    F32 = jnp.float32
    L, B, H, C, D = 8, args.batch, args.heads, args.capacity, args.head_dim
    K = jax.random.normal(jax.random.PRNGKey(0), (L, B, H, C, D), jnp.bfloat16)
    q = jax.random.normal(jax.random.PRNGKey(1), (L, B, H, 1, D), jnp.bfloat16)
    perm = jnp.argsort(jax.random.uniform(jax.random.PRNGKey(2), (L, B, 1, C)), -1).astype(jnp.int32)
    ranks = {"shared": perm, "per-head": jnp.broadcast_to(perm, (L, B, H, C)) + 0}
    cos, sin = rope_table(C + 1, jnp.asarray(1.0 / 10000 ** (np.arange(0, D, 2) / D), F32))

    def product(form):
        if form == "plain":
            return lambda q, K, r: jnp.einsum("bhgd,bhcd->bhgc", q, K, preferred_element_type=F32)
        return lambda q, K, r: rotated_scores(q, K, cos[r], sin[r], form)

    def per_layer_us(fn, r):
        @jax.jit
        def run(q, K, r):
            return jax.lax.scan(lambda acc, xs: (acc + fn(*xs).sum(), None), jnp.zeros((), F32), (q, K, r))[0]
        return 1e6 * median_seconds(run, q, K, r, reps=args.repeats) / L

    rows = [{"product": "plain (absolute)", "ranks": "-", "us_per_layer": per_layer_us(product("plain"), ranks["shared"])}]
    for rname, r in ranks.items():
        for form in ("sum", "query"):
            rows.append({"product": form, "ranks": rname, "us_per_layer": per_layer_us(product(form), r)})
            print(rows[-1], flush=True)
    key_bytes = B * H * C * D * 2
    for row in rows:
        row["key_bytes_per_s"] = key_bytes / (row["us_per_layer"] * 1e-6)
    command = "python -m benchmarks.rotated_scores " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = now_tag()
    info = device_info()
    write_json(str(out / f"rotated-scores-{tag}.json"),
               {"command": command, "date": tag, "device": info, "batch": B, "kv_heads": H, "capacity": C,
                "head_dim": D, "key_bytes_per_layer": key_bytes, "rows": rows})
    lines = [f"# reindex score product per layer, B={B}, Hkv={H}, C={C}, D={D}, {info['device_kind']}", "",
             f"`{command}`", "", "| product | ranks | us/layer | keys read at GB/s |", "|---|---|---:|---:|"]
    lines += [f"| {r['product']} | {r['ranks']} | {r['us_per_layer']:.1f} | {r['key_bytes_per_s'] / 1e9:.0f} |"
              for r in rows]
    (out / f"rotated-scores-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
