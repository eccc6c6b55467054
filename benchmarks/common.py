"""Shared pieces of the benchmarks: byte and FLOP counts of a decode step, the device's
copy bandwidth and matmul rate, device facts, JSON output.

The model shapes, random device parameters and fabricated states are
`msrnn_jax.testing`'s (one definition for the tests and the benchmarks): the benchmarks
run random bf16 weights in the real shapes (speed does not depend on the values), made on
the device itself.
"""

from __future__ import annotations

import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from msrnn_jax.config import ModelConfig
from msrnn_jax.params import param_shapes

GiB = 1024 ** 3


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


def _slot_kv_bytes(cfg: ModelConfig, state_dtype) -> int:
    """A slot's key and value bytes: D numbers each, plus a float32 scale each when 8-bit."""
    if str(state_dtype) in ("int8", "fp8"):
        return 2 * (cfg.head_dim + 4)
    return 2 * cfg.head_dim * jnp.dtype(state_dtype).itemsize


def layer_slots(cfg: ModelConfig, capacity: int) -> int:
    """The slots of one row and KV head summed over the layers: L x C, or with layer groups
    (gemma3) each group's layers at its capacity (a sliding group's: its window's)."""
    from msrnn_jax.core.state import window_slots

    return sum(len(layers) * (window_slots(w) if w else capacity) for layers, w in cfg.layer_groups)


def state_row_bytes(cfg: ModelConfig, capacity: int, state_dtype=jnp.bfloat16) -> int:
    """Bytes of one batch row of the state (keys, values, pos, score; one length per group)."""
    slots = layer_slots(cfg, capacity) * cfg.num_kv_heads
    return slots * (_slot_kv_bytes(cfg, state_dtype) + 4 + 4) + 4 * len(cfg.layer_groups)


def state_read_bytes_per_step(cfg: ModelConfig, batch: int, capacity: int, state_dtype=jnp.bfloat16,
                              uses_score: bool = False) -> int:
    """State bytes one step reads: every slot's key, value (and 8-bit scales) and position
    (the step attends over the whole fixed-size buffer; empty slots are masked, not
    skipped), plus the score for H2O. The one-slot write per (layer, row, KV head) is
    negligible and not counted."""
    slots = layer_slots(cfg, capacity) * batch * cfg.num_kv_heads
    return slots * (_slot_kv_bytes(cfg, state_dtype) + 4 + (4 if uses_score else 0))


def step_flops(cfg: ModelConfig, batch: int, capacity: int) -> int:
    """Matmul FLOPs of one decode step (2 per multiply-add): projections, MLP, LM head,
    attention over capacity + 1 candidates."""
    E, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = E * (q + 2 * kv) + q * E + 3 * E * F
    attention = 2 * cfg.num_heads * cfg.head_dim * (layer_slots(cfg, capacity) + L)  # C + 1 candidates a layer
    return 2 * batch * (L * per_layer + attention + E * V)


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
