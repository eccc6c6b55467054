"""A llama-like decoder written as a multi-state RNN (docs/design.md §3).

`step` consumes one token per batch row: every layer attends over its kept slots plus
the new token, the policy picks the candidate to drop, and the new (key, value) is
written into that slot in place. `lax.scan` drives the step over layers (stacked on a
leading axis) and over tokens. Nothing ever changes shape.

`forward_parallel` is the ordinary causal forward pass over a whole sequence; it serves
the `oneshot` prompt mode and shows that the RNN and the transformer are one model.
`chunk_step` is the middle ground: S tokens at a time against the state.
Shapes follow the notation in `state.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from . import attention
from .attention import DEFAULT_IMPL, StepImpl  # noqa: F401  (re-exported)
from .config import ModelConfig
from .policies import Policy, select_keep, step_choice
from .precision import exact_for_f32
from .state import State

F32 = jnp.float32


# -- building blocks -------------------------------------------------------------------
def rms_norm(x, w, eps):
    x32 = x.astype(F32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
    return w * x32.astype(x.dtype)


def rope(x, positions, inv_freq):
    """Rotate-half RoPE. x: [..., H, D]; positions: int [...] broadcast over H."""
    freqs = positions.astype(F32)[..., None] * inv_freq  # [..., D/2]
    emb = jnp.concatenate([freqs, freqs], -1)[..., None, :]  # [..., 1, D]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, -1)
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def qkv(cfg: ModelConfig, lp, h, positions):
    """Project and rotate. h: [..., E] -> q [..., Hq, D], k, v [..., Hkv, D]."""
    q, k, v = h @ lp["wq"], h @ lp["wk"], h @ lp["wv"]
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    D = cfg.head_dim
    q = q.reshape(*q.shape[:-1], cfg.num_heads, D)
    k = k.reshape(*k.shape[:-1], cfg.num_kv_heads, D)
    v = v.reshape(*v.shape[:-1], cfg.num_kv_heads, D)
    inv_freq = jnp.asarray(cfg.inv_freq())
    return rope(q, positions, inv_freq), rope(k, positions, inv_freq), v


def mlp(lp, h):
    return (jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"]


def logits_from_hidden(cfg: ModelConfig, params, x):
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.matmul(x, head, preferred_element_type=F32)


def token_nll(logits, targets):
    """Next-token loss: logits [..., V], targets int [...] -> NLL [...] float32."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]


def _visible(cfg: ModelConfig, key_pos, query_pos):
    """Keys a query may see: real (pos >= 0), not in its future, inside Mistral's window."""
    ok = (key_pos >= 0) & (key_pos <= query_pos)
    if cfg.sliding_window is not None:
        ok &= key_pos > query_pos - cfg.sliding_window
    return ok


# -- the recurrent step ----------------------------------------------------------------
def split_layers(params):
    """The same parameters with `layers` as a list of per-layer dicts. `step` then unrolls
    the layers and reads each weight where it lies (the fast layout on GPU, see
    `attention`). The parallel paths (`forward_parallel`, `chunk_step`) restack such
    params inside their program: one weight copy per call."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a: a[i], layers) for i in range(n)]}


def stacked_layers(params):
    """`params["layers"]` stacked on a leading axis (undoes `split_layers`)."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return layers


