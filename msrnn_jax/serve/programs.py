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
from ..core.state import State
from ..fast.layer_major import layer_scan
from ..run import decoding


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
def insert_row(state: State, row: State, b) -> State:
    """Write the 1-row state `row` into row b (a traced int) of `state`, in place."""
    def put(s, r, axis):
        return jax.lax.dynamic_update_index_in_dim(s, jnp.take(r, 0, axis), b, axis)

    return State(put(state.keys, row.keys, 1), put(state.values, row.values, 1),
                 put(state.pos, row.pos, 1), put(state.score, row.score, 1),
                 put(state.length, row.length, 0))
