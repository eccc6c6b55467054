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
import numpy as np

from ..fast import attention
from ..fast.attention import DEFAULT_IMPL, StepImpl
from ..config import ModelConfig
from ..errors import InvalidArgument, check_choice
from .policies import Policy, heads_agree, select_keep, step_choice
from ..fast.precision import exact_for_f32
from ..fast.sharding import whole
from .state import State

F32 = jnp.float32

# docs/design.md §8: what position a key and a query are rotated by. A static argument of
# the step, the scans and `chunk_step` (it changes *what* is computed, unlike StepImpl).
POSITIONS = ("absolute", "reindex")


def check_positions(positions: str, prefill: str | None = None) -> str:
    """`positions` checked once for every caller; `oneshot` prefill cannot reindex (its
    parallel forward rotates every key at its original position)."""
    positions = check_choice("positions", positions, POSITIONS, "positions")
    if positions == "reindex" and prefill == "oneshot":
        raise InvalidArgument("oneshot prefill supports positions absolute only; "
                              "use exact or chunked prefill with reindex", "positions")
    return positions


# -- building blocks -------------------------------------------------------------------
def rms_norm(x, w, eps):
    x32 = x.astype(F32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
    return w * x32.astype(x.dtype)


def rope(x, positions, inv_freq):
    """Rotate-half RoPE. x: [..., H, D]; positions: int [...] broadcast over H."""
    freqs = positions.astype(F32)[..., None] * inv_freq  # [..., D/2]
    emb = jnp.concatenate([freqs, freqs], -1)[..., None, :]  # [..., 1, D]
    return _rotate(x, jnp.cos(emb), jnp.sin(emb))


def _rotate(x, cos, sin):
    """x [..., D] rotated by the angles whose cos, sin [..., D] (f32) broadcast to x."""
    x1, x2 = jnp.split(x, 2, -1)
    return x * cos.astype(x.dtype) + jnp.concatenate([-x2, x1], -1) * sin.astype(x.dtype)


def rope_table(n: int, inv_freq):
    """cos, sin [n, D] of positions 0..n-1: reindexed positions never reach past n, so a
    gather from this small table replaces C x D/2 sines per layer and step."""
    freqs = jnp.arange(n, dtype=F32)[:, None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], -1)
    return jnp.cos(emb), jnp.sin(emb)


def slot_ranks(P):
    """The rank of each kept slot in order of original position, and how many are kept.

    P: int [..., C] (-1 = empty). Returns (rank int32 [..., C]: 0..n-1 on kept slots, n..C-1
    on the empty ones, n int32 [...]). Positions are distinct within a head (a token is
    written once), so the rank is well defined; two sorts of C per layer and head."""
    key = jnp.where(P >= 0, P, jnp.iinfo(jnp.int32).max)  # empty slots rank last
    rank = jnp.argsort(jnp.argsort(key, axis=-1), axis=-1).astype(jnp.int32)
    return rank, (P >= 0).sum(-1).astype(jnp.int32)


def advance_ranks(rank, n, P, slot):
    """`slot_ranks` after `write_slots` puts a new token into `slot`, without a sort.

    rank, n: `slot_ranks(P)` of the slots P [..., C] before the write; slot int [...] in
    [0, C] (C: the new token was dropped). The new token has the highest position, so it
    ranks last among the kept. Overwriting a kept slot moves the kept ones ranked above it
    down one; filling an empty slot moves the empty ones ranked below it up one (the empty
    slots keep the sort's order by index). O(C) where the sort is O(C log C); the layer-major
    exact step carries the ranks through its token loop this way."""
    C = P.shape[-1]
    hit = jnp.arange(C) == slot[..., None]
    r_s = jnp.sum(jnp.where(hit, rank, 0), -1, keepdims=True)  # the overwritten slot's rank
    filled = (slot < C)[..., None] & ~jnp.any(hit & (P >= 0), -1, keepdims=True)  # an empty slot
    dropped = (slot < C)[..., None] & ~filled  # a kept slot
    nn = n[..., None]
    shift = jnp.where(dropped & (rank > r_s) & (rank < nn), -1, 0) + jnp.where(filled & (rank >= nn) & (rank < r_s), 1, 0)
    new_rank = jnp.where(hit, jnp.where(filled, nn, nn - 1), rank + shift)
    return new_rank.astype(jnp.int32), n + filled[..., 0].astype(jnp.int32)


