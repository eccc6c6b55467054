"""Test helpers around the executable specification `msrnn_jax.core.reference` (the slow,
independent reference of every policy and prefill mode): tiny configs and params, random
tokens, and canonical forms of kept positions."""

from __future__ import annotations

import numpy as np

from msrnn_jax.core.reference import (  # noqa: F401  (the tests import them from here)
    F32, HEADWISE, POLICIES, Entry, ReferenceMSRNN, log_softmax, numpy_params, reference_chunked,
    reference_forward, reference_nll, reference_oneshot, reference_run)

# -- tiny models and drivers of the implementation, shared by the tests ----------------------
# (Kept here rather than in conftest so that test modules can import them as functions.)

def tiny_config(kind: str = "gqa"):
    """Tiny configs: `gqa` (llama, 4 query / 2 KV heads, untied head), `mha` (qwen2: q/k/v
    biases, tied embeddings, 4/4 heads), `mistral` (sliding window 6, 4 query heads sharing
    one KV head), `mistral-w4` (sliding window 4, 4/2 heads)."""
    from msrnn_jax.config import ModelConfig

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, head_dim=8)
    if kind == "gqa":
        return ModelConfig(family="llama", num_heads=4, num_kv_heads=2, **common)
    if kind == "mha":
        return ModelConfig(family="qwen2", num_heads=4, num_kv_heads=4, tie_word_embeddings=True,
                           qkv_bias=True, rope_theta=1000.0, **common)
    if kind == "mistral":
        return ModelConfig(family="mistral", num_heads=4, num_kv_heads=1, sliding_window=6, **common)
    if kind == "mistral-w4":  # window 4: uniform attention weights are exactly 1/4 (ties)
        return ModelConfig(family="mistral", num_heads=4, num_kv_heads=2, sliding_window=4, **common)
    raise ValueError(kind)


_PARAMS: dict = {}


def tiny_params(cfg, seed: int = 0, scale: float = 0.2):
    """Random params (cached). scale 0.2 gives clearly non-uniform attention."""
    key = (cfg, seed, scale)
    if key not in _PARAMS:
        import jax

        from msrnn_jax.params import init_params

        _PARAMS[key] = init_params(cfg, jax.random.key(seed), scale=scale)
    return _PARAMS[key]


def uniform_params(cfg, seed: int = 0):
    """Zero query weights: every attention score is 0, so attention is exactly uniform
    over the visible candidates (every TOVA comparison is a tie)."""
    import jax.numpy as jnp

    params = tiny_params(cfg, seed)
    return {**params, "layers": {**params["layers"], "wq": jnp.zeros_like(params["layers"]["wq"])}}


def random_tokens(cfg, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)


def policy_obj(name: str, sinks: int = 4):
    """The implementation's policy; the sink count only matters for `sink` (keep other
    policies on the default so that jit caches are shared)."""
    from msrnn_jax.core.policies import make_policy

    return make_policy(name, sinks=sinks if name == "sink" else 4)


def sorted_pos(pos) -> np.ndarray:
    """Canonical form of kept positions: sorted along the slot axis (-1 padding first)."""
    return np.sort(np.asarray(pos), axis=-1)


def slot_scores_by_pos(pos, score) -> np.ndarray:
    """score reordered like `sorted_pos(pos)`, with empty slots zeroed."""
    pos, score = np.asarray(pos), np.asarray(score)
    order = np.argsort(pos, axis=-1, kind="stable")
    s = np.take_along_axis(score, order, -1)
    return np.where(np.take_along_axis(pos, order, -1) >= 0, s, 0.0).astype(F32)
