"""The physical bound of a serving workload: its prompts' matrix products at the measured
bf16 matmul rate, its decode steps' bytes at the measured copy bandwidth.

The method and its formulas: docs/performance.md, "The physical bound of a workload".
In short, per system and phase:

- prefill: FLOPs / matmul rate. FLOPs = 2 x (weights in matrix products) per prompt token
  (projections and MLP), the LM head once per prompt (its first token), and attention
  (QK^T and AV: 4 Hq D per query-key pair per layer). The pairs: a `full` cache (ours or
  transformers') each token against its prefix, causal (T (T + 1) / 2 for a prompt of T,
  capped by a sliding window); a bounded policy read in chunked pieces of S tokens each
  real token of a piece against the piece's C + S candidates (the C slots and the whole
  piece: what `core.parallel.chunk_step` computes, and what chunked TOVA's choice is
  defined over). `flops_computed` beside it is what the engine's code runs: every piece S
  tokens long (the last one padded), the LM head on every token, and S x (C + S) pairs
  per piece for `full` too (its buffer of C slots).
- decode: max(bytes / copy bandwidth, FLOPs / matmul rate). Bytes = every weight once
  per step (one embedding row per batch row) x steps, plus, for each generated token, its
  row's state once: C slots (bounded) or its context (full), each slot its key and value
  (D numbers each, plus a float32 scale each when 8-bit) and its int32 position. Steps:
  those the engine's schedule ran (its decode chunks x steps per chunk), or, where not
  recorded (transformers), the decode tokens / the batch (said in `steps_from`).
- total: the two added; fraction = bound / measured (1.0: at the bound).

    python -m benchmarks.bound --json rates.json [--quick]   # only measure the two rates
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from msrnn_jax.config import ModelConfig

GiB = 1024 ** 3
QUANTIZED = ("int8", "fp8")


# -- the device's two rates -------------------------------------------------------------
def _best(fn, *args, reps: int) -> float:
    """fn(*args) once to compile and warm, then the best wall time of `reps` calls."""
    import jax
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate(n: int = 8192, chain: int = 8, reps: int = 5) -> dict:
    """bf16 [n, n] x [n, n] products (float32 accumulation), `chain` of them one after the
    other in one jitted call (x <- x @ b: nothing to simplify, one host dispatch for all),
    best of `reps` calls: 2 n^3 chain FLOPs / time."""
    import jax
    import jax.numpy as jnp
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = (jax.random.normal(k2, (n, n), jnp.float32) / math.sqrt(n)).astype(jnp.bfloat16)
    f = jax.jit(lambda x, y: jax.lax.fori_loop(0, chain, lambda i, z: z @ y, x))
    t = _best(f, a, b, reps=reps)
    del a, b
    return {"n": n, "chain": chain, "reps": reps, "best_s": t, "flops_per_s": 2 * n ** 3 * chain / t}


def copy_bandwidth(nbytes: int = 4 * GiB, reps: int = 10) -> dict:
    """One kernel reads n bytes and writes n bytes (bitwise NOT of uint32, which XLA
    cannot elide, the kernel of `common.copy_bandwidth`), best of `reps` calls:
    (read + written) / time."""
    import jax
    import jax.numpy as jnp
    n = nbytes // 4
    x = jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(2654435761)
    t = _best(jax.jit(lambda a: ~a), x, reps=reps)
    del x
    return {"bytes": 4 * n, "reps": reps, "best_s": t, "bytes_per_s": 2 * 4 * n / t}


def measure_rates(quick: bool = False, matmul_n: int | None = None, copy_bytes: int | None = None) -> dict:
    """Both rates, measured now on the default device (small sizes with `quick`: the CPU
    path of the same code)."""
    mm = matmul_rate(matmul_n or (128 if quick else 8192), chain=2 if quick else 8, reps=2 if quick else 5)
    cp = copy_bandwidth(copy_bytes or ((16 << 20) if quick else 4 * GiB), reps=3 if quick else 10)
    return {"matmul_flops_per_s": mm["flops_per_s"], "copy_bytes_per_s": cp["bytes_per_s"],
            "matmul": mm, "copy": cp}


# -- counts ------------------------------------------------------------------------------
def matmul_params(cfg: ModelConfig) -> int:
    """Weights one token multiplies by in the layers (projections and MLP; of a mixture of
    experts the router and the experts it runs), the LM head excluded."""
    E, L = cfg.hidden_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    mlp = (E * cfg.num_experts + cfg.experts_per_token * 3 * E * cfg.moe_intermediate_size
           if cfg.num_experts else 3 * E * cfg.intermediate_size)
    return L * (E * (q + 2 * kv) + q * E + mlp)


def lm_head_flops(cfg: ModelConfig) -> int:
    return 2 * cfg.hidden_size * cfg.vocab_size


def attention_flops(cfg: ModelConfig, pairs) -> float:
    """QK^T and AV over `pairs` query-key pairs, every layer: 4 Hq D L per pair."""
    return 4.0 * cfg.num_heads * cfg.head_dim * cfg.num_layers * float(pairs)


def causal_pairs(cfg: ModelConfig, T: np.ndarray) -> np.ndarray:
    """Query-key pairs of causal attention over prompts of T tokens (each token with its
    prefix and itself; at most W keys under a sliding window of W)."""
    T = np.asarray(T, np.float64)
    W = cfg.sliding_window
    if not W:
        return T * (T + 1) / 2
    n = np.minimum(T, W)
    return n * (n + 1) / 2 + np.maximum(T - W, 0) * W


def prefill_counts(cfg: ModelConfig, prompt_lens, bounded: bool, capacity: int | None = None,
                   chunk: int | None = None, mode: str = "chunked") -> dict:
    """FLOPs of reading these prompts (module docstring): `flops` (the bound's count) and,
    for chunked prefill, `flops_computed` (the engine's code)."""
    T = np.asarray(list(prompt_lens), np.float64)
    dense = 2.0 * matmul_params(cfg) * T.sum()
    head = lm_head_flops(cfg) * len(T)
    if bounded and mode == "chunked":
        pairs = T.sum() * (capacity + chunk)
        how = f"each prompt token against the C + S = {capacity} + {chunk} candidates of its piece"
    elif bounded and mode in ("exact", "exact-scan"):
        pairs = T.sum() * (capacity + 1)
        how = f"each prompt token against C + 1 = {capacity + 1} candidates (the slots and itself)"
    else:
        pairs = causal_pairs(cfg, T).sum()
        how = "causal: each prompt token against its prefix and itself"
    out = {"tokens": int(T.sum()), "prompts": len(T), "flops_dense": dense, "flops_lm_head": head,
           "flops_attention": attention_flops(cfg, pairs), "attention_pairs": float(pairs), "attention": how}
    out["flops"] = dense + head + out["flops_attention"]
    if mode == "chunked" and chunk:
        pieces = np.ceil(T / chunk)
        padded = float((pieces * chunk).sum())
        out["pieces"] = int(pieces.sum())
        if capacity:
            out["flops_computed"] = ((2.0 * matmul_params(cfg) + lm_head_flops(cfg)) * padded
                                     + attention_flops(cfg, padded * (capacity + chunk)))
    return out


def slot_bytes(cfg: ModelConfig, state_dtype: str) -> int:
    """One slot of one KV head of one layer: key and value (D numbers each, plus a float32
    scale each when 8-bit) and its int32 position."""
    if state_dtype in QUANTIZED:
        kv = 2 * (cfg.head_dim + 4)
    else:
        kv = 2 * cfg.head_dim * np.dtype(_np_dtype(state_dtype)).itemsize
    return kv + 4


def _np_dtype(name):
    if name in ("bfloat16", "bf16"):
        import ml_dtypes
        return ml_dtypes.bfloat16
    return name


def decode_counts(cfg: ModelConfig, prompt_lens, gen: int, batch: int, bounded: bool, capacity: int | None,
                  state_dtype: str = "bfloat16", steps: int | None = None, weight_itemsize: int = 2,
                  buffer: int | None = None) -> dict:
    """Bytes and FLOPs of the decode (module docstring). Every request generates `gen`
    tokens, the first from its prompt's logits, the other gen - 1 by decode steps; the
    j-th of those (j = 1..gen-1) reads its row's state of P + j - 1 tokens (min(C, .)
    slots when bounded) and attends over that plus itself. `steps`: the steps the schedule
    ran; None: ceil(decode tokens / batch). `buffer`: the slots per row the engine's code
    reads at every step, every row busy or not (then `bytes_code`: what it reads)."""
    from .common import weight_bytes_per_step
    P = np.asarray(list(prompt_lens), np.float64)[:, None]
    j = np.arange(1, max(gen, 1), dtype=np.float64)[None, :]
    ctx = P + j - 1  # [N, gen-1] tokens in the row's state when it is read
    if bounded:
        ctx = np.minimum(ctx, capacity)
    elif cfg.sliding_window:
        ctx = np.minimum(ctx, cfg.sliding_window)
    tokens = int(ctx.size)
    row_slots = float(ctx.sum())
    slot = slot_bytes(cfg, state_dtype)
    state_bytes = row_slots * cfg.num_layers * cfg.num_kv_heads * slot
    steps_from = "recorded: the engine's decode chunks x steps per chunk"
    if steps is None:
        steps = math.ceil(tokens / batch) if tokens else 0
        steps_from = f"not recorded: decode tokens / batch {batch}"
    wstep = weight_bytes_per_step(cfg, weight_itemsize, batch)
    flops = tokens * (2.0 * matmul_params(cfg) + lm_head_flops(cfg)) + attention_flops(cfg, row_slots + tokens)
    out = {"tokens": tokens, "steps": int(steps), "steps_from": steps_from, "batch": batch,
           "steps_ideal": math.ceil(tokens / batch) if tokens else 0, "weight_bytes_per_step": wstep,
           "state_bytes": state_bytes, "slot_bytes": slot, "state_dtype": state_dtype,
           "bytes": steps * wstep + state_bytes, "flops": flops}
    if buffer:
        out["bytes_code"] = steps * (wstep + batch * buffer * cfg.num_layers * cfg.num_kv_heads * slot)
    return out


def phase(counts: dict, measured_s: float | None, rates: dict, kind: str) -> dict:
    """A phase's record: its counts, its bound in seconds and measured / bound."""
    mm, bw = rates["matmul_flops_per_s"], rates["copy_bytes_per_s"]
    if kind == "prefill":
        bound = counts["flops"] / mm
    else:
        bound = max(counts["bytes"] / bw, counts["flops"] / mm)
        counts = {**counts, "bytes_s": counts["bytes"] / bw, "flops_s": counts["flops"] / mm}
        if counts["steps_ideal"] != counts["steps"]:  # the same work in the fewest steps
            counts["bound_s_ideal_steps"] = max(
                (counts["bytes"] - (counts["steps"] - counts["steps_ideal"]) * counts["weight_bytes_per_step"]) / bw,
                counts["flops"] / mm)
    return {**counts, "bound_s": bound, "measured_s": measured_s, "fraction": fraction(bound, measured_s)}


def fraction(bound_s, measured_s):
    if measured_s is None or bound_s is None or not measured_s > 0:
        return None
    return bound_s / measured_s


def system_bound(cfg: ModelConfig, prompt_lens, gen: int, rates: dict, *, bounded: bool, capacity: int | None,
                 chunk: int | None, batch: int, state_dtype: str, steps: int | None,
                 prefill_s: float | None, decode_s: float | None, total_s: float | None,
                 prefill_mode: str = "chunked", weight_itemsize: int = 2, buffer: int | None = None) -> dict:
    """The bound of one system's run of this request set, with its measured times."""
    pre = phase(prefill_counts(cfg, prompt_lens, bounded, capacity, chunk, prefill_mode), prefill_s, rates,
                "prefill")
    dec = phase(decode_counts(cfg, prompt_lens, gen, batch, bounded, capacity, state_dtype, steps,
                              weight_itemsize, buffer), decode_s, rates, "decode")
    tot = pre["bound_s"] + dec["bound_s"]
    return {"rates": {k: rates[k] for k in ("matmul_flops_per_s", "copy_bytes_per_s")},
            "prefill": pre, "decode": dec,
            "total": {"bound_s": tot, "measured_s": total_s, "fraction": fraction(tot, total_s)}}


def combine(bounds: list) -> dict:
    """Bounds of slices of one request set (each measured apart) as one: bounds and
    measured times add up, per phase (a phase measured in none of them stays unmeasured)."""
    out = {"slices": len(bounds), "rates": bounds[0]["rates"]}
    for ph in ("prefill", "decode", "total"):
        b = sum(x[ph]["bound_s"] for x in bounds)
        ms = [x[ph].get("measured_s") for x in bounds]
        m = None if any(v is None for v in ms) else sum(ms)
        out[ph] = {"bound_s": b, "measured_s": m, "fraction": fraction(b, m)}
    return out


PHASES = ("prefill", "decode", "total")


def table_rows(systems: dict) -> list[dict]:
    """One row per (system, phase) of the systems that have a bound."""
    rows = []
    for name, rec in systems.items():
        b = rec.get("bound")
        if not b:
            continue
        for ph in PHASES:
            p = b[ph]
            rows.append({"system": name, "phase": ph, "measured_s": p.get("measured_s"), "bound_s": p["bound_s"],
                         "fraction": p.get("fraction")})
    return rows


def pct(x) -> str:
    """A fraction as a percentage, three significant digits (57.3%, 0.0214%)."""
    return "–" if x is None else f"{100 * x:.3g}%"


def table_markdown(rows: list[dict]) -> list[str]:
    def f(x, fmt):
        return "–" if x is None else format(x, fmt)
    L = ["| system | phase | measured s | bound s | fraction |", "|---|---|---|---|---|"]
    L += [f"| {r['system']} | {r['phase']} | {f(r['measured_s'], '.4g')} | {f(r['bound_s'], '.4g')} | "
          f"{pct(r['fraction'])} |" for r in rows]
    return L


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where the measured rates go")
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU)")
    ap.add_argument("--matmul-n", type=int, default=None)
    ap.add_argument("--copy-bytes", type=int, default=None)
    args = ap.parse_args(argv)
    from .common import device_info, write_json
    rates = measure_rates(args.quick, args.matmul_n, args.copy_bytes)
    write_json(args.json, {"device": device_info(), "rates": rates})
    print(f"matmul {rates['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s, copy {rates['copy_bytes_per_s'] / 1e12:.3f} TB/s")


if __name__ == "__main__":
    main()