def ranks_of(policy: Policy, P):
    """`slot_ranks` of one or every layer's slots P [..., Hkv, C] under `policy`: when every
    head keeps the same slots (`heads_agree`, the layer-wise policies) one sort per layer,
    rank [..., 1, C] and n [..., 1], which broadcast over the heads where they are used (at
    batch 128 of the Llama-2-7B shape the carried ranks shrink from 268 to 8 MB); else
    per head, [..., Hkv, C] and [..., Hkv]."""
    return slot_ranks(P[..., :1, :] if heads_agree(policy) else P)


def follow_ranks(ranks, P, slot):
    """`advance_ranks` of `ranks_of`'s ranks (shared over the heads or not) after the
    write of `slot` [..., Hkv] into the slots P [..., Hkv, C]."""
    rank, n = ranks
    h = rank.shape[-2]
    return advance_ranks(rank, n, P[..., :h, :], slot[..., :h])


def reindex_slots(K, P, table):
    """`reindex` positions (docs/design.md §8) of one layer's slots: every kept key, stored
    before RoPE, is rotated by its rank among the kept slots of its KV head.

    K: [B,Hkv,C,D] unrotated keys; P: [B,Hkv,C]; table: `rope_table` of >= C positions.
    Returns (rotated keys [B,Hkv,C,D], n [B,Hkv]: the position the next token gets)."""
    rank, n = slot_ranks(P)
    cos, sin = table
    return _rotate(K, cos[rank], sin[rank]), n


def rotate_at(x, positions, table):
    """x [..., D] rotated by positions int [...] (x's leading axes) from `table`, broadcast
    over the axes of x between them and D (e.g. the G query heads of each KV head)."""
    cos, sin = table
    idx = positions.reshape(positions.shape + (1,) * (x.ndim - 1 - positions.ndim))
    return _rotate(x, cos[idx], sin[idx])


FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gateup": ("w_gate", "w_up")}


def fuse_projections(params):
    """The same parameters with each layer's q, k, v projections (and biases) joined into
    one matrix `wqkv` and the MLP's gate and up into `w_gateup`: fewer, larger products
    (one read of h per group). `project` and `mlp` read either layout. A mesh with a
    model axis over 1 splits the separate matrices by heads and columns, so there a model
    keeps them apart; where the model axis is 1 the joined ones are whole on every device."""
    def fuse(lp):
        lp = dict(lp)
        for name, parts in FUSED.items():
            if all(p in lp for p in parts):
                arrays = [lp.pop(p) for p in parts]
                xp = np if all(isinstance(a, np.ndarray) for a in arrays) else jnp  # host stays host
                lp[name] = xp.concatenate(arrays, -1)
        return lp

    layers = params["layers"]
    fused = [fuse(lp) for lp in layers] if isinstance(layers, (list, tuple)) else fuse(layers)
    return {**params, "layers": fused}


def project(cfg: ModelConfig, lp, h):
    """Project without rotating. h: [..., E] -> q [..., Hq, D], k, v [..., Hkv, D]."""
    if "wqkv" in lp:  # `fuse_projections`
        qkv = h @ lp["wqkv"] + (lp["bqkv"] if cfg.qkv_bias else 0)
        nq, nk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
    else:
        q, k, v = h @ lp["wq"], h @ lp["wk"], h @ lp["wv"]
        if cfg.qkv_bias:
            q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    D = cfg.head_dim
    return (q.reshape(*q.shape[:-1], cfg.num_heads, D), k.reshape(*k.shape[:-1], cfg.num_kv_heads, D),
            v.reshape(*v.shape[:-1], cfg.num_kv_heads, D))


