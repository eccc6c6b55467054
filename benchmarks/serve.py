"""The serving engine, driven directly (no HTTP): offline throughput, online latency
under Poisson arrivals, and the engine's overhead over a fixed-batch decode.

Random bf16 weights in a real shape (`msrnn_jax.testing`), random prompt tokens,
greedy, `ignore_eos` (fixed lengths). Beside it, transformers' own continuous batching
(`generate_batch`, paged attention) on the same shape and requests, guarded: a failure
is reported in the results, not fatal.

    python -m benchmarks.serve --out $OUT                 # one H200, Llama-2-7B shape (~8 min)
    python -m benchmarks.serve --quick --out /tmp/serve   # CPU, the tiny shape, seconds

Each system's run is set beside the physical bound of its workload (`benchmarks.bound`:
the prompts' FLOPs at the bf16 matmul rate and the decode steps' bytes at the copy
bandwidth, both measured at the start of the run), for prefill, decode and the whole:
a table of measured s, bound s and bound / measured. `--state-dtype int8|fp8` stores the
JAX systems' state in 8 bits (and a scale per slot), so that a larger batch fits.

transformers runs in a process of its own (`python -m benchmarks.hf_peer --serve ...`),
started once the JAX systems are done; those then run in a child process too, so that
the GPU memory JAX held is free again when transformers starts. Without PyTorch the
transformers system is skipped with one line.

Writes serve.json, serve.md and serve.png (throughput against latency) under --out;
--replot SERVE_JSON redraws the PNG of an earlier run; --merge A.json B.json ... writes
the three files for runs of one request set measured in several commands (one system
each, or transformers in --hf-range slices).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from msrnn_jax.config import preset
from msrnn_jax import testing
from msrnn_jax.run.api import Model
from msrnn_jax.fast.attention import StepImpl
from msrnn_jax.serve.engine import Engine
from msrnn_jax.fast.layouts import fuse_projections, split_layers

from . import bound as bounds
from .common import device_info, median_seconds, weight_bytes_per_step, write_json

HF = "transformers generate_batch"


def requests(n, lo, hi, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def request_range(text):
    """'A:B' -> (A, B), 0 <= A < B (argparse type of --hf-range)."""
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not A:B (two integers)") from None
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"{text!r}: want 0 <= A < B")
    return a, b


def merge(runs, command):
    """Runs of one request set (their serve.json) as one result: their systems side by
    side, each keeping the command that measured it. A system measured offline in
    `--hf-range` slices becomes one offline record, provided its slices cover the set
    exactly once: their tokens and wall times add up (each slice drains its batch at its
    end, so the sum is a little slower than one run would be). Raises ValueError for runs
    of different sets or devices, a system measured twice, or slices with a gap or an
    overlap."""
    if not runs:
        raise ValueError("nothing to merge")
    keys = ("model", "requests", "prompt_tokens", "generated_tokens_each")
    first = runs[0]
    for r in runs[1:]:
        for k in keys:
            if r[k] != first[k]:
                raise ValueError(f"runs of different request sets: {k} {r[k]!r} != {first[k]!r}")
        if r["device"].get("device_kind") != first["device"].get("device_kind"):
            raise ValueError(f"runs on different devices: {r['device'].get('device_kind')!r} "
                             f"!= {first['device'].get('device_kind')!r}")
    out = {"command": command, "device": first["device"], **{k: first[k] for k in keys},
           "merged_from": [r["command"] for r in runs], "systems": {}}
    slices = {}
    for r in runs:
        for name, rec in r["systems"].items():
            rec = {**rec, "command": r["command"], "prefill_share": r.get("prefill_share")}
            if "range" in rec.get("offline", {}):
                slices.setdefault(name, []).append(rec)
            elif name in out["systems"]:
                raise ValueError(f"{name} is measured in two of the runs")
            else:
                out["systems"][name] = rec
    for name, recs in slices.items():
        if name in out["systems"]:
            raise ValueError(f"{name} is measured both whole and in slices")
        recs.sort(key=lambda rec: rec["offline"]["range"][0])
        spans = [tuple(rec["offline"]["range"]) for rec in recs]
        starts = [0] + [b for _, b in spans[:-1]]
        if [a for a, _ in spans] != starts or spans[-1][1] != out["requests"]:
            raise ValueError(f"{name}: the slices {spans} do not cover requests 0..{out['requests']} once")
        offline = [rec["offline"] for rec in recs]
        tokens, wall = sum(o["generated_tokens"] for o in offline), sum(o["wall_s"] for o in offline)
        out["systems"][name] = {"offline": {"requests": sum(o["requests"] for o in offline),
                                            "generated_tokens": tokens, "wall_s": wall,
                                            "tokens_per_s": tokens / wall, "slices": offline},
                                "commands": [rec["command"] for rec in recs]}
        if all(rec.get("bound") for rec in recs):  # each slice's bound at its own run's rates
            out["systems"][name]["bound"] = bounds.combine([rec["bound"] for rec in recs])
    return out


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def run_load(eng: Engine, prompts, gen, arrivals=None):
    """Submit `prompts` (all at once, or at the `arrivals` offsets in seconds) and wait.
    Returns throughput and latency figures."""
    t0 = time.perf_counter()
    stamps = {}
    reqs = []

    def listener_for(i):
        def on(ev):
            if ev["type"] == "delta" and ev["tokens"]:
                stamps.setdefault(i, []).append((time.perf_counter(), len(ev["tokens"])))
        return on

    for i, p in enumerate(prompts):
        if arrivals is not None:
            wait = t0 + arrivals[i] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        reqs.append(eng.submit(p, gen, temperature=0.0, ignore_eos=True, listener=listener_for(i)))
    res = [r.result(3600) for r in reqs]
    wall = time.perf_counter() - t0
    ttft = [r.time_to_first_token for r in res]
    itl = []  # inter-token latency: a chunk's gap spread over the tokens it brought
    for i in range(len(prompts)):
        s = stamps.get(i, [])
        for (ta, _), (tb, n) in zip(s, s[1:]):
            itl += [(tb - ta) / n] * n
    return latency(ttft, itl, sum(len(r.tokens) for r in res), wall, len(prompts))


def overhead(eng: Engine, prompts, gen):
    """The engine's decode rate over chunks where all B rows emitted, against
    `testing.greedy_decode` of the same batch, capacity and steps per call."""
    eng.stats.clear()
    run_load(eng, [p[:64] for p in prompts[:eng.B]], gen)
    rate = eng.stats["full_tokens"] / eng.stats["full_seconds"] if eng.stats["full_seconds"] else float("nan")
    cfg, B, C, n = eng.cfg, eng.B, eng.capacity, eng.steps
    state = testing.fabricate_state(cfg, B, C, min(C, 64 + gen // 2), eng.dtype)
    tok = jnp.zeros((B,), jnp.int32)
    box = [state]

    def call():
        toks, box[0] = testing.greedy_decode(eng.model.params, cfg, eng.policy, n, box[0], tok, eng.impl)
        return toks

    sec = median_seconds(call, reps=10)
    fixed = B * n / sec
    return {"batch": B, "engine_tokens_per_s": rate, "fixed_batch_tokens_per_s": fixed,
            "ratio": rate / fixed, "overhead_pct": 100 * (1 - rate / fixed)}


def config_items(text):
    """`key=value,...` as a dict; values read as bool, int, float or else kept as text."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, val = item.partition("=")
        low = val.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        for kind in (int, float):
            try:
                out[key] = kind(val)
                break
            except ValueError:
                pass
        else:
            out[key] = val
    return out


