"""The layer math of a llama-like decoder: norms, RoPE, the projections, the MLP, the
logits (docs/design.md §3, steps 1 and 5). Pure functions of a layer's params `lp` (a
dict of arrays, either layout of `fast.layouts`) and its inputs; shapes as in `state.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..fast.sharding import whole

F32 = jnp.float32


def rms_norm(x, w, eps, plus_one: bool = False):
    """RMS norm of x [..., E] scaled by w, or (plus_one: Gemma's) by 1 + w in float32
    before the cast back, as transformers' Gemma3RMSNorm."""
    x32 = x.astype(F32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
    if plus_one:
        return (x32 * (1.0 + w.astype(F32))).astype(x.dtype)
    return w * x32.astype(x.dtype)


def norm(cfg: ModelConfig, x, w):
    """The family's RMS norm of x with weight w (gemma3: scaled by 1 + w)."""
    return rms_norm(x, w, cfg.rms_norm_eps, cfg.gemma)


def embed(cfg: ModelConfig, params, tokens):
    """The token embeddings [..., E] (gemma3: times sqrt(E), rounded to their dtype first,
    as transformers' Gemma3TextScaledWordEmbedding)."""
    x = params["embed"][tokens]
    if cfg.gemma:
        x = x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype)
    return x


def rope(x, positions, inv_freq):
    """Rotate-half RoPE. x: [..., H, D]; positions: int [...] broadcast over H."""
    freqs = positions.astype(F32)[..., None] * inv_freq  # [..., D/2]
    emb = jnp.concatenate([freqs, freqs], -1)[..., None, :]  # [..., 1, D]
    return rotate(x, jnp.cos(emb), jnp.sin(emb))


def rotate(x, cos, sin):
    """x [..., D] rotated by the angles whose cos, sin [..., R] (f32) broadcast to x: the
    first R dims rotate-half, the rest pass through (partial rotary, R < D)."""
    R = cos.shape[-1]
    if R < x.shape[-1]:
        return jnp.concatenate([rotate(x[..., :R], cos, sin), x[..., R:]], -1)
    x1, x2 = jnp.split(x, 2, -1)
    return x * cos.astype(x.dtype) + jnp.concatenate([-x2, x1], -1) * sin.astype(x.dtype)


def angles(cfg: ModelConfig, positions):
    """cos, sin [..., R] f32 of the model's RoPE at int positions [...] (R = `cfg.rotary`):
    `rope` with the config's switches. LongRoPE (phi3) rotates a position p >= its original
    context with the long factors (transformers' step-by-step rule); LongRoPE and YaRN
    scale cos and sin by their attention factor."""
    inv = jnp.asarray(cfg.inv_freq())
    if cfg.long_rope is not None:
        switch, _ = cfg.long_rope
        inv = jnp.where((positions >= switch)[..., None], jnp.asarray(cfg.inv_freq(long=True)), inv)
    freqs = positions.astype(F32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], -1)
    if cfg.rope_attention_factor != 1.0:
        return jnp.cos(emb) * F32(cfg.rope_attention_factor), jnp.sin(emb) * F32(cfg.rope_attention_factor)
    return jnp.cos(emb), jnp.sin(emb)


def rope_at(cfg: ModelConfig, x, positions):
    """x [..., H, D] rotated by the model's RoPE (`angles`) at int positions [...]."""
    cos, sin = angles(cfg, positions)
    return rotate(x, cos[..., None, :], sin[..., None, :])


def model_rope_table(cfg: ModelConfig, n: int):
    """`rope_table` of the model's RoPE (`angles`): cos, sin [n, R] of positions 0..n-1."""
    return angles(cfg, jnp.arange(n, dtype=jnp.int32))


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
    q, k = q.reshape(*q.shape[:-1], cfg.num_heads, D), k.reshape(*k.shape[:-1], cfg.num_kv_heads, D)
    if cfg.qk_norm:  # qwen3, gemma3: each head's q and k RMS-normed before RoPE
        q, k = norm(cfg, q, lp["q_norm"]), norm(cfg, k, lp["k_norm"])
    if cfg.query_pre_attn_scalar is not None and cfg.query_pre_attn_scalar != D:
        # scores scaled 1/sqrt(query_pre_attn_scalar) instead of 1/sqrt(D): the query carries
        # the ratio (RoPE is linear), so every attention path keeps its 1/sqrt(D)
        q = q * jnp.asarray((D / cfg.query_pre_attn_scalar) ** 0.5, q.dtype)
    return q, k, v.reshape(*v.shape[:-1], cfg.num_kv_heads, D)


