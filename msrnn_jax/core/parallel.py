"""The parallel (transformer) view of the same model: the causal forward over a whole
sequence, and the two prompt modes built on it (docs/design.md §4): `prefill_oneshot`
(one forward, then a top-C cut) and `chunk_step` (S tokens at a time against the state,
then a cut back to C)."""

from __future__ import annotations

import functools
from typing import NamedTuple
import math

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..fast.layouts import scan_layers
from ..fast.precision import exact_for_f32
from ..fast.sharding import whole
from .layers import (
    F32,
    finish_layer,
    logits_from_hidden,
    project,
    qkv,
    embed,
    model_rope_table,
    norm,
    rotate_at,
    visible,
)
from .policies import Policy, select_keep
from .positions import check_positions, reindex_slots
from .groups import layer_params
from .state import Groups, Quantized, State, check_single, read


@functools.partial(jax.jit, static_argnames=("cfg",))
@exact_for_f32
def forward_parallel(params, cfg: ModelConfig, tokens, lengths=None):
    """The ordinary causal forward over tokens [B, T] (rows valid up to `lengths`).

    Returns (logits [B,T,V], keys [L,B,Hkv,T,D], values, last-token attention averaged
    per KV head [L,B,Hkv,T], column-summed attention averaged per KV head [L,B,Hkv,T]).
    """
    B, T = tokens.shape
    if lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32)
    pos = jnp.where(t[None] < lengths[:, None], t[None], -1)  # [B,T]
    x = embed(cfg, params, tokens)
    last = jnp.maximum(lengths - 1, 0)

    def layer(cfg, x, lp):  # cfg: the layer's (its group's, `ModelConfig.group_config`)
        h = norm(cfg, x, lp["attn_norm"])
        q, k, v = qkv(cfg, lp, h, jnp.maximum(pos, 0))
        kpos = jnp.broadcast_to(pos[:, None, :], (B, cfg.num_kv_heads, T))
        out, w = _attend_heads(cfg, q, k, v, pos, kpos)
        x = finish_layer(cfg, lp, x, out.reshape(B, T, -1))
        w_last = jnp.take_along_axis(w, last[:, None, None, None, None], 3)[:, :, :, 0]  # [B,Hkv,G,T]
        colsum = w.sum(3)  # [B,Hkv,G,N]
        return x, (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), w_last.mean(2), colsum.mean(2))

    if cfg.grouped:  # layer groups: unrolled, each layer with its group's config
        outs = []
        for l, (g, _) in enumerate(cfg.layer_slots):
            x, out = layer(cfg.group_config(g), x, layer_params(params["layers"], l))
            outs.append(out)
        K, V, a_last, colsum = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    else:
        x, (K, V, a_last, colsum) = scan_layers(lambda x, xs: layer(cfg, x, xs[0]), x, params)
    return logits_from_hidden(cfg, params, x), K, V, a_last, colsum


def _head_average(policy: Policy, a):
    """[..., Hkv, N] per-KV-head average -> what the policy ranks by (a or a_h)."""
    if policy.head_wise:
        return a
    a = whole(a, a.ndim - 3)  # the heads of each row on one device (`sharding`)
    return jnp.broadcast_to(a.mean(-2, keepdims=True), a.shape)


def reduce_candidates(policy: Policy, capacity: int, keys, values, pos, attn, score):
    """Keep the top-C of N candidates per layer/head by the policy's keys.

    keys, values: [L,B,Hkv,N,D]; pos: [L,B,Hkv,N]; attn, score: [L,B,Hkv,N] f32 (attn
    already averaged the way the policy wants). Returns (keys, values, pos, score) with C.
    """
    n = pos.shape[-1]
    if n < capacity:  # pad with empty candidates so there is something to keep
        pad = capacity - n
        padn = lambda a, v: jax.tree.map(  # noqa: E731
            lambda a: jnp.pad(a, [(0, 0)] * 3 + [(0, pad)] + [(0, 0)] * (a.ndim - 4), constant_values=v), a)
        keys, values, pos = padn(keys, 0), padn(values, 0), padn(pos, -1)
        attn, score = padn(attn, 0.0), padn(score, 0.0)
    idx = select_keep(policy, pos, attn, score, capacity)  # [L,B,Hkv,C]

    def take(a):
        if isinstance(a, Quantized):
            return a.take(idx, 3)
        return jnp.take_along_axis(a, idx[..., None] if a.ndim == 5 else idx, 3)

    pos = take(pos)
    score = jnp.where(pos >= 0, take(score), 0.0) if policy.uses_score else jnp.zeros(pos.shape, F32)
    return take(keys), take(values), pos, score


class Prompt(NamedTuple):
    """What a oneshot cut reads from one parallel forward over a prompt (`oneshot_forward`):
    keys, values [L,B,Hkv,T,D], their positions [L,B,Hkv,T] (-1 past a row's length), the
    last token's and the column-summed attention per KV head [L,B,Hkv,T], the lengths [B]."""

    keys: jax.Array
    values: jax.Array
    pos: jax.Array
    a_last: jax.Array
    colsum: jax.Array
    lengths: jax.Array