def hf_offline(name, prompts, gen, device, batch_tokens, extra=None, model=None):
    """transformers' continuous batching on the same requests (guarded by the caller);
    `extra` goes to its ContinuousBatchingConfig (e.g. use_cuda_graph). `model`: one
    already built (kept), else one is built and freed."""
    import torch

    from .hf_peer import build_model

    own = model is None
    if own:
        model = build_model(name, device)  # sdpa: generate_batch switches it to "paged|sdpa" itself
    gc_, cbc = _hf_generation(gen, batch_tokens, extra)
    kw = {} if cbc is None else {"continuous_batching_config": cbc}
    try:
        model.generate_batch(prompts[:2], generation_config=gc_, progress_bar=False, **kw)  # warm-up
    except ValueError:  # older transformers name the paged attention "sdpa_paged"
        model.config._attn_implementation = "sdpa_paged"
        model.generate_batch(prompts[:2], generation_config=gc_, progress_bar=False, **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=gc_, progress_bar=False, **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in out.values())
    del out
    if own:
        del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"requests": len(prompts), "generated_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "config": {"max_batch_tokens": batch_tokens, **(extra or {})}}


def arrival_sets(rates, n, seed=1):
    """[(rate, arrival offsets in s)] of n Poisson arrivals per rate; every system is
    handed the same ones."""
    rng = np.random.default_rng(seed)
    return [(rate, np.cumsum(rng.exponential(1 / rate, n))) for rate in rates]


