"""Shared pieces of the decode benchmarks: model shapes, byte counts, fabricated inputs.

Nothing here touches a checkpoint: the benchmarks run random bf16 weights in the real
shapes (speed does not depend on the values), made on the device itself.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from msrnn_jax.config import ModelConfig
from msrnn_jax.params import param_shapes
from msrnn_jax.state import State

GiB = 1024 ** 3

# Llama-2-7B (MHA) and Mistral-7B v0.2/v0.3-style (GQA, no sliding window) shapes.
MODELS = {
    "llama2-7b": dict(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=4096),
    "mistral-7b": dict(family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=1e6, max_position_embeddings=32768),
    # a few-MB model for the CPU smoke test
    "tiny": dict(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0),
}


def model_config(name: str) -> ModelConfig:
    return ModelConfig(**MODELS[name])


def now_tag() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


# -- byte counts -----------------------------------------------------------------------
def weight_bytes_per_step(cfg: ModelConfig, itemsize: int = 2, batch: int = 1) -> int:
    """Weight bytes one decode step must read: every layer matrix and norm, the final
    norm, the LM head, and one embedding row per batch row."""
    shapes = param_shapes(cfg)
    total = 0
    for path, shape in jax.tree_util.tree_flatten_with_path(
            shapes, is_leaf=lambda x: isinstance(x, tuple))[0]:
        name = jax.tree_util.keystr(path)
        if "embed" in name:
            total += batch * shape[1] * itemsize
        else:
            total += int(np.prod(shape)) * itemsize
    if cfg.tie_word_embeddings:  # the head is the embedding, read whole
        total += cfg.vocab_size * cfg.hidden_size * itemsize
    return total


def param_bytes(cfg: ModelConfig, itemsize: int = 2) -> int:
    shapes = param_shapes(cfg)
    return sum(int(np.prod(s)) * itemsize for s in
               jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))


def state_row_bytes(cfg: ModelConfig, capacity: int, itemsize: int = 2) -> int:
    """Bytes of one batch row of the state (keys, values, pos, score)."""
    slots = cfg.num_layers * cfg.num_kv_heads * capacity
    return slots * (2 * cfg.head_dim * itemsize + 4 + 4) + 4


def state_read_bytes_per_step(cfg: ModelConfig, batch: int, capacity: int, itemsize: int = 2,
                              uses_score: bool = False) -> int:
    """State bytes one step reads: every slot's key, value and position (the step attends
    over the whole fixed-size buffer; empty slots are masked, not skipped), plus the score
    for H2O. The one-slot write per (layer, row, KV head) is negligible and not counted."""
    slots = cfg.num_layers * batch * cfg.num_kv_heads * capacity
    return slots * (2 * cfg.head_dim * itemsize + 4 + (4 if uses_score else 0))


def step_flops(cfg: ModelConfig, batch: int, capacity: int) -> int:
    """Matmul FLOPs of one decode step (2 per multiply-add): projections, MLP, LM head,
    attention over capacity + 1 candidates."""
    E, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = E * (q + 2 * kv) + q * E + 3 * E * F + 2 * cfg.num_heads * (capacity + 1) * cfg.head_dim
    return 2 * batch * (L * per_layer + E * V)


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
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
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
    fixed-size buffer and masks empty ones.
    """
    L, Hkv, D, C, B = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, capacity, batch
    shape = (L, B, Hkv, C, D)
    keys = _hash_fill(shape, 11, dtype, 2.0)
    values = _hash_fill(shape, 12, dtype, 2.0)
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
    shift = jnp.asarray(position, jnp.int32) - state.length[0]
    return state._replace(pos=jnp.where(state.pos >= 0, state.pos + shift, -1),
                          length=state.length + shift)


# -- measuring -------------------------------------------------------------------------
def device_info() -> dict:
    dev = jax.devices()[0]
    info = {"platform": dev.platform, "device_kind": dev.device_kind, "jax": jax.__version__,
            "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None}
    try:
        import jaxlib
        info["jaxlib"] = jaxlib.__version__
    except Exception:  # pragma: no cover
        pass
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return info


def memory_stats() -> dict:
    try:
        s = jax.devices()[0].memory_stats() or {}
    except Exception:  # pragma: no cover (some backends have none)
        s = {}
    return {k: int(v) for k, v in s.items() if isinstance(v, (int, np.integer))}


def copy_bandwidth(nbytes: int = 4 * GiB, reps: int = 20) -> dict:
    """Device-to-device copy bandwidth: one kernel reads n bytes and writes n bytes
    (bitwise NOT of uint32, which XLA cannot elide); reported as (read + written) / time,
    the median of `reps` runs. Also a read-only pass (a sum), reported as read / time."""
    n = nbytes // 4
    x = jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(2654435761)
    f = jax.jit(lambda a: ~a)
    g = jax.jit(lambda a: jnp.sum(a, dtype=jnp.uint32))
    ts_copy, ts_read = [], []
    y = f(x).block_until_ready()
    g(x).block_until_ready()
    for _ in range(reps):
        t0 = time.perf_counter()
        y = f(x)
        y.block_until_ready()
        ts_copy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        g(y).block_until_ready()
        ts_read.append(time.perf_counter() - t0)
    del x, y
    tc, tr = float(np.median(ts_copy)), float(np.median(ts_read))
    return {"bytes": 4 * n, "copy_s": tc, "copy_bytes_per_s": 2 * 4 * n / tc,
            "read_s": tr, "read_bytes_per_s": 4 * n / tr}


def median_seconds(fn, *args, reps: int) -> float:
    """fn(*args) once to compile and warm, then the median wall time of `reps` calls, each
    waited for (block_until_ready)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def matmul_rate(n: int = 8192, reps: int = 10) -> dict:
    """bf16 matrix-product rate: one [n, n] x [n, n] product (float32 accumulation, bf16
    out), 2 n^3 FLOPs / the median time of `reps` runs. The decode step's weight products
    at the largest batches are this kind of work; the step's compute bound uses this rate."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    t = median_seconds(jax.jit(lambda x, y: x @ y), a, b, reps=reps)
    del a, b
    return {"n": n, "s": t, "flops_per_s": 2 * n ** 3 / t}


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)
