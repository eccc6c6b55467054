"""Compile one decode configuration and keep XLA's optimised HLO and buffer assignment
(for finding what a compiled step allocates). Run on the GPU machine:

    XLA_FLAGS=--xla_dump_to=/tmp/xdump PYTHONPATH=. python -m benchmarks.dump_step \
        --model llama2-7b --policy tova --capacity 512 --batch 32 --variant split:einsum --out OUT
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil

from msrnn_jax.core.policies import make_policy
from msrnn_jax.config import preset
from msrnn_jax.testing import device_params, parse_variant

from .jax_bench import DTYPE, _use_variant, compile_decode, parse_compiler_options


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--variant", default="split:einsum")
    ap.add_argument("--dump", default="/tmp/xdump", help="the --xla_dump_to folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = preset(args.model)
    _, impl = parse_variant(args.variant)
    params = _use_variant(args.variant, device_params(cfg, DTYPE))
    compiled, rec = compile_decode(params, cfg, make_policy(args.policy), args.batch, args.capacity, 16, impl,
                                   parse_compiler_options(args.compiler_option))
    os.makedirs(args.out, exist_ok=True)
    tag = f"{args.model}-{args.policy}-C{args.capacity}-B{args.batch}-{args.variant.replace(':', '-')}"
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump(rec, f, indent=1)
    for pat, name in (("*greedy_decode*after_optimizations.txt", "hlo"),
                      ("*greedy_decode*after_optimizations-buffer-assignment.txt", "buffer-assignment")):
        for p in glob.glob(os.path.join(args.dump, pat)):
            with open(p, "rb") as src, gzip.open(os.path.join(args.out, f"{tag}-{name}.txt.gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
    shutil.rmtree(args.dump, ignore_errors=True)
    print(tag, {k: v for k, v in rec.items() if k.endswith("bytes")})


if __name__ == "__main__":
    main()
