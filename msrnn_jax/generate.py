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

from .config import ModelConfig, MsrnnError
from .model import chunk_step, prefill_oneshot, scan_last_logits, step
from .policies import Policy
from .sampling import GREEDY, Sampling
from .state import State

PAD = 32  # prompt lengths are padded up to a multiple of this (padding never enters a row)
PREFILL_MODES = ("exact", "oneshot", "chunked")


def pad_batch(seqs: Sequence[Sequence[int]], multiple: int = PAD):
    """Right-pad token lists into (tokens [B, T] int32, active [B, T] bool), T a multiple."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise MsrnnError("empty prompt")
    T = max(len(s) for s in seqs)
    T = -(-T // multiple) * multiple
    tokens = np.zeros((len(seqs), T), np.int32)
    active = np.zeros((len(seqs), T), bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
        active[i, : len(s)] = True
    return tokens, active


def prefill(params, cfg: ModelConfig, policy: Policy, state: State | None, capacity: int,
            seqs: Sequence[Sequence[int]], mode: str = "exact", chunk: int | None = None,
            dtype=None):
    """Read prompts into a state. Returns (logits after each row's last token [B, V], state).

    `state` None starts from an empty state of `capacity` slots; otherwise the prompts
    continue that state (exact and chunked only: oneshot reads a prompt from scratch).
    """
    if mode not in PREFILL_MODES:
        raise MsrnnError(f"unknown prefill mode {mode!r} (choose from {', '.join(PREFILL_MODES)})")
    dtype = dtype or params["embed"].dtype
    tokens, active = pad_batch(seqs)
    B = tokens.shape[0]
    if mode == "oneshot":
        if state is not None:
            raise MsrnnError("oneshot prefill reads a prompt into an empty state; use exact or chunked")
        lengths = active.sum(1).astype(np.int32)
        logits, state = prefill_oneshot(params, cfg, policy, capacity, jnp.asarray(tokens), jnp.asarray(lengths))
        last = jnp.take_along_axis(logits, jnp.asarray(lengths - 1)[:, None, None], 1)[:, 0]
        return last, state._replace(keys=state.keys.astype(dtype), values=state.values.astype(dtype))
    if state is None:
        state = State.init(cfg, B, capacity, dtype)
    if mode == "exact":
        return scan_last_logits(params, cfg, policy, state, jnp.asarray(tokens), jnp.asarray(active))
    if not chunk or chunk < 1:
        raise MsrnnError("chunked prefill needs --chunk S with S >= 1")
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
        row_last = jnp.take_along_axis(logits, jnp.asarray(np.maximum(n_act - 1, 0))[:, None, None], 1)[:, 0]
        last = jnp.where(jnp.asarray(n_act > 0)[:, None], row_last, last)
    return last, state


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "sampling", "n_steps"),
                   donate_argnames=("state",))
def decode_chunk(params, cfg: ModelConfig, policy: Policy, sampling: Sampling, n_steps: int,
                 state: State, logits, key, done, budget, eos_ids):
    """Emit up to n_steps tokens per row. logits [B, V]: the next-token logits; done [B]
    bool; budget [B] int32: tokens each row may still emit; eos_ids [E] int32.
    Returns (tokens [B, n], emitted [B, n] bool, state, logits, key, done, budget).
    A row stops after emitting an EOS token (which does enter its state, so a chat can
    continue from it) or when its budget runs out; stopped rows leave their state as is."""

    def body(carry, _):
        st, logits, key, done, budget = carry
        key, sub = jax.random.split(key)
        done = done | (budget <= 0)
        tok = sampling(logits, sub)
        emit = ~done
        logits, st = step(params, cfg, policy, st, tok, emit)
        budget = budget - emit.astype(jnp.int32)
        done = done | (emit & jnp.isin(tok, eos_ids))
        return (st, logits, key, done, budget), (tok, emit)

    (state, logits, key, done, budget), (toks, emitted) = jax.lax.scan(
        body, (state, logits, key, done, budget), None, length=n_steps)
    return toks.T, emitted.T, state, logits, key, done, budget


@dataclasses.dataclass
class GenerateResult:
    tokens: list[list[int]]  # emitted tokens per row (EOS included when reached)
    state: State             # the state after the last emitted token: keep it, fork it
    logits: jax.Array        # next-token logits [B, V], to continue from the state
    time_to_first_token: float
    decode_tokens_per_s: float
    prefill_s: float


def generate(params, cfg: ModelConfig, policy: Policy, capacity: int | None,
             prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = GREEDY,
             seed: int = 0, prefill_mode: str = "exact", chunk: int | None = None,
             state: State | None = None, eos_ids: Sequence[int] = (),
             on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None,
             steps_per_call: int = 16) -> GenerateResult:
    """Read `prompts` (token lists, one per row; ragged is fine) into a fresh state or
    continue `state`, then decode up to `max_new_tokens` per row. `on_tokens(tokens,
    emitted)` is called with each chunk of [B, steps_per_call] tokens as they arrive."""
    if max_new_tokens < 1:
        raise MsrnnError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    B = len(prompts)
    if state is not None and state.batch != B:
        raise MsrnnError(f"the state has {state.batch} rows but {B} prompts were given")
    t0 = time.perf_counter()
    logits, state = prefill(params, cfg, policy, state, capacity or 1, prompts, prefill_mode, chunk)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t0
    key = jax.random.key(seed)
    done = jnp.zeros((B,), bool)
    budget = jnp.full((B,), max_new_tokens, jnp.int32)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    out: list[list[int]] = [[] for _ in range(B)]
    ttft, t_first, n_decoded, n_steps = None, t0, 0, 1  # the first token alone: time to first token
    while True:
        toks, emitted, state, logits, key, done, budget = decode_chunk(
            params, cfg, policy, sampling, n_steps, state, logits, key, done, budget, eos)
        toks, emitted = np.asarray(toks), np.asarray(emitted)
        if ttft is None:
            ttft = t_first = time.perf_counter()
            ttft -= t0
        else:
            n_decoded += int(emitted.sum())
        for b in range(B):
            out[b].extend(int(t) for t in toks[b][emitted[b]])
        if on_tokens is not None:
            on_tokens(toks, emitted)
        if bool(np.asarray(done | (budget <= 0)).all()):
            break
        n_steps = steps_per_call
    elapsed = time.perf_counter() - t_first
    rate = n_decoded / elapsed if n_decoded and elapsed > 0 else float("nan")
    return GenerateResult(out, state, logits, ttft, rate, prefill_s)
