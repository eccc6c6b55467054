"""The JAX side of the decode benchmarks (one model per process; see decode.py).

Every decode figure is the steady state of `msrnn_jax.testing.greedy_decode`: n greedy
steps of the decode loop (`msrnn_jax.run.decoding.decode_rows`, the one that generation
and the serving engine run) inside one `lax.scan`, the state donated. It is compiled
ahead of time for fixed (policy, capacity, batch) and called on a state fabricated at the
wanted position (`msrnn_jax.testing.fabricate_state`). Step time = median wall time of a call / n steps;
a call is followed by `block_until_ready`.

    python -m benchmarks.jax_bench --section llama --json part.json [--deadline EPOCH]
"""

from __future__ import annotations

import argparse
import gc
import glob
import gzip
import os
import re
import shutil
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from msrnn_jax.fast import kernels
from msrnn_jax.fast.layouts import fuse_projections, split_layers, stacked_layers
from msrnn_jax.run.decoding import prefill
from msrnn_jax.core.policies import make_policy
from msrnn_jax.core.state import init_state
from msrnn_jax.fast.attention import DEFAULT_IMPL
from msrnn_jax.config import preset as model_config
from msrnn_jax.testing import (decode_inputs, device_params, fabricate_state, greedy_decode, hlo_large_buffers,
                               move_state, parse_variant, state_copies)

from .common import (GiB, copy_bandwidth, device_info, matmul_rate, memory_stats, param_bytes,
                     state_read_bytes_per_step, state_row_bytes, step_flops, weight_bytes_per_step, write_json)
from .schedule import Deadline, compile_then_run

DTYPE = jnp.bfloat16
STATE_DTYPE = DTYPE  # --state-dtype: how the decode state stores keys and values (int8 / fp8: 8 bits + scales)
FULL_PROMPT = 32          # Table 1 analog: a 32-token prompt, then 4096 decoded tokens
DECODE_LEN = 4096
FULL_CAPACITY = FULL_PROMPT + DECODE_LEN  # the full cache holds every token of the run


# -- decode ----------------------------------------------------------------------------
def compile_decode(params, cfg, policy, batch, capacity, n_steps, impl=DEFAULT_IMPL,
                   options=None):
    """AOT-compile greedy_decode for these sizes (options: XLA compiler options).
    Returns (compiled, record)."""
    st, tok = decode_inputs(cfg, batch, capacity, STATE_DTYPE)
    t0 = time.perf_counter()
    lowered = greedy_decode.lower(params, cfg, policy, n_steps, st, tok, impl)
    t1 = time.perf_counter()
    options = {**COMPILER_OPTIONS, **(options or {})}
    compiled = lowered.compile(options) if options else lowered.compile()
    t2 = time.perf_counter()
    rec = {"lower_s": t1 - t0, "compile_s": t2 - t0, "compiler_options": options or {}}
    rec.update(memory_analysis(compiled))
    return compiled, rec


def memory_analysis(compiled) -> dict:
    try:
        ma = compiled.memory_analysis()
        out = {"arg_bytes": int(ma.argument_size_in_bytes), "out_bytes": int(ma.output_size_in_bytes),
               "alias_bytes": int(ma.alias_size_in_bytes), "temp_bytes": int(ma.temp_size_in_bytes)}
        out["exe_peak_bytes"] = out["arg_bytes"] + out["out_bytes"] + out["temp_bytes"] - out["alias_bytes"]
        return out
    except Exception:  # pragma: no cover (backend without the analysis)
        return {}


def _is_oom(e: Exception) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s


def time_decode(compiled, params, cfg, batch, capacity, positions, n_steps, reps, warmup=1):
    """Run the compiled decode on a fabricated state; time `reps` calls per position.
    Returns {position: {"step_s": median, "step_s_all": [...]}}."""
    out = {}
    state = fabricate_state(cfg, batch, capacity, positions[0], STATE_DTYPE)
    tok = jnp.ones((batch,), jnp.int32)
    try:
        for i, p in enumerate(positions):
            if i:
                state = move_state(state, p)
            for _ in range(warmup):
                toks, state = compiled(params, state, tok)
                jax.block_until_ready((toks, state))
                tok = toks[:, -1]
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                toks, state = compiled(params, state, tok)
                jax.block_until_ready((toks, state))
                ts.append(time.perf_counter() - t0)
                tok = toks[:, -1]
            steps = [t / n_steps for t in ts]
            out[p] = {"step_s": float(np.median(steps)), "step_s_all": steps}
    finally:
        del state
    return out


