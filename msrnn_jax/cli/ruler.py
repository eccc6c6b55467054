"""`msrnn eval ruler`: RULER under every policy, in kvpress's result format (run/ruler.py).

Its flags are added to the `eval` parser by `add_ruler_args`; `commands.eval` hands a
`ruler` task to `eval_ruler` and refuses the ruler-only flags on the other tasks."""

from __future__ import annotations

import argparse
import sys

from ..errors import InvalidArgument

MODES = ("exact", "once")


class DefaultLengths(list):
    """--lengths when not given: 1024 for passkey and niah; ruler takes 4096 instead."""


def _float_list(name):
    def parse(s):
        try:
            return [float(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a comma list of numbers, got {s!r}") from None
    return parse


def add_ruler_args(e) -> None:
    """The flags of `msrnn eval ruler` (the ones it shares with passkey and niah are the
    eval parser's own)."""
    g = e.add_argument_group("ruler (msrnn eval ruler)")
    g.add_argument("--ratio", type=_float_list("--ratio"),
                   help="comma list of compression ratios in [0, 1): the fraction of the context removed, "
                        "as kvpress states it (capacity = floor((1 - R) x context tokens))")
    g.add_argument("--mode", default="once", choices=MODES,
                   help="exact: per-step eviction over prompt and answer (the paper); once: the context "
                        "read in full and compressed once, then the rest appended (kvpress's presses)")
    g.add_argument("--tasks", help="comma list of RULER tasks (default: every task that runs offline)")
    g.add_argument("--query-aware", action="store_true",
                   help="the question is part of the compressed context (kvpress's query_aware)")
    g.add_argument("--squad", help="a local SQuAD JSON file: runs qa_1 (skipped without it)")
    g.add_argument("--hotpotqa", help="a local HotpotQA JSON file: runs qa_2 (skipped without it)")
    g.add_argument("--out", default="ruler-results",
                   help="the folder of the kvpress-format result directories, summary and plots")


RULER_ONLY = ("ratio", "tasks", "squad", "hotpotqa")
NOT_FOR_RULER = {"prefill": "exact", "chunk": None, "batch": None, "chat": False, "json": False, "csv": None,
                 "plot": None, "positions": "absolute", "depths": "0,0.25,0.5,0.75,1",
                 "state_dtype": None}  # ruler's states are kept in --dtype (an 8-bit state: not wired in yet)


def reject_ruler_flags(args) -> None:
    """passkey and niah: the ruler-only flags are usage errors."""
    given = [f for f in RULER_ONLY if getattr(args, f, None) is not None]
    given += [f for f, on in (("query_aware", args.query_aware), ("mode", args.mode != "once"),
                              ("out", args.out != "ruler-results")) if on]
    if given:
        raise InvalidArgument(f"--{given[0].replace('_', '-')} applies to msrnn eval ruler only")


def eval_ruler(args) -> int:
    from ..run import api
    from ..run import ruler as R
    from ..serve.server import served_name

    for flag, default in NOT_FOR_RULER.items():
        if getattr(args, flag, default) != default:
            why = " (RULER's prompts use the model's chat template when it has one, as kvpress does)" \
                if flag == "chat" else ""
            raise InvalidArgument(f"--{flag.replace('_', '-')} does not apply to msrnn eval ruler{why}")
    lengths = [4096] if isinstance(args.lengths, DefaultLengths) else args.lengths
    # every value that does not need the model, checked before it loads
    R.check_ruler(args.policy, args.ratio or [], args.capacity or [], lengths, args.samples, args.tasks,
                  args.mode, args.seed, args.sinks, args.squad, args.hotpotqa, args.query_aware)
    out = R.check_out(args.out)
    if args.haystack is not None:
        from ..run.ruler_tasks import read_haystack

        read_haystack(args.haystack)
    model = api.load_model(args.model, args.dtype, precision=args.precision,
                           notify=lambda msg: print(f"msrnn: {msg}", file=sys.stderr, flush=True))

    from tqdm.auto import tqdm

    def log(line):
        tqdm.write(f"msrnn: {line}", file=sys.stderr)

    with tqdm(total=0, unit="sample", disable=None, file=sys.stderr, leave=False, desc="eval ruler") as bar:
        dirs = R.run_ruler(model, args.policy, args.ratio or [], args.capacity or [], lengths, args.samples,
                           args.tasks, args.mode, args.query_aware, args.haystack, args.seed, out, args.squad,
                           args.hotpotqa, args.sinks, served_name(args.model, args.model), bar=bar, log=log,
                           fuse=not args.no_fuse)
    R.write_summary(out)
    mine = {d.name for d in dirs}
    print(R.summary_table([r for r in R.read_results(out) if r["dir"] in mine]))
    print(f"msrnn: {len(dirs)} result directories, summary.csv, summary.md and plots in {out}", file=sys.stderr)
    return 0