@exact_for_f32  # fp32 params: exact matmuls, also when called eagerly (precision.py)
def step(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active=None,
         impl: StepImpl = DEFAULT_IMPL):
    """One token per row through every layer (docs/design.md, "One step").

    tokens: int [B]; active: bool [B] (inactive rows leave their state untouched);
    impl: how the products and the layer loop are computed (`attention.StepImpl`).
    Returns (logits [B, V] f32, the new state)."""
    B, C = state.batch, state.capacity
    Hkv, G, D = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    active = jnp.ones((B,), bool) if active is None else active
    p = state.length  # [B] the new token's position
    new_pos = jnp.broadcast_to(p[:, None, None], (B, Hkv, 1))

    def layer(x, lp, K, V, P, S, l):
        """x [B,E]; this layer's slots K, V [B,Hkv,C,D], P, S [B,Hkv,C]. Returns x and what
        to write: (k, v [B,Hkv,D], slot [B,Hkv] in [0, C], scores [B,Hkv,C])."""
        # 1. q, k, v of the new token, RoPE at its position
        q, k, v = qkv(cfg, lp, rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps), p)
        q = q.reshape(B, Hkv, G, D)
        # 2-3. attend over the kept slots plus the new token (softmax in float32)
        out, w_old, w_new = attention.attend(q, k, v, K, V, _visible(cfg, P, p[:, None, None]), impl, l)
        x = x + out.reshape(B, -1).astype(x.dtype) @ lp["wo"]
        x = x + mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps))
        # 4. the policy picks one of the C + 1 candidates to drop, from the attention
        #    averaged over the query heads of each KV head
        w = jnp.concatenate([w_old.mean(2), w_new.mean(2)[..., None]], -1)  # [B,Hkv,C+1]
        slot, cand_score = step_choice(policy, w, jnp.concatenate([P, new_pos], -1), S)
        slot = jnp.where(active[:, None], slot, C)  # C = drop the new token = no write
        if policy.uses_score:  # H2O: the dropped slot's score becomes the new token's
            kept = jnp.where(jnp.arange(C) == slot[..., None], cand_score[..., C:], cand_score[..., :C])
            S = jnp.where(active[:, None, None], kept, S)
        return x, (k, v, slot, S)

    # every layer reads the old state; all layers' new entries are written afterwards in
    # one in-place scatter (a write inside the loop would copy the state once per layer)
    x, (k, v, slot, score) = attention.over_layers(layer, params["embed"][tokens], params["layers"],
                                                   state, impl)
    at = (jnp.arange(cfg.num_layers)[:, None, None], jnp.arange(B)[None, :, None],
          jnp.arange(Hkv)[None, None, :], slot)  # [L,B,Hkv]; slot C is out of range: no write
    state = State(
        keys=state.keys.at[at].set(k.astype(state.keys.dtype), mode="drop"),
        values=state.values.at[at].set(v.astype(state.values.dtype), mode="drop"),
        pos=state.pos.at[at].set(jnp.broadcast_to(p[None, :, None], slot.shape), mode="drop"),
        score=score if policy.uses_score else state.score,
        length=state.length + active.astype(jnp.int32))
    return logits_from_hidden(cfg, params, x), state


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "record_pos"), donate_argnames=("state",))
@exact_for_f32
def scan_logits(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active=None,
                record_pos: bool = False):
    """Feed tokens [B, T] step by step. Returns (logits [B, T, V], state) — and, with
    record_pos, the kept positions after every step [T, L, B, Hkv, C]."""
    if active is None:
        active = jnp.ones(tokens.shape, bool)

    def body(st, xs):
        tok, act = xs
        logits, st = step(params, cfg, policy, st, tok, act)
        return st, ((logits, st.pos) if record_pos else logits)

    state, out = jax.lax.scan(body, state, (tokens.T, active.T))
    if record_pos:
        logits, pos = out
        return jnp.swapaxes(logits, 0, 1), state, pos
    return jnp.swapaxes(out, 0, 1), state


@functools.partial(jax.jit, static_argnames=("cfg", "policy"), donate_argnames=("state",))
@exact_for_f32
def scan_nll(params, cfg: ModelConfig, policy: Policy, state: State, tokens, targets, active=None):
    """Feed tokens [B, T]; return the NLL of `targets` [B, T] at every step (f32) and the
    state. Only the per-token loss leaves the loop, so long texts need no [T, V] buffer."""
    if active is None:
        active = jnp.ones(tokens.shape, bool)

    def body(st, xs):
        tok, tgt, act = xs
        logits, st = step(params, cfg, policy, st, tok, act)
        nll = token_nll(logits, tgt)
        return st, jnp.where(act, nll, 0.0)

    state, nll = jax.lax.scan(body, state, (tokens.T, targets.T, active.T))
    return nll.T, state


