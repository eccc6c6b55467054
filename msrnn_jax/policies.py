"""Eviction policies: which (key, value) pair a bounded multi-state RNN forgets.

Every policy is a small frozen dataclass that turns the candidates of one layer —
their original positions, their attention from the current query and (for H2O) their
accumulated attention — into *eviction keys*: a tuple of arrays compared
lexicographically, lowest evicted first. Two generic routines use those keys:

* `drop_slot` (one decoding step, C + 1 candidates: the kept slots and the new token)
  returns the single candidate to drop, so the step can overwrite that slot in place;
* `select_keep` (prompt prefill, N candidates) returns the C candidates to keep.

Both put empty slots first (they are filled before anything is evicted) and break every
remaining tie by the smallest position (DESIGN.md §3), so one definition serves both.
Policies differ only in array logic, never in shapes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .config import UsageError

_BIG = jnp.iinfo(jnp.int32).max


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base class. `head_wise`: one choice per KV head instead of one per layer."""

    head_wise: bool = dataclasses.field(default=False, init=False)
    uses_score: bool = dataclasses.field(default=False, init=False)
    name: str = dataclasses.field(default="", init=False)

    def eviction_keys(self, pos, attn, score, capacity):
        """Keys, lowest evicted first. pos: int32 [..., N]; attn, score: float32 [..., N]."""
        raise NotImplementedError

    def validate(self, capacity: int) -> None:
        if capacity < 1:
            raise UsageError(f"capacity must be >= 1, got {capacity}")


@dataclasses.dataclass(frozen=True)
class Window(Policy):
    """Keep the most recent C tokens. With C >= T this is the unbounded `full` MSRNN."""

    name: str = dataclasses.field(default="window", init=False)

    def eviction_keys(self, pos, attn, score, capacity):
        return (pos,)


@dataclasses.dataclass(frozen=True)
class Full(Window):
    """The unbounded MSRNN: capacity = sequence length, so nothing is ever dropped."""

    name: str = dataclasses.field(default="full", init=False)


@dataclasses.dataclass(frozen=True)
class Sink(Policy):
    """Window + i attention sinks: never drop positions < sinks (StreamingLLM)."""

    sinks: int = 4
    name: str = dataclasses.field(default="sink", init=False)

    def eviction_keys(self, pos, attn, score, capacity):
        return (jnp.where(pos < self.sinks, _BIG, pos),)

    def validate(self, capacity: int) -> None:
        super().validate(capacity)
        if self.sinks < 0:
            raise UsageError(f"--sinks must be >= 0, got {self.sinks}")
        if capacity <= self.sinks:
            raise UsageError(f"sink policy needs capacity > sinks, got capacity {capacity} "
                             f"and sinks {self.sinks}")


@dataclasses.dataclass(frozen=True)
class Tova(Policy):
    """TOVA: drop the candidate with the lowest attention from the current query,
    averaged over the heads of the layer (`tova`) or of each KV head (`tova-head`)."""

    head_wise: bool = False
    name: str = dataclasses.field(default="tova", init=False)

    def eviction_keys(self, pos, attn, score, capacity):
        return (attn,)


@dataclasses.dataclass(frozen=True)
class H2O(Policy):
    """Heavy-hitter oracle: protect the floor(C/2) most recent candidates, drop the
    unprotected one with the lowest accumulated attention."""

    head_wise: bool = False
    uses_score: bool = dataclasses.field(default=True, init=False)
    name: str = dataclasses.field(default="h2o", init=False)

    def eviction_keys(self, pos, attn, score, capacity):
        recent = capacity // 2
        if recent == 0:
            protected = jnp.zeros(pos.shape, jnp.int32)
        else:
            kth = jax.lax.top_k(pos, recent)[0][..., -1:]  # the recent-th largest position
            protected = (pos >= kth).astype(jnp.int32)
        return (protected, score)


@dataclasses.dataclass(frozen=True)
class PerRow(Policy):
    """Several policies side by side: batch row b follows `policies[b % len(policies)]`.

    Rows never interact, so each row keeps exactly what that policy keeps alone (its
    logits differ only by the float rounding of batched matmuls);
    what they share is the reading of the weights, which dominates the cost of a step on
    memory-bound hardware. A perplexity sweep at one capacity runs every policy at once.
    (Token-by-token steps only: prefill modes take a single policy.)"""

    policies: tuple = ()
    name: str = dataclasses.field(default="per-row", init=False)

    @property
    def uses_score(self) -> bool:  # type: ignore[override]
        return any(p.uses_score for p in self.policies)

    def validate(self, capacity: int) -> None:
        for p in self.policies:
            p.validate(capacity)

    def spread(self, tokens):
        """Token rows [N, T] -> [N * n, T]: every text once per policy (row b = text b // n)."""
        return np.repeat(np.asarray(tokens), len(self.policies), axis=0)

    def rows_of(self, i: int, batch: int) -> np.ndarray:
        """The batch rows that follow policies[i], one per text, in text order."""
        return np.arange(i, batch, len(self.policies))


