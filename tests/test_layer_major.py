"""The exact step computed layer by layer (`layer_major`) is the step computed token by
token (`scan`, emit "nll" and "last"): the same kept positions, and the same NLL,
logits, keys, values and scores up to float rounding, for every policy, side-by-side
policies, ragged rows, a continued state and both position modes."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msrnn_jax.config import preset
import msrnn_jax as m
from msrnn_jax.run import decoding
from msrnn_jax.fast.layer_major import layer_major, layer_scan
from msrnn_jax import testing
from msrnn_jax.core.state import State

CFG = preset("tiny")
B, T, C = 3, 80, 16


@pytest.fixture(scope="module")
def params():
    return m.init_params(CFG, jax.random.key(0), scale=0.2)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32)
    active = np.ones((B, T), bool)
    active[1, 50:] = False  # a shorter row, right-padded
    return tokens, targets, jnp.asarray(active)


POLICIES = [*(m.make_policy(n) for n in m.POLICY_NAMES if n != "full"),
            m.PerRow(policies=(m.make_policy("tova"), m.make_policy("h2o-head"), m.make_policy("sink")))]


@pytest.mark.parametrize("positions", ["absolute", "reindex"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: m.policy_name(p))
def test_nll_and_state_match_the_token_scan(params, inputs, policy, positions):
    tokens, targets, active = inputs
    # a state that has already read some tokens (and evicted some), so the call continues it
    warm = m.scan(params, CFG, policy, State.init(CFG, B, C), tokens[:, :20], emit="nll", targets=targets[:, :20],
                      positions=positions)[1]
    want_nll, want = m.scan(params, CFG, policy, warm.copy(), tokens, active, emit="nll", targets=targets, positions=positions)
    got_nll, got = layer_scan(params, CFG, policy, warm.copy(), tokens, active, emit="nll", targets=targets, positions=positions)
    np.testing.assert_array_equal(np.asarray(got.pos), np.asarray(want.pos))
    np.testing.assert_array_equal(np.asarray(got.length), np.asarray(want.length))
    assert np.asarray(got_nll)[1, 50:].max() == 0.0  # inactive steps have no loss
    chex.assert_trees_all_close(got_nll, want_nll, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close((got.keys, got.values, got.score), (want.keys, want.values, want.score),
                                atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["window", "tova-head", "h2o"])
def test_exact_prefill_layer_major(params, name):
    rows = [list(range(3, 60)), list(range(5, 40)), list(range(7, 77))]
    pol = m.make_policy(name)
    want_logits, want = decoding.prefill(params, CFG, pol, None, C, rows, layer_major=False)
    got_logits, got = decoding.prefill(params, CFG, pol, None, C, rows)
    np.testing.assert_array_equal(np.asarray(got.pos), np.asarray(want.pos))
    np.testing.assert_array_equal(np.asarray(got.length), [57, 35, 70])
    chex.assert_trees_all_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)


def test_rows_with_no_active_token_keep_their_logits(params):
    tokens = jnp.asarray(np.arange(2 * 8).reshape(2, 8) % CFG.vocab_size, jnp.int32)
    active = jnp.asarray([[True] * 8, [False] * 8])
    before = jnp.full((2, CFG.vocab_size), 7.0)
    st = State.init(CFG, 2, C)
    logits, out = layer_scan(params, CFG, m.make_policy("tova"), st, tokens, active, emit="last", last_logits=before)
    assert np.all(np.asarray(logits[1]) == 7.0) and not np.all(np.asarray(logits[0]) == 7.0)
    assert np.asarray(out.length).tolist() == [8, 0] and np.asarray(out.pos)[:, 1].max() == -1


@pytest.mark.parametrize("name", ["window", "tova"])
def test_layer_major_writes_the_slots_in_place(params, name):
    """The compiled layer-major step holds no copy of one layer's keys or values: its token
    loop updates each layer's slots in place. (Before its write was ordered after the
    attention's reads, XLA copied the layer's keys and values at every token, which made a
    CPU run at C=512 about 1.4x slower.) The whole state may be copied once per call, where
    the layer loop takes it apart and stacks it again."""
    cap, rows = 256, 4
    state = State.init(CFG, rows, cap)
    tokens = jnp.ones((rows, 8), jnp.int32)
    compiled = layer_scan.lower(params, CFG, m.make_policy(name), state, tokens, emit="nll", targets=tokens).compile()
    one_layer = f"f32[{rows},{CFG.num_kv_heads},{cap},{CFG.head_dim}]"
    assert [c for c in testing.state_copies(compiled, CFG, cap, rows) if c["shape"] == one_layer] == []
