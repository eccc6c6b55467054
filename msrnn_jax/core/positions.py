"""Positions (docs/design.md §8): what RoPE position a key and a query are rotated by.

- `absolute` (the paper): every key is rotated once, at its original position, when it
  is written; the query at its own position.
- `reindex` (StreamingLLM's positions within the state): keys are kept *before* RoPE; at
  every step the n kept slots of each layer and KV head are rotated by their rank 0..n-1
  in order of original position, the new token and the query by n. Masks still come from
  the original positions in `pos`.

Each mode is a small strategy object (`ABSOLUTE`, `REINDEX`, `positions_of(name)`) with
the carry it owns across the steps of a loop: nothing under absolute; under reindex the
slots' ranks, sorted once per loop and then advanced in O(C) after each write
(`advance_ranks`), so that a scan of steps sorts once per call instead of once per layer
and step.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..errors import InvalidArgument, check_choice
from ..fast import attention
from .layers import model_rope_table, rope_at, rotate, rotate_at
from .policies import Policy, heads_agree

POSITIONS = ("absolute", "reindex")


def check_positions(positions: str, prefill: str | None = None) -> str:
    """`positions` checked once for every caller; `oneshot` prefill cannot reindex (its
    parallel forward rotates every key at its original position)."""
    positions = check_choice("positions", positions, POSITIONS, "positions")
    if positions == "reindex" and prefill == "oneshot":
        raise InvalidArgument("oneshot prefill supports positions absolute only; "
                              "use exact or chunked prefill with reindex", "positions")
    return positions


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
    rank [..., 1, C] and n [..., 1], which broadcast over the heads where they are used (Hkv
    times fewer ranks to carry); else
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
    return rotate(K, cos[rank], sin[rank]), n


class Absolute:
    """Keys stored rotated at their original position; nothing to carry."""

    name = "absolute"

    def shared(self, cfg, capacity: int):
        """What every layer of a step (or of a call) shares: None here."""
        return None

    def start(self, policy: Policy, pos):
        """The carry of slots whose positions are `pos` [..., Hkv, C]: None here."""
        return None

    def rotate_token(self, cfg, shared, carry, q, k, K, V, P, p, impl, l):
        """The new token's q [B,Hkv,G,D] and k [B,Hkv,D] at position p [B]. Returns (q, the
        key the query attends to, the key the state keeps, the slots K, V and index l as
        the attention reads them, rot: a rotation applied inside the score product)."""
        q, k = rope_at(cfg, q, p[:, None]), rope_at(cfg, k, p)
        return q, k, k, K, V, l, None

    def advance(self, carry, P, slot):
        """The layer's carry after its write of `slot` [B, Hkv] into the slots P."""
        return None


class Reindex(Absolute):
    """Keys stored unrotated; each step rotates the n kept slots by their rank and the new
    token and the query by n. Carry: the slots' ranks (`ranks_of`)."""

    name = "reindex"

    def shared(self, cfg, capacity: int):
        return model_rope_table(cfg, capacity + 1)  # cos, sin of 0..C

    def start(self, policy: Policy, pos):
        return ranks_of(policy, pos)  # one sort per call: [..., Hkv or 1, C]

    def rotate_token(self, cfg, table, ranks, q, k, K, V, P, p, impl, l):
        rank, n = ranks
        cos, sin = table
        rot = None
        if attention.fused_reindex(impl) and cfg.rotary == cfg.head_dim:  # rotated inside the score product
            rot = (cos[rank], sin[rank])
        else:  # a rotated copy of the layer's keys
            K, V, l = attention.rotated_copy(K, V, l, impl, lambda K: rotate(K, cos[rank], sin[rank]), q.dtype)
        return rotate_at(q, n, table), rotate_at(k, n, table), k, K, V, l, rot

    def advance(self, ranks, P, slot):
        return follow_ranks(ranks, P, slot)


ABSOLUTE, REINDEX = Absolute(), Reindex()


def positions_of(name: str) -> Absolute:
    """The strategy of a `positions` name ("absolute" or "reindex")."""
    return REINDEX if check_positions(name) == "reindex" else ABSOLUTE
