"""Eviction policies: which (key, value) pair a bounded multi-state RNN forgets.

Every policy is a small frozen dataclass that turns the candidates of one layer —
their original positions, their attention from the current query and (for H2O) their
accumulated attention — into *eviction keys*: a tuple of arrays compared
lexicographically, lowest evicted first. Two generic routines use those keys:

* `drop_slot` (one decoding step, C + 1 candidates: the kept slots and the new token)
  returns the single candidate to drop, so the step can overwrite that slot in place;
* `select_keep` (prompt prefill, N candidates) returns the C candidates to keep.

Both put empty slots first (they are filled before anything is evicted) and break every
remaining tie by the smallest position (docs/design.md §3), so one definition serves both.
Policies differ only in array logic, never in shapes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InvalidArgument, check_int

_BIG = jnp.iinfo(jnp.int32).max


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base class. `head_wise`: one choice per KV head instead of one per layer."""

    head_wise: bool = dataclasses.field(default=False, init=False)
    uses_score: bool = dataclasses.field(default=False, init=False)
    name: str = dataclasses.field(default="", init=False)
    bounded: bool = dataclasses.field(default=True, init=False)  # False: `full`, C = the sequence

    def eviction_keys(self, pos, attn, score, capacity):
        """Keys, lowest evicted first. pos: int32 [..., N]; attn, score: float32 [..., N]."""
        raise NotImplementedError

    def validate(self, capacity: int) -> None:
        """Raise InvalidArgument unless this policy can run with `capacity` slots."""
        check_int("capacity", capacity)

    def spread(self, tokens):
        """The token rows [N, T] a run of this policy reads (`PerRow` repeats them)."""
        return np.asarray(tokens)

    def rows_of(self, i: int, batch: int) -> np.ndarray:
        """The batch rows of a run of this policy that answer for its i-th member policy."""
        return np.arange(batch)


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
    bounded: bool = dataclasses.field(default=False, init=False)


@dataclasses.dataclass(frozen=True)
class Sink(Policy):
    """Window + i attention sinks: never drop positions < sinks (StreamingLLM)."""

    sinks: int = 4
    name: str = dataclasses.field(default="sink", init=False)

    def eviction_keys(self, pos, attn, score, capacity):
        return (jnp.where(pos < self.sinks, _BIG, pos),)

    def __post_init__(self):
        check_int("sinks", self.sinks, minimum=0)

    def validate(self, capacity: int) -> None:
        super().validate(capacity)
        if capacity <= self.sinks:
            raise InvalidArgument(f"the sink policy needs capacity > sinks, got capacity {capacity} "
                                  f"and sinks {self.sinks}", "capacity")


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


def side_by_side(policies, fuse: bool = True) -> list[tuple[Policy, tuple[Policy, ...]]]:
    """The runs that serve several bounded policies of one capacity: one run of all of them
    side by side as batch rows (`PerRow`) with `fuse` and more than one, else one run each.
    Each run: (the policy it runs, its member policies; member i's rows: `rows_of(i, B)`,
    its inputs: `spread(tokens)`). The one helper of every fused loop (perplexity sweeps,
    long-context tasks, recordings)."""
    pols = tuple(policies)
    if fuse and len(pols) > 1:
        return [(PerRow(policies=pols), pols)]
    return [(p, (p,)) for p in pols]


def heads_agree(policy: Policy) -> bool:
    """Whether every KV head of a layer keeps the same slots: true of the layer-wise
    policies (one choice per layer, so one position per slot across the heads), and of a
    `PerRow` of them. What depends only on the kept positions (the reindex ranks) is then
    computed once per layer instead of once per head."""
    if isinstance(policy, PerRow):
        return all(heads_agree(p) for p in policy.policies)
    return not policy.head_wise


POLICY_NAMES = ("full", "window", "sink", "tova", "tova-head", "h2o", "h2o-head")


def make_policy(name: str | Policy, sinks: int = 4) -> Policy:
    """A policy from its name (case-insensitive; see POLICY_NAMES); a Policy is returned
    as it is."""
    if isinstance(name, Policy):
        return name
    key = str(name).strip().lower()
    if key == "full":
        return Full()
    if key == "window":
        return Window()
    if key == "sink":
        return Sink(sinks=sinks)
    if key in ("tova", "tova-head"):
        return Tova(head_wise=key.endswith("-head"))
    if key in ("h2o", "h2o-head"):
        return H2O(head_wise=key.endswith("-head"))
    raise InvalidArgument(f"unknown policy {name!r} (choose from {', '.join(POLICY_NAMES)})")


