"""The multi-state: one fixed-shape pytree for the whole model (docs/design.md §2).

Shape notation used throughout the package::

    L layers, B batch rows, Hq query heads, Hkv key/value heads, G = Hq // Hkv,
    C capacity (slots), D head dim, E hidden, V vocab, T tokens, S chunk length.

Slot order carries no meaning: every mask is computed from `pos`, and `pos == -1`
marks an empty slot. The state never changes shape: a bounded policy overwrites one
slot per step, and the unbounded (`full`) MSRNN is the same thing with C = T.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from ..config import ModelConfig


@struct.dataclass
class State:
    """The multi-state (a pytree: `jax.tree.map` and `jit` see its five arrays)."""

    keys: jax.Array    # [L, B, Hkv, C, D]  RoPE applied at each token's original position
    values: jax.Array  # [L, B, Hkv, C, D]
    pos: jax.Array     # [L, B, Hkv, C] int32, original absolute position; -1 = empty
    score: jax.Array   # [L, B, Hkv, C] float32, policy bookkeeping (H2O's accumulated attention)
    length: jax.Array  # [B] int32, tokens consumed so far by each row

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> "State":
        """An empty state: every slot free, every row at position 0."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            pos=jnp.full(shape[:-1], -1, jnp.int32),
            score=jnp.zeros(shape[:-1], jnp.float32),
            length=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    def kept(self) -> jax.Array:
        """Number of occupied slots per [L, B, Hkv]."""
        return (self.pos >= 0).sum(-1)

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

    def as_dict(self) -> dict:
        """{field name: array}, e.g. to save the state."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __iter__(self):  # the five arrays in field order, as a tuple would give them
        return iter(self.as_dict().values())

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def copy(self) -> "State":
        """An independent copy (jitted calls donate their state; keep a copy to fork)."""
        return jax.tree.map(jnp.copy, self)

    def take_rows(self, rows) -> "State":
        """A copy of some batch rows (fork a state, or pick one row of a batch)."""
        rows = jnp.asarray(rows)
        return State(self.keys[:, rows], self.values[:, rows], self.pos[:, rows],
                     self.score[:, rows], self.length[rows])
