"""The multi-state RNN's step (docs/design.md §3): one token per batch row through every
layer, the state updated in place. Read `layer_step` and `attend_and_choose` first: they
are the paper's recurrence, line by line. `step` runs them over the layers and writes the
chosen slots; `scan` drives `step` over many tokens with `lax.scan`. Nothing ever
changes shape.

How the layers are looped, how the query meets the slots (einsum, Pallas) and the write
ordering are implementation choices of `fast.attention` (`StepImpl`), never results;
what position a key is rotated by is a strategy of `positions` (absolute or reindex).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..fast import attention
from ..fast.attention import DEFAULT_IMPL, StepImpl
from ..fast.precision import exact_for_f32
from ..fast.sharding import whole
from .layers import F32, embed, finish_layer, logits_from_hidden, norm, project, token_nll, visible
from .policies import Policy, step_choice
from .positions import ABSOLUTE, Absolute, positions_of
from .state import Groups, Quantized, State, check_single, read


# -- the recurrence ----------------------------------------------------------------------
def layer_step(cfg: ModelConfig, policy: Policy, lp, x, K, V, P, S, p, active,
               impl: StepImpl = DEFAULT_IMPL, l: int = 0, where: Absolute = ABSOLUTE, shared=None, carry=None):
    """One layer, one token per row. x [B,E]: the layer's input; K, V [B,Hkv,C,D] (Pallas:
    the whole [L,...] buffers, read at layer l), P, S [B,Hkv,C]: the layer's slots; p int
    [B]: the token's original position; active bool [B]. Returns (the layer's output x,
    what to write: (k, v [B,Hkv,D], slot [B,Hkv] in [0, C], scores [B,Hkv,C], the
    positions' carry after the write))."""
    B, Hkv, G, D = x.shape[0], cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    # 1. q, k, v of the new token (rotated below, by the positions' rule)
    q, k, v = project(cfg, lp, norm(cfg, x, lp["attn_norm"]))
    # 2-4. attend over the kept slots plus the new token; the policy picks the drop
    out, writes = attend_and_choose(cfg, policy, q.reshape(B, Hkv, G, D), k, v, K, V, P, S, p, active,
                                    impl, l, where, shared, carry)
    carry = where.advance(carry, P, writes[2])
    # 5. the rest of the layer: output projection, residual, MLP
    return finish_layer(cfg, lp, x, out.reshape(B, -1)), writes + (carry,)


def attend_and_choose(cfg: ModelConfig, policy: Policy, q, k, v, K, V, P, S, p, active,
                      impl: StepImpl = DEFAULT_IMPL, l: int = 0, where: Absolute = ABSOLUTE, shared=None,
                      carry=None):
    """Steps 1-4 of one layer for one token per row, from the token's q [B,Hkv,G,D] and k,
    v [B,Hkv,D], not yet rotated (arguments as `layer_step`). Returns (the attention output
    [B,Hkv,G,D] f32, what to write: (k as the state keeps it, v, slot [B,Hkv] in [0, C]
    (C = drop the new token: no write), the slots' scores [B,Hkv,C]))."""
    B, C = P.shape[0], P.shape[-1]
    # an 8-bit state is read dequantized: attention, and so the policy, see what is stored
    K, V = read_slots(K, V, q.dtype, impl)
    # RoPE: the query and the new key, and the kept keys as the query reads them
    q, k_att, k, K, V, l, rot = where.rotate_token(cfg, shared, carry, q, k, K, V, P, p, impl, l)
    # the query attends over the C + 1 candidates: the kept slots it may see and itself
    out, w_old, w_new = attention.attend(q, k_att, v, K, V, visible(cfg, P, p[:, None, None]), impl, l, rot)
    # the policy drops one candidate, judged by the attention averaged over query heads
    w = whole(jnp.concatenate([w_old.mean(2), w_new.mean(2)[..., None]], -1))  # [B,Hkv,C+1]
    new_pos = jnp.broadcast_to(p[:, None, None], (B, cfg.num_kv_heads, 1))
    slot, cand_score = step_choice(policy, w, jnp.concatenate([P, new_pos], -1), S)
    slot = jnp.where(active[:, None], slot, C)  # an inactive row writes nothing
    if policy.uses_score:  # H2O: the dropped slot's score becomes the new token's
        kept = jnp.where(jnp.arange(C) == slot[..., None], cand_score[..., C:], cand_score[..., :C])
        S = jnp.where(active[:, None, None], kept, S)
    return out, (k, v, slot, S)


def read_slots(K, V, dtype, impl: StepImpl = DEFAULT_IMPL):
    """The slots as attention reads them: as stored, or dequantized from 8 bits (§13).
    The Pallas kernels read 8-bit slots in place and dequantize them in registers."""
    if impl.attention == "pallas":
        return K, V
    return read(K, dtype), read(V, dtype)


def write_slots(keys, values, pos, slot, k, v, p):
    """Write each new entry in place: keys, values [..., C, D], pos [..., C]; slot int
    [...] (C, out of range, writes nothing); k, v [..., D]; p: positions broadcast to
    slot's shape. The leading axes are e.g. [L, B, Hkv] (a step) or [B, Hkv] (one layer).
    An 8-bit state stores the entries quantized, each with its scale."""
    at = tuple(jnp.arange(n).reshape((-1,) + (1,) * (slot.ndim - 1 - i)) for i, n in enumerate(slot.shape))
    at = at + (slot,)

    def store(buf, x):
        return buf.set(at, x) if isinstance(buf, Quantized) else buf.at[at].set(x.astype(buf.dtype), mode="drop")

    return (store(keys, k), store(values, v),
            pos.at[at].set(jnp.broadcast_to(p, slot.shape).astype(pos.dtype), mode="drop"))


# -- the step over every layer ------------------------------------------------------------
class Recurrence(NamedTuple):
    """What a loop of steps passes from one step to the next: the state, and the carry
    its positions' rule keeps beside it (reindex: the slots' ranks; absolute: None)."""

    state: State
    carry: object = None

    @classmethod
    def start(cls, state: State, positions: str = "absolute", policy: Policy | None = None) -> "Recurrence":
        where = positions_of(positions)
        if isinstance(state, Groups):  # one carry per group, under the group's policy
            return cls(state, tuple(where.start(pol, s.pos) for pol, s in zip(state.policies(policy), state.states)))
        return cls(state, where.start(policy, state.pos))


@exact_for_f32  # fp32 params: exact matmuls, also when called eagerly (precision.py)
def step(params, cfg: ModelConfig, policy: Policy, state, tokens, active=None,
         impl: StepImpl = DEFAULT_IMPL, positions: str = "absolute"):
    """One token per row through every layer (docs/design.md §3).

    state: a `State`, or a `Recurrence` (what a loop of steps carries:
    `Recurrence.start(state, positions, policy)`); the same kind is returned.
    tokens: int [B]; active: bool [B] (inactive rows leave their state untouched);
    impl: how the products and the layer loop are computed (`fast.attention.StepImpl`);
    positions: "absolute" (keys stored rotated at their original position) or "reindex"
    (keys stored unrotated and rotated by their rank among the kept slots, §8).
    Returns (logits [B, V] f32, the new state)."""
    rnn = state if isinstance(state, Recurrence) else Recurrence(state)
    if isinstance(rnn.state, Groups):  # layer groups (docs/design.md §12): `groups.step`
        from .groups import grouped_step

        logits, rnn = grouped_step(params, cfg, policy, rnn, tokens, active, impl, positions)
        return logits, (rnn if isinstance(state, Recurrence) else rnn.state)
    st, where = rnn.state, positions_of(positions)
    check_single(cfg, st)
    active = jnp.ones((st.batch,), bool) if active is None else active
    p = st.length  # [B] the new token's original position (masks and `pos` use it)
    shared = where.shared(cfg, st.capacity)
    carry = where.start(policy, st.pos) if rnn.carry is None else rnn.carry

    def layer(x, lp, K, V, P, S, l, c):
        return layer_step(cfg, policy, lp, x, K, V, P, S, p, active, impl, l, where, shared, c)

    # every layer reads the old state; all layers' new entries are written afterwards in
    # one in-place scatter (`fast.attention.over_layers`)
    x, (k, v, slot, score, carry) = attention.over_layers(layer, embed(cfg, params, tokens), params["layers"],
                                                          st, impl, carry)
    keys, values, pos = write_slots(st.keys, st.values, st.pos, slot, k, v, p[None, :, None])
    st = State(keys=keys, values=values, pos=pos, score=score if policy.uses_score else st.score,
               length=st.length + active.astype(jnp.int32))
    logits = logits_from_hidden(cfg, params, x)
    return logits, (Recurrence(st, carry) if isinstance(state, Recurrence) else st)


# -- many steps -------------------------------------------------------------------------------
EMITS = ("logits", "logits+pos", "nll", "last")


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "emit", "positions", "impl"),
                   donate_argnames=("state",))