POLICY_NAMES = ("full", "window", "sink", "tova", "tova-head", "h2o", "h2o-head")


def make_policy(name: str, sinks: int = 4) -> Policy:
    """Policy from its command-line name."""
    if name == "full":
        return Full()
    if name == "window":
        return Window()
    if name == "sink":
        return Sink(sinks=sinks)
    if name in ("tova", "tova-head"):
        return Tova(head_wise=name.endswith("-head"))
    if name in ("h2o", "h2o-head"):
        return H2O(head_wise=name.endswith("-head"))
    raise UsageError(f"unknown policy {name!r} (choose from {', '.join(POLICY_NAMES)})")


def capacity_for(policy: Policy, capacity: int | None, needed: int, bucket: int = 1) -> int:
    """The state size a run needs. `full` keeps every token: `needed` slots, rounded up to
    a multiple of `bucket` (so calls of similar lengths share a compile); every other
    policy needs its capacity, validated."""
    if policy.name == "full":
        return -(-max(needed, 1) // bucket) * bucket
    if capacity is None:
        raise UsageError(f"policy {policy_name(policy)!r} needs a capacity (--capacity C)")
    policy.validate(capacity)
    return capacity


def policy_name(policy: Policy) -> str:
    return policy.name + ("-head" if policy.head_wise and policy.name in ("tova", "h2o") else "")


# --------------------------------------------------------------------------------------
def _all_keys(policy: Policy, pos, attn, score, capacity):
    # Empty candidates (pos < 0) sort first, then the policy's keys, then position.
    return ((pos >= 0).astype(jnp.int32),) + tuple(policy.eviction_keys(pos, attn, score, capacity)) + (pos,)


def lex_argmin(keys) -> jax.Array:
    """Index of the lexicographically smallest entry along the last axis (first on ties)."""
    alive = jnp.ones(keys[0].shape, bool)
    for k in keys:
        hi = jnp.inf if jnp.issubdtype(k.dtype, jnp.floating) else _BIG
        k = jnp.where(alive, k, hi)
        alive = alive & (k == k.min(-1, keepdims=True))
    return jnp.argmax(alive, -1)


def step_choice(policy: Policy, w, cand_pos, prev_score):
    """The policy's decision for one layer of one step.

    w: float32 [B, Hkv, G, C+1] attention of every query head over the kept slots and the
    new token (last); cand_pos: int32 [B, Hkv, C+1]; prev_score: float32 [B, Hkv, C].
    Returns (slot [B, Hkv] in [0, C], C meaning "drop the new token"; the candidates'
    updated scores [B, Hkv, C+1], which H2O keeps)."""
    B, Hkv, _, n = w.shape
    if isinstance(policy, PerRow):
        choices = [step_choice(p, w, cand_pos, prev_score) for p in policy.policies]
        which = jnp.arange(B) % len(policy.policies)
        slot = jnp.stack([c[0] for c in choices])[which, jnp.arange(B)]
        score = jnp.stack([c[1] for c in choices])[which, jnp.arange(B)]
        return slot, score
    if policy.head_wise:
        attn = w.mean(2)  # a_h: averaged over the query heads that share a KV head
    else:
        attn = jnp.broadcast_to(w.mean((1, 2))[:, None, :], (B, Hkv, n))  # a: the whole layer
    score = jnp.concatenate([prev_score, jnp.zeros((B, Hkv, 1), jnp.float32)], -1) + attn
    return drop_slot(policy, cand_pos, attn, score, n - 1), score


def drop_slot(policy: Policy, pos, attn, score, capacity) -> jax.Array:
    """Which of the C + 1 candidates (slot index, or C for the new token) to drop.

    pos: int32 [..., C+1]; attn, score: float32 [..., C+1] (score already includes attn).
    """
    return lex_argmin(_all_keys(policy, pos, attn, score, capacity))


def select_keep(policy: Policy, pos, attn, score, capacity) -> jax.Array:
    """Indices [..., C] of the candidates to keep out of N >= C (the top C by the keys)."""
    n = pos.shape[-1]
    keys = _all_keys(policy, pos, attn, score, capacity)
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), pos.shape)
    keys = tuple(jnp.broadcast_to(k, pos.shape) for k in keys)
    out = jax.lax.sort(keys + (idx,), dimension=-1, num_keys=len(keys) + 1)
    return out[-1][..., n - capacity:]