@functools.partial(jax.jit, static_argnames=("cfg",))
@exact_for_f32
def oneshot_forward(params, cfg: ModelConfig, tokens, lengths=None):
    """The parallel forward of a oneshot prefill, before any cut: (logits [B,T,V], Prompt).
    Several cuts (policies, capacities) of one prompt share it (`oneshot_cut`)."""
    B, T = tokens.shape
    if lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    logits, K, V, a_last, colsum = forward_parallel(params, cfg, tokens, lengths)
    t = jnp.arange(T, dtype=jnp.int32)
    pos = jnp.where(t[None] < lengths[:, None], t[None], -1)  # [B,T]
    pos = jnp.broadcast_to(pos[None, :, None, :], K.shape[:-1])
    return logits, Prompt(K, V, pos, a_last, colsum, lengths.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "capacity", "dtype"))
def oneshot_cut(cfg: ModelConfig, policy: Policy, capacity: int, prompt: Prompt, dtype=jnp.float32):
    """The state a oneshot prefill leaves (`prefill_oneshot`), cut from a `oneshot_forward`:
    each layer keeps its top C (keys and values stored in `dtype`)."""
    K, V, pos, a_last, colsum, lengths = prompt
    if cfg.grouped:  # each group keeps its own capacity by its own policy
        empty = Groups.init(cfg, 1, capacity)
        states = []
        for (layers, _), pol, st in zip(cfg.layer_groups, empty.policies(policy), empty.states):
            at = jnp.asarray(layers)
            keys, values, kpos, score = reduce_candidates(pol, st.capacity, K[at], V[at], pos[at],
                                                          _head_average(pol, a_last[at]),
                                                          _head_average(pol, colsum[at]))
            states.append(State(keys.astype(dtype), values.astype(dtype), kpos, score, lengths))
        return Groups(tuple(states), empty.windows)
    keys, values, pos, score = reduce_candidates(
        policy, capacity, K, V, pos, _head_average(policy, a_last), _head_average(policy, colsum))
    return State(keys.astype(dtype), values.astype(dtype), pos, score, lengths)


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "capacity"))
@exact_for_f32
def prefill_oneshot(params, cfg: ModelConfig, policy: Policy, capacity: int, tokens, lengths=None):
    """The official TOVA code's prompt handling: one parallel causal forward over the
    prompt, then each layer keeps a top-C mask ranked by the last prompt token's
    head-averaged attention (H2O: recent C/2 plus top by column-summed attention).
    Returns (logits [B,T,V], state)."""
    logits, prompt = oneshot_forward(params, cfg, tokens, lengths)
    return logits, oneshot_cut(cfg, policy, capacity, prompt, params["embed"].dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "positions"), donate_argnames=("state",))
@exact_for_f32
def chunk_step(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active=None,
               positions: str = "absolute"):
    """S tokens per row at once: the chunk attends to the state plus itself (causally),
    then every layer reduces its C + S candidates back to C with the attention of the
    chunk's last token (H2O: accumulated column sums). No chunk sees a token that an
    earlier chunk evicted. tokens, active: [B, S]. Under `reindex` positions the n kept
    slots of a head are rotated by their ranks and the chunk's tokens by n..n+S-1.
    Returns (logits [B,S,V], state)."""
    B, S = tokens.shape
    reindex = check_positions(positions) == "reindex"
    if active is None:
        active = jnp.ones(tokens.shape, bool)
    n_act = active.sum(1).astype(jnp.int32)  # active tokens form a prefix of the chunk
    qpos = jnp.where(active, state.length[:, None] + jnp.arange(S, dtype=jnp.int32)[None], -1)
    last = jnp.maximum(n_act - 1, 0)
    x = embed(cfg, params, tokens)
    if isinstance(state, Groups):  # layer groups: unrolled, each layer with its group's config and policy
        pols = state.policies(policy)
        cfgs = [cfg.group_config(g) for g in range(len(state.states))]
        layer_fns = [_chunk_layer(c, pol, st.capacity, B, S, qpos, last, reindex)
                     for c, pol, st in zip(cfgs, pols, state.states)]
        outs = [[] for _ in state.states]
        for l, (g, i) in enumerate(cfg.layer_slots):
            st = state.states[g]
            x, out = layer_fns[g](x, (layer_params(params["layers"], l), st.keys[i], st.values[i], st.pos[i],
                                      st.score[i]))
            outs[g].append(out)
        states = []
        for g, st in enumerate(state.states):
            K, V, P, A, Sc = jax.tree.map(lambda *a: jnp.stack(a), *outs[g])
            keys, values, pos, score = reduce_candidates(pols[g], st.capacity, K, V, P, A, Sc)
            states.append(State(keys, values, pos, score, st.length + n_act))
        return logits_from_hidden(cfg, params, x), Groups(tuple(states), state.windows)
    check_single(cfg, state)
    C = state.capacity
    layer = _chunk_layer(cfg, policy, C, B, S, qpos, last, reindex)
    x, (K, V, P, A, Sc) = scan_layers(layer, x, params, state.keys, state.values, state.pos, state.score)
    keys, values, pos, score = reduce_candidates(policy, C, K, V, P, A, Sc)
    state = State(keys, values, pos, score, state.length + n_act)
    return logits_from_hidden(cfg, params, x), state


