"""Generation without end (issue 17): tokens/s, host memory and recompilation of a long
`generate` run, at milestones of new tokens.

    python -m benchmarks.long_generate [--max-new-tokens 20000] [--policy tova] [--capacity 256]
        [--positions reindex] [--milestones 1000,10000,20000] [--out benchmarks/results]

is `msrnn generate --max-new-tokens 20000 --policy tova --capacity 256 --positions reindex`
on the embedded SmolLM2 (greedy), with, at each milestone: the decode rate over the
tokens since the previous milestone, the process's current and peak resident memory,
the device memory in use where the backend reports it, and the number of compiled
`decode_rows` programs (it must not grow after the first chunk). At the end: whether the
last logits are finite. EOS does not end the run. --quick: 300 tokens, milestones 100,200,300.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--max-new-tokens", type=int, default=20000)
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--capacity", type=int, default=256)
    ap.add_argument("--positions", default="reindex")
    ap.add_argument("--milestones", default="1000,10000,20000")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.max_new_tokens, args.milestones = 300, "100,200,300"

    import jax
    import numpy as np

    import msrnn_jax as m
    from msrnn_jax.run import decoding
    from msrnn_jax.run.spec import RunSpec

    model = m.load_model(args.model)
    marks = [int(x) for x in args.milestones.split(",")]
    rows, n, t_last, n_last = [], [0], [None], [0]

    def device_mib():
        stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
        return stats["bytes_in_use"] / 2**20 if stats else None

    def on_tokens(toks, emitted):
        now = time.perf_counter()
        if t_last[0] is None:
            t_last[0] = now
        n[0] += int(emitted.sum())
        while marks and n[0] >= marks[0]:
            mark = marks.pop(0)
            dt = now - t_last[0]
            rows.append({"new_tokens": mark, "tokens_per_s_since_last": (n[0] - n_last[0]) / dt if dt > 0 else None,
                         "rss_mib": rss_mib(), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                         "device_mib": device_mib(), "compiled_decode_programs": decoding.decode_rows._cache_size()})
            print(json.dumps(rows[-1]), flush=True)
            t_last[0], n_last[0] = now, n[0]

    t0 = time.perf_counter()
    # EOS does not stop the run (eos_ids=()): every run reaches --max-new-tokens
    policy = m.make_policy(args.policy)
    spec = RunSpec(policy, args.capacity, positions=args.positions)
    res = decoding.generate_tokens(model.params, model.cfg, spec, [model.encode(args.prompt)],
                                   args.max_new_tokens, eos_ids=(), on_tokens=on_tokens)
    summary = {"command": "python -m benchmarks.long_generate " + " ".join(argv or sys.argv[1:]),
               "policy": args.policy, "capacity": args.capacity, "positions": args.positions,
               "new_tokens": sum(len(t) for t in res.tokens), "seconds": time.perf_counter() - t0,
               "decode_tokens_per_s": res.decode_tokens_per_s,
               "last_logits_finite": bool(np.isfinite(np.asarray(m.step(
                   model.params, model.cfg, policy, res.state, np.asarray([res.tokens[0][-1]]),
                   positions=args.positions)[0])).all()),
               "state_mib": res.state.nbytes() / 2**20, "milestones": rows,
               "backend": jax.default_backend()}
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"long-generate-{args.policy}-C{args.capacity}-{args.positions}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
