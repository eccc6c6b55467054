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
from ..errors import check_choice

# --state-dtype: how keys and values are stored (docs/design.md §13). The 8-bit kinds keep
# one float32 scale per slot: a slot's D numbers are stored as q = x / s with
# s = max|x| / QMAX (int8: rounded to the nearest integer; fp8: float8_e4m3fn's rounding).
STATE_DTYPES = ("float32", "bfloat16", "int8", "fp8")
QUANTIZED = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}


def check_state_dtype(name) -> str:
    return check_choice("state dtype", name, STATE_DTYPES, "state_dtype")


def quantize(x, kind: str):
    """x [..., D] -> (q [..., D] in the kind's 8-bit type, scale [..., ] float32)."""
    qtype, qmax = QUANTIZED[kind]
    x = x.astype(jnp.float32)
    scale = jnp.abs(x).max(-1) / qmax
    y = x / jnp.where(scale > 0, scale, 1.0)[..., None]
    q = jnp.clip(jnp.round(y), -qmax, qmax).astype(qtype) if kind == "int8" else y.astype(qtype)
    return q, scale


@struct.dataclass
class Quantized:
    """Slots stored in 8 bits: x = data * scale, one scale per slot (per [..., C] entry).

    Indexing (`K[l]`, `K[:, rows]`) takes leading axes of both arrays, so loops over
    layers and rows handle it as they handle an array; `dequantize` is what attention
    reads, `set` what a write stores."""

    data: jax.Array   # [..., C, D] int8 or float8_e4m3fn
    scale: jax.Array  # [..., C] float32

    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def kind(self) -> str:
        return "int8" if self.data.dtype == jnp.int8 else "fp8"

    def __getitem__(self, idx):
        return Quantized(self.data[idx], self.scale[idx])

    @classmethod
    def zeros(cls, shape, kind: str) -> "Quantized":
        return cls(jnp.zeros(shape, QUANTIZED[kind][0]), jnp.zeros(shape[:-1], jnp.float32))

    @classmethod
    def of(cls, x, kind: str) -> "Quantized":
        return cls(*quantize(x, kind))

    def dequantize(self, dtype=jnp.float32):
        return (self.data.astype(jnp.float32) * self.scale[..., None]).astype(dtype)

    def set(self, at, x) -> "Quantized":
        """Store x [..., D] at the slots `at` (an index tuple; out of range: no write)."""
        q, s = quantize(x, self.kind)
        return Quantized(self.data.at[at].set(q, mode="drop"), self.scale.at[at].set(s, mode="drop"))

    def concat(self, new: "Quantized") -> "Quantized":
        """These slots [..., C, D] followed by `new` ones [..., S, D]: C + S slots."""
        return Quantized(jnp.concatenate([self.data, new.data], -2), jnp.concatenate([self.scale, new.scale], -1))

    def take(self, idx, axis: int) -> "Quantized":
        """`take_along_axis` on a slot axis: idx [..., K] picks slots of both arrays."""
        return Quantized(jnp.take_along_axis(self.data, idx[..., None], axis),
                         jnp.take_along_axis(self.scale, idx, axis))


def read(x, dtype=jnp.float32):
    """Slots as attention reads them: a plain array as it is, 8-bit ones dequantized."""
    return x.dequantize(dtype) if isinstance(x, Quantized) else x


def as_storage(x, dtype):
    """Slots x [..., D] stored as `dtype`: a float dtype, or "int8" / "fp8"."""
    if isinstance(dtype, str) and dtype in QUANTIZED:
        return Quantized.of(x, dtype)
    return x.astype(dtype)


