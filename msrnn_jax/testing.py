"""Helpers shared by the tests and the benchmarks: random parameters
and fabricated states made on the device, a compiled n-step greedy decode loop, and the
inspection of its optimised HLO for copies of the state.

Nothing here touches a checkpoint: random weights in the real shapes (speed does not
depend on the values), made on the device itself.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .core.state import QUANTIZED, Groups, State, as_storage, group_view, init_state, window_slots
from .fast.attention import DEFAULT_IMPL, StepImpl
from .params import param_shapes
from .run.decoding import decode_rows


# -- inputs made on the device ---------------------------------------------------------
def _hash_fill(shape, seed, dtype, scale):
    """Pseudo-random values in [-scale, scale) from an integer hash of the element index:
    one fused kernel, no float32 or random-bits intermediate the size of the output."""
    h = jnp.uint32((seed * 0x9E3779B9 + 0x7F4A7C15) & 0xFFFFFFFF)
    mult = (0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1, 0x9E3779B1, 0x61C88647)
    for i in range(len(shape)):
        idx = jax.lax.broadcasted_iota(jnp.uint32, shape, i)
        h = (h ^ idx) * jnp.uint32(mult[i % len(mult)])
        h = h ^ (h >> 15)
    h = (h ^ (h >> 13)) * jnp.uint32(0x846CA68B)
    h = h ^ (h >> 16)
    u = (h >> 8).astype(jnp.float32) * (2.0 ** -24)  # [0, 1)
    return ((2.0 * u - 1.0) * scale).astype(dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "seed"))
def device_params(cfg: ModelConfig, dtype=jnp.bfloat16, seed: int = 0) -> dict:
    """Random parameters in the model's shapes, made on the device (norms = 1, matrices
    uniform with std ~0.02)."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    out = []
    for i, (shape, path) in enumerate(zip(leaves, paths)):
        if "norm" in path:  # a scale of 1 (gemma3's norms scale by 1 + w)
            out.append((jnp.zeros if cfg.gemma else jnp.ones)(shape, dtype))
        else:
            out.append(_hash_fill(shape, seed * 1000 + i, dtype, 0.0346))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("cfg", "batch", "capacity", "dtype"))
def fabricate_state(cfg: ModelConfig, batch: int, capacity: int, position, dtype=jnp.bfloat16) -> State:
    """A state as it would be after `position` tokens, without running them.

    Keys/values are pseudo-random (never zeros). If position >= capacity every slot holds
    a distinct earlier position, permuted across slots per (layer, row) — the same in
    every KV head, as layer-wise policies keep it; otherwise slots [0, position) hold
    positions 0..position-1 and the rest are empty. `length` = position for every row.
    Step cost does not depend on these contents: the step reads every slot of the
    fixed-size buffer and masks empty ones. A model with layer groups gets `Groups`, each
    group fabricated alike at its own capacity (a sliding group: its window's).
    """
    if cfg.grouped:
        return Groups(tuple(fabricate_state(group_view(cfg, layers), batch, window_slots(w) if w else capacity,
                                            position, dtype) for layers, w in cfg.layer_groups),
                      tuple(w for _, w in cfg.layer_groups))
    L, Hkv, D, C, B = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, capacity, batch
    shape = (L, B, Hkv, C, D)
    fill = jnp.bfloat16 if dtype in QUANTIZED else dtype  # an 8-bit state stores these quantized
    keys = as_storage(_hash_fill(shape, 11, fill, 2.0), dtype)
    values = as_storage(_hash_fill(shape, 12, fill, 2.0), dtype)
    position = jnp.asarray(position, jnp.int32)
    c = jax.lax.broadcasted_iota(jnp.int32, (L, B, Hkv, C), 3)
    l = jax.lax.broadcasted_iota(jnp.int32, (L, B, Hkv, C), 0)
    b = jax.lax.broadcasted_iota(jnp.int32, (L, B, Hkv, C), 1)
    # (c * odd + offset) mod C is a permutation of 0..C-1 when C is a power of two;
    # for other C fall back to the identity
    if C & (C - 1) == 0:
        perm = (c * 37 + l * 7 + b * 13) % C
    else:
        perm = c
    pos = jnp.where(position >= C, position - C + perm, jnp.where(c < position, c, -1))
    return State(keys, values, pos.astype(jnp.int32), jnp.zeros((L, B, Hkv, C), jnp.float32),
                 jnp.full((B,), position, jnp.int32))