def max_batch(cfg, capacity, free_bytes, reserve=2 * GiB, multiple=8):
    """Largest batch whose state fits in free_bytes - reserve (`build_decode` then fits
    the executable's temporaries too)."""
    b = int((free_bytes - reserve) // state_row_bytes(cfg, capacity, STATE_DTYPE))
    if b >= 2 * multiple:
        b -= b % multiple
    return max(b, 1)


def decode_record(cfg, pname, capacity, batch, position, step_s, bw, uses_score=False):
    wb = weight_bytes_per_step(cfg, batch=batch)
    sb = state_read_bytes_per_step(cfg, batch, capacity, STATE_DTYPE, uses_score=uses_score)
    rec = {"policy": pname, "capacity": capacity, "batch": batch, "position": position,
           "state_dtype": jnp.dtype(STATE_DTYPE).name if not isinstance(STATE_DTYPE, str) else STATE_DTYPE,
           "step_ms": 1e3 * step_s, "tokens_per_s": batch / step_s,
           "weight_bytes": wb, "state_bytes": sb, "bytes_per_step": wb + sb,
           "achieved_bytes_per_s": (wb + sb) / step_s, "flops_per_step": step_flops(cfg, batch, capacity)}
    rec["achieved_tflops"] = rec["flops_per_step"] / step_s / 1e12
    if bw:
        rec["bw_fraction"] = rec["achieved_bytes_per_s"] / bw
        rec["bound_step_ms"] = 1e3 * (wb + sb) / bw
    return rec


def run_compiled(compiled, crec, params, cfg, pname, capacity, batch, positions, n_steps, reps, bw,
                 results, base):
    """Time a compiled configuration; append one record per position. Returns the error
    record on failure (else None)."""
    try:
        timings = time_decode(compiled, params, cfg, batch, capacity, positions, n_steps, reps)
    except Exception as e:
        err = {**base, "policy": pname, "capacity": capacity, "batch": batch, "stage": "run",
               "oom": _is_oom(e), "error": repr(e)[:500]}
        results["errors"].append(err)
        return err
    for p, t in timings.items():
        rec = decode_record(cfg, pname, capacity, batch, p, t["step_s"], bw, make_policy(pname).uses_score)
        rec.update(base)
        rec.update(crec)
        rec["step_ms_all"] = [1e3 * s for s in t["step_s_all"]]
        rec["n_steps_per_call"] = n_steps
        results["decode"].append(rec)
    return None


def run_decode_config(params, cfg, pname, capacity, batch, positions, n_steps, reps, bw, results,
                      label="", extra=None, impl=DEFAULT_IMPL):
    """Compile + time one configuration; append one record per position to results."""
    base = {"label": label, "model": results["model"], **(extra or {})}
    try:
        compiled, crec = compile_decode(params, cfg, make_policy(pname), batch, capacity, n_steps, impl)
    except Exception as e:  # pragma: no cover (device problems)
        results["errors"].append({**base, "policy": pname, "capacity": capacity, "batch": batch,
                                  "stage": "compile", "error": repr(e)[:500]})
        return None, None
    run_compiled(compiled, crec, params, cfg, pname, capacity, batch, positions, n_steps, reps, bw, results, base)
    return compiled, crec


# -- profile ---------------------------------------------------------------------------
def profile_call(fn, logdir: str) -> dict:
    """Trace fn() with the JAX profiler; summarise every line of the GPU plane (kernels
    per stream, XLA ops): event count, busy time, span, top events by total time."""
    jax.profiler.start_trace(logdir)
    try:
        fn()
    finally:
        jax.profiler.stop_trace()
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        return {"error": "no trace written"}
    from jax.profiler import ProfileData
    pd = ProfileData.from_file(paths[0])
    lines = []
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            evs = [(ev.name, float(ev.start_ns), float(ev.duration_ns)) for ev in line.events]
            if not evs:
                continue
            evs.sort(key=lambda k: k[1])
            busy = sum(k[2] for k in evs)
            span = evs[-1][1] + evs[-1][2] - evs[0][1]
            by_name: dict[str, list] = {}
            for n, _, d in evs:  # one kernel per layer: msrnn_slot_scores__17 -> msrnn_slot_scores
                by_name.setdefault(re.sub(r"(__\d+|\.\d+)$", "", n), []).append(d)
            top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:60]
            lines.append({"line": line.name, "events": len(evs), "busy_ms": busy / 1e6, "span_ms": span / 1e6,
                          "top": [{"name": n[:160], "count": len(d), "total_ms": sum(d) / 1e6,
                                   "mean_us": float(np.mean(d)) / 1e3} for n, d in top]})
    if not lines:
        return {"error": "no GPU lines in the trace", "planes": [p.name for p in pd.planes]}
    return {"lines": lines}