@functools.partial(jax.jit, static_argnames=("cfg", "policy"), donate_argnames=("state",))
@exact_for_f32
def scan_last_logits(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active=None,
                     last_logits=None):
    """Feed tokens [B, T] step by step and return only each row's logits after its last
    active token ([B, V] f32; rows with no active token keep `last_logits`) and the state.
    This is the `exact` prompt prefill; right-padding (active=False) never enters a row."""
    B = tokens.shape[0]
    if active is None:
        active = jnp.ones(tokens.shape, bool)
    if last_logits is None:
        last_logits = jnp.zeros((B, cfg.vocab_size), F32)

    def body(carry, xs):
        st, last = carry
        tok, act = xs
        logits, st = step(params, cfg, policy, st, tok, act)
        return (st, jnp.where(act[:, None], logits, last)), None

    (state, last), _ = jax.lax.scan(body, (state, last_logits), (tokens.T, active.T))
    return last, state


# -- the parallel (transformer) view ---------------------------------------------------
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
    x = params["embed"][tokens]
    last = jnp.maximum(lengths - 1, 0)

    def layer(x, lp):
        h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        q, k, v = qkv(cfg, lp, h, jnp.maximum(pos, 0))
        kpos = jnp.broadcast_to(pos[:, None, :], (B, cfg.num_kv_heads, T))
        out, w = _attend_heads(cfg, q, k, v, pos, kpos)
        x = x + out.reshape(B, T, -1).astype(x.dtype) @ lp["wo"]
        x = x + mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps))
        w_last = jnp.take_along_axis(w, last[:, None, None, None, None], 3)[:, :, :, 0]  # [B,Hkv,G,T]
        colsum = w.sum(3)  # [B,Hkv,G,N]
        return x, (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), w_last.mean(2), colsum.mean(2))

    x, (K, V, a_last, colsum) = jax.lax.scan(layer, x, stacked_layers(params))
    return logits_from_hidden(cfg, params, x), K, V, a_last, colsum


def _head_average(policy: Policy, a):
    """[..., Hkv, N] per-KV-head average -> what the policy ranks by (a or a_h)."""
    if policy.head_wise:
        return a
    return jnp.broadcast_to(a.mean(-2, keepdims=True), a.shape)


def reduce_candidates(policy: Policy, capacity: int, keys, values, pos, attn, score):
    """Keep the top-C of N candidates per layer/head by the policy's keys.

    keys, values: [L,B,Hkv,N,D]; pos: [L,B,Hkv,N]; attn, score: [L,B,Hkv,N] f32 (attn
    already averaged the way the policy wants). Returns (keys, values, pos, score) with C.
    """
    n = pos.shape[-1]
    if n < capacity:  # pad with empty candidates so there is something to keep
        pad = capacity - n
        padn = lambda a, v: jnp.pad(a, [(0, 0)] * 3 + [(0, pad)] + [(0, 0)] * (a.ndim - 4), constant_values=v)
        keys, values, pos = padn(keys, 0), padn(values, 0), padn(pos, -1)
        attn, score = padn(attn, 0.0), padn(score, 0.0)
    idx = select_keep(policy, pos, attn, score, capacity)  # [L,B,Hkv,C]
    take = lambda a: jnp.take_along_axis(a, idx[..., None] if a.ndim == 5 else idx, 3)
    pos = take(pos)
    score = jnp.where(pos >= 0, take(score), 0.0) if policy.uses_score else jnp.zeros(pos.shape, F32)
    return take(keys), take(values), pos, score


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "capacity"))
@exact_for_f32
def prefill_oneshot(params, cfg: ModelConfig, policy: Policy, capacity: int, tokens, lengths=None):
    """The official TOVA code's prompt handling: one parallel causal forward over the
    prompt, then each layer keeps a top-C mask ranked by the last prompt token's
    head-averaged attention (H2O: recent C/2 plus top by column-summed attention).
    Returns (logits [B,T,V], state)."""
    B, T = tokens.shape
    if lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    logits, K, V, a_last, colsum = forward_parallel(params, cfg, tokens, lengths)
    t = jnp.arange(T, dtype=jnp.int32)
    pos = jnp.where(t[None] < lengths[:, None], t[None], -1)  # [B,T]
    pos = jnp.broadcast_to(pos[None, :, None, :], K.shape[:-1])
    keys, values, pos, score = reduce_candidates(
        policy, capacity, K, V, pos, _head_average(policy, a_last), _head_average(policy, colsum))
    state = State(keys.astype(params["embed"].dtype), values.astype(params["embed"].dtype),
                  pos, score, lengths.astype(jnp.int32))
    return logits, state