@struct.dataclass
class State:
    """The multi-state (a pytree: `jax.tree.map` and `jit` see its five arrays)."""

    keys: jax.Array    # [L, B, Hkv, C, D]  RoPE applied at each token's original position
    values: jax.Array  # [L, B, Hkv, C, D]  (either may be `Quantized`: 8 bits + a scale per slot)
    pos: jax.Array     # [L, B, Hkv, C] int32, original absolute position; -1 = empty
    score: jax.Array   # [L, B, Hkv, C] float32, policy bookkeeping (H2O's accumulated attention)
    length: jax.Array  # [B] int32, tokens consumed so far by each row

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> "State":
        """An empty state: every slot free, every row at position 0. dtype: how keys and
        values are stored, a float dtype or "int8" / "fp8" (8 bits and a scale per slot)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        check_single(cfg, None)  # a model with layer groups gets `Groups.init`
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        def empty():
            if isinstance(dtype, str) and dtype in QUANTIZED:
                return Quantized.zeros(shape, dtype)
            return jnp.zeros(shape, dtype)

        return cls(
            keys=empty(),
            values=empty(),
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

    @property
    def dtype(self) -> str:
        """How keys and values are stored: "float32", "bfloat16", "int8" or "fp8"."""
        return self.keys.kind if isinstance(self.keys, Quantized) else jnp.dtype(self.keys.dtype).name

    def take_rows(self, rows) -> "State":
        """A copy of some batch rows (fork a state, or pick one row of a batch)."""
        rows = jnp.asarray(rows)
        return State(self.keys[:, rows], self.values[:, rows], self.pos[:, rows],
                     self.score[:, rows], self.length[rows])


@struct.dataclass
class Groups:
    """The state of a model whose layers differ in how far they attend (docs/design.md §12):
    one fixed-shape `State` per layer group (`ModelConfig.layer_groups`), each over its own
    layers with its own capacity (and policy: `Groups.policies`). All groups
    hold the same rows and lengths. A model of one group uses a plain `State`."""

    states: tuple  # of State, in the order of cfg.layer_groups
    windows: tuple = struct.field(pytree_node=False, default=())  # each group's window, or None (global)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> "Groups":
        """Empty groups: a window group keeps its window W - 1 earlier tokens (a token sees
        itself and the W - 1 before it, as transformers' sliding layers), the global group
        `capacity` slots."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        return cls(tuple(State.init(group_view(cfg, layers), batch, window_slots(window) if window else capacity, dtype)
                         for layers, window in cfg.layer_groups), tuple(w for _, w in cfg.layer_groups))

    @property
    def length(self):
        return self.states[0].length

    @property
    def batch(self) -> int:
        return self.states[0].batch

    @property
    def capacity(self) -> tuple[int, ...]:
        return tuple(s.capacity for s in self.states)

    @property
    def pos(self) -> tuple:
        return tuple(s.pos for s in self.states)

    @property
    def dtype(self) -> str:
        return self.states[0].dtype

    def kept(self) -> tuple:
        return tuple(s.kept() for s in self.states)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states)

    def copy(self) -> "Groups":
        return jax.tree.map(jnp.copy, self)

    def take_rows(self, rows) -> "Groups":
        return Groups(tuple(s.take_rows(rows) for s in self.states), self.windows)

    def map(self, fn, *others: "Groups") -> "Groups":
        """Groups of fn(this group's State, the others' same group's), group by group (the
        same windows): e.g. one row write applied to every group."""
        if any(o.windows != self.windows for o in others):
            raise ValueError(f"layer groups differ: windows {self.windows} and {[o.windows for o in others]}")
        return Groups(tuple(fn(*ss) for ss in zip(self.states, *(o.states for o in others))), self.windows)

    def policies(self, policy) -> tuple:
        """Each group's policy: `window` for a sliding group (its capacity is its window,
        so it forgets only what the model cannot see), `policy` for the global one."""
        from .policies import Window

        return tuple(Window() if w else policy for w in self.windows)

    @property
    def bounded_group(self) -> int | None:
        """The group that the user's policy and capacity bound (the global layers)."""
        return next((g for g, w in enumerate(self.windows) if not w), None)


def check_single(cfg: ModelConfig, state) -> None:
    """A model with layer groups runs on `Groups` only: one `State` would give every layer
    one window and one RoPE (state: the state, or what was given in its place)."""
    if cfg.grouped and not isinstance(state, Groups):
        from ..errors import InvalidArgument

        raise InvalidArgument(f"a {cfg.family} model's layers differ (sliding and global): its state is "
                              "`Groups` (`init_state`, `Model.empty_state`), not one State", "state")


def window_slots(window: int) -> int:
    """The slots of a sliding layer of window W: the W - 1 tokens before the current one."""
    return max(int(window) - 1, 1)


def group_view(cfg: ModelConfig, layers) -> ModelConfig:
    """`cfg` with only `layers`' count: the shapes of a group's `State`."""
    return dataclasses.replace(cfg, num_layers=len(layers), sliding_layers=())


def init_state(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32):
    """An empty state for `cfg`: a `State`, or `Groups` when its layers differ (§12)."""
    return Groups.init(cfg, batch, capacity, dtype) if cfg.grouped else State.init(cfg, batch, capacity, dtype)