@functools.partial(jax.jit, donate_argnums=(0,))
def move_state(state: State, position) -> State:
    """Shift a full state's positions so that it sits at `position` (same kept set)."""
    if isinstance(state, Groups):
        return Groups(tuple(move_state.__wrapped__(s, position) for s in state.states), state.windows)
    shift = jnp.asarray(position, jnp.int32) - state.length[0]
    return state.replace(pos=jnp.where(state.pos >= 0, state.pos + shift, -1),
                          length=state.length + shift)


def decode_inputs(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16):
    """Abstract (state, first token) arguments of `greedy_decode`, for lowering it."""
    st = jax.eval_shape(lambda: init_state(cfg, batch, capacity, dtype))
    return st, jax.ShapeDtypeStruct((batch,), jnp.int32)


# -- the decode loop -------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "policy", "n_steps", "impl", "positions"),
                   donate_argnames=("state",))
def greedy_decode(params, cfg, policy, n_steps, state, tok, impl=DEFAULT_IMPL,
                  positions="absolute"):
    """n greedy steps of the decode loop (`run.decoding.decode_rows`) in one compiled
    call, the state donated, every row running to its budget (no EOS): what the decode
    benchmarks time. tok [B]: the token fed first. Returns (tokens [B, n], state)."""
    B = tok.shape[0]
    zeros = jnp.zeros((B,), jnp.float32)
    toks, _, state, *_ = decode_rows(params, cfg, policy, n_steps, state, tok, jnp.zeros((B, 2), jnp.uint32),
                                     jnp.ones((B,), bool), jnp.zeros((B,), bool), jnp.full((B,), n_steps + 1),
                                     zeros, jnp.zeros((B,), jnp.int32), zeros + 1.0, jnp.asarray([-1]),
                                     jnp.ones((B,), bool), impl, positions)
    return toks, state


def parse_variant(variant: str):
    """'loop:attention[:nobar]', e.g. 'scan:einsum', 'unroll:reduce', 'split:pallas'
    (split = the layers passed as a list of per-layer arrays, so no weight is ever
    sliced; fused = split, with `fast.layouts.fuse_projections`; nobar = unrolled without the
    optimization barrier between layers). Returns (split, StepImpl): split is False,
    True or "fused"."""
    parts = variant.split(":")
    impl = StepImpl(layer_loop="unroll" if parts[0] in ("unroll", "split", "fused") else "scan",
                           attention=parts[1] if len(parts) > 1 else "einsum",
                           unroll_barrier="nobar" not in parts[2:])
    return ("fused" if parts[0] == "fused" else parts[0] == "split"), impl


# -- HLO inspection --------------------------------------------------------------------
_DT = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\((.*)$")


def hlo_large_buffers(text: str, min_bytes: int) -> list[dict]:
    """Instructions of the optimised HLO that materialise an array of >= min_bytes:
    copies, fusions that are whole-buffer writes, etc. (in-place updates of the carried
    state show up as fusions/scatters whose output is the state shape — they alias)."""
    out = []
    comp = ""
    nested = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", text))  # fused / reducer bodies
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            comp = line.split("(")[0].strip().split()[-1].lstrip("%")
            continue
        m = _INSTR.match(line)
        if not m or comp in nested:
            continue
        name, dt, dims, op, rest = m.groups()
        if op in ("parameter", "get-tuple-element", "bitcast", "tuple", "constant"):
            continue
        n = int(np.prod([int(d) for d in dims.split(",") if d] or [1])) * _DT.get(dt, 4)
        if n >= min_bytes:
            kind = re.search(r"kind=(\w+)", rest)
            calls = re.search(r"calls=%([\w.\-]+)", rest)
            out.append({"computation": comp[:80], "name": name, "op": op, "shape": f"{dt}[{dims}]",
                        "bytes": n, "kind": kind.group(1) if kind else None,
                        "calls": calls.group(1) if calls else None})
    return out


def state_copies(compiled, cfg: ModelConfig, capacity: int, batch: int) -> list[dict]:
    """Copies in a compiled decode's optimised HLO at least one layer's bf16 keys in size
    (there should be none: the state is updated in place, and split layers slice no
    weight)."""
    layer_bytes = batch * cfg.num_kv_heads * capacity * cfg.head_dim * 2
    try:
        text = compiled.as_text()
    except Exception:  # pragma: no cover
        return []
    return [{"name": b["name"], "shape": b["shape"], "bytes": b["bytes"]}
            for b in hlo_large_buffers(text, max(layer_bytes, 1)) if b["op"] in ("copy", "copy-start")]
