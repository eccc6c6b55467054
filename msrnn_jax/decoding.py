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

from . import sharding
from .config import ModelConfig
from .errors import InvalidArgument, check_choice, check_int
from .model import DEFAULT_IMPL, StepImpl, chunk_step, prefill_oneshot, scan_last_logits, step
from .policies import Policy, capacity_for
from .precision import exact_for_f32
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
            dtype=None, mesh=None):
    """Read prompts into a state. Returns (logits after each row's last token [B, V], state).

    `state` None starts from an empty state of `capacity` slots; otherwise the prompts
    continue that state (exact and chunked only: oneshot reads a prompt from scratch).
    mesh: a `sharding` mesh the params are placed on; the new state is made in its
    shardings (B must then be a multiple of the mesh's data size).
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
        state = state.replace(keys=state.keys.astype(dtype), values=state.values.astype(dtype))
        if mesh is not None:
            state = sharding.place_state(state, mesh)
        return _row_last(logits, lengths), state
    if state is None:
        state = State.init(cfg, B, capacity, dtype) if mesh is None else sharding.init_state(cfg, B, capacity, dtype, mesh)
    if mode == "exact":
        return scan_last_logits(params, cfg, policy, state, jnp.asarray(tokens), jnp.asarray(active))
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
@exact_for_f32
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
             steps_per_call: int = 16, impl: StepImpl = DEFAULT_IMPL, mesh=None) -> GenerateResult:
    """Read `prompts` (token lists, one per row; ragged is fine) into a fresh state or
    continue `state`, then decode up to `max_new_tokens` per row. `on_tokens(tokens,
    emitted)` is called with each chunk of [B, steps_per_call] tokens as they arrive.
    impl: how the decode step computes (`model.StepImpl`); e.g. attention="pallas" for
    the largest batches on a GPU (benchmarks/results/). mesh: the `sharding` mesh the
    params are placed on; rows are padded to a multiple of its data size with one-token
    rows that never decode, and dropped from the result."""
    check_int("max_new_tokens", max_new_tokens)
    sharding.check_impl(impl, mesh)
    n_real = len(prompts)
    if state is not None and state.batch != n_real:
        raise InvalidArgument(f"the state has {state.batch} rows but {n_real} prompts were given")
    prompts = [list(p) for p in prompts]
    if mesh is not None:
        if state is not None:
            sharding.check_rows(state.batch, mesh)
        prompts += [prompts[0][:1]] * (sharding.padded_rows(n_real, mesh) - n_real)
    B = len(prompts)
    if state is None:
        capacity = capacity_for(policy, capacity, max(len(p) for p in prompts) + max_new_tokens, 2 * PAD)
    else:
        state = state.copy()  # the caller's state stays valid (the calls below donate theirs)
        if mesh is not None:
            state = sharding.place_state(state, mesh)
    t0 = time.perf_counter()
    logits, state = prefill(params, cfg, policy, state, capacity, prompts, prefill_mode, chunk, mesh=mesh)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t0
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    budget = jnp.full((B,), max_new_tokens, jnp.int32)
    tok, key, finished, budget = first_token(sampling, logits, jax.random.key(seed), budget, eos)
    if B > n_real:  # the padding rows stop here: never pending, so they never step
        real = jnp.arange(B) < n_real
        finished = finished | ~real
    first = sharding.to_host(tok)[:n_real]
    ttft = time.perf_counter() - t0
    out: list[list[int]] = [[int(t)] for t in first]
    if on_tokens is not None:
        on_tokens(first[:, None], np.ones((n_real, 1), bool))
    pending = jnp.ones((B,), bool) if B == n_real else real
    # the decode rate counts from the end of the first chunk, whose call may compile
    t_first, n_decoded, t_steady, n_steady = time.perf_counter(), 0, None, 0
    while True:
        if mesh is not None:  # the same input shardings at every call: one compile
            state = sharding.place_state(state, mesh)
            tok, key, pending, finished, budget = sharding.place_rows(mesh, tok, key, pending, finished, budget)
            eos = sharding.replicate(mesh, eos)
        toks, emitted, state, logits, tok, key, pending, finished, budget = decode_chunk(
            params, cfg, policy, sampling, steps_per_call, state, tok, key, pending, finished,
            budget, eos, impl)
        toks, emitted = sharding.to_host(toks)[:n_real], sharding.to_host(emitted)[:n_real]
        n_decoded += int(emitted.sum())
        if t_steady is None:
            t_steady = time.perf_counter()
        else:
            n_steady += int(emitted.sum())
        for b in range(n_real):
            out[b].extend(int(t) for t in toks[b][emitted[b]])
        if on_tokens is not None and emitted.any():
            on_tokens(toks, emitted)
        if not bool(sharding.to_host(pending).any()):
            break
    end = time.perf_counter()
    if n_steady:  # steady state: every chunk after the first
        rate = n_steady / (end - t_steady)
    else:  # one chunk only: its time includes any compilation
        rate = n_decoded / (end - t_first) if n_decoded and end > t_first else float("nan")
    if B > n_real:
        state, logits = state.take_rows(np.arange(n_real)), logits[:n_real]
    return GenerateResult(out, state, logits, ttft, rate, prefill_s)
