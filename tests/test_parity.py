"""The step-by-step MSRNN equals transformers' own PyTorch models (fp32)."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from msrnn_jax.convert.hf import load_hf_folder
from msrnn_jax.core.parallel import forward_parallel
from msrnn_jax.core.step import scan
from msrnn_jax.core.policies import make_policy
from msrnn_jax.core.state import init_state

from hf_models import FAMILIES, hf_logits, make_hf_model, save_hf_model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
    model = make_hf_model(request.param)
    folder = save_hf_model(model, tmp_path_factory.mktemp(request.param))
    cfg, params = load_hf_folder(folder)
    return request.param, model, cfg, jax_tree(params)


def jax_tree(params):
    import jax
    return jax.tree.map(jnp.asarray, params)


def test_scan_matches_transformers_ragged_batch(family_model):
    """Two rows of different lengths, right-padded: each row's logits at every one of its
    positions equal transformers' forward of that row alone, within 1e-4."""
    family, model, cfg, params = family_model
    rng = np.random.default_rng(1)
    T, short = 24, 17
    tokens = rng.integers(0, cfg.vocab_size, (2, T)).astype(np.int32)
    active = np.ones((2, T), bool)
    active[1, short:] = False
    logits, state = scan(params, cfg, make_policy("full"), init_state(cfg, 2, T),
                                jnp.asarray(tokens), jnp.asarray(active), emit="logits")
    logits = np.asarray(logits)
    ref0 = hf_logits(model, tokens[0])[0]
    ref1 = hf_logits(model, tokens[1, :short])[0]
    chex.assert_trees_all_close((logits[0], logits[1, :short]), (ref0, ref1), atol=1e-4, rtol=0)
    assert np.asarray(state.length).tolist() == [T, short]
    # padding never entered row 1's state (gemma3: nor its sliding layers', which keep W - 1)
    for pos, window in zip(state.pos if isinstance(state.pos, tuple) else (state.pos,),
                           cfg.layer_groups if cfg.grouped else [(None, None)]):
        assert (np.asarray(pos)[:, 1] < short).all()
        want = short if window[1] is None else min(short, window[1] - 1)
        assert ((np.asarray(pos)[:, 1] >= 0).sum(-1) == want).all()


def test_parallel_forward_matches_transformers(family_model):
    family, model, cfg, params = family_model
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 20)).astype(np.int32)
    logits = np.asarray(forward_parallel(params, cfg, jnp.asarray(tokens))[0])
    np.testing.assert_allclose(logits, hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_mistral_sliding_window_matters():
    """The mistral case above only tests something if the window actually masks."""
    model = make_hf_model("mistral")
    tokens = np.random.default_rng(3).integers(0, 96, (1, 20))
    wide = make_hf_model("mistral", sliding_window=None)
    assert np.abs(hf_logits(model, tokens) - hf_logits(wide, tokens)).max() > 1e-3


def test_llama3_rope_scaling_matters():
    model = make_hf_model("llama3-rope")
    plain = make_hf_model("llama3-rope", rope_scaling=None)
    tokens = np.random.default_rng(4).integers(0, 96, (1, 20))
    assert np.abs(hf_logits(model, tokens) - hf_logits(plain, tokens)).max() > 1e-3