def qkv(cfg: ModelConfig, lp, h, positions):
    """Project and rotate. h: [..., E] -> q [..., Hq, D], k, v [..., Hkv, D]."""
    q, k, v = project(cfg, lp, h)
    inv_freq = jnp.asarray(cfg.inv_freq())
    return rope(q, positions, inv_freq), rope(k, positions, inv_freq), v


def mlp(lp, h):
    if "w_gateup" in lp:  # `fuse_projections`
        gate, up = jnp.split(h @ lp["w_gateup"], 2, -1)
    else:
        gate, up = h @ lp["w_gate"], h @ lp["w_up"]
    return whole(jax.nn.silu(gate) * up) @ lp["w_down"]


def finish_layer(cfg: ModelConfig, lp, x, out):
    """The rest of a layer once attention has run: x + out @ wo, then x + MLP(norm(x)).
    x [..., E]; out [..., Hq*D]. `whole` keeps every sum on one device under a mesh
    (`sharding`): the same numbers as one device."""
    x = whole(x + whole(out.astype(x.dtype)) @ lp["wo"])
    return whole(x + mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)))


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
def _layer_slots(K, V, l, impl: StepImpl):
    """This layer's keys and values [B,Hkv,C,D] and the index the kernels then read them
    at: Pallas hands the layer the whole [L,...] buffers (reindex then reads a rotated
    copy of the layer's keys, passed as a one-layer buffer)."""
    return (K[l], V[l], 0) if impl.attention == "pallas" else (K, V, l)


def split_layers(params):
    """The same parameters with `layers` as a list of per-layer dicts. `step` and the
    parallel paths (`forward_parallel`, `chunk_step`, `layer_major`) then unroll the layers
    and read each weight where it lies (the fast layout on GPU, see `attention` and
    `scan_layers`)."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a: a[i], layers) for i in range(n)]}


def scan_layers(layer, x, params, *per_layer):
    """`lax.scan(layer, x, (layers, *per_layer))` over the model's layers: layer(x, (lp,
    *slices)) -> (x, out), the outs stacked on a leading axis. With per-layer params
    (`split_layers`) the loop is unrolled instead and each weight is read where it lies;
    restacking them inside the program copied every weight once per call (13.5 GB for
    the Llama-2-7B shape, and as much again of memory, for each chunked prefill piece)."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return jax.lax.scan(layer, x, (layers,) + per_layer)
    outs = []
    for l, lp in enumerate(layers):
        x, out = layer(x, (lp,) + jax.tree.map(lambda a: a[l], per_layer))
        outs.append(out)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)


