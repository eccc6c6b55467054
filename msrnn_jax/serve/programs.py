"""The engine's compiled programs: the decode loop and the first-token sampler that
generation runs too (`run.decoding.decode_rows`, `first_rows`: the same functions, jitted
here as the engine's own copies, so that its compile count is the engine's alone), reading
a piece of a prompt into a 1-row state, and writing that row into the B-row state. Each
has one shape per engine (nothing depends on a request), so nothing recompiles while
serving."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..core.parallel import chunk_step
from ..core.policies import Policy
from ..core.layers import logits_from_hidden
from ..core.state import Groups, State
from ..fast.attention import DEFAULT_IMPL
from ..fast.layer_major import layer_major, layer_scan
from ..fast.precision import exact_for_f32
from ..core.step import Recurrence, step
from ..run import decoding
from ..run.sampling import sample_rows, split_rows


def _own(fn):
    """A function object of the engine's own around `fn` (jit caches by function)."""
    return functools.wraps(fn)(lambda *args, **kwargs: fn(*args, **kwargs))


decode_rows = jax.jit(_own(decoding.decode_rows.__wrapped__), donate_argnames=("state",),
                      static_argnames=("cfg", "policy", "n_steps", "impl", "positions"))
first_rows = jax.jit(_own(decoding.first_rows.__wrapped__))


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "positions"), donate_argnames=("state",))
def chunk_piece(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active, last_logits,
                positions: str = "absolute"):
    """One chunked-prefill piece: `chunk_step` over tokens [R, S], keeping each row's
    logits after its last active token ([R, V]; rows with none keep `last_logits`)."""
    logits, state = chunk_step(params, cfg, policy, state, tokens, active, positions=positions)
    n = active.sum(1)
    here = jnp.take_along_axis(logits, jnp.maximum(n - 1, 0)[:, None, None], 1)[:, 0]
    return jnp.where((n > 0)[:, None], here, last_logits), state


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "positions"), donate_argnames=("state",))
def exact_piece(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active, last_logits,
                positions: str = "absolute"):
    """One exact-prefill piece: `layer_scan(emit="last")` over tokens [R, P] (the exact step,
    computed layer by layer)."""
    return layer_scan(params, cfg, policy, state, tokens, active, emit="last", last_logits=last_logits,
                      positions=positions)


@functools.partial(jax.jit, donate_argnames=("state",))
def insert_row(state: State | Groups, row: State | Groups, b) -> State | Groups:
    """Write the 1-row state `row` into row b (a traced int) of `state`, in place. Layer
    groups (docs/design.md §12): the same write into every group's state."""
    if isinstance(state, Groups):
        return state.map(lambda s, r: _insert_row(s, r, b), row)
    return _insert_row(state, row, b)


def _insert_row(state: State, row: State, b) -> State:
    def put(s, r, axis):
        return jax.lax.dynamic_update_index_in_dim(s, jnp.take(r, 0, axis), b, axis)

    rows = lambda s, r: jax.tree.map(lambda a, b: put(a, b, 1), s, r)  # noqa: E731  (8-bit: data and scales)
    return State(rows(state.keys, row.keys), rows(state.values, row.values),
                 put(state.pos, row.pos, 1), put(state.score, row.score, 1),
                 put(state.length, row.length, 0))


def _logprobs(logits, tokens, last_logits, top: int):
    """Each token's log-probability given what came before it, from the logits after each
    token of the piece [R, P, V] and those before its first (`last_logits` [R, V]: the
    previous piece's last): (token log-probabilities [R, P], the top `top` [R, P, top] and
    their token ids)."""
    prev = jnp.concatenate([last_logits[:, None].astype(jnp.float32), logits[:, :-1].astype(jnp.float32)], 1)
    lp = jax.nn.log_softmax(prev, -1)
    tok_lp = jnp.take_along_axis(lp, tokens[..., None], -1)[..., 0]
    top_v, top_i = jax.lax.top_k(lp, top)
    return tok_lp, top_v, top_i


def _last(logits, active, last_logits):
    n = active.sum(1)
    here = jnp.take_along_axis(logits, jnp.maximum(n - 1, 0)[:, None, None], 1)[:, 0]
    return jnp.where((n > 0)[:, None], here.astype(jnp.float32), last_logits)


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "positions", "top"), donate_argnames=("state",))
@exact_for_f32
def exact_piece_logprobs(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active, last_logits,
                         positions: str = "absolute", top: int = 5):
    """`exact_piece` that also gives every token's log-probability (and the top `top`)
    given the tokens before it, exact per step: the logits after each token of the piece
    come from the same layer-by-layer step (`layer_major`), as `layer_scan(emit="nll")`
    computes perplexity. Returns (last logits, state, token log-probs, top values, top ids)."""
    x, state = layer_major(params, cfg, policy, state, tokens, active, DEFAULT_IMPL, positions)
    logits = logits_from_hidden(cfg, params, x)
    return (_last(logits, active, last_logits), state, *_logprobs(logits, tokens, last_logits, top))


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "positions", "top"), donate_argnames=("state",))
@exact_for_f32
def chunk_piece_logprobs(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active, last_logits,
                         positions: str = "absolute", top: int = 5):
    """`chunk_piece` that also gives every token's log-probability (as exact_piece_logprobs)."""
    logits, state = chunk_step(params, cfg, policy, state, tokens, active, positions=positions)
    return (_last(logits, active, last_logits), state, *_logprobs(logits, tokens, last_logits, top))


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "n_steps", "impl", "positions", "top"),
                   donate_argnames=("state",))
@exact_for_f32
def decode_rows_logprobs(params, cfg: ModelConfig, policy: Policy, n_steps: int, state: State, tok, keys,
                         pending, finished, budget, temperature, top_k, top_p, eos_ids, ignore_eos,
                         impl=DEFAULT_IMPL, positions: str = "absolute", top: int = 5):
    """`decoding.decode_rows` (the same step, sampler and bookkeeping, so the same tokens)
    that also gives each step's token log-probability and the top `top`, of the model's
    distribution (before temperature and filters, as OpenAI's and vLLM's logprobs). Run
    instead of decode_rows only for chunks in which a row asked for logprobs. Returns
    decode_rows' tuple, then log-probabilities [B, n], top values [B, n, top], top ids."""
    def body(carry, _):
        rnn, tok, keys, pending, finished, budget = carry
        logits, rnn = step(params, cfg, policy, rnn, tok, pending, impl, positions)
        keys, sub = split_rows(keys)
        nxt = sample_rows(logits, sub, temperature, top_k, top_p)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        chosen = jnp.take_along_axis(lp, nxt[:, None], -1)[:, 0]
        top_v, top_i = jax.lax.top_k(lp, top)
        emit = pending & ~finished
        budget = budget - emit.astype(jnp.int32)
        finished = finished | (emit & ((jnp.isin(nxt, eos_ids) & ~ignore_eos) | (budget <= 0)))
        tok = jnp.where(emit, nxt, tok)
        return (rnn, tok, keys, emit, finished, budget), (nxt, emit, chosen, top_v, top_i)

    carry = (Recurrence.start(state, positions, policy), tok, keys, pending, finished, budget)
    carry, (toks, emitted, chosen, top_v, top_i) = jax.lax.scan(body, carry, None, length=n_steps)
    rnn, tok, keys, pending, finished, budget = carry
    return (toks.T, emitted.T, rnn.state, tok, keys, pending, finished, budget, chosen.T,
            jnp.swapaxes(top_v, 0, 1), jnp.swapaxes(top_i, 0, 1))
