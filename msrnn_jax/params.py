"""The parameter pytree: plain nested dicts of arrays, layers stacked on a leading axis.

Shapes (E hidden, F intermediate, V vocab, L layers, Hq/Hkv heads, D head dim)::

    embed                [V, E]
    layers/attn_norm     [L, E]
    layers/wq            [L, E, Hq*D]      x @ wq  (HF's q_proj.weight transposed)
    layers/wk            [L, E, Hkv*D]
    layers/wv            [L, E, Hkv*D]
    layers/bq, bk, bv    [L, Hq*D], [L, Hkv*D], [L, Hkv*D]   (qwen2 only)
    layers/q_norm, k_norm [L, D]           (qwen3, gemma3: `qk_norm`)
    layers/post_attn_norm, post_mlp_norm [L, E]   (gemma3's sandwich norms; its norms
                                           scale by 1 + w, and mlp_norm is its pre-MLP norm)
    layers/wo            [L, Hq*D, E]
    layers/mlp_norm      [L, E]
    layers/w_gate        [L, E, F]
    layers/w_up          [L, E, F]
    layers/w_down        [L, F, E]
    layers/router        [L, E, N]         (experts instead of w_gate, w_up, w_down:
    layers/experts_gate  [L, N, E, Fe]      N experts of Fe = moe_intermediate_size)
    layers/experts_up    [L, N, E, Fe]
    layers/experts_down  [L, N, Fe, E]
    final_norm           [E]
    lm_head              [E, V]            (absent when embeddings are tied)

q/k projections use Hugging Face's (rotate-half) RoPE layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .errors import MsrnnError


def param_shapes(cfg: ModelConfig) -> dict:
    """The expected shape of every parameter, as the same nested dict as the params."""
    E, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = {
        "attn_norm": (L, E), "wq": (L, E, q), "wk": (L, E, kv), "wv": (L, E, kv),
        "wo": (L, q, E), "mlp_norm": (L, E),
    }
    if cfg.moe:
        N, Fe = cfg.num_experts, cfg.moe_intermediate_size
        layers.update(router=(L, E, N), experts_gate=(L, N, E, Fe), experts_up=(L, N, E, Fe),
                      experts_down=(L, N, Fe, E))
    else:
        layers.update(w_gate=(L, E, F), w_up=(L, E, F), w_down=(L, F, E))
    if cfg.qkv_bias:
        layers.update(bq=(L, q), bk=(L, kv), bv=(L, kv))
    if cfg.qk_norm:
        layers.update(q_norm=(L, cfg.head_dim), k_norm=(L, cfg.head_dim))
    if cfg.gemma:
        layers.update(post_attn_norm=(L, E), post_mlp_norm=(L, E))
    shapes = {"embed": (V, E), "layers": layers, "final_norm": (E,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (E, V)
    return shapes


def check_params(cfg: ModelConfig, params: dict) -> None:
    """Raise MsrnnError unless `params` has exactly the keys and shapes `cfg` implies."""
    want = param_shapes(cfg)
    want_flat = {jax.tree_util.keystr(k): v for k, v in
                 jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: isinstance(x, tuple))[0]}
    got_flat = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
                jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(set(want_flat) - set(got_flat))
    extra = sorted(set(got_flat) - set(want_flat))
    if missing or extra:
        raise MsrnnError(f"parameters do not match the config: missing {missing}, unexpected {extra}")
    for k, shape in want_flat.items():
        if got_flat[k] != tuple(shape):
            raise MsrnnError(f"parameter {k} has shape {got_flat[k]}, expected {tuple(shape)}")


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random parameters in the model's real shapes (tests, benchmarks)."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    out = []
    for k, shape, path in zip(keys, leaves, paths):
        if "norm" in path:  # a scale of 1 (gemma3's norms scale by 1 + w)
            out.append((jnp.zeros if cfg.gemma else jnp.ones)(shape, dtype))
        else:
            out.append((scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