def _chunk_layer(cfg: ModelConfig, policy: Policy, C: int, B: int, S: int, qpos, last, reindex: bool):
    """`chunk_step`'s layer: (x, (lp, K, V, P, Sc) of one layer) -> (x, its C + S candidates)."""
    table = model_rope_table(cfg, C + S) if reindex else None

    def layer(x, xs):
        lp, K_kept, V_kept, P, Sc = xs  # K: [B,Hkv,C,D], P: [B,Hkv,C]
        K, V = read(K_kept, x.dtype), read(V_kept, x.dtype)  # an 8-bit state is read dequantized
        h = norm(cfg, x, lp["attn_norm"])
        if reindex:  # keys are kept unrotated; attention sees them rotated by rank
            q, k, v = project(cfg, lp, h)
            K_rot, n = reindex_slots(K, P, table)
            at = n[:, None, :] + jnp.arange(S, dtype=jnp.int32)[None, :, None]  # [B,S,Hkv]
            q = rotate_at(q.reshape(B, S, cfg.num_kv_heads, cfg.group_size, -1), at, table).reshape(q.shape)
            keys = jnp.concatenate([jnp.swapaxes(K_rot, 1, 2), rotate_at(k, at, table).astype(K.dtype)], 1)
        else:
            q, k, v = qkv(cfg, lp, h, jnp.maximum(qpos, 0))
            keys = jnp.concatenate([jnp.swapaxes(K, 1, 2), k.astype(K.dtype)], 1)  # [B,C+S,Hkv,D]
        vals = jnp.concatenate([jnp.swapaxes(V, 1, 2), v.astype(V.dtype)], 1)
        # a slot's position is the same across heads for layer-wise policies, but not for
        # head-wise ones: mask per head
        kpos = jnp.concatenate([P, jnp.broadcast_to(qpos[:, None], (B, cfg.num_kv_heads, S))], -1)
        out, w = _attend_heads(cfg, q, keys, vals, qpos, kpos)  # w: [B,Hkv,G,S,C+S]
        x = finish_layer(cfg, lp, x, out.reshape(B, S, -1))
        a_last = jnp.take_along_axis(w, last[:, None, None, None, None], 3)[:, :, :, 0].mean(2)
        colsum = w.sum(3).mean(2)  # [B,Hkv,C+S]
        score = jnp.concatenate([Sc, jnp.zeros((B, cfg.num_kv_heads, S), F32)], -1)
        score = score + _head_average(policy, colsum)
        # the candidates as they will be stored (reindex: unrotated)
        if isinstance(K_kept, Quantized):  # the kept slots as they are, the chunk's tokens quantized
            cand_k = K_kept.concat(Quantized.of(jnp.swapaxes(k, 1, 2), K_kept.kind))
            cand_v = V_kept.concat(Quantized.of(jnp.swapaxes(v, 1, 2), V_kept.kind))
        else:
            if reindex:
                keys = jnp.concatenate([jnp.swapaxes(K, 1, 2), k.astype(K.dtype)], 1)
            cand_k, cand_v = jnp.swapaxes(keys, 1, 2), jnp.swapaxes(vals, 1, 2)
        return x, (cand_k, cand_v, kpos, _head_average(policy, a_last), score)

    return layer


def _attend_heads(cfg, q, k, v, q_pos, k_pos):
    """Causal attention of T queries over N keys with per-KV-head key positions. q: [B,T,Hq,D];
    k, v: [B,N,Hkv,D]; q_pos [B,T] (-1 = padding); k_pos [B,Hkv,N] (-1 = masked).
    Returns (out [B,T,Hq,D] f32, weights [B,Hkv,G,T,N] f32)."""
    B, T = q.shape[:2]
    Hkv, G, D = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    qg = q.reshape(B, T, Hkv, G, D)
    s = jnp.einsum("bthgd,bnhd->bhgtn", qg, k, preferred_element_type=F32) / math.sqrt(D)
    vis = visible(cfg, k_pos[:, :, None, :], q_pos[:, None, :, None])  # [B,Hkv,T,N]
    vis = vis & (q_pos >= 0)[:, None, :, None]
    s = jnp.where(vis[:, :, None], s, -jnp.inf)
    w = jnp.where(vis[:, :, None], jax.nn.softmax(s, -1), 0.0)
    out = jnp.einsum("bhgtn,bnhd->bthgd", w.astype(v.dtype), v, preferred_element_type=F32)
    return out.reshape(B, T, Hkv * G, D), w
