"""7B-size shapes traced with jax.eval_shape: nothing is allocated, nothing changes shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from msrnn_jax.config import ModelConfig
from msrnn_jax.core.step import step
from msrnn_jax.params import param_shapes
from msrnn_jax.core.policies import make_policy
from msrnn_jax.core.state import State

LLAMA2_7B = ModelConfig(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                        max_position_embeddings=4096)
MISTRAL_7B = ModelConfig(family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, sliding_window=4096,
                         max_position_embeddings=32768)


def abstract_params(cfg, dtype=jnp.bfloat16):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("cfg", [LLAMA2_7B, MISTRAL_7B], ids=["llama2-7b", "mistral-7b"])
@pytest.mark.parametrize("policy", ["full", "tova", "h2o-head"])
def test_7b_state_and_step_shapes(cfg, policy):
    B, C = 8, 512
    params = abstract_params(cfg)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert 6.5e9 < n_params < 7.5e9  # really a 7B model
    state = jax.eval_shape(lambda: State.init(cfg, B, C, jnp.bfloat16))
    assert state.keys.shape == (32, B, cfg.num_kv_heads, C, 128)
    tokens = jax.ShapeDtypeStruct((B,), jnp.int32)
    logits, new_state = jax.eval_shape(
        lambda p, s, t: step(p, cfg, make_policy(policy), s, t), params, state, tokens)
    assert logits.shape == (B, cfg.vocab_size) and logits.dtype == jnp.float32
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), state)