@exact_for_f32
def scan(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active=None, *, emit: str = "logits",
         targets=None, last_logits=None, positions: str = "absolute", impl: StepImpl = DEFAULT_IMPL):
    """Feed tokens [B, T] step by step (active bool [B, T]: False never enters a row).
    What leaves the loop (`emit`):

    - "logits": (logits [B, T, V] f32, state);
    - "logits+pos": (logits, state, the kept positions after every step [T, L, B, Hkv, C]);
    - "nll": (the NLL of `targets` [B, T] at every step [B, T] f32, 0 where inactive,
      state): long texts need no [T, V] buffer;
    - "last": (each row's logits after its last active token [B, V] f32, rows with none
      keeping `last_logits`, state): the `exact` prompt prefill.
    `positions`, `impl`: see `step`."""
    if emit not in EMITS:
        raise ValueError(f"emit must be one of {EMITS}, got {emit!r}")
    B = tokens.shape[0]
    if active is None:
        active = jnp.ones(tokens.shape, bool)
    if emit == "last" and last_logits is None:
        last_logits = jnp.zeros((B, cfg.vocab_size), F32)

    def body(carry, xs):
        rnn, last = carry
        tok, act = (xs[0], xs[2]) if emit == "nll" else xs
        logits, rnn = step(params, cfg, policy, rnn, tok, act, impl, positions)
        if emit == "nll":
            return (rnn, last), jnp.where(act, token_nll(logits, xs[1]), 0.0)
        if emit == "last":
            return (rnn, jnp.where(act[:, None], logits, last)), None
        return (rnn, last), ((logits, rnn.state.pos) if emit == "logits+pos" else logits)

    carry = (Recurrence.start(state, positions, policy), last_logits)
    xs = (tokens.T, targets.T, active.T) if emit == "nll" else (tokens.T, active.T)
    (rnn, last), out = jax.lax.scan(body, carry, xs)
    if emit == "nll":
        return out.T, rnn.state
    if emit == "last":
        return last, rnn.state
    if emit == "logits+pos":
        return jnp.swapaxes(out[0], 0, 1), rnn.state, out[1]
    return jnp.swapaxes(out, 0, 1), rnn.state