def latency(ttft, itl, tokens, wall, n):
    """The figures of one load: run_load's, from times measured by whoever ran it."""
    return {"requests": n, "generated_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99)}


def _hf_generation(gen, batch_tokens, extra):
    """transformers' GenerationConfig (fixed lengths: EOS off) and ContinuousBatchingConfig
    (None where transformers has none: it then reads max_batch_tokens from the former)."""
    from transformers.generation import GenerationConfig
    gc_ = GenerationConfig(max_new_tokens=gen, min_new_tokens=gen, do_sample=False, eos_token_id=-1,
                           pad_token_id=0)
    try:
        from transformers.generation import ContinuousBatchingConfig
    except ImportError:  # older transformers read it from the generation config
        gc_.max_batch_tokens = batch_tokens
        return gc_, None
    return gc_, ContinuousBatchingConfig(max_batch_tokens=batch_tokens, **(extra or {}))


def hf_online(name, prompts, gen, device, batch_tokens, extra, arrivals, timeout_s=1800.0, model=None):
    """transformers' continuous batching under the same Poisson arrivals as the engine:
    its manager (`continuous_batching_context_manager`, CUDA graphs warmed up first) gets
    each request at its arrival time; transformers records each generated token's time
    (`record_timestamps`), so time to first token and inter-token latency are the times
    it produced them (ours are the times our engine handed them out: as early or
    earlier than a client sees either). One row per rate, as `run_load`'s. `model`: one
    already built (kept), else one is built and freed."""
    import torch

    from .hf_peer import build_model

    own = model is None
    if own:
        model = build_model(name, device)
    gc_, cbc = _hf_generation(gen, batch_tokens, extra)
    rows = []
    with torch.no_grad(), model.continuous_batching_context_manager(
            generation_config=gc_, continuous_batching_config=cbc, block=True, timeout=60) as manager:
        for rate, arr in arrivals:
            n = min(len(prompts), len(arr))
            sent, done = {}, {}
            t0 = time.perf_counter()
            deadline = t0 + timeout_s
            while len(done) < n and time.perf_counter() < deadline:
                now = time.perf_counter()
                while len(sent) < n and t0 + arr[len(sent)] <= now:
                    i = len(sent)
                    sent[manager.add_request(prompts[i], request_id=f"r{rate}-{i}", max_new_tokens=gen,
                                             record_timestamps=True)] = time.perf_counter()
                wait = 0.05 if len(sent) == n else max(0.0, min(0.05, t0 + arr[len(sent)] - now))
                res = manager.get_result(timeout=wait)
                if res is not None and res.is_finished():
                    if res.error is not None:
                        raise RuntimeError(f"transformers failed request {res.request_id}: {res.error}")
                    done[res.request_id] = res
                elif res is None and not manager.is_running():
                    raise RuntimeError("transformers' generation thread stopped")
            if len(done) < n:
                raise TimeoutError(f"{n - len(done)} of {n} requests unfinished after {timeout_s:.0f} s")
            wall = time.perf_counter() - t0
            ttft, itl = [], []
            for rid, res in done.items():
                ts = res.timestamps or []
                if ts:
                    ttft.append(ts[0] - sent[rid])
                    itl += list(np.diff(ts))
            row = {"rate": rate, **latency(ttft, itl, sum(len(r.generated_tokens) for r in done.values()), wall, n)}
            rows.append(row)
            print("transformers online", row, flush=True)
    if own:
        del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


class TimedEngine(Engine):
    """The engine, each prompt piece waited for and timed (`stats["prefill_seconds"]`).
    While rows decode the engine waits for each piece itself; before any row decodes its
    pieces would otherwise be dispatched without waiting, so this adds one host round
    trip per piece there (microseconds beside a piece of hundreds of tokens)."""

    def _advance(self, pf):
        t0 = time.perf_counter()
        done = super()._advance(pf)
        jax.block_until_ready(pf.logits)
        self.stats["prefill_seconds"] += time.perf_counter() - t0
        return done


def torch_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def state_dtype_name(arg, on_gpu: bool) -> str:
    """The state's dtype as named in the results: --state-dtype, else the weights' dtype."""
    return arg or ("bfloat16" if on_gpu else "float32")


def fixed_batch_bound(cfg, rec, rates, capacity, state_dtype, itemsize):
    """The fixed-batch decode's step against its bandwidth bound: every weight and every
    row's C slots read once per step (`benchmarks.bound`)."""
    B = rec["batch"]
    step_bytes = (weight_bytes_per_step(cfg, itemsize, B)
                  + B * capacity * cfg.num_layers * cfg.num_kv_heads * bounds.slot_bytes(cfg, state_dtype))
    step_s = B / rec["fixed_batch_tokens_per_s"]
    return {"bytes_per_step": step_bytes, "bound_step_s": step_bytes / rates["copy_bytes_per_s"],
            "step_s": step_s, "fraction": step_bytes / rates["copy_bytes_per_s"] / step_s}


def hf_bound(cfg, prompts, gen, rates, rec, batch_estimate):
    """transformers' bound on the requests it ran: a full cache read at its length; its
    steps are not recorded: decode tokens / the batch that fits (the child's estimate:
    the KV of that many rows at the longest request in 0.9 of the memory free after the
    weights; on a CPU every request at once)."""
    off = rec["offline"]
    a, b = off.get("range", (0, len(prompts)))
    lens = [len(p) for p in prompts[a:b]]
    batch = min(len(lens), batch_estimate or len(lens))
    pre = rec.get("prefill_only")
    pre_s = pre["wall_s"] if pre else None
    # decode: the offline run less its prefill-only twin (None if that leaves nothing)
    dec_s = None if pre_s is None or off["wall_s"] <= pre_s else off["wall_s"] - pre_s
    return bounds.system_bound(cfg, lens, gen, rates, bounded=False, capacity=None, chunk=None, batch=batch,
                               state_dtype="bfloat16", steps=None, prefill_s=pre_s, decode_s=dec_s,
                               total_s=off["wall_s"], prefill_mode="causal")


def run_child(cmd, what):
    """A child process of this benchmark, its output passed through; raises if it fails."""
    import subprocess
    env = dict(os.environ)
    if what == "transformers":  # should JAX be imported there, it stays off the GPU
        env["JAX_PLATFORMS"] = "cpu"
    print(f"[{what}] {' '.join(cmd)}", flush=True)
    p = subprocess.run(cmd, env=env)
    if p.returncode:
        raise RuntimeError(f"the {what} process exited with {p.returncode}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny shape on the CPU, seconds")
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--requests", type=int, default=256, help="offline requests (the issue asks 1024; "
                    "256 fit the 8-minute budget)")
    ap.add_argument("--prompt", default="512,2048", help="prompt lengths: min,max")
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--tova-batch", type=int, default=256)
    ap.add_argument("--tova-capacity", type=int, default=512)
    ap.add_argument("--full-batch", type=int, default=48)
    ap.add_argument("--full-attention", default="einsum", choices=["einsum", "pallas"],
                    help="the full cache's attention (StepImpl): at batches past ~16, XLA's autotuner "
                         "wants a scratch copy of a whole state buffer, which Pallas' kernels do not")
    ap.add_argument("--tova-attention", default="einsum", choices=["einsum", "pallas"],
                    help="the same for tova: past batch ~128 of C=512 the autotuner's scratch copy "
                         "no longer fits an H200")
    ap.add_argument("--state-dtype", default=None, choices=["bfloat16", "float32", "int8", "fp8"],
                    help="how the JAX systems' state stores keys and values (default: as the weights, "
                         "bfloat16 on a GPU; int8/fp8: 8 bits and a float32 scale per slot)")
    ap.add_argument("--chunk", type=int, default=512, help="chunked prefill piece")
    ap.add_argument("--steps-per-call", type=int, default=16)
    ap.add_argument("--prefill-share", type=float, default=0.4,
                    help="the engine's prefill_share: the most of its time that reading prompts may "
                         "take while rows decode (1: prompts first)")
    ap.add_argument("--rates", default="2,4,8", help="online Poisson arrival rates, requests/s")
    ap.add_argument("--online-requests", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate_batch")
    ap.add_argument("--systems", default=None,
                    help="which systems run (tova, full, hf; default all three, --quick: tova,full); "
                         "'' measures only the device's rates")
    ap.add_argument("--hf-batch-tokens", type=int, default=8192)
    ap.add_argument("--hf-modes", default="offline,online",
                    help="what transformers runs: offline (all --requests at once), online (the "
                         "--rates arrivals, its manager taking each request at its time), or both")
    ap.add_argument("--no-hf-phases", dest="hf_phases", action="store_false",
                    help="skip transformers' prefill-only run (the same requests, 1 token each), "
                         "which splits its offline time into prefill and decode")
    ap.add_argument("--hf-range", type=request_range, default=None, metavar="A:B",
                    help="transformers runs only requests A..B-1 of the --requests set (the first k "
                         "requests of every set are the same, so the slices of one set add up: a run "
                         "too long for one command in pieces)")
    ap.add_argument("--hf-config", default="", metavar="KEY=VALUE,...",
                    help="more ContinuousBatchingConfig settings for transformers, e.g. "
                         "use_cuda_graph=true,max_memory_percent=0.9")
    ap.add_argument("--hf-in-process", action="store_true",
                    help="run transformers in this process after the JAX systems (the old way: JAX "
                         "still holds its GPU memory)")
    ap.add_argument("--matmul-n", type=int, default=None, help="the matmul rate's square product (8192)")
    ap.add_argument("--copy-bytes", type=int, default=None, help="the copy bandwidth's array (4 GiB)")
    ap.add_argument("--replot", metavar="SERVE_JSON", help="only redraw serve.png under --out "
                                                        "from an earlier run's serve.json")
    ap.add_argument("--merge", nargs="+", metavar="SERVE_JSON",
                    help="only write serve.json, .md and .png under --out for these runs of one "
                         "request set as one (see `merge`)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    command = "python -m benchmarks.serve " + " ".join(argv)
    if args.merge:
        import json
        try:
            runs = [json.loads(open(p).read()) for p in args.merge]
            out = merge(runs, command)
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--merge: {e}")
        write_results(out, args.out)
        return
    if args.hf_range and args.hf_range[1] > args.requests:
        ap.error(f"--hf-range ends past the {args.requests} requests")
    if args.replot:
        import json
        out = json.loads(open(args.replot).read())
        os.makedirs(args.out, exist_ok=True)
        plot(out, os.path.join(args.out, "serve.png"))
        return
    if args.systems is None:
        args.systems = "tova,full" if args.quick else "tova,full,hf"
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(systems) - {"tova", "full", "hf"}:
        ap.error(f"--systems: unknown {sorted(set(systems) - {'tova', 'full', 'hf'})} (tova, full, hf)")
    if args.quick:  # the tiny shape; the request set's sizes unless given
        default = {k: ap.get_default(k) for k in ("requests", "gen", "rates", "online_requests")}
        args.model, args.prompt = "tiny", "8,40"
        args.tova_batch, args.tova_capacity, args.full_batch, args.chunk = 4, 32, 2, 16
        args.steps_per_call = 4
        for k, v in (("requests", 12), ("gen", 8), ("rates", "50"), ("online_requests", 8)):
            if getattr(args, k) == default[k]:
                setattr(args, k, v)
        if "num_blocks" not in args.hf_config:  # transformers' paged cache sized for the tiny set, not
            # by the host's free memory (which took 14.7 GB of RAM on a CPU)
            args.hf_config = ",".join(x for x in (args.hf_config, "num_blocks=16") if x)
    os.makedirs(args.out, exist_ok=True)
    run_hf = "hf" in systems and not args.no_hf
    if run_hf and not torch_available():
        print("transformers: skipped (PyTorch or transformers is not installed)", flush=True)
        run_hf = False
    jax_systems = [s for s in systems if s != "hf"]
    if run_hf and not args.hf_in_process:
        # JAX (its systems, or only the rates) in a child of its own: when it exits, the
        # GPU memory it held is free for transformers, which then runs in another child
        import json
        part = os.path.join(args.out, "jax-part")
        if os.path.exists(os.path.join(part, "serve.json")):
            os.remove(os.path.join(part, "serve.json"))
        err = None
        try:
            run_child([sys.executable, "-m", "benchmarks.serve", *argv, "--systems", ",".join(jax_systems),
                       "--no-hf", "--out", part], "JAX")
        except RuntimeError as e:  # what it wrote before it failed is kept; transformers still runs
            err = str(e)
        try:
            with open(os.path.join(part, "serve.json")) as f:
                out = json.load(f)
        except OSError:
            cfg, lo, hi, _ = request_set(args)
            out = {"model": args.model, "requests": args.requests, "prompt_tokens": [lo, hi],
                   "generated_tokens_each": args.gen, "device": {}, "systems": {}}
        if err:
            out["jax_error"] = err
        out["command"] = command
        hf_child(args, out, part)
        write_results(out, args.out)
        return
    out = run_jax(args, jax_systems, command)
    if run_hf:  # --hf-in-process
        run_hf_here(args, out)
    write_results(out, args.out)


def request_set(args):
    cfg = preset(args.model)
    lo, hi = map(int, args.prompt.split(","))
    return cfg, lo, hi, requests(args.requests, lo, hi, cfg.vocab_size)


def run_jax(args, systems, command) -> dict:
    """The device's rates, then the JAX systems, in this process."""
    cfg, lo, hi, prompts = request_set(args)
    on_gpu = jax.default_backend() != "cpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    sd = state_dtype_name(args.state_dtype, on_gpu)
    rates = bounds.measure_rates(args.quick or not on_gpu, args.matmul_n, args.copy_bytes)
    print(f"rates: matmul {rates['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s (bf16 [n,n]x[n,n], "
          f"n={rates['matmul']['n']}), copy {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + written)",
          flush=True)
    rates_list = [float(r) for r in args.rates.split(",") if r]
    arrivals = arrival_sets(rates_list, args.online_requests)
    out = {"command": command, "device": device_info(), "model": args.model, "requests": args.requests,
           "prompt_tokens": [lo, hi], "generated_tokens_each": args.gen, "steps_per_call": args.steps_per_call,
           "prefill_share": args.prefill_share, "state_dtype": sd, "rates": rates, "pid": os.getpid(),
           "prefill": f"chunked S={args.chunk}", "systems": {}}
    if not systems:
        return out
    params = testing.device_params(cfg, dtype)
    if on_gpu:  # the layout `load_model` gives on one accelerator: per-layer, q|k|v and gate|up joined
        params = fuse_projections(split_layers(params))
    model = Model(cfg, params, None, f"random {args.model}")
    itemsize = jnp.dtype(dtype).itemsize

    def engine(policy, capacity, batch, impl):
        t0 = time.perf_counter()
        eng = TimedEngine(model, policy, capacity, max_batch=batch,
                          max_queue=max(args.requests, args.online_requests), prefill="chunked", chunk=args.chunk,
                          steps_per_call=args.steps_per_call, prefill_share=args.prefill_share, impl=impl,
                          dtype=args.state_dtype, log_requests=False).start()
        eng.ready.wait()
        if eng.error:
            raise eng.error
        return eng, time.perf_counter() - t0

    full_c = -(-(hi + args.gen) // 64) * 64
    tag = f" {args.state_dtype}" if args.state_dtype else ""
    lens = [len(p) for p in prompts]
    for label, policy, cap, batch in [(f"tova C={args.tova_capacity}{tag}", "tova", args.tova_capacity, args.tova_batch),
                                      (f"full C={full_c}{tag}", "full", full_c, args.full_batch)]:
        if policy not in systems:
            continue
        impl = StepImpl(attention=args.full_attention if policy == "full" else args.tova_attention)
        rec = {"policy": policy, "capacity": cap, "batch": batch, "attention": impl.attention, "state_dtype": sd}
        try:
            eng, rec["compile_s"] = engine(policy, cap, batch, impl)
            eng.stats.clear()
            rec["offline"] = run_load(eng, prompts, args.gen)
            st = {k: float(v) for k, v in eng.stats.items()}
            rec["engine_stats"] = st
            rec["bound"] = bounds.system_bound(
                cfg, lens, args.gen, rates, bounded=policy != "full", capacity=cap, chunk=args.chunk, batch=batch,
                state_dtype=sd, steps=int(st.get("chunks", 0)) * args.steps_per_call,
                prefill_s=st.get("prefill_seconds"), decode_s=st.get("decode_seconds"),
                total_s=rec["offline"]["wall_s"], weight_itemsize=itemsize, buffer=cap)
            print(label, "offline", rec["offline"], flush=True)
            print("\n".join(bounds.table_markdown(bounds.table_rows({label: rec}))), flush=True)
            if arrivals:
                rec["online"] = []
                for rate, arr in arrivals:
                    r = {"rate": rate, **run_load(eng, prompts[:args.online_requests], args.gen, arr)}
                    rec["online"].append(r)
                    print(label, "online", r, flush=True)
            if policy == "tova":
                try:  # a second program beside the engine's: at a large batch it may not fit
                    rec["overhead"] = overhead(eng, prompts, max(args.gen, 8 * args.steps_per_call))
                    rec["overhead"]["bound"] = fixed_batch_bound(cfg, rec["overhead"], rates, cap, sd, itemsize)
                    print(label, "overhead", rec["overhead"], flush=True)
                except Exception as e:  # noqa: BLE001
                    rec["overhead_error"] = f"{type(e).__name__}: {e}"[:300]
            eng.stop()
            del eng
        except Exception as e:  # noqa: BLE001  e.g. out of memory at this batch: say so, go on
            rec["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        gc.collect()
        out["systems"][label] = rec
        write_json(os.path.join(args.out, "serve.json"), out)
    return out


def hf_spec(args) -> dict:
    """What the transformers child runs: the request set (it draws the same prompts) and
    its settings."""
    lo, hi = map(int, args.prompt.split(","))
    return {"model": args.model, "requests": args.requests, "prompt": [lo, hi], "gen": args.gen,
            "range": list(args.hf_range) if args.hf_range else None, "batch_tokens": args.hf_batch_tokens,
            "extra": config_items(args.hf_config), "modes": [m for m in args.hf_modes.split(",") if m],
            "rates": [float(r) for r in args.rates.split(",") if r], "online_requests": args.online_requests,
            "phases": args.hf_phases}


def hf_child(args, out, folder):
    """transformers in a process of its own (`hf_peer --serve`); its record and bound
    join `out` (a failure is reported there, not raised)."""
    import json
    spec_path, res_path = os.path.join(folder, "hf-spec.json"), os.path.join(folder, "hf.json")
    os.makedirs(folder, exist_ok=True)
    write_json(spec_path, hf_spec(args))
    if os.path.exists(res_path):
        os.remove(res_path)
    err = None
    try:
        run_child([sys.executable, "-m", "benchmarks.hf_peer", "--serve", spec_path, "--json", res_path],
                  "transformers")
    except Exception as e:  # noqa: BLE001  what it wrote before (it saves after each run) is kept
        err = f"{type(e).__name__}: {e}"
    try:
        with open(res_path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        out["systems"][HF] = {"error": err or "the transformers process wrote no result"}
        return
    if err:
        res["record"].setdefault("error", err)
    add_hf(args, out, res)


def add_hf(args, out, res):
    rec = res["record"]
    rec["process"] = {k: res.get(k) for k in ("pid", "torch", "transformers", "gpu", "free_bytes_after_model",
                                                 "batch_estimate")}
    if "offline" in rec and out.get("rates"):
        cfg, _, _, prompts = request_set(args)
        rec["bound"] = hf_bound(cfg, prompts, args.gen, out["rates"], rec, res.get("batch_estimate"))
        print("\n".join(bounds.table_markdown(bounds.table_rows({HF: rec}))), flush=True)
    out["systems"][HF] = rec


def run_hf_here(args, out):
    """--hf-in-process: the transformers peer in this process (JAX's memory still held)."""
    from .hf_peer import serve_peer
    add_hf(args, out, serve_peer(hf_spec(args), "cuda" if jax.default_backend() != "cpu" else "cpu"))


def write_results(out, folder):
    """serve.json, serve.md and serve.png of `out` under `folder`; the table printed."""
    os.makedirs(folder, exist_ok=True)
    out["bound_table"] = bounds.table_rows(out["systems"])
    write_json(os.path.join(folder, "serve.json"), out)
    text = markdown(out)
    with open(os.path.join(folder, "serve.md"), "w") as f:
        f.write(text)
    plot(out, os.path.join(folder, "serve.png"))
    print(text)


def plot(out, path):
    """Throughput against latency: each online rate of each system as a point (tokens/s,
    ITL p50 and p99), the offline runs as their tokens/s; one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(rec.get("online") for rec in out["systems"].values()):  # offline only: one bar each
        names = [n for n, rec in out["systems"].items() if "offline" in rec]
        tps = [out["systems"][n]["offline"]["tokens_per_s"] for n in names]
        fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.6))
        bars = ax.barh(names, tps, color="tab:blue")
        ax.bar_label(bars, [f"{t:,.0f}" for t in tps], padding=3, fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="generated tokens/s", title=f"offline: {out['requests']} requests at once")
        ax.set_xlim(0, 1.15 * max(tps, default=1))
        ax.grid(alpha=0.3, axis="x")
        fig.suptitle(f"{out['model']} (random bf16 weights), {out['device'].get('device_kind', '')}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rec in out["systems"].items():
        on = rec.get("online") or []
        if on:
            tps = [r["tokens_per_s"] for r in on]
            line, = ax1.plot(tps, [1e3 * r["itl_p50_s"] for r in on], "o-", label=f"{name} ITL p50")
            ax1.plot(tps, [1e3 * r["itl_p99_s"] for r in on], "s--", color=line.get_color(), label=f"{name} ITL p99")
            ax2.plot(tps, [r["ttft_p50_s"] for r in on], "o-", color=line.get_color(), label=f"{name} TTFT p50")
            ax2.plot(tps, [r["ttft_p99_s"] for r in on], "s--", color=line.get_color(), label=f"{name} TTFT p99")
            for r, x in zip(on, tps):
                ax1.annotate(f"{r['rate']:g}/s", (x, 1e3 * r["itl_p50_s"]), textcoords="offset points", xytext=(4, -10))
    for name, rec in out["systems"].items():
        if "offline" in rec:
            ax1.axvline(rec["offline"]["tokens_per_s"], ls=":", color="gray")
            ax1.annotate(f"{name} offline", (rec["offline"]["tokens_per_s"], ax1.get_ylim()[1]), rotation=90,
                         va="top", ha="right", fontsize=8, color="gray")
    ax1.set(xlabel="generated tokens/s", ylabel="inter-token latency, ms", title="online: throughput vs ITL")
    ax2.set(xlabel="generated tokens/s", ylabel="time to first token, s", title="online: throughput vs TTFT")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{out['model']} (random bf16 weights), {out['device'].get('device_kind', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(out) -> str:
    L = [f"# Serving: {out['model']}, {out['requests']} requests, prompts {out['prompt_tokens'][0]}–"
         f"{out['prompt_tokens'][1]} tokens, {out['generated_tokens_each']} generated each",
         "", f"`{out['command']}` on {out['device'].get('device_kind', out['device'])}", ""]
    if out.get("merged_from"):
        L += ["Merged from these runs of the same requests:", ""]
        L += [f"- `{c}`" for c in out["merged_from"]] + [""]
    L += ["| system | batch | offline tokens/s | wall s |", "|---|---|---|---|"]
    for name, rec in out["systems"].items():
        if "offline" in rec:
            o = rec["offline"]
            L.append(f"| {name} | {rec.get('batch', '')} | {o['tokens_per_s']:.1f} | {o['wall_s']:.1f} |")
        elif "error" in rec or not rec.get("online"):
            L.append(f"| {name} | {rec.get('batch', '')} | failed: {rec.get('error', '?')[:80]} | |")
    rows = bounds.table_rows(out["systems"])
    if rows:
        L += ["", "The workload's physical bound, per system and phase (`benchmarks/bound.py`; "
              "docs/performance.md): prefill FLOPs at the matmul rate, decode bytes at the copy bandwidth; "
              "fraction = bound / measured (1 = at the bound):", ""]
        L += bounds.table_markdown(rows)
        seen = []
        for name, rec in out["systems"].items():
            b = rec.get("bound")
            if b and b["rates"] not in seen:
                seen.append(b["rates"])
                L.append(f"\nRates ({name}): bf16 matmul {b['rates']['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s, "
                         f"copy {b['rates']['copy_bytes_per_s'] / 1e12:.3f} TB/s (read + written).")
            if b and "steps_from" in b.get("decode", {}):
                d = b["decode"]
                L.append(f"\n{name}: decode steps {d['steps']} ({d['steps_from']}; {d['steps_ideal']} at a full "
                         f"batch of {d['batch']}); prefill attention: {b['prefill']['attention']}.")
    for name, rec in out["systems"].items():
        if rec.get("online"):
            L += ["", f"Online, {name} (Poisson arrivals):", "",
                  "| rate req/s | tokens/s | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms |",
                  "|---|---|---|---|---|---|"]
            for r in rec["online"]:
                L.append(f"| {r['rate']:g} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | "
                         f"{1e3 * r['itl_p50_s']:.2f} | {1e3 * r['itl_p99_s']:.2f} |")
        if rec.get("overhead"):
            o = rec["overhead"]
            L += ["", f"Engine overhead ({name}, batch {o['batch']}): {o['engine_tokens_per_s']:.1f} tokens/s "
                  f"against {o['fixed_batch_tokens_per_s']:.1f} for the fixed-batch decode "
                  f"(ratio {o['ratio']:.3f}, overhead {o['overhead_pct']:.1f}%)"
                  + (f"; the fixed-batch step at {o['bound']['fraction']:.1%} of its bandwidth bound"
                     if o.get("bound") else "")]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
