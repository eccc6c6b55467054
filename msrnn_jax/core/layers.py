"""The layer math of a llama-like decoder: norms, RoPE, the projections, the MLP, the
logits (docs/design.md §3, steps 1 and 5). Pure functions of a layer's params `lp` (a
dict of arrays, either layout of `fast.layouts`) and its inputs; shapes as in `state.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..fast.sharding import whole

F32 = jnp.float32


def rms_norm(x, w, eps):
    x32 = x.astype(F32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
    return w * x32.astype(x.dtype)


def rope(x, positions, inv_freq):
    """Rotate-half RoPE. x: [..., H, D]; positions: int [...] broadcast over H."""
    freqs = positions.astype(F32)[..., None] * inv_freq  # [..., D/2]
    emb = jnp.concatenate([freqs, freqs], -1)[..., None, :]  # [..., 1, D]
    return rotate(x, jnp.cos(emb), jnp.sin(emb))


def rotate(x, cos, sin):
    """x [..., D] rotated by the angles whose cos, sin [..., D] (f32) broadcast to x."""
    x1, x2 = jnp.split(x, 2, -1)
    return x * cos.astype(x.dtype) + jnp.concatenate([-x2, x1], -1) * sin.astype(x.dtype)


def rope_table(n: int, inv_freq):
    """cos, sin [n, D] of positions 0..n-1: reindexed positions never reach past n, so a
    gather from this small table replaces C x D/2 sines per layer and step."""
    freqs = jnp.arange(n, dtype=F32)[:, None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], -1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_at(x, positions, table):
    """x [..., D] rotated by positions int [...] (x's leading axes) from `table`, broadcast
    over the axes of x between them and D (e.g. the G query heads of each KV head)."""
    cos, sin = table
    idx = positions.reshape(positions.shape + (1,) * (x.ndim - 1 - positions.ndim))
    return rotate(x, cos[idx], sin[idx])


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


def visible(cfg: ModelConfig, key_pos, query_pos):
    """Keys a query may see: real (pos >= 0), not in its future, inside Mistral's window."""
    ok = (key_pos >= 0) & (key_pos <= query_pos)
    if cfg.sliding_window is not None:
        ok &= key_pos > query_pos - cfg.sliding_window
    return ok
