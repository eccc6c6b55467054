"""Generation driven by scan: parity with transformers' greedy generate, ragged batches,
compile counts, sampling, and states that can be kept and forked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from msrnn_jax.convert.hf import load_hf_folder
from msrnn_jax.run.decoding import decode_rows, prefill
from msrnn_jax.run.decoding import generate_tokens as generate
from msrnn_jax.fast.layer_major import layer_scan
from msrnn_jax.core.policies import make_policy
from msrnn_jax.run.sampling import Sampling, sample_rows
from msrnn_jax.run.spec import RunSpec

from hf_models import make_hf_model, save_hf_model

FULL = make_policy("full")


@pytest.fixture(scope="module", params=["llama-gqa", "qwen2"])
def tiny(request, tmp_path_factory):
    model = make_hf_model(request.param)
    cfg, params = load_hf_folder(save_hf_model(model, tmp_path_factory.mktemp(request.param)))
    return model, cfg, jax.tree.map(jnp.asarray, params)


def prompts(n, lengths, vocab=96, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, L).tolist() for L in lengths[:n]]


def test_greedy_matches_transformers_generate(tiny):
    model, cfg, params = tiny
    for ids in prompts(2, [7, 13], seed=1):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        out = generate(params, cfg, RunSpec(FULL, None), [ids], 20)
        assert out.tokens[0] == ref


def test_ragged_batch_rows_equal_their_single_runs(tiny):
    _, cfg, params = tiny
    ps = prompts(3, [5, 19, 11], seed=2)
    for pol, cap in [(FULL, None), (make_policy("tova"), 8), (make_policy("sink", 2), 8)]:
        batch = generate(params, cfg, RunSpec(pol, cap or 40), ps, 12)
        for i, p in enumerate(ps):
            alone = generate(params, cfg, RunSpec(pol, cap or 40), [p], 12)
            assert batch.tokens[i] == alone.tokens[0], (pol, i)


def test_eos_stops_each_row(tiny):
    _, cfg, params = tiny
    ps = prompts(2, [6, 9], seed=3)
    free = generate(params, cfg, RunSpec(FULL, 40), ps, 10)
    eos = free.tokens[0][3]  # row 0 emits this as its 4th token
    stopped = generate(params, cfg, RunSpec(FULL, 40), ps, 10, eos_ids=[eos])
    first = free.tokens[0].index(eos)
    assert stopped.tokens[0] == free.tokens[0][: first + 1]
    row1 = free.tokens[1]
    assert stopped.tokens[1] == (row1[: row1.index(eos) + 1] if eos in row1 else row1)


def test_compiles_once_across_chunks_and_calls(tiny):
    _, cfg, params = tiny
    pol = make_policy("tova")
    ps = prompts(2, [9, 14], seed=4)
    generate(params, cfg, RunSpec(pol, 16), ps, 40, steps_per_call=8)  # 1 + 5 chunk calls
    sizes = (decode_rows._cache_size(), layer_scan._cache_size())
    generate(params, cfg, RunSpec(pol, 16), prompts(2, [12, 3], seed=5), 33, steps_per_call=8)
    assert (decode_rows._cache_size(), layer_scan._cache_size()) == sizes


def test_decode_loop_traces_once(tiny, monkeypatch):
    """chex counts the traces: two generations with other prompt lengths and budgets run
    the decode chunk from one trace (nothing in it depends on a request's sizes)."""
    import chex

    import msrnn_jax.run.decoding as g

    _, cfg, params = tiny
    chex.clear_trace_counter()
    counted = jax.jit(chex.assert_max_traces(g.decode_rows.__wrapped__, n=1),
                      static_argnames=("cfg", "policy", "n_steps", "impl", "positions"),
                      donate_argnames=("state",))
    monkeypatch.setattr(g, "decode_rows", counted)
    pol = make_policy("tova")
    generate(params, cfg, RunSpec(pol, 16), prompts(2, [9, 14], seed=4), 40, steps_per_call=8)
    generate(params, cfg, RunSpec(pol, 16), prompts(2, [30, 3], seed=5), 17, steps_per_call=8)


def test_sampling_seed_topk_topp(tiny):
    _, cfg, params = tiny
    ps = prompts(1, [8], seed=6)
    hot = Sampling(temperature=1.5)
    a = generate(params, cfg, RunSpec(FULL, sampling=hot), ps, 16, seed=7).tokens
    b = generate(params, cfg, RunSpec(FULL, sampling=hot), ps, 16, seed=7).tokens
    c = generate(params, cfg, RunSpec(FULL, sampling=hot), ps, 16, seed=8).tokens
    assert a == b and a != c
    greedy = generate(params, cfg, RunSpec(FULL, 40), ps, 16).tokens
    assert generate(params, cfg, RunSpec(FULL, sampling=Sampling(temperature=2.0, top_k=1)), ps, 16, seed=9).tokens == greedy
    # a tiny nucleus keeps only the most likely token: greedy again
    assert generate(params, cfg, RunSpec(FULL, sampling=Sampling(temperature=1.0, top_p=1e-6)), ps, 16, seed=9).tokens == greedy


def test_one_temperature_rule():
    """Sampling, the engine and the server share `sampling.check_settings`: [0, 2]."""
    from msrnn_jax.errors import InvalidArgument
    from msrnn_jax.run.sampling import check_settings

    assert Sampling(temperature=2.0).temperature == 2.0 and Sampling(temperature=0.0).greedy
    for bad in (2.5, -0.1, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument, match="temperature must be"):
            Sampling(temperature=bad)
        with pytest.raises(InvalidArgument, match="temperature must be"):
            check_settings(bad, 0, 1.0)


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)

    def draw(s):  # 400 draws of one row under the settings s, in one compiled call
        t, k, p = (jnp.asarray(a) for a in s.rows(1))
        one = jax.jit(jax.vmap(lambda key: sample_rows(logits, key[None], t, k, p)[0]))
        return set(np.asarray(one(jax.random.key_data(keys))).tolist())

    assert draw(Sampling(temperature=1.0, top_k=2)) == {0, 1}
    assert draw(Sampling(temperature=1.0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert draw(Sampling(temperature=1.0, top_p=0.81)) == {0, 1, 2}
    assert draw(Sampling(temperature=1.0)) == {0, 1, 2, 3}


@pytest.mark.parametrize("policy,cap", [("full", 64), ("tova", 12), ("h2o", 12)])
def test_forked_state_answers_like_a_fresh_read(tiny, policy, cap):
    """Read a context once, fork the state, ask two questions: each answer equals reading
    context + question from scratch."""
    _, cfg, params = tiny
    pol = make_policy(policy)
    context, q1, q2 = prompts(3, [20, 5, 7], seed=10)
    _, state = prefill(params, cfg, pol, None, cap, [context])
    for q in (q1, q2):
        forked = generate(params, cfg, RunSpec(pol, cap), [q], 10, state=state)  # state is not consumed
        fresh = generate(params, cfg, RunSpec(pol, cap), [context + q], 10)
        assert forked.tokens == fresh.tokens
    assert int(state.length[0]) == len(context)


def test_state_shape_constant_through_generation(tiny):
    _, cfg, params = tiny
    out = generate(params, cfg, RunSpec(make_policy("window"), 8), prompts(1, [30], seed=11), 25)
    assert out.state.keys.shape == (cfg.num_layers, 1, cfg.num_kv_heads, 8, cfg.head_dim)
    assert int(out.state.length[0]) == 30 + 25
    assert sorted(np.asarray(out.state.pos)[0, 0, 0].tolist()) == list(range(47, 55))


@pytest.mark.parametrize("mode,chunk", [("oneshot", None), ("chunked", 4)])
def test_prefill_modes_generate(tiny, mode, chunk):
    """With capacity above the prompt, every prefill mode reads the same state."""
    _, cfg, params = tiny
    ps = prompts(2, [9, 15], seed=12)
    ref = generate(params, cfg, RunSpec(make_policy("tova"), 32), ps, 8)
    out = generate(params, cfg, RunSpec(make_policy("tova"), 32, mode, chunk), ps, 8)
    assert out.tokens == ref.tokens


def test_decode_rate_leaves_out_the_first_chunk(tiny, monkeypatch):
    """decode_tokens_per_s is the steady rate: the first decode call (which compiles, on
    a first use) is not in it. A 1 s stall in that call would cap a rate that counted it
    at 40 tokens/s; the steady rate of this tiny model is far above."""
    import time

    import msrnn_jax.run.decoding as g

    _, cfg, params = tiny
    real, calls = g.decode_rows, []

    def stalled_first(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return real(*a, **k)

    monkeypatch.setattr(g, "decode_rows", stalled_first)
    res = g.generate_tokens(params, cfg, RunSpec(make_policy("window"), 16), prompts(1, [5]), 40, steps_per_call=4)
    assert len(calls) == 10 and sum(len(t) for t in res.tokens) == 40
    assert res.decode_tokens_per_s > 80


def test_full_refuses_to_continue_a_state_too_small_for_the_run(tiny):
    """full never drops a token: continuing a state without slots for the whole run is
    refused, not run as a window."""
    from msrnn_jax.errors import InvalidArgument

    _, cfg, params = tiny
    _, state = prefill(params, cfg, FULL, None, 16, [list(range(1, 11))])
    with pytest.raises(InvalidArgument, match="16 slots"):
        generate(params, cfg, RunSpec(FULL), [[3, 4]], 8, state=state)
    assert len(generate(params, cfg, RunSpec(FULL), [[3, 4]], 4, state=state).tokens[0]) == 4  # 10 + 2 + 4 fit