# -- prefill ---------------------------------------------------------------------------
def time_prefill(params, cfg, pname, capacity, n_tokens, mode, chunk=None, batch=1, runs=2):
    """Prefill `batch` prompts of n_tokens through generate.prefill. The first run
    compiles; the record's tokens_per_s is from the last run (steady state)."""
    policy = make_policy(pname)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, cfg.vocab_size, n_tokens).tolist() for _ in range(batch)]
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        last, state = prefill(params, cfg, policy, None, capacity, seqs, mode=mode, chunk=chunk, dtype=DTYPE)
        jax.block_until_ready((last, state))
        ts.append(time.perf_counter() - t0)
        del last, state
    rec = {"policy": pname, "capacity": capacity, "mode": mode, "chunk": chunk, "batch": batch,
           "prompt_tokens": n_tokens, "first_run_s": ts[0], "run_s": ts[-1],
           "tokens_per_s": batch * n_tokens / ts[-1], "ms_per_token": 1e3 * ts[-1] / (batch * n_tokens)}
    if runs > 1:
        rec["compile_s_approx"] = ts[0] - ts[-1]
    return rec


def time_exact_prefill(params, cfg, pname, capacity, n_tokens, batch=1, layer_major=False):
    """Exact prefill, AOT-compiled, then one timed run: the token-by-token scan of the step
    (mode "exact-scan") or the same step ordered layer by layer ("exact", the default path)."""
    from msrnn_jax.fast.layer_major import layer_scan
    from msrnn_jax.core.step import scan
    fn = layer_scan if layer_major else scan
    policy = make_policy(pname)
    st = init_state(cfg, batch, capacity, DTYPE)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, n_tokens)), jnp.int32)
    active = jnp.ones(tokens.shape, bool)
    t0 = time.perf_counter()
    compiled = fn.lower(params, cfg, policy, st, tokens, active, emit="last").compile()
    t1 = time.perf_counter()
    last, st = compiled(params, st, tokens, active)
    jax.block_until_ready((last, st))
    t2 = time.perf_counter()
    return {"policy": pname, "capacity": capacity, "mode": "exact" if layer_major else "exact-scan",
            "chunk": None, "batch": batch,
            "prompt_tokens": n_tokens, "compile_s": t1 - t0, "run_s": t2 - t1,
            "tokens_per_s": batch * n_tokens / (t2 - t1), "ms_per_token": 1e3 * (t2 - t1) / (batch * n_tokens),
            **memory_analysis(compiled)}


# -- sections --------------------------------------------------------------------------
def _setup(results, model_name, bw_bytes, matmul_n=8192):
    cfg = model_config(model_name)
    results["model"] = model_name
    results["config"] = cfg.to_dict()
    results["info"] = device_info()
    if bw_bytes:
        results["bandwidth"] = copy_bandwidth(bw_bytes)
        results["matmul"] = matmul_rate(matmul_n)
    t0 = time.perf_counter()
    params = device_params(cfg, DTYPE)
    jax.block_until_ready(params)
    results["params_s"] = time.perf_counter() - t0
    results["param_bytes"] = param_bytes(cfg)
    results["memory_after_params"] = memory_stats()
    return cfg, params


