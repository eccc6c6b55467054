"""The bodies of the `msrnn` subcommands (argument parsing lives in `cli/__init__.py`)."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import signal
import sys
import threading
from pathlib import Path

from ..core.policies import make_policies, make_policy, policy_name
from ..errors import InvalidArgument, MsrnnError, check_float, check_int
from ..fast.attention import StepImpl
from ..io.files import check_output_file, write_atomic
from ..run import api
from ..run.decoding import check_context
from ..run.evaluate import PPL_PREFILL_MODES, run_grid
from ..run.sampling import Sampling
from ..run.spec import RunSpec, grid


# -- shared ---------------------------------------------------------------------------
def _policy(args):
    check_int("sinks", args.sinks, minimum=0)
    return make_policy(args.policy, args.sinks)  # raises on an unknown name


def _policies(args):
    """--policy as a comma list (at least one), with --sinks checked as for one."""
    check_int("sinks", args.sinks, minimum=0)
    return make_policies(args.policy, args.sinks)


def _note_full_capacity():
    print("msrnn: note: the full policy keeps every token and ignores --capacity", file=sys.stderr)


def _spec(args, capacity: int | None = None) -> RunSpec:
    """The run of generate and chat as the flags say (policy, capacity, prefill, chunk,
    positions, sampling), checked before any work; `full` ignores --capacity, with a note.
    `capacity` stands in for --capacity when it is not given (a saved state's)."""
    pol = _policy(args)
    if not pol.bounded and args.capacity is not None:
        _note_full_capacity()
    return RunSpec(pol, args.capacity if args.capacity is not None else capacity, args.prefill, args.chunk,
                   args.positions, _sampling(args), args.state_dtype)


def _sampling(args) -> Sampling:
    """Greedy unless a sampling flag is given. The settings follow `sampling.check_settings`
    (the one rule); on the command line a given --temperature must also be > 0 and a given
    --top-k >= 1, because giving a flag switches sampling (or its filter) on: greedy is
    --greedy, not --temperature 0."""
    sampled = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    if args.greedy and sampled:
        raise InvalidArgument("--greedy cannot be combined with --temperature/--top-k/--top-p")
    if args.temperature is not None:
        check_float("temperature", args.temperature, low=0.0, low_open=True)
    if args.top_k is not None:
        check_int("top_k", args.top_k, minimum=1)
    return Sampling.of(args.temperature, args.top_k, args.top_p)


def _load(args):
    """The model of --model/--dtype/--precision/--mesh; a first conversion says so in one
    line on stderr."""
    return api.load_model(args.model, args.dtype, precision=getattr(args, "precision", None),
                          mesh=getattr(args, "mesh", None),
                          notify=lambda msg: print(f"msrnn: {msg}", file=sys.stderr, flush=True))


def _check_outputs(args):
    """Every output path of a command, checked before any work starts."""
    if getattr(args, "csv", None):
        check_output_file(args.csv, "csv")
    if getattr(args, "plot", None):
        check_output_file(args.plot, "plot", suffix=".png")
    if getattr(args, "save_state", None):
        from ..io.state_io import check_state_folder

        check_state_folder(args.save_state)


# -- ppl ------------------------------------------------------------------------------
def ppl(args):
    policies = _policies(args)
    capacities = args.capacity
    if capacities and all(not p.bounded for p in policies):
        _note_full_capacity()
    if any(p.bounded for p in policies) and not capacities:
        raise InvalidArgument("--capacity C[,C...] is required by every policy but full")
    specs = grid(policies, capacities or [], args.sinks, args.prefill, args.chunk, args.positions,
                 PPL_PREFILL_MODES, args.state_dtype)
    if args.tokens is not None:
        check_int("tokens", args.tokens, minimum=2)
    _check_outputs(args)
    texts = [api.read_text(f) for f in args.files]
    model = _load(args)
    limit = model.cfg.max_position_embeddings
    if args.tokens is not None:  # past the trained context `full` is refused before any work
        for p in policies:
            if not p.bounded:
                check_context(model.cfg, p, args.tokens, args.positions)
    if args.tokens is None:
        shortest = min(len(model.encode(t)) for t in texts)
        n_tokens = min(shortest // (args.batch if len(texts) == 1 else 1), limit)
    else:
        n_tokens = args.tokens
    rows = api.text_rows(model, texts, n_tokens, args.batch)
    if rows.shape[1] < 2:
        raise MsrnnError("the text has fewer than 2 tokens")

    from tqdm.auto import tqdm

    n_full = sum(not p.bounded for p in policies)
    runs = n_full + (len(policies) - n_full) * len(capacities or [])
    per_run = rows.shape[0] * (rows.shape[1] - 1)
    results = []
    with tqdm(total=runs * per_run, unit="tok", disable=None, file=sys.stderr, leave=False,
              desc=f"perplexity, {runs} runs x {per_run} tokens") as bar:
        for res in run_grid(model, specs, rows, fuse=not args.no_fuse, progress=bar.update):
            run, pol = res.run, res.policy
            rec = {"policy": policy_name(pol), "capacity": res.capacity, "tokens": int(rows.shape[1]),
                   "batch": int(rows.shape[0]), "mean_nll": run.mean_nll, "ppl": run.ppl,
                   "tokens_per_s": run.tokens_per_s, "compile_s": run.compile_seconds,
                   "prefill": args.prefill, "positions": args.positions, "shared_with": res.shared_with,
                   "state_dtype": run.state.dtype, "state_bytes": run.state.nbytes(), "model": model.source}
            if pol.name == "sink":
                rec["sinks"] = pol.sinks
            if args.curve_every:
                rec["curve"] = run.curve(args.curve_every)
            results.append(rec)
            if args.json:
                bar.clear()
                print(json.dumps(rec), flush=True)
    if not args.json:
        _print_table(results)
    if args.csv:
        write_atomic(args.csv, lambda f: _csv(results, f))
    if args.plot:
        title = f"{Path(args.files[0]).name}, {rows.shape[1]} tokens"
        _plot(results, args.plot, title=title, curve=bool(args.curve_every), context=limit)
    return 0


def _print_table(results):
    print(f"{'policy':<10} {'capacity':>8} {'tokens':>7} {'mean_nll':>9} {'ppl':>9} {'tok/s':>9}")
    for r in results:
        print(f"{r['policy']:<10} {r['capacity']:>8} {r['tokens']:>7} {r['mean_nll']:>9.4f} "
              f"{r['ppl']:>9.3f} {r['tokens_per_s']:>9.1f}")


def _csv(results, f):
    """One row per (policy, capacity); with a curve, one more per bucket, whose `start` and
    `end` say which predictions it averages (the summary rows leave them empty)."""
    keys = ["policy", "capacity", "tokens", "batch", "mean_nll", "ppl", "tokens_per_s", "positions"]
    curve = any("curve" in r for r in results)
    w = csv.DictWriter(f, fieldnames=keys + (["start", "end"] if curve else []), extrasaction="ignore")
    w.writeheader()
    w.writerows(results)
    for r in results:
        for c in r.get("curve", []):
            w.writerow({**{k: r[k] for k in ("policy", "capacity", "positions", "tokens", "batch")}, **c})


def _plot(results, path, title="", curve=False, context=None):
    from ..run.plots import plot_nll_curve, plot_ppl_vs_capacity

    if curve:  # NLL against position (--curve-every)
        write_atomic(path, lambda f: plot_nll_curve(results, f, title=title, context=context), binary=True)
    else:
        write_atomic(path, lambda f: plot_ppl_vs_capacity(results, f, title=title), binary=True)


# -- eval -----------------------------------------------------------------------------
def eval(args):  # the subcommand's name (cli.py calls commands.<command>)
    from ..run.longcontext import check_eval, evaluate_task
    from .ruler import eval_ruler, reject_ruler_flags

    if args.task.strip().lower() == "ruler":  # RULER in kvpress's format (cli/ruler.py)
        return eval_ruler(args)
    reject_ruler_flags(args)

    names = _policies(args)
    depths = [d.strip() for d in args.depths.split(",") if d.strip()]
    _check_outputs(args)
    # every value but the lengths (counted in the model's tokens) is checked before the model loads
    kwargs = dict(capacities=args.capacity or [], lengths=args.lengths, depths=depths,
                  samples=args.samples, seed=args.seed, prefill=args.prefill, chunk=args.chunk,
                  batch=args.batch, chat=args.chat, sinks=args.sinks, fuse=not args.no_fuse,
                  positions=args.positions, state_dtype=args.state_dtype)
    check_eval(args.task, names, kwargs["capacities"], depths, args.samples, args.seed, args.prefill,
               args.chunk, args.batch, args.sinks, args.positions, args.state_dtype)
    if args.haystack is not None:
        api.read_text(args.haystack)  # a missing or empty file, before the model loads
    if any(not p.bounded for p in names) and args.capacity and len(names) == 1:
        _note_full_capacity()
    model = _load(args)

    from tqdm.auto import tqdm

    n_full = sum(not p.bounded for p in names)
    runs = n_full + (len(names) - n_full) * len(args.capacity or [])
    total = runs * sum(set(args.lengths)) * len(set(map(float, depths))) * args.samples  # prompt tokens
    results = []
    with tqdm(total=total, unit="tok", disable=None, file=sys.stderr, leave=False,
              desc=f"eval {args.task}") as bar:
        for rec in evaluate_task(model, args.task, names, haystack=args.haystack, progress=bar.update,
                                 **kwargs):
            row = {**rec.as_dict(), "model": model.source}
            results.append(row)
            if args.json:
                bar.clear()
                print(json.dumps(row), flush=True)
    if not args.json:
        print(f"{'task':<8} {'policy':<10} {'capacity':>8} {'length':>7} {'depth':>6} {'accuracy':>9}")
        for r in results:
            print(f"{r['task']:<8} {r['policy']:<10} {r['capacity']:>8} {r['length']:>7} "
                  f"{r['depth']:>6.2f} {r['accuracy']:>9.3f}")
    if args.csv:
        from ..run.longcontext import CSV_KEYS as keys

        def write(f):
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(results)

        write_atomic(args.csv, write)
    if args.plot:
        from ..run.plots import plot_eval

        write_atomic(args.plot, lambda f: plot_eval(results, f, title=f"{args.task}, {model.source}"),
                     binary=True)
    return 0


# -- generate / chat -----------------------------------------------------------------
class _Streamer:
    """Prints one row's tokens as they arrive, decoding incrementally so multi-byte
    characters and merged BPE pieces come out whole."""

    def __init__(self, model, out=None):
        self.model, self.out, self.ids, self.printed = model, out or sys.stdout, [], 0
        self.stop = None  # an Event that, once set, stops the generation at the next chunk

    def __call__(self, toks, emitted):
        if self.stop is not None and self.stop.is_set():
            raise _ReplyStopped
        self.ids.extend(int(t) for t in toks[0][emitted[0]])
        text = self.model.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def finish(self):
        text = self.model.decode(self.ids)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def generate(args):
    # a saved state brings its own capacity; --capacity, if given, must agree with it
    saved = None
    if args.load_state:
        from ..io.state_io import state_meta

        saved = state_meta(args.load_state)
    spec = _spec(args, saved["capacity"] if saved else None)
    check_int("max_new_tokens", args.max_new_tokens)
    if args.prompts and args.prompt:
        raise InvalidArgument("give a prompt or --prompts FILE, not both")
    _check_outputs(args)
    if args.prompts:
        lines = api.read_text(args.prompts).splitlines()
        for i, line in enumerate(lines, 1):
            if not line.strip():
                raise InvalidArgument(f"{args.prompts}: line {i} is empty")
        prompts = lines
    else:
        text = " ".join(args.prompt)
        if not text.strip():
            raise InvalidArgument("empty prompt")
        prompts = [text]
    model = _load(args)
    ids = api.prompt_ids(model, prompts, chat=args.chat)
    state = None
    if args.load_state:
        from ..io.state_io import load_state

        state = load_state(args.load_state, model, spec.policy, batch=len(ids), capacity=args.capacity)
    streamer = _Streamer(model) if len(ids) == 1 else None
    res = api.generate(model, ids, args.max_new_tokens, spec=spec, seed=args.seed, state=state,
                       on_tokens=streamer)
    if streamer is not None:
        streamer.finish()
    else:
        for i, row in enumerate(res.tokens):
            if i:
                print("---")
            print(model.decode(row))
    if args.save_state:
        from ..io.state_io import save_state

        save_state(args.save_state, res.state, model, spec.policy)
    if args.stats:
        _print_stats(res, [len(i) for i in ids])
    return 0


def _print_stats(res, prompt_lengths):
    n = sum(len(t) for t in res.tokens)
    rate = res.decode_tokens_per_s
    rate = (f"decode {rate:.1f} tokens/s" if math.isfinite(rate)
            else "decode tokens/s n/a (every token came from the compiling call)")
    print(f"[stats] prompt tokens {sum(prompt_lengths)}, new tokens {n}, "
          f"time to first token {res.time_to_first_token * 1000:.0f} ms, "
          f"decode compile {res.compile_s:.2f} s, {rate}, "
          f"state {res.state.nbytes() / 2**20:.2f} MiB ({res.state.nbytes()} bytes, "
          f"capacity {res.state.capacity})", file=sys.stderr)


def chat(args):
    spec = _spec(args)
    if spec.prefill == "oneshot":
        raise InvalidArgument("chat continues its state across turns: use --prefill exact or chunked")
    model = _load(args)
    pol, cap = spec.policy, spec.state_size(model.cfg.max_position_embeddings)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    # `full` keeps the whole conversation: its state has the trained context's slots from the start
    state, consumed = (None if pol.bounded else model.empty_state(1, cap, spec.state_dtype)), ""
    interactive = sys.stdin.isatty()
    eos_text = model.tokenizer.eos_token or ""
    if interactive:
        print(f"msrnn chat: {args.policy}" + (f", capacity {cap}" if pol.bounded else "")
              + " — Ctrl-C stops a reply, Ctrl-D or /exit quits", file=sys.stderr)
    while True:
        line = _read_turn(interactive)
        if line is None or line.strip() == "/exit":
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        full = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if not full.startswith(consumed):  # the template re-rendered the reply (e.g. stripped it)
            prev = model.tokenizer.apply_chat_template(messages[:-1], tokenize=False)
            if not full.startswith(prev):
                raise MsrnnError("the chat template does not extend the conversation so far")
            consumed = prev
        new_ids = list(model.tokenizer(full[len(consumed):], add_special_tokens=False)["input_ids"])
        streamer = _Streamer(model)
        try:
            with _ctrl_c_stops(streamer):
                res = api.generate(model, [new_ids], args.max_new_tokens, spec=spec,
                                   seed=args.seed + len(messages), state=state, on_tokens=streamer)
        except _ReplyStopped:  # drop this turn: the state is the one before it (generate copies)
            streamer.finish()
            print("[reply interrupted]", file=sys.stderr)
            messages.pop()
            continue
        streamer.finish()
        state = res.state
        reply = model.decode(res.tokens[0])
        ended = bool(res.tokens[0]) and res.tokens[0][-1] in model.eos_ids
        messages.append({"role": "assistant", "content": reply})
        # what the state has read: the prompt, the reply and (if emitted) the end-of-turn token
        consumed = full + model.tokenizer.decode(res.tokens[0], skip_special_tokens=False)
        if not ended:
            if len(res.tokens[0]) >= args.max_new_tokens:  # cut, not finished: say so
                print(f"[reply cut at {args.max_new_tokens} tokens: --max-new-tokens sets the limit]",
                      file=sys.stderr, flush=True)
            state = _feed(model, pol, cap, state, eos_text, args.positions)
            consumed += eos_text
        if args.stats:
            _print_stats(res, [len(new_ids)])
    return 0


class _ReplyStopped(Exception):
    """Ctrl-C during a chat reply."""


@contextlib.contextmanager
def _ctrl_c_stops(streamer):
    """While the block runs, Ctrl-C stops the reply at the next chunk of tokens: the
    signal only sets a flag, and the streamer raises between compiled calls (an
    exception raised inside one of JAX's calls can leave it in a bad state)."""
    stop = threading.Event()
    old = signal.signal(signal.SIGINT, lambda *_: stop.set())
    streamer.stop = stop
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        streamer.stop = None


def _read_turn(interactive: bool) -> str | None:
    """The user's next line; None at end of input (Ctrl-D). On a terminal, Ctrl-C at the
    prompt starts a fresh line, as a shell does."""
    while True:
        try:
            if not interactive:
                line = sys.stdin.readline()
                return line if line else None
            return input("> ")
        except EOFError:
            print(flush=True)  # leave the shell's prompt on a line of its own
            return None
        except KeyboardInterrupt:
            print(flush=True)


def _feed(model, pol, cap, state, text, positions="absolute"):
    from ..run.decoding import prefill

    ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        return state
    with model.scope():
        return prefill(model.params, model.cfg, pol, state, cap, [ids], "exact", positions=positions)[1]


# -- convert ----------------------------------------------------------------------------
def convert(args):
    from msrnn_jax.convert import convert_cli

    convert_cli(args.src, args.out, args.dtype, overwrite=args.overwrite)
    print(f"converted {args.src} -> {args.out}", file=sys.stderr)
    return 0


# -- serve ------------------------------------------------------------------------------
def serve(args):
    from ..serve import server
    from ..serve.engine import SERVE_PREFILL_MODES, Engine, check_batch, served_policies

    # a comma list serves several policies side by side (checked here, before the server starts)
    pols = served_policies(_policies(args), args.sinks)
    capacity = args.capacity
    if pols[0].bounded:
        capacity = 512 if capacity is None else capacity
    for p in pols:
        RunSpec(p, capacity, args.prefill, args.chunk, args.positions).require_prefill(SERVE_PREFILL_MODES)
    check_int("max_queue", args.max_queue, minimum=0)
    check_float("--prefill-share", args.prefill_share, low=0.0, high=1.0, low_open=True)
    if not 0 <= args.port <= 65535:
        raise InvalidArgument(f"--port must be in [0, 65535], got {args.port}")
    impl = StepImpl(attention=args.attention)
    mesh = None
    if args.mesh is not None:  # the mesh's own errors before the server starts (heads: at load)
        from ..fast import sharding
        mesh = sharding.make_mesh(args.mesh)
        sharding.check_impl(impl, mesh)
    check_batch(args.max_batch, mesh, len(pols))
    limits = dict(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens)

    def factory():  # on the server's loading thread: /health answers 503 meanwhile
        model = _load(args)
        eng = Engine(model, pols, capacity, **limits, max_batch=args.max_batch, max_queue=args.max_queue,
                     prefill=args.prefill, chunk=args.chunk, steps_per_call=args.steps_per_call,
                     prefill_share=args.prefill_share, positions=args.positions, impl=impl,
                     dtype=args.state_dtype)
        return model, eng

    name = args.served_model_name or server.served_name(args.model, args.model)
    return server.run(factory, name, aliases=(args.model,), host=args.host, port=args.port,
                      api_key=args.api_key, max_body_bytes=args.max_body_bytes)