def stacked_layers(params):
    """`params["layers"]` stacked on a leading axis (undoes `split_layers`)."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return layers


def attend_and_choose(cfg: ModelConfig, policy: Policy, q, k, v, K, V, P, S, p, active,
                      impl: StepImpl = DEFAULT_IMPL, l: int = 0, table=None, ranks=None):
    """Steps 2-4 of one layer for one token per row: the recurrence of docs/design.md §3.

    q [B,Hkv,G,D], k, v [B,Hkv,D]: the new token's projections, not yet rotated; K, V
    [B,Hkv,C,D] (or, for Pallas, the whole [L,...] buffers with the layer index l), P, S
    [B,Hkv,C]: the layer's slots; p int [B]: the token's original position; active bool
    [B]; table: `rope_table` under reindex positions, None under absolute; ranks: the
    slots' `slot_ranks(P)` where the caller has them (else they are sorted here).
    Returns (attention output [B,Hkv,G,D] f32, what to write: the key as the state keeps
    it and v [B,Hkv,D], slot [B,Hkv] in [0, C] (C = drop the new token: no write), the
    slots' scores [B,Hkv,C])."""
    B, C = P.shape[0], P.shape[-1]
    Hkv = cfg.num_kv_heads
    # RoPE at the token's original position (absolute), or at the number n of kept slots,
    # whose keys are stored unrotated and rotated by their ranks here (reindex)
    rot = None
    if table is not None:
        rank, n = ranks_of(policy, P) if ranks is None else ranks
        cos, sin = table
        if attention.fused_reindex(impl):  # rotated inside the score product, never stored
            rot = (cos[rank], sin[rank])
        else:  # a rotated copy of the layer's keys
            K, V, l = _layer_slots(K, V, l, impl)
            K = _rotate(K, cos[rank], sin[rank])
            K, V = (K[None], V[None]) if impl.attention == "pallas" else (K, V)
        q, k_rot = rotate_at(q, n, table), rotate_at(k, n, table)
    else:
        inv_freq = jnp.asarray(cfg.inv_freq())
        q, k = rope(q, p[:, None], inv_freq), rope(k, p, inv_freq)
        k_rot = k
    # attend over the kept slots plus the new token (softmax in float32)
    out, w_old, w_new = attention.attend(q, k_rot, v, K, V, _visible(cfg, P, p[:, None, None]), impl, l, rot)
    # the policy picks one of the C + 1 candidates to drop, from the attention averaged
    # over the query heads of each KV head
    w = whole(jnp.concatenate([w_old.mean(2), w_new.mean(2)[..., None]], -1))  # [B,Hkv,C+1]
    new_pos = jnp.broadcast_to(p[:, None, None], (B, Hkv, 1))
    slot, cand_score = step_choice(policy, w, jnp.concatenate([P, new_pos], -1), S)
    slot = jnp.where(active[:, None], slot, C)
    if policy.uses_score:  # H2O: the dropped slot's score becomes the new token's
        kept = jnp.where(jnp.arange(C) == slot[..., None], cand_score[..., C:], cand_score[..., :C])
        S = jnp.where(active[:, None, None], kept, S)
    return out, (k, v, slot, S)


def write_slots(keys, values, pos, slot, k, v, p):
    """Write each new entry in place: keys, values [..., C, D], pos [..., C]; slot int
    [...] (C, out of range, writes nothing); k, v [..., D]; p: positions broadcast to
    slot's shape. The leading axes are e.g. [L, B, Hkv] (a step) or [B, Hkv] (one layer)."""
    at = tuple(jnp.arange(n).reshape((-1,) + (1,) * (slot.ndim - 1 - i)) for i, n in enumerate(slot.shape))
    at = at + (slot,)
    return (keys.at[at].set(k.astype(keys.dtype), mode="drop"),
            values.at[at].set(v.astype(values.dtype), mode="drop"),
            pos.at[at].set(jnp.broadcast_to(p, slot.shape).astype(pos.dtype), mode="drop"))


@exact_for_f32  # fp32 params: exact matmuls, also when called eagerly (precision.py)
def step(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active=None,
         impl: StepImpl = DEFAULT_IMPL, positions: str = "absolute"):
    """One token per row through every layer (docs/design.md, "One step").

    tokens: int [B]; active: bool [B] (inactive rows leave their state untouched);
    impl: how the products and the layer loop are computed (`attention.StepImpl`);
    positions: "absolute" (keys stored rotated at their original position) or "reindex"
    (keys stored unrotated and rotated by their rank among the kept slots, §8).
    Returns (logits [B, V] f32, the new state). A loop of steps under reindex calls
    `step_ranked` instead, which carries the slots' ranks from one step to the next."""
    logits, state, _ = step_ranked(params, cfg, policy, state, None, tokens, active, impl, positions)
    return logits, state


def initial_ranks(state: State, positions: str, policy: Policy):
    """The ranks `step_ranked` carries: `ranks_of` every layer's slots (one sort of
    [L, B, Hkv or 1, C]) under reindex, None under absolute."""
    return ranks_of(policy, state.pos) if check_positions(positions) == "reindex" else None


@exact_for_f32
def step_ranked(params, cfg: ModelConfig, policy: Policy, state: State, ranks, tokens, active=None,
                impl: StepImpl = DEFAULT_IMPL, positions: str = "absolute"):
    """`step`, carrying the slots' ranks (reindex): ranks is `initial_ranks(state,
    positions)` or what the previous step returned (None: sorted here). Returns (logits,
    state, the ranks of the new state: `advance_ranks` after each layer's write, O(C), so
    a scan of steps sorts once per call instead of once per layer and step)."""
    B, C = state.batch, state.capacity
    Hkv, G, D = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    active = jnp.ones((B,), bool) if active is None else active
    p = state.length  # [B] the new token's original position (masks and `pos` use it)
    table = None
    if check_positions(positions) == "reindex":
        table = rope_table(C + 1, jnp.asarray(cfg.inv_freq()))
        ranks = ranks_of(policy, state.pos) if ranks is None else ranks
    else:
        ranks = None

    def layer(x, lp, K, V, P, S, l, r):
        """x [B,E]; this layer's slots K, V [B,Hkv,C,D], P, S [B,Hkv,C]; r: their ranks.
        Returns x and what to write: (k, v [B,Hkv,D], slot [B,Hkv] in [0, C], scores
        [B,Hkv,C], the ranks after the write)."""
        # 1. q, k, v of the new token (not yet rotated)
        q, k, v = project(cfg, lp, rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps))
        # 2-4. attend over the kept slots plus the new token; the policy picks the drop
        out, writes = attend_and_choose(cfg, policy, q.reshape(B, Hkv, G, D), k, v, K, V, P, S, p,
                                        active, impl, l, table, r)
        r = None if r is None else follow_ranks(r, P, writes[2])
        return finish_layer(cfg, lp, x, out.reshape(B, -1)), writes + (r,)

    # every layer reads the old state; all layers' new entries are written afterwards in
    # one in-place scatter (a write inside the loop would copy the state once per layer)
    x, (k, v, slot, score, ranks) = attention.over_layers(layer, params["embed"][tokens], params["layers"],
                                                          state, impl, ranks)
    keys, values, pos = write_slots(state.keys, state.values, state.pos, slot, k, v, p[None, :, None])
    state = State(keys=keys, values=values, pos=pos, score=score if policy.uses_score else state.score,
                  length=state.length + active.astype(jnp.int32))
    return logits_from_hidden(cfg, params, x), state, ranks


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "record_pos", "positions", "impl"),
                   donate_argnames=("state",))