def qkv(cfg: ModelConfig, lp, h, positions):
    """Project and rotate. h: [..., E] -> q [..., Hq, D], k, v [..., Hkv, D]."""
    q, k, v = project(cfg, lp, h)
    return rope_at(cfg, q, positions), rope_at(cfg, k, positions), v


def mlp(cfg: ModelConfig, lp, h):
    """The SwiGLU MLP of h [..., E], or the routed experts' (`moe`)."""
    if cfg.moe:
        return moe(cfg, lp, h)
    if "w_gateup" in lp:  # `fuse_projections`
        gate, up = jnp.split(h @ lp["w_gateup"], 2, -1)
    else:
        gate, up = h @ lp["w_gate"], h @ lp["w_up"]
    act = jax.nn.gelu(gate, approximate=True) if cfg.gemma else jax.nn.silu(gate)  # gemma3: GELU-tanh
    return whole(act * up) @ lp["w_down"]


def route(cfg: ModelConfig, lp, h):
    """The router: h [M, E] -> (the chosen experts int [M, k], their weights [M, k] f32):
    softmax over every expert, the top k, renormalised over them if `norm_topk_prob`. The
    logits in h's dtype and the softmax in f32, as transformers routes (a bf16 model's
    choices between nearly equal experts then agree with its)."""
    probs = jax.nn.softmax((h @ lp["router"]).astype(F32), -1)
    weight, expert = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        weight = weight / weight.sum(-1, keepdims=True)
    return expert, weight


def moe(cfg: ModelConfig, lp, h):
    """The routed MLP (qwen3_moe, mixtral) of h [..., E]: each token through its k chosen
    experts' SwiGLU, summed with the router's weights. Fixed shapes either way:

    - few tokens (M k < number of experts: a decode step): the chosen experts' weights are
      gathered, [M, k, E, F], so only they are read;
    - many tokens (a prompt): the M k (token, expert) pairs sorted by expert and multiplied
      by each expert's weights once (`jax.lax.ragged_dot`, groups of varying size)."""
    lead, E = h.shape[:-1], h.shape[-1]
    x = h.reshape(-1, E)
    M, k = x.shape[0], cfg.experts_per_token
    expert, weight = route(cfg, lp, x)  # [M, k]
    if M * k < cfg.num_experts:
        gate = jnp.einsum("me,mkef->mkf", x, lp["experts_gate"][expert])
        up = jnp.einsum("me,mkef->mkf", x, lp["experts_up"][expert])
        out = jnp.einsum("mkf,mkfe->mke", whole(jax.nn.silu(gate) * up), lp["experts_down"][expert])
    else:
        flat = expert.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
        xs = x[order // k]
        gate = jax.lax.ragged_dot(xs, lp["experts_gate"], sizes)
        up = jax.lax.ragged_dot(xs, lp["experts_up"], sizes)
        down = jax.lax.ragged_dot(whole(jax.nn.silu(gate) * up), lp["experts_down"], sizes)
        out = jnp.zeros_like(down).at[order].set(down).reshape(M, k, E)
    out = jnp.einsum("mke,mk->me", out, weight.astype(out.dtype))
    return out.reshape(*lead, E)


def finish_layer(cfg: ModelConfig, lp, x, out):
    """The rest of a layer once attention has run: x + out @ wo, then x + MLP(norm(x)).
    x [..., E]; out [..., Hq*D]. `whole` keeps every sum on one device under a mesh
    (`sharding`): the same numbers as one device."""
    if cfg.gemma:  # sandwich norms: around the attention's output and around the MLP
        x = whole(x + norm(cfg, whole(out.astype(x.dtype)) @ lp["wo"], lp["post_attn_norm"]))
        return whole(x + norm(cfg, mlp(cfg, lp, norm(cfg, x, lp["mlp_norm"])), lp["post_mlp_norm"]))
    x = whole(x + whole(out.astype(x.dtype)) @ lp["wo"])
    return whole(x + mlp(cfg, lp, rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)))


def logits_from_hidden(cfg: ModelConfig, params, x):
    x = norm(cfg, x, params["final_norm"])
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = jnp.matmul(x, head, preferred_element_type=F32)
    if cfg.final_logit_softcapping is not None:  # gemma: cap tanh(logits / cap)
        cap = F32(cfg.final_logit_softcapping)
        logits = jnp.tanh(logits / cap) * cap
    return logits


def token_nll(logits, targets):
    """Next-token loss: logits [..., V], targets int [...] -> NLL [...] float32."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]


def visible(cfg: ModelConfig, key_pos, query_pos):
    """Keys a query may see: real (pos >= 0), not in its future, inside Mistral's window."""
    ok = (key_pos >= 0) & (key_pos <= query_pos)
    if cfg.sliding_window is not None:
        ok &= key_pos > query_pos - cfg.sliding_window
    return ok