def free_bytes() -> int:
    s = memory_stats()
    if "bytes_limit" in s:
        return s["bytes_limit"] - s.get("bytes_in_use", 0)
    return 64 << 20  # CPU (smoke tests): pretend 64 MiB


# The decode grid in priority order (a deadline cuts the tail): policy/capacity/batch
# [@variant], capacity F = the full cache (FULL_CAPACITY), batch max = the largest that
# fits. Fixed batches run the section's --variant (split:einsum, XLA's own kernels); the
# largest batches run split:pallas (msrnn_jax.fast.kernels: custom kernels that read the state
# in place, where XLA's would carry a transposed copy and need autotuning scratch the size
# of a whole buffer). The Pallas variant is also timed at the headline fixed batches.
_P = "@split:pallas"
DEFAULT_JOBS = ",".join([
    # headline fixed batches
    "tova/512/1", "window/512/1", "full/F/1", "tova/512/32", "window/512/32", "full/F/32",
    "tova/512/8", "window/512/8",
    # the largest batches: the Table 1 analog
    *(j + _P for j in ("tova/512/max", "window/512/max", "full/F/max", "tova/256/max", "tova/1024/max",
                       "tova/2048/max", "window/256/max", "window/1024/max", "window/2048/max", "sink/512/max",
                       "sink/256/max", "sink/1024/max", "sink/2048/max")),
    # the headline fixed batches in the other implementation
    *(j + _P for j in ("tova/512/1", "window/512/1", "full/F/1", "tova/512/32", "window/512/32", "full/F/32")),
    # the rest of the grid
    "sink/512/1", "tova/256/1", "tova/1024/1", "tova/2048/1", "window/256/1", "window/1024/1", "window/2048/1",
    "tova/256/32", "tova/1024/32", "tova/2048/32", "window/256/32", "window/1024/32", "window/2048/32",
    "sink/512/32", "full/F/8", "sink/512/8", "tova/256/8", "tova/1024/8", "tova/2048/8",
    "window/256/8", "window/1024/8", "window/2048/8", "sink/256/1", "sink/1024/1", "sink/2048/1",
    "sink/256/32", "sink/1024/32", "sink/2048/32", "sink/256/8", "sink/1024/8", "sink/2048/8",
])


def _use_variant(variant, params):
    """Params in the layout a variant wants (stacked or split layers). The new layout is
    made on the host, after the old one is freed: building it beside the old one on the
    device left a params-sized hole at the start of the allocator's pool, and a largest-
    batch state (two buffers of ~56 GiB each) then no longer fit in one piece."""
    split, _ = parse_variant(variant)
    host = jax.device_get(params)
    for a in jax.tree.leaves(params):
        a.delete()
    params = split_layers(host) if split else {**host, "layers": stacked_layers(host)}
    if split == "fused":
        params = jax.tree.map(np.asarray, fuse_projections(params))  # joined on the host
    params = jax.device_put(params)
    jax.block_until_ready(params)
    gc.collect()
    return params


def _parse_jobs(spec: str, full_capacity: int, variant: str):
    """'policy/C/B[@variant],...' -> [(policy, C, B, variant)]."""
    jobs = []
    for j in spec.split(","):
        if not j:
            continue
        j, _, v = j.partition("@")
        p, c, b = j.split("/")
        jobs.append((p, full_capacity if c == "F" else int(c), b if b == "max" else int(b), v or variant))
    return jobs


LARGEST_BATCH_OPTIONS = {"xla_gpu_autotune_level": 0}
COMPILER_OPTIONS: dict = {}  # --compiler-option KEY=VALUE, for every decode compile