@exact_for_f32
def scan_logits(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active=None,
                record_pos: bool = False, positions: str = "absolute", impl: StepImpl = DEFAULT_IMPL):
    """Feed tokens [B, T] step by step. Returns (logits [B, T, V], state) — and, with
    record_pos, the kept positions after every step [T, L, B, Hkv, C]. `positions`,
    `impl`: see `step`."""
    if active is None:
        active = jnp.ones(tokens.shape, bool)

    def body(carry, xs):
        st, ranks = carry
        tok, act = xs
        logits, st, ranks = step_ranked(params, cfg, policy, st, ranks, tok, act, impl, positions)
        return (st, ranks), ((logits, st.pos) if record_pos else logits)

    carry = (state, initial_ranks(state, positions, policy))
    (state, _), out = jax.lax.scan(body, carry, (tokens.T, active.T))
    if record_pos:
        logits, pos = out
        return jnp.swapaxes(logits, 0, 1), state, pos
    return jnp.swapaxes(out, 0, 1), state


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "positions"), donate_argnames=("state",))
@exact_for_f32
def scan_nll(params, cfg: ModelConfig, policy: Policy, state: State, tokens, targets, active=None,
             positions: str = "absolute"):
    """Feed tokens [B, T]; return the NLL of `targets` [B, T] at every step (f32) and the
    state. Only the per-token loss leaves the loop, so long texts need no [T, V] buffer."""
    if active is None:
        active = jnp.ones(tokens.shape, bool)

    def body(carry, xs):
        st, ranks = carry
        tok, tgt, act = xs
        logits, st, ranks = step_ranked(params, cfg, policy, st, ranks, tok, act, positions=positions)
        nll = token_nll(logits, tgt)
        return (st, ranks), jnp.where(act, nll, 0.0)

    carry = (state, initial_ranks(state, positions, policy))
    (state, _), nll = jax.lax.scan(body, carry, (tokens.T, targets.T, active.T))
    return nll.T, state


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "positions"), donate_argnames=("state",))
@exact_for_f32
def scan_last_logits(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active=None,
                     last_logits=None, positions: str = "absolute"):
    """Feed tokens [B, T] step by step and return only each row's logits after its last
    active token ([B, V] f32; rows with no active token keep `last_logits`) and the state.
    This is the `exact` prompt prefill; right-padding (active=False) never enters a row."""
    B = tokens.shape[0]
    if active is None:
        active = jnp.ones(tokens.shape, bool)
    if last_logits is None:
        last_logits = jnp.zeros((B, cfg.vocab_size), F32)

    def body(carry, xs):
        st, ranks, last = carry
        tok, act = xs
        logits, st, ranks = step_ranked(params, cfg, policy, st, ranks, tok, act, positions=positions)
        return (st, ranks, jnp.where(act[:, None], logits, last)), None

    (state, _, last), _ = jax.lax.scan(body, (state, initial_ranks(state, positions, policy), last_logits),
                                       (tokens.T, active.T))
    return last, state


