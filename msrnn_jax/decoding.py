"""Prompt prefill and streaming generation: the model run as an RNN.

A prompt is read into the state (`prefill`: exact, oneshot or chunked), then tokens are
emitted by `decode_chunk`, a `lax.scan` over a fixed number of steps compiled once and
called repeatedly from the host, which streams what each chunk produced. Shapes are
bucketed (prompt lengths padded to a multiple of `PAD`, batch and capacity fixed per
call) so nothing recompiles between chunks or between calls of the same sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import attention
from . import model as _m
from .config import ModelConfig
from .errors import InvalidArgument, check_choice, check_int
from .model import DEFAULT_IMPL, StepImpl, chunk_step, prefill_oneshot, scan_last_logits, step
from .policies import Policy, capacity_for, step_choice
from .sampling import GREEDY, Sampling
from .state import State

PAD = 32  # prompt lengths are padded up to a multiple of this (padding never enters a row)
PREFILL_MODES = ("exact", "oneshot", "chunked")


def check_prefill(mode: str, chunk: int | None, modes=PREFILL_MODES) -> tuple[str, int | None]:
    """(mode, chunk) checked once for every caller: a known mode, and a chunk size
    S >= 1 exactly when the mode is chunked."""
    mode = check_choice("prefill mode", mode, modes, "prefill")
    if mode == "chunked":
        if chunk is None:
            raise InvalidArgument("chunked prefill needs chunk (the chunk size S)", "chunk")
        return mode, check_int("chunk", chunk)
    if chunk is not None:
        raise InvalidArgument(f"chunk applies to chunked prefill only, not {mode}", "chunk")
    return mode, None


def pad_batch(seqs: Sequence[Sequence[int]], multiple: int = PAD):
    """Right-pad token lists into (tokens [B, T] int32, active [B, T] bool), T a multiple."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise InvalidArgument("empty prompt")
    T = max(len(s) for s in seqs)
    T = -(-T // multiple) * multiple
    tokens = np.zeros((len(seqs), T), np.int32)
    active = np.zeros((len(seqs), T), bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
        active[i, : len(s)] = True
    return tokens, active


def _row_last(logits, n):
    """Each row's logits after its n-th token: logits [B, T, V], n int [B] -> [B, V]."""
    return jnp.take_along_axis(logits, jnp.asarray(np.maximum(n - 1, 0))[:, None, None], 1)[:, 0]


def prefill(params, cfg: ModelConfig, policy: Policy, state: State | None, capacity: int,
            seqs: Sequence[Sequence[int]], mode: str = "exact", chunk: int | None = None,
            dtype=None, layer_major: bool = False):
    """Read prompts into a state. Returns (logits after each row's last token [B, V], state).

    `state` None starts from an empty state of `capacity` slots; otherwise the prompts
    continue that state (exact and chunked only: oneshot reads a prompt from scratch).
    `layer_major` (exact): the same step computed layer by layer (`layer_major`), the
    same kept positions and logits within float rounding, several times faster on a CPU.
    """
    mode, chunk = check_prefill(mode, chunk)
    dtype = dtype or params["embed"].dtype
    tokens, active = pad_batch(seqs)
    B = tokens.shape[0]
    if mode == "oneshot":
        if state is not None:
            raise InvalidArgument("oneshot prefill reads a prompt into an empty state; use exact or chunked")
        lengths = active.sum(1).astype(np.int32)
        logits, state = prefill_oneshot(params, cfg, policy, capacity, jnp.asarray(tokens), jnp.asarray(lengths))
        return _row_last(logits, lengths), state.replace(keys=state.keys.astype(dtype), values=state.values.astype(dtype))
    if state is None:
        state = State.init(cfg, B, capacity, dtype)
    if mode == "exact":
        run = layer_major_last_logits if layer_major else scan_last_logits
        return run(params, cfg, policy, state, jnp.asarray(tokens), jnp.asarray(active))
    last = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    n_chunks = -(-tokens.shape[1] // chunk)
    tokens = np.pad(tokens, ((0, 0), (0, n_chunks * chunk - tokens.shape[1])))
    active = np.pad(active, ((0, 0), (0, n_chunks * chunk - active.shape[1])))
    for c in range(n_chunks):
        sl = slice(c * chunk, (c + 1) * chunk)
        if not active[:, sl].any():
            break
        logits, state = chunk_step(params, cfg, policy, state, jnp.asarray(tokens[:, sl]), jnp.asarray(active[:, sl]))
        n_act = active[:, sl].sum(1)
        last = jnp.where(jnp.asarray(n_act > 0)[:, None], _row_last(logits, n_act), last)
    return last, state


@functools.partial(jax.jit, static_argnames=("sampling",))
def first_token(sampling: Sampling, logits, key, budget, eos_ids):
    """Sample each row's first new token from the prompt's logits (no model step: cheap
    to compile, and the time to first token is the prompt's time)."""
    key, sub = jax.random.split(key)
    tok = sampling(logits, sub)
    budget = budget - 1
    finished = jnp.isin(tok, eos_ids) | (budget <= 0)
    return tok, key, finished, budget


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "sampling", "n_steps", "impl"),
                   donate_argnames=("state",))
def decode_chunk(params, cfg: ModelConfig, policy: Policy, sampling: Sampling, n_steps: int,
                 state: State, tok, key, pending, finished, budget, eos_ids,
                 impl: StepImpl = DEFAULT_IMPL):
    """n_steps of the RNN: feed each row's pending token, sample the next one.

    tok [B]: the last emitted token; pending [B]: it has not been fed yet; finished [B]:
    it was the row's last (an EOS, or the budget [B] ran out). Every emitted token is fed,
    EOS included, so the state can continue a chat; finished rows then stop.
    Returns (tokens [B, n], emitted [B, n], state, logits, tok, key, pending, finished, budget).
    """
    logits = jnp.zeros((tok.shape[0], cfg.vocab_size), jnp.float32)

    def body(carry, _):
        st, logits, tok, key, pending, finished, budget = carry
        new_logits, st = step(params, cfg, policy, st, tok, pending, impl=impl)
        logits = jnp.where(pending[:, None], new_logits, logits)
        key, sub = jax.random.split(key)
        nxt = sampling(logits, sub)
        emit = pending & ~finished
        budget = budget - emit.astype(jnp.int32)
        finished = finished | (emit & (jnp.isin(nxt, eos_ids) | (budget <= 0)))
        tok = jnp.where(emit, nxt, tok)
        return (st, logits, tok, key, emit, finished, budget), (nxt, emit)

    carry = (state, logits, tok, key, pending, finished, budget)
    carry, (toks, emitted) = jax.lax.scan(body, carry, None, length=n_steps)
    state, logits, tok, key, pending, finished, budget = carry
    return toks.T, emitted.T, state, logits, tok, key, pending, finished, budget


@dataclasses.dataclass
class GenerateResult:
    tokens: list[list[int]]  # emitted tokens per row (EOS included when reached)
    state: State             # the state after the last emitted token: keep it, fork it
    logits: jax.Array        # next-token logits [B, V], to continue from the state
    time_to_first_token: float
    decode_tokens_per_s: float   # after the first decode chunk (whose call may compile)
    prefill_s: float
    texts: list[str] = dataclasses.field(default_factory=list)  # decoded rows (with a tokenizer)


def generate_tokens(params, cfg: ModelConfig, policy: Policy, capacity: int | None,
             prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = GREEDY,
             seed: int = 0, prefill_mode: str = "exact", chunk: int | None = None,
             state: State | None = None, eos_ids: Sequence[int] = (),
             on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None,
             steps_per_call: int = 16, impl: StepImpl = DEFAULT_IMPL,
             layer_major: bool = False) -> GenerateResult:
    """Read `prompts` (token lists, one per row; ragged is fine) into a fresh state or
    continue `state`, then decode up to `max_new_tokens` per row. `on_tokens(tokens,
    emitted)` is called with each chunk of [B, steps_per_call] tokens as they arrive.
    impl: how the decode step computes (`model.StepImpl`); e.g. attention="pallas" for
    the largest batches on a GPU (benchmarks/results/); layer_major: see `prefill`."""
    check_int("max_new_tokens", max_new_tokens)
    B = len(prompts)
    if state is not None and state.batch != B:
        raise InvalidArgument(f"the state has {state.batch} rows but {B} prompts were given")
    if state is None:
        capacity = capacity_for(policy, capacity, max(len(p) for p in prompts) + max_new_tokens, 2 * PAD)
    else:
        state = state.copy()  # the caller's state stays valid (the calls below donate theirs)
    t0 = time.perf_counter()
    logits, state = prefill(params, cfg, policy, state, capacity, prompts, prefill_mode, chunk,
                            layer_major=layer_major)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t0
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    budget = jnp.full((B,), max_new_tokens, jnp.int32)
    tok, key, finished, budget = first_token(sampling, logits, jax.random.key(seed), budget, eos)
    first = np.asarray(tok)
    ttft = time.perf_counter() - t0
    out: list[list[int]] = [[int(t)] for t in first]
    if on_tokens is not None:
        on_tokens(first[:, None], np.ones((B, 1), bool))
    pending = jnp.ones((B,), bool)
    # the decode rate counts from the end of the first chunk, whose call may compile
    t_first, n_decoded, t_steady, n_steady = time.perf_counter(), 0, None, 0
    while True:
        toks, emitted, state, logits, tok, key, pending, finished, budget = decode_chunk(
            params, cfg, policy, sampling, steps_per_call, state, tok, key, pending, finished,
            budget, eos, impl)
        toks, emitted = np.asarray(toks), np.asarray(emitted)
        n_decoded += int(emitted.sum())
        if t_steady is None:
            t_steady = time.perf_counter()
        else:
            n_steady += int(emitted.sum())
        for b in range(B):
            out[b].extend(int(t) for t in toks[b][emitted[b]])
        if on_tokens is not None and emitted.any():
            on_tokens(toks, emitted)
        if not bool(np.asarray(pending).any()):
            break
    end = time.perf_counter()
    if n_steady:  # steady state: every chunk after the first
        rate = n_steady / (end - t_steady)
    else:  # one chunk only: its time includes any compilation
        rate = n_decoded / (end - t_first) if n_decoded and end > t_first else float("nan")
    return GenerateResult(out, state, logits, ttft, rate, prefill_s)


# -- exact, layer by layer -------------------------------------------------------------
def layer_major(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active,
                impl: StepImpl = DEFAULT_IMPL):
    """What `model.step` computes token after token (the exact step of docs/design.md §3,
    as `scan_logits` drives it), ordered layer by layer: tokens int [B, T], active bool
    [B, T] -> (the last layer's output [B, T, E] before the final norm, the state).

    A layer's state depends only on that layer's inputs, and a layer's input for every
    token is known once the layer below has run, so each layer's projections and MLP run
    over all T tokens at once (matrix products the CPU does near its peak) and only the
    attention over the slots and the policy's choice run token by token. The weights are
    read once per call instead of once per token; the results are the step's, up to the
    float rounding of the larger products."""
    B, T = tokens.shape
    C, Hkv, G, D = state.capacity, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    act = active.astype(jnp.int32)
    pos = state.length[:, None] + jnp.cumsum(act, 1) - act  # [B, T] each token's position
    rows, heads = jnp.arange(B)[:, None], jnp.arange(Hkv)[None, :]

    def layer(x, xs):
        lp, K, V, P, S = xs
        q, k, v = _m.qkv(cfg, lp, _m.rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps), pos)
        q = q.reshape(B, T, Hkv, G, D)

        def token(carry, t_in):
            K, V, P, S = carry
            q_t, k_t, v_t, p_t, a_t = t_in
            out, w_old, w_new = attention.attend(q_t, k_t, v_t, K, V, _m._visible(cfg, P, p_t[:, None, None]), impl)
            w = jnp.concatenate([w_old.mean(2), w_new.mean(2)[..., None]], -1)  # [B,Hkv,C+1]
            new_pos = jnp.broadcast_to(p_t[:, None, None], (B, Hkv, 1))
            slot, cand_score = step_choice(policy, w, jnp.concatenate([P, new_pos], -1), S)
            slot = jnp.where(a_t[:, None], slot, C)  # C: drop the new token, no write
            if policy.uses_score:
                kept = jnp.where(jnp.arange(C) == slot[..., None], cand_score[..., C:], cand_score[..., :C])
                S = jnp.where(a_t[:, None, None], kept, S)
            at = (rows, heads, slot)
            K = K.at[at].set(k_t.astype(K.dtype), mode="drop")
            V = V.at[at].set(v_t.astype(V.dtype), mode="drop")
            P = P.at[at].set(jnp.broadcast_to(p_t[:, None], slot.shape), mode="drop")
            return (K, V, P, S), out

        t_major = (jnp.swapaxes(q, 0, 1), jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1), pos.T, active.T)
        (K, V, P, S), out = jax.lax.scan(token, (K, V, P, S), t_major)
        out = jnp.swapaxes(out, 0, 1).reshape(B, T, -1)  # [B, T, Hq * D]
        x = x + out.astype(x.dtype) @ lp["wo"]
        x = x + _m.mlp(lp, _m.rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps))
        return x, (K, V, P, S)

    x = params["embed"][tokens]
    x, (K, V, P, S) = jax.lax.scan(layer, x, (_m.stacked_layers(params), state.keys, state.values,
                                              state.pos, state.score))
    return x, State(K, V, P, S if policy.uses_score else state.score, state.length + act.sum(1))


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "impl"), donate_argnames=("state",))
def layer_major_last_logits(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active,
                            impl: StepImpl = DEFAULT_IMPL):
    """`model.scan_last_logits` (the exact prefill) computed layer by layer: each row's
    logits after its last active token [B, V] f32 (rows must have one), and the state."""
    x, state = layer_major(params, cfg, policy, state, tokens, active, impl)
    last = jnp.maximum(active.sum(1) - 1, 0)
    x_last = jnp.take_along_axis(x, last[:, None, None], 1)[:, 0]
    return _m.logits_from_hidden(cfg, params, x_last), state
