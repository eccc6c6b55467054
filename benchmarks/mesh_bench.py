"""The sharded code path at a mesh of one device against the plain one: the same greedy
decode (`testing.greedy_decode`) of one batch, with params and state placed on a
`data=1,model=1` mesh and traced under it (`sharding.use`), and without, in both per-layer
layouts: split (q, k, v, gate, up apart: what a mesh with a model axis over 1 needs) and
fused (q|k|v and gate|up joined: what `load_model` gives on one accelerator, with or
without a mesh whose model axis is 1).

    python -m benchmarks.mesh_bench --out OUT.json                 # Llama-2-7B shape, tova C=512, B=1
    python -m benchmarks.mesh_bench --model tiny --out /tmp/m.json # CPU, seconds

Prints and writes {plain_ms, mesh_ms, fused_ms, mesh_fused_ms, ratio, ratio_fused} per step
(and same_tokens: whether each layout decodes the same tokens with the mesh as without,
and the two layouts alike) (median of --reps calls of --steps steps).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from msrnn_jax.config import preset
from msrnn_jax.fast import sharding
from msrnn_jax import testing
from msrnn_jax.fast.layouts import fuse_projections, split_layers
from msrnn_jax.core.policies import make_policy

from .common import device_info, median_seconds, write_json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    cfg = preset(args.model)
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    policy = make_policy(args.policy)
    host = jax.tree.map(np.asarray, split_layers(jax.device_get(testing.device_params(cfg, dtype))))
    tok = jnp.zeros((args.batch,), jnp.int32)
    fill = min(args.capacity, 64)
    out = {"command": "python -m benchmarks.mesh_bench " + " ".join(argv or []), "device": device_info(),
           "model": args.model, "policy": args.policy, "capacity": args.capacity, "batch": args.batch,
           "steps": args.steps}
    fused = jax.tree.map(np.asarray, fuse_projections(host))  # what load_model gives at model=1
    one = sharding.make_mesh("data=1,model=1")
    tokens = {}
    for label, mesh, prm in (("plain", None, host), ("mesh", one, host),
                             ("fused", None, fused), ("mesh_fused", one, fused)):
        params = jax.device_put(prm) if mesh is None else sharding.shard_params(prm, mesh)
        state = testing.fabricate_state(cfg, args.batch, args.capacity, fill, dtype)
        if mesh is not None:
            state = sharding.place_state(state, mesh)
        box = [state]

        def call():
            with sharding.use(mesh):
                toks, box[0] = testing.greedy_decode(params, cfg, policy, args.steps, box[0], tok)
            return toks

        out[f"{label}_ms"] = 1e3 * median_seconds(call, reps=args.reps) / args.steps
        tokens[label] = np.asarray(call()).tolist()
        del params, box
    out["ratio"] = out["mesh_ms"] / out["plain_ms"]  # split weights, with and without the mesh
    out["ratio_fused"] = out["mesh_fused_ms"] / out["fused_ms"]  # the default layout, with and without
    # the mesh changes nothing for a layout: the same greedy tokens (the layouts themselves
    # may differ in the last bit of a bf16 product, and so in a random model's near ties)
    out["same_tokens"] = {"mesh": tokens["mesh"] == tokens["plain"], "mesh_fused": tokens["mesh_fused"] == tokens["fused"],
                          "fused": tokens["fused"] == tokens["plain"]}
    write_json(args.out, out)
    print({k: out[k] for k in ("plain_ms", "mesh_ms", "fused_ms", "mesh_fused_ms", "ratio", "ratio_fused",
                                   "same_tokens")})


if __name__ == "__main__":
    main()