# -- the same step, ordered layer by layer ---------------------------------------------
def layer_major(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active,
                impl: StepImpl = DEFAULT_IMPL, positions: str = "absolute"):
    """What `step` computes token after token over tokens [B, T] (active bool [B, T]),
    ordered layer by layer. Returns (the last layer's output [B, T, E] before the final
    norm, the state): the state and every token's output are the scan's.

    A layer's slots depend only on that layer's inputs, and those are known for every
    token once the layer below has run. So each layer's projections and MLP run over all
    T tokens at once (matrix products, which a CPU runs near its peak), and only
    `attend_and_choose` and the write run token by token. The weights are read once per
    call instead of once per token. Results equal the scan's up to the float rounding of
    the larger products (tests/test_layer_major.py)."""
    B, T = tokens.shape
    C, Hkv, G, D = state.capacity, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    act = active.astype(jnp.int32)
    pos = state.length[:, None] + jnp.cumsum(act, 1) - act  # [B, T] each token's position
    table = rope_table(C + 1, jnp.asarray(cfg.inv_freq())) if check_positions(positions) == "reindex" else None
    view = (lambda a: a[None]) if impl.attention == "pallas" else (lambda a: a)  # kernels read [L,...]

    def layer(x, xs):
        lp, K, V, P, S = xs  # this layer's slots
        q, k, v = project(cfg, lp, rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps))  # [B, T, ...]

        def token(slots, t_in):
            K, V, P, S, ranks = slots
            q_t, k_t, v_t, p_t, a_t = t_in
            out, (k_w, v_w, slot, S) = attend_and_choose(cfg, policy, q_t.reshape(B, Hkv, G, D), k_t, v_t,
                                                         view(K), view(V), P, S, p_t, a_t, impl, 0, table, ranks)
            if ranks is not None:  # reindex: the ranks follow the write (no sort per token)
                ranks = follow_ranks(ranks, P, slot)
            # the write depends on the attention output (0 * out, no other effect), so the
            # reads of K and V are ordered before it and it updates them in place (without,
            # XLA copied the layer's K and V at every token: 4x the time at C=512 on a CPU)
            dep = (0 * out[:, :, :1, :1]).astype(K.dtype)[..., 0, :]  # [B, Hkv, 1]
            K, V, P = write_slots(K, V, P, slot, k_w + dep, v_w + dep, p_t[:, None])
            return (K, V, P, S, ranks), out

        t_major = tuple(jnp.swapaxes(a, 0, 1) for a in (q, k, v, pos, active))
        ranks = ranks_of(policy, P) if table is not None else None  # one sort per layer and call
        (K, V, P, S, _), out = jax.lax.scan(token, (K, V, P, S, ranks), t_major)
        return finish_layer(cfg, lp, x, jnp.swapaxes(out, 0, 1).reshape(B, T, -1)), (K, V, P, S)

    x, (K, V, P, S) = scan_layers(layer, params["embed"][tokens], params,
                                  state.keys, state.values, state.pos, state.score)
    return x, State(K, V, P, S if policy.uses_score else state.score, state.length + act.sum(1))


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "positions", "impl"), donate_argnames=("state",))
@exact_for_f32
def layer_nll(params, cfg: ModelConfig, policy: Policy, state: State, tokens, targets, active=None,
              positions: str = "absolute", impl: StepImpl = DEFAULT_IMPL):
    """`scan_nll` computed by `layer_major`: the NLL of `targets` [B, T] (f32, 0 where
    inactive) and the state. The logits are made 32 tokens at a time, never [T, V]."""
    if active is None:
        active = jnp.ones(tokens.shape, bool)
    x, state = layer_major(params, cfg, policy, state, tokens, active, impl, positions)
    nll = jax.lax.map(lambda xt: token_nll(logits_from_hidden(cfg, params, xt[0]), xt[1]),
                      (jnp.swapaxes(x, 0, 1), targets.T), batch_size=min(tokens.shape[1], 32)).T
    return jnp.where(active, nll, 0.0), state


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "positions", "impl"), donate_argnames=("state",))
@exact_for_f32
def layer_last_logits(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active=None,
                      last_logits=None, positions: str = "absolute", impl: StepImpl = DEFAULT_IMPL):
    """`scan_last_logits` (the exact prefill) computed by `layer_major`: each row's logits
    after its last active token [B, V] f32 (rows with none keep `last_logits`), and the state."""
    B = tokens.shape[0]
    if active is None:
        active = jnp.ones(tokens.shape, bool)
    if last_logits is None:
        last_logits = jnp.zeros((B, cfg.vocab_size), F32)
    x, state = layer_major(params, cfg, policy, state, tokens, active, impl, positions)
    n = active.sum(1)
    x_last = jnp.take_along_axis(x, jnp.maximum(n - 1, 0)[:, None, None], 1)[:, 0]
    return jnp.where((n > 0)[:, None], logits_from_hidden(cfg, params, x_last), last_logits), state


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
        x = finish_layer(cfg, lp, x, out.reshape(B, T, -1))
        w_last = jnp.take_along_axis(w, last[:, None, None, None, None], 3)[:, :, :, 0]  # [B,Hkv,G,T]
        colsum = w.sum(3)  # [B,Hkv,G,N]
        return x, (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), w_last.mean(2), colsum.mean(2))

    x, (K, V, a_last, colsum) = scan_layers(lambda x, xs: layer(x, xs[0]), x, params)
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
    C = state.capacity
    reindex = check_positions(positions) == "reindex"
    table = rope_table(C + S, jnp.asarray(cfg.inv_freq())) if reindex else None
    if active is None:
        active = jnp.ones(tokens.shape, bool)
    n_act = active.sum(1).astype(jnp.int32)  # active tokens form a prefix of the chunk
    qpos = jnp.where(active, state.length[:, None] + jnp.arange(S, dtype=jnp.int32)[None], -1)
    last = jnp.maximum(n_act - 1, 0)
    x = params["embed"][tokens]

    def layer(x, xs):
        lp, K, V, P, Sc = xs  # K: [B,Hkv,C,D], P: [B,Hkv,C]
        h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
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
        if reindex:  # what is kept is the unrotated keys
            keys = jnp.concatenate([jnp.swapaxes(K, 1, 2), k.astype(K.dtype)], 1)
        return x, (jnp.swapaxes(keys, 1, 2), jnp.swapaxes(vals, 1, 2), kpos,
                   _head_average(policy, a_last), score)

    x, (K, V, P, A, Sc) = scan_layers(layer, x, params, state.keys, state.values, state.pos, state.score)
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