@functools.partial(jax.jit, static_argnames=("cfg", "policy"), donate_argnames=("state",))
@exact_for_f32
def chunk_step(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active=None):
    """S tokens per row at once: the chunk attends to the state plus itself (causally),
    then every layer reduces its C + S candidates back to C with the attention of the
    chunk's last token (H2O: accumulated column sums). No chunk sees a token that an
    earlier chunk evicted. tokens, active: [B, S]. Returns (logits [B,S,V], state)."""
    B, S = tokens.shape
    C = state.capacity
    if active is None:
        active = jnp.ones(tokens.shape, bool)
    n_act = active.sum(1).astype(jnp.int32)  # active tokens form a prefix of the chunk
    qpos = jnp.where(active, state.length[:, None] + jnp.arange(S, dtype=jnp.int32)[None], -1)
    last = jnp.maximum(n_act - 1, 0)
    x = params["embed"][tokens]

    def layer(x, xs):
        lp, K, V, P, Sc = xs  # K: [B,Hkv,C,D], P: [B,Hkv,C]
        h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        q, k, v = qkv(cfg, lp, h, jnp.maximum(qpos, 0))
        keys = jnp.concatenate([jnp.swapaxes(K, 1, 2), k.astype(K.dtype)], 1)  # [B,C+S,Hkv,D]
        vals = jnp.concatenate([jnp.swapaxes(V, 1, 2), v.astype(V.dtype)], 1)
        # a slot's position is the same across heads for layer-wise policies, but not for
        # head-wise ones: mask per head
        kpos = jnp.concatenate([P, jnp.broadcast_to(qpos[:, None], (B, cfg.num_kv_heads, S))], -1)
        out, w = _attend_heads(cfg, q, keys, vals, qpos, kpos)  # w: [B,Hkv,G,S,C+S]
        x = x + out.reshape(B, S, -1).astype(x.dtype) @ lp["wo"]
        x = x + mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps))
        a_last = jnp.take_along_axis(w, last[:, None, None, None, None], 3)[:, :, :, 0].mean(2)
        colsum = w.sum(3).mean(2)  # [B,Hkv,C+S]
        score = jnp.concatenate([Sc, jnp.zeros((B, cfg.num_kv_heads, S), F32)], -1)
        score = score + _head_average(policy, colsum)
        return x, (jnp.swapaxes(keys, 1, 2), jnp.swapaxes(vals, 1, 2), kpos,
                   _head_average(policy, a_last), score)

    x, (K, V, P, A, Sc) = jax.lax.scan(
        layer, x, (stacked_layers(params), state.keys, state.values, state.pos, state.score))
    keys, values, pos, score = reduce_candidates(policy, C, K, V, P, A, Sc)
    state = State(keys, values, pos, score, state.length + n_act)
    return logits_from_hidden(cfg, params, x), state


def _attend_heads(cfg, q, k, v, q_pos, k_pos):
    """Causal attention of T queries over N keys with per-KV-head key positions. q: [B,T,Hq,D];
    k, v: [B,N,Hkv,D]; q_pos [B,T] (-1 = padding); k_pos [B,Hkv,N] (-1 = masked).
    Returns (out [B,T,Hq,D] f32, weights [B,Hkv,G,T,N] f32)."""
    B, T = q.shape[:2]
    Hkv, G, D = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    qg = q.reshape(B, T, Hkv, G, D)
    s = jnp.einsum("bthgd,bnhd->bhgtn", qg, k, preferred_element_type=F32) / math.sqrt(D)
    vis = _visible(cfg, k_pos[:, :, None, :], q_pos[:, None, :, None])  # [B,Hkv,T,N]
    vis = vis & (q_pos >= 0)[:, None, :, None]
    s = jnp.where(vis[:, :, None], s, -jnp.inf)
    w = jnp.where(vis[:, :, None], jax.nn.softmax(s, -1), 0.0)
    out = jnp.einsum("bhgtn,bnhd->bthgd", w.astype(v.dtype), v, preferred_element_type=F32)
    return out.reshape(B, T, Hkv * G, D), w