def make_policies(names, sinks: int = 4) -> list[Policy]:
    """A list of policies from names, or from one comma-separated string ("tova,h2o");
    at least one. The one parser of policy lists (command line, server, evaluation)."""
    if isinstance(names, (str, Policy)):
        names = [names] if isinstance(names, Policy) else [n for n in names.split(",") if n.strip()]
    pols = [make_policy(n, sinks) for n in names]
    if not pols:
        raise InvalidArgument("need at least one policy", "policy")
    return pols


def capacity_for(policy: Policy, capacity: int | None, needed: int, bucket: int = 1) -> int:
    """The state size a run needs, checked once here for every caller. `full` keeps every
    token: `needed` slots, rounded up to a multiple of `bucket` (so calls of similar
    lengths share a compile), whatever `capacity` says; every other policy needs its
    capacity, validated."""
    if not policy.bounded:
        return -(-max(needed, 1) // bucket) * bucket
    if capacity is None:
        raise InvalidArgument(f"policy {policy_name(policy)} needs capacity C (the number of slots)",
                              "capacity")
    policy.validate(capacity)
    return int(capacity)


def policy_name(policy: Policy) -> str:
    """The policy's name as `make_policy` takes it (tova-head, h2o-head, ...)."""
    return policy.name + ("-head" if policy.head_wise and policy.name in ("tova", "h2o") else "")


# --------------------------------------------------------------------------------------
def _all_keys(policy: Policy, pos, attn, score, capacity):
    # Empty candidates (pos < 0) sort first, then the policy's keys, then position.
    return ((pos >= 0).astype(jnp.int32),) + tuple(policy.eviction_keys(pos, attn, score, capacity)) + (pos,)


def lex_argmin(keys) -> jax.Array:
    """Index of the lexicographically smallest entry along the last axis (first on ties).

    One variadic reduction over (keys..., index): a step's choice is one kernel per layer
    on a GPU, where a min, a mask and a min again per key were a chain of dependent
    reductions (four small kernels for TOVA's three keys; docs/performance.md). The
    index is the last key, so the order is total and the result does not depend on the
    order in which the reduction meets the entries."""
    shape = jnp.broadcast_shapes(*(k.shape for k in keys))
    keys = tuple(jnp.broadcast_to(k, shape) for k in keys)
    idx = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)

    def smaller(a, b):  # whichever of the two candidates (keys..., index) comes first
        lt, eq = False, True
        for x, y in zip(a, b):
            lt = lt | (eq & (x < y))
            eq = eq & (x == y)
        return tuple(jnp.where(lt, x, y) for x, y in zip(a, b))

    inits = tuple(np.array(np.inf if jnp.issubdtype(k.dtype, jnp.floating) else np.iinfo(k.dtype).max,
                           k.dtype) for k in keys + (idx,))
    return jax.lax.reduce(keys + (idx,), inits, smaller, (len(shape) - 1,))[-1]


def step_choice(policy: Policy, w, cand_pos, prev_score):
    """The policy's decision for one layer of one step.

    w: float32 [B, Hkv, C+1], the attention over the kept slots and the new token (last),
    averaged over the query heads of each KV head (a_h); cand_pos: int32 [B, Hkv, C+1];
    prev_score: float32 [B, Hkv, C]. Returns (slot [B, Hkv] in [0, C], C meaning "drop
    the new token"; the candidates' updated scores [B, Hkv, C+1], which H2O keeps)."""
    B, Hkv, n = w.shape
    if isinstance(policy, PerRow):
        choices = [step_choice(p, w, cand_pos, prev_score) for p in policy.policies]
        which = jnp.arange(B) % len(policy.policies)
        slot = jnp.stack([c[0] for c in choices])[which, jnp.arange(B)]
        score = jnp.stack([c[1] for c in choices])[which, jnp.arange(B)]
        return slot, score
    # layer-wise: a, the average over every query head of the layer (KV heads serve
    # equally many query heads, so it is the mean of the a_h)
    attn = w if policy.head_wise else jnp.broadcast_to(w.mean(1, keepdims=True), w.shape)
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
