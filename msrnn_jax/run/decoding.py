"""Prompt prefill and streaming generation: the model run as an RNN.

A prompt is read into the state (`prefill`: exact, oneshot or chunked), then tokens are
emitted by `decode_rows`, the one decode loop (a `lax.scan` over a fixed number of steps,
each row with its own sampling settings, compiled once and called repeatedly from the
host, which streams what each chunk produced; the serving engine runs it too). Shapes are
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

from .. import errors
from ..config import ModelConfig
from ..core.parallel import Prompt, chunk_step, oneshot_cut, oneshot_forward
from ..core.policies import Policy
from ..core.positions import check_positions
from ..core.state import Groups, State, as_storage, init_state
from ..core.step import Recurrence, scan, step
from ..errors import InvalidArgument, check_int
from ..fast import sharding
from ..fast.attention import DEFAULT_IMPL, StepImpl
from ..fast.layer_major import layer_scan
from ..fast.precision import exact_for_f32
from .sampling import row_keys, sample_rows, split_rows
from .spec import RunSpec, check_prefill

PAD = 32  # prompt lengths are padded up to a multiple of this (padding never enters a row)
def check_context(cfg: ModelConfig, policy: Policy, n_tokens: int, positions: str = "absolute",
                  capacity: int | None = None) -> None:
    """docs/design.md §8 past the model's trained context (`max_position_embeddings`):
    `full` there is bad input; a bounded policy runs, with one warning line on stderr
    (`errors.warn`) when its queries will sit at positions the model never saw (always under absolute;
    under reindex only when the capacity itself exceeds the trained context)."""
    limit = cfg.max_position_embeddings
    if n_tokens <= limit:
        return
    warn = None
    if not policy.bounded:
        raise InvalidArgument(f"the full policy over {n_tokens} tokens goes beyond the model's trained "
                              f"context of {limit} tokens; use a bounded policy (with positions reindex "
                              f"to stay within it)", "policy")
    if positions == "absolute":
        warn = (f"{n_tokens} tokens go beyond the model's trained context of {limit}; positions "
                f"absolute puts queries at positions it never saw (positions reindex keeps them "
                f"within the capacity)")
    elif capacity is not None and capacity > limit:
        warn = f"capacity {capacity} is beyond the model's trained context of {limit}"
    if warn is not None:
        errors.warn(warn)


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


@sharding.within_mesh
def oneshot_prompt(params, cfg: ModelConfig, seqs: Sequence[Sequence[int]]) -> tuple[jax.Array, Prompt]:
    """The parallel forward of a oneshot prefill over prompts, before any cut: (the logits
    after each row's last token [B, V], the `Prompt` that `cut_prompt` cuts). Several
    policies and capacities of one prompt share it (`eval ruler --mode once`)."""
    tokens, active = pad_batch(seqs)
    lengths = active.sum(1).astype(np.int32)
    logits, prompt = oneshot_forward(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths))
    return _row_last(logits, lengths), prompt


def cut_prompt(params, cfg: ModelConfig, policy: Policy, capacity: int, prompt: Prompt, dtype=None, mesh=None):
    """The state a oneshot prefill of `policy` in `capacity` slots leaves, cut from
    `oneshot_prompt`'s forward: equal to `prefill(..., mode="oneshot")`'s."""
    dtype = dtype or params["embed"].dtype
    state = oneshot_cut(cfg, policy, capacity, prompt, params["embed"].dtype)
    store = lambda st: st.replace(keys=as_storage(st.keys, dtype), values=as_storage(st.values, dtype))  # noqa: E731
    state = Groups(tuple(map(store, state.states)), state.windows) if isinstance(state, Groups) else store(state)
    return state if mesh is None else sharding.place_state(state, mesh)


def prefill(params, cfg: ModelConfig, policy: Policy, state: State | None, capacity: int,
            seqs: Sequence[Sequence[int]], mode: str = "exact", chunk: int | None = None,
            dtype=None, positions: str = "absolute", mesh=None, layer_major: bool = True):
    """Read prompts into a state. Returns (logits after each row's last token [B, V], state).

    `state` None starts from an empty state of `capacity` slots; otherwise the prompts
    continue that state (exact and chunked only: oneshot reads a prompt from scratch).
    positions: "absolute" or "reindex" (docs/design.md §8; not with oneshot). A state
    must be continued under the positions it was read with (its keys are stored rotated
    or not accordingly).
    mesh: a `sharding` mesh the params are placed on; the new state is made in its
    shardings (B must then be a multiple of the mesh's data size).
    layer_major (exact): compute the exact step layer by layer (`fast.layer_major`: the
    same state, several times faster on a CPU); False runs the token-by-token scan.
    """
    mode, chunk = check_prefill(mode, chunk)
    positions = check_positions(positions, mode)
    dtype = dtype or params["embed"].dtype
    tokens, active = pad_batch(seqs)
    B = tokens.shape[0]
    if mode == "oneshot":
        if state is not None:
            raise InvalidArgument("oneshot prefill reads a prompt into an empty state; use exact or chunked")
        last, prompt = oneshot_prompt(params, cfg, seqs)
        return last, cut_prompt(params, cfg, policy, capacity, prompt, dtype, mesh)
    if state is None:
        state = init_state(cfg, B, capacity, dtype) if mesh is None else sharding.init_state(cfg, B, capacity, dtype, mesh)
    if mode == "exact":
        run = layer_scan if layer_major else scan
        return run(params, cfg, policy, state, jnp.asarray(tokens), jnp.asarray(active), emit="last",
                   positions=positions)
    last = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    n_chunks = -(-tokens.shape[1] // chunk)
    tokens = np.pad(tokens, ((0, 0), (0, n_chunks * chunk - tokens.shape[1])))
    active = np.pad(active, ((0, 0), (0, n_chunks * chunk - active.shape[1])))
    for c in range(n_chunks):
        sl = slice(c * chunk, (c + 1) * chunk)
        if not active[:, sl].any():
            break
        logits, state = chunk_step(params, cfg, policy, state, jnp.asarray(tokens[:, sl]), jnp.asarray(active[:, sl]),
                                   positions=positions)
        n_act = active[:, sl].sum(1)
        last = jnp.where(jnp.asarray(n_act > 0)[:, None], _row_last(logits, n_act), last)
    return last, state


@jax.jit
def first_rows(logits, keys, temperature, top_k, top_p):
    """Each row's first token from its prompt's logits [B, V] (no model step: cheap to
    compile, and the time to first token is the prompt's): (tokens [B], next keys)."""
    keys, sub = split_rows(keys)
    return sample_rows(logits, sub, temperature, top_k, top_p), keys


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "n_steps", "impl", "positions"),
                   donate_argnames=("state",))
@exact_for_f32
def decode_rows(params, cfg: ModelConfig, policy: Policy, n_steps: int, state: State, tok, keys,
                pending, finished, budget, temperature, top_k, top_p, eos_ids, ignore_eos,
                impl: StepImpl = DEFAULT_IMPL, positions: str = "absolute"):
    """The decode loop: n_steps of the RNN over B rows, feeding each row's pending token
    and sampling the next one with the row's own settings (`sampling.sample_rows`), so
    greedy and sampled rows share one program (`generate_tokens` and the serving engine).

    tok [B]: each row's last emitted token; pending [B]: it has not been fed yet;
    finished [B]: it was the row's last (an EOS, or the budget ran out); budget [B]:
    tokens the row may still emit; keys uint32 [B, 2]; temperature/top_k/top_p [B];
    eos_ids [E]; ignore_eos [B]: the row runs to its budget whatever it emits. Every
    emitted token is fed, EOS included, so the state can continue a chat; a row with
    pending False and finished True (a free or finished row) is left untouched.
    Returns (tokens [B, n], emitted [B, n], state, tok, keys, pending, finished, budget)."""

    def body(carry, _):
        rnn, tok, keys, pending, finished, budget = carry
        logits, rnn = step(params, cfg, policy, rnn, tok, pending, impl, positions)
        keys, sub = split_rows(keys)
        nxt = sample_rows(logits, sub, temperature, top_k, top_p)
        emit = pending & ~finished
        budget = budget - emit.astype(jnp.int32)
        finished = finished | (emit & ((jnp.isin(nxt, eos_ids) & ~ignore_eos) | (budget <= 0)))
        tok = jnp.where(emit, nxt, tok)
        return (rnn, tok, keys, emit, finished, budget), (nxt, emit)

    carry = (Recurrence.start(state, positions, policy), tok, keys, pending, finished, budget)
    carry, (toks, emitted) = jax.lax.scan(body, carry, None, length=n_steps)
    rnn, tok, keys, pending, finished, budget = carry
    return toks.T, emitted.T, rnn.state, tok, keys, pending, finished, budget


@dataclasses.dataclass
class GenerateResult:
    tokens: list[list[int]]  # emitted tokens per row (EOS included when reached)
    state: State             # the state after the last emitted token: keep it, fork it
    time_to_first_token: float
    decode_tokens_per_s: float   # steady state, compilation excluded (NaN: nothing to time)
    prefill_s: float
    compile_s: float = 0.0       # the first decode call's time, when it compiled
    texts: list[str] = dataclasses.field(default_factory=list)  # decoded rows (with a tokenizer)


@sharding.within_mesh
def generate_tokens(params, cfg: ModelConfig, spec: RunSpec, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, seed: int = 0, state: State | None = None,
                    eos_ids: Sequence[int] = (),
                    on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None,
                    steps_per_call: int = 16, impl: StepImpl = DEFAULT_IMPL, mesh=None) -> GenerateResult:
    """Read `prompts` (token lists, one per row; ragged is fine) into a fresh state or
    continue `state`, then decode up to `max_new_tokens` per row, as `spec` says (policy,
    capacity, prefill, positions, sampling: a `RunSpec`, already validated). A continued
    `state` must have been read with the same positions. `on_tokens(tokens, emitted)` is
    called with each chunk of [B, steps_per_call] tokens as they arrive.
    impl: how the decode step computes (`fast.attention.StepImpl`); e.g. attention="pallas" for
    the largest batches on a GPU (docs/performance.md).
    mesh: the `sharding` mesh the params are placed on; rows are padded to a multiple of its data size with one-token
    rows that never decode, and dropped from the result."""
    check_int("max_new_tokens", max_new_tokens)
    sharding.check_impl(impl, mesh)
    policy, capacity, positions = spec.policy, spec.capacity, spec.positions
    n_real = len(prompts)
    if state is not None and state.batch != n_real:
        raise InvalidArgument(f"the state has {state.batch} rows but {n_real} prompts were given")
    if state is not None and spec.state_dtype not in (None, state.dtype):
        raise InvalidArgument(f"the state stores {state.dtype}, not {spec.state_dtype}", "state_dtype")
    prompts = [list(p) for p in prompts]
    if mesh is not None:
        if state is not None:
            sharding.check_rows(state.batch, mesh)
        prompts += [prompts[0][:1]] * (sharding.padded_rows(n_real, mesh) - n_real)
    B = len(prompts)
    if state is None:
        capacity = spec.state_size(max(len(p) for p in prompts) + max_new_tokens, 2 * PAD)
    else:
        state = state.copy()  # the caller's state stays valid (the calls below donate theirs)
        if mesh is not None:
            state = sharding.place_state(state, mesh)
    start = 0 if state is None else int(np.asarray(state.length).max())
    needed = start + max(len(p) for p in prompts) + max_new_tokens
    slots = None if state is None else state.capacity
    if isinstance(state, Groups):  # the global layers' (none: every layer keeps its window)
        slots = needed if state.bounded_group is None else slots[state.bounded_group]
    if not policy.bounded and state is not None and needed > slots:
        raise InvalidArgument(f"the full policy keeps every token, but the state has {slots} slots "
                              f"and this run needs up to {needed}", "max_new_tokens")
    check_context(cfg, policy, needed, positions, capacity)
    t0 = time.perf_counter()
    logits, state = prefill(params, cfg, policy, state, capacity, prompts, spec.prefill, spec.chunk,
                            dtype=spec.state_dtype, positions=positions, mesh=mesh)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t0
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    temperature, top_k, top_p = (jnp.asarray(a) for a in spec.sampling.rows(B))
    tok, keys = first_rows(logits, jnp.asarray(row_keys(seed, B)), temperature, top_k, top_p)
    budget = jnp.full((B,), max_new_tokens - 1, jnp.int32)
    finished = jnp.isin(tok, eos) | (budget <= 0)
    ignore_eos = jnp.zeros((B,), bool)
    if B > n_real:  # the padding rows stop here: never pending, so they never step
        real = jnp.arange(B) < n_real
        finished = finished | ~real
    first = sharding.to_host(tok)[:n_real]
    ttft = time.perf_counter() - t0
    out: list[list[int]] = [[int(t)] for t in first]
    if on_tokens is not None:
        on_tokens(first[:, None], np.ones((n_real, 1), bool))
    pending = jnp.ones((B,), bool) if B == n_real else real
    # The decode rate never counts compilation: a first chunk whose call compiled (or may
    # have: a wrapped function cannot tell) is timed as compile_s and left out of the rate.
    cache_size = getattr(decode_rows, "_cache_size", None)
    before = cache_size() if cache_size else None
    t_start, t_rate, n_rate, compile_s = time.perf_counter(), None, 0, 0.0
    while True:
        if mesh is not None:  # the same input shardings at every call: one compile
            state = sharding.place_state(state, mesh)
            tok, keys, pending, finished, budget, temperature, top_k, top_p, ignore_eos = sharding.place_rows(
                mesh, tok, keys, pending, finished, budget, temperature, top_k, top_p, ignore_eos)
            eos = sharding.replicate(mesh, eos)
        toks, emitted, state, tok, keys, pending, finished, budget = decode_rows(
            params, cfg, policy, steps_per_call, state, tok, keys, pending, finished, budget,
            temperature, top_k, top_p, eos, ignore_eos, impl, positions)
        toks, emitted = sharding.to_host(toks)[:n_real], sharding.to_host(emitted)[:n_real]
        if t_rate is None:  # the first chunk has returned
            if before is not None and cache_size() == before:  # warm: it counts
                t_rate, n_rate = t_start, int(emitted.sum())
            else:
                t_rate = time.perf_counter()
                compile_s = t_rate - t_start
        else:
            n_rate += int(emitted.sum())
        for b in range(n_real):
            out[b].extend(int(t) for t in toks[b][emitted[b]])
        if on_tokens is not None and emitted.any():
            on_tokens(toks, emitted)
        if not bool(sharding.to_host(pending).any()):
            break
    end = time.perf_counter()
    rate = n_rate / (end - t_rate) if n_rate and end > t_rate else float("nan")
    if B > n_real:
        state = state.take_rows(np.arange(n_real))
    return GenerateResult(out, state, ttft, rate, prefill_s, compile_s=compile_s)