def parse_compiler_options(items) -> dict:
    """['key=value', ...] -> {key: bool | int | str} (XLA debug options by name)."""
    out = {}
    for item in items or []:
        k, _, v = item.partition("=")
        out[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.lstrip("-").isdigit() else v)
    return out


def build_decode(params, cfg, pname, capacity, batch, n_steps, budget=None, free=None, reserve=0,
                 cap=None, impl=DEFAULT_IMPL, options=None):
    """Compile one decode configuration (options: XLA compiler options). batch="max":
    start from the largest batch whose state fits in `free` and shrink it until XLA's own
    memory analysis of the executable (arguments + outputs + temporaries - aliased) fits
    in `budget`. Returns (batch, compiled, record) or raises."""
    policy = make_policy(pname)
    fixed = batch != "max"
    b = batch if fixed else max_batch(cfg, capacity, free, reserve=reserve)
    if not fixed and cap:
        b = min(b, cap)
    shrinks = []
    while True:
        compiled, crec = compile_decode(params, cfg, policy, b, capacity, n_steps, impl, options)
        peak = crec.get("exe_peak_bytes")
        if fixed or budget is None or peak is None or peak <= budget or b == 1:
            break
        # peak = resident params + batch x (state row + that row's temporaries)
        resident = min(crec.get("arg_bytes", 0), param_bytes(cfg))
        per_row = max(1.0, (peak - resident) / b)
        nb = int((budget - resident) // per_row)
        nb = max(1, nb - nb % 8 if nb >= 16 else nb)
        shrinks.append({"batch": b, "exe_peak_bytes": peak})
        b = min(nb, b - 1)
    crec["shrinks"] = shrinks
    crec["state_copies"] = state_copies(compiled, cfg, capacity, b)
    return b, compiled, crec


def section_decode(args, results, save):
    """The decode grid for one model (see DEFAULT_JOBS): bounded policies at positions
    4096 and 16384, `full` (capacity 4128 = 32-token prompt + 4096 decoded) at ~4096.

    Every configuration is compiled ahead of time, --compile-workers at a time (XLA
    compiles in C++, off the GIL), before any is timed, so that autotuning never runs
    beside a timed call; then they run one by one in job order."""
    dl = Deadline(args.deadline)
    cfg, params = _setup(results, args.model, args.bw_bytes, args.matmul_n)
    bw = results.get("bandwidth", {}).get("copy_bytes_per_s")
    save()
    n, reps = args.n_steps, args.reps
    full_c = args.full_capacity or FULL_CAPACITY
    variant = args.variant or "split:einsum"
    jobs = _parse_jobs(args.jobs, full_c, variant)
    if len({parse_variant(j[3])[0] for j in jobs}) > 1:
        raise SystemExit("one section runs one params layout: split or stacked variants, not both")
    params = _use_variant(variant, params)
    results["variants"] = sorted({j[3] for j in jobs})
    gc.collect()
    free = free_bytes()
    in_use = memory_stats().get("bytes_in_use", 0)
    # the params are resident already and counted in the executable's arguments
    budget = free + min(in_use, param_bytes(cfg)) - args.reserve_bytes
    results["memory_budget"] = {"free": free, "in_use": in_use, "exe_budget": budget}

    # XLA's autotuner runs candidate kernels on scratch copies of their operands, which at
    # the largest batches include the whole keys or values buffer when XLA's own kernels
    # read the state: those compile one at a time (below), or without autotuning
    # (--no-autotune-largest). The Pallas kernels are not autotuned, so their largest
    # batches compile in parallel like the rest.
    max_options = None if args.autotune_largest else LARGEST_BATCH_OPTIONS

    def alone(job):
        return job[2] == "max" and parse_variant(job[3])[1].attention != "pallas"

    def build(job):
        pname, C, B, v = job
        return build_decode(params, cfg, pname, C, B, n, budget, free, args.reserve_bytes, args.max_batch_cap,
                            parse_variant(v)[1], max_options if B == "max" else None)

    t0 = time.perf_counter()

    def compile_phase_over():
        results["compile_phase_s"] = time.perf_counter() - t0
        results["compile_workers"] = args.compile_workers
        save()

    # compiling may take --compile-share of the section's time
    for job, skip, fut in compile_then_run(jobs, build, dl, args.compile_workers, alone, args.compile_share,
                                           lambda job: 8 if job[2] != "max" else 15, compile_phase_over):
        pname, C, B, variant = job
        if skip:
            results["skipped"].append({"policy": pname, "capacity": C, "batch": B, "variant": variant,
                                       "reason": skip})
            continue
        base = {"label": "max" if B == "max" else "grid", "model": results["model"], "variant": variant}
        try:
            b, compiled, crec = fut.result()
        except Exception as e:  # pragma: no cover (device problems)
            results["errors"].append({**base, "policy": pname, "capacity": C, "batch": B,
                                      "stage": "compile", "oom": _is_oom(e), "error": repr(e)[:500]})
            save()
            continue
        crec["compile_workers"] = 1 if job == jobs[0] else args.compile_workers
        positions = [C - FULL_PROMPT - n * (reps + 1)] if pname == "full" else \
            [int(p) for p in args.positions.split(",")]
        if B == "max":
            base.update({"max_batch": True, "free_bytes": free})
        for attempt in range(3):
            before = len(results["decode"])
            err = run_compiled(compiled, crec, params, cfg, pname, C, b, positions, n, reps, bw, results,
                               {**base, "attempt": attempt})
            gc.collect()
            if len(results["decode"]) > before or B != "max" or not (err and err.get("oom")):
                break
            b = max(1, int(b * 0.9) // 8 * 8)  # XLA's analysis was short: shrink, recompile
            try:
                b, compiled, crec = build_decode(params, cfg, pname, C, b, n, impl=parse_variant(variant)[1],
                                                 options=max_options)
            except Exception as e:  # pragma: no cover
                results["errors"].append({**base, "policy": pname, "capacity": C, "batch": b,
                                          "stage": "compile", "error": repr(e)[:500]})
                break
        del compiled
        save()
    results["memory_end"] = memory_stats()


def prefill_rate(cfg, rec, matmul):
    """A prefill record's FLOPs (`bound.prefill_counts`: the serve benchmark's count, the
    LM head once), achieved TFLOP/s and its fraction of the measured matmul rate."""
    from .bound import prefill_counts
    n = prefill_counts(cfg, [rec["prompt_tokens"]] * rec["batch"], True, rec["capacity"], rec["chunk"],
                       rec["mode"] if rec["mode"] != "oneshot" else "causal")
    rate = n["flops"] / rec["run_s"]
    out = {"flops": n["flops"], "flops_attention": n["flops_attention"], "attention": n["attention"],
           "achieved_tflops": rate / 1e12}
    if "flops_computed" in n:
        out["flops_computed"] = n["flops_computed"]
    if matmul:
        out["matmul_fraction"] = rate / matmul["flops_per_s"]
    return out


def section_prefill(args, results, save):
    dl = Deadline(args.deadline)
    cfg, params = _setup(results, args.model, 0)
    if args.variant:  # every mode reads the variant's layout (split: unrolled layers, `fast.layouts.scan_layers`)
        params = _use_variant(args.variant, params)
    from .bound import matmul_rate as best_matmul_rate
    on_cpu = jax.default_backend() == "cpu"  # the same path at a small size
    try:
        results["matmul"] = best_matmul_rate(min(args.matmul_n, 256) if on_cpu else args.matmul_n,
                                             chain=2 if on_cpu else 8, reps=2 if on_cpu else 5)
        print(f"matmul rate {results['matmul']['flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
    except Exception as e:  # noqa: BLE001  the timings go on without it
        results["errors"].append({"matmul": repr(e)[:300]})
        results["matmul"] = None
    save()
    T, C, pname = args.prefill_tokens, args.prefill_capacity, args.prefill_policy
    jobs = [(m, args.chunk if m == "chunked" else None) for m in args.prefill_modes.split(",")]
    for mode, chunk in jobs:
        if not dl.ok(30):
            results["skipped"].append({"prefill": mode, "reason": "deadline"})
            continue
        try:
            if mode in ("exact", "exact-scan"):
                rec = time_exact_prefill(params, cfg, pname, C, args.exact_tokens or T,
                                         layer_major=mode == "exact")
            else:
                rec = time_prefill(params, cfg, pname, C, T, mode, chunk)
            rec["model"] = args.model
            rec.update(prefill_rate(cfg, rec, results.get("matmul")))
            print(f"prefill {rec['mode']}" + (f" S={rec['chunk']}" if rec["chunk"] else "") +
                  f": {rec['tokens_per_s']:,.0f} tokens/s, {rec['achieved_tflops']:.1f} TFLOP/s"
                  + (f", {rec['matmul_fraction']:.1%} of the matmul rate" if "matmul_fraction" in rec else ""),
                  flush=True)
            results["prefill"].append(rec)
        except Exception as e:
            results["errors"].append({"prefill": mode, "error": repr(e)[:500], "oom": _is_oom(e)})
        save()
    results["memory_end"] = memory_stats()


def section_probe(args, results, save):
    """Implementation variants of the step at the headline sizes, with the optimised
    HLO's large buffers and a kernel profile. The first variant also times window and
    checks that step cost does not depend on the position / fill of the state."""
    dl = Deadline(args.deadline)
    cfg, params = _setup(results, args.model, 0)
    save()
    n, reps = args.n_steps, args.reps
    for vi, variant in enumerate(args.variants.split(",")):
        _, impl = parse_variant(variant)
        params = _use_variant(variant, params)  # one layout on the device at a time
        cases = [(c.split("/")[0], int(c.split("/")[1]), int(c.split("/")[2])) for c in args.probe_cases.split(",")]
        cases = [(p, C, args.probe_batch if B == 0 else B) for p, C, B in cases]
        if vi == 0 and args.probe_window:
            cases += [("window", C, B) for p, C, B in cases if p == "tova"]
        for pname, C, B in cases:
            if not dl.ok(25):
                results["skipped"].append({"probe": variant, "policy": pname, "batch": B})
                continue
            positions = [0, 4096, 16384] if (pname == "tova" and vi == 0 and args.probe_window) else [4096]
            compiled, crec = run_decode_config(params, cfg, pname, C, B, positions, n, reps, None, results,
                                               "probe", {"variant": variant}, impl)
            if compiled is None:
                continue
            text = compiled.as_text()
            big = hlo_large_buffers(text, args.hlo_min_bytes)
            results["probe"].append({"variant": variant, "policy": pname, "capacity": C, "batch": B,
                                     "hlo_chars": len(text), "hlo_large_buffers": big[:80],
                                     "hlo_copy_count": len(re.findall(r"= \S+ copy(?:-start)?\(", text))})
            if args.dump_dir:
                with gzip.open(os.path.join(args.dump_dir, f"hlo-{variant.replace(':', '-')}-{pname}-C{C}-B{B}.txt.gz"),
                               "wt") as f:
                    f.write(text)
            if pname == "tova" and dl.ok(15):
                holder = {"state": fabricate_state(cfg, B, C, 4096, STATE_DTYPE)}
                tok = jnp.ones((B,), jnp.int32)

                def go():
                    r = compiled(params, holder["state"], tok)
                    jax.block_until_ready(r)
                    holder["state"] = r[1]

                go()  # warm
                d = tempfile.mkdtemp()
                try:
                    prof = profile_call(go, d)
                except Exception as e:  # pragma: no cover
                    prof = {"error": repr(e)[:300]}
                shutil.rmtree(d, ignore_errors=True)
                prof.update({"variant": variant, "policy": pname, "capacity": C, "batch": B, "n_steps": n})
                results["profile"].append(prof)
                del holder
            del compiled
            save()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", choices=["decode", "prefill", "probe"], required=True)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--json", required=True)
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds; stop starting work after")
    ap.add_argument("--bw-bytes", type=int, default=4 * GiB)
    ap.add_argument("--matmul-n", type=int, default=8192, help="size of the square bf16 product timed for the matmul rate")
    ap.add_argument("--n-steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--jobs", default=DEFAULT_JOBS, help="policy/C/B,... (C=F: full capacity; B=max)")
    ap.add_argument("--positions", default="4096,16384")
    ap.add_argument("--full-capacity", type=int, default=None)
    ap.add_argument("--max-batch-cap", type=int, default=None)
    ap.add_argument("--reserve-bytes", type=int, default=2 * GiB,
                    help="device memory left free when sizing the largest batch")
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--exact-tokens", type=int, default=None)
    ap.add_argument("--prefill-capacity", type=int, default=512)
    ap.add_argument("--prefill-policy", default="tova")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--prefill-modes", default="exact,exact-scan,oneshot,chunked")
    ap.add_argument("--variants", default="scan:einsum,scan:reduce,unroll:einsum,split:einsum,unroll:reduce")
    ap.add_argument("--probe-batch", type=int, default=256)
    ap.add_argument("--probe-cases", default="tova/512/1,tova/512/0", help="policy/C/B (B=0: --probe-batch)")
    ap.add_argument("--no-probe-window", dest="probe_window", action="store_false")
    ap.add_argument("--hlo-min-bytes", type=int, default=16 << 20)
    ap.add_argument("--dump-dir", default=None)
    ap.add_argument("--variant", default=None,
                    help="'loop:attention' for the decode/prefill sections (default: the library's)")
    ap.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an XLA option for every decode compile, e.g. xla_gpu_autotune_level=0")
    ap.add_argument("--autotune-largest", dest="autotune_largest", action="store_true", default=True,
                    help="decode section: autotune the largest-batch configurations (the default)")
    ap.add_argument("--no-autotune-largest", dest="autotune_largest", action="store_false",
                    help="decode section: compile the largest-batch configurations without autotuning "
                         "(fits in less memory, but the untuned kernels reached 7.7%% of the bandwidth on an H200, against 66-83%% tuned)")
    ap.add_argument("--compile-share", type=float, default=0.6,
                    help="decode section: share of its time that compiling may take")
    ap.add_argument("--compile-workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                    help="decode section: configurations compiled at once")
    ap.add_argument("--state-dtype", default="bfloat16", choices=["bfloat16", "float32", "int8", "fp8"],
                    help="how the decode state stores keys and values (int8/fp8: 8 bits and a scale per slot)")
    ap.add_argument("--kernel-tuning", action="append", default=[], metavar="BYTES:BLOCK:WARPS",
                    help="the Pallas kernels' slots per program (limit) and num_warps (0: Triton's) for states of "
                         "BYTES bytes per number (kernels.TUNING; e.g. 1:512:8 for int8/fp8)")
    args = ap.parse_args(argv)
    for item in args.kernel_tuning:
        nbytes, block, warps = (int(x) for x in item.split(":"))
        kernels.TUNING[nbytes] = (block, warps or None)
    global STATE_DTYPE
    STATE_DTYPE = args.state_dtype if args.state_dtype in ("int8", "fp8") else jnp.dtype(args.state_dtype)
    COMPILER_OPTIONS.update(parse_compiler_options(args.compiler_option))
    try:  # XLA's rematerialisation only adds whole-state copies here (see section_decode)
        jax.config.update("jax_compiler_enable_remat_pass", False)
    except Exception:  # pragma: no cover (option absent)
        pass
    results = {"section": args.section, "model": args.model, "argv": sys.argv, "variant": args.variant or "scan:einsum", "decode": [], "prefill": [],
               "probe": [], "profile": [], "errors": [], "skipped": [], "started": time.time(),
               "kernel_tuning": {str(k): list(v) for k, v in kernels.TUNING.items()}}

    def save():
        results["elapsed_s"] = time.time() - results["started"]
        write_json(args.json, results)

    try:
        {"decode": section_decode, "prefill": section_prefill, "probe": section_probe}[args.section](
            args, results, save)
    except Exception as e:
        results["errors"].append({"stage": "section", "error": repr(e)[:1000], "trace": traceback.format_exc()[-3000:]})
        save()
        raise
    save()
    return results


if __name__ == "__main__":
    main()
