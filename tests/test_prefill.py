"""Prompt prefill modes (docs/design.md §4) against the independent reference.

`oneshot`: one causal forward, then a top-C mask per layer. `chunked`: S tokens at a time
against the state, then C+S candidates reduced to C. Kept positions are compared sorted
per (layer, row, KV head); logits to 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msrnn_jax.core.parallel import chunk_step, prefill_oneshot

from msrnn_jax.core.step import scan
from msrnn_jax.core.state import State
from reference import (
    ReferenceMSRNN,
    policy_obj,
    random_tokens,
    reference_chunked,
    reference_oneshot,
    reference_run,
    slot_scores_by_pos,
    sorted_pos,
    tiny_config,
    tiny_params,
    uniform_params,
)

T = 24
ATOL = RTOL = 1e-5
POLICIES = [("tova", 4), ("tova-head", 4), ("window", 4), ("sink", 2), ("h2o", 4), ("h2o-head", 4)]
IDS = [n + (str(i) if n == "sink" else "") for n, i in POLICIES]


def run_oneshot(params, cfg, name, capacity, tokens, sinks=4, lengths=None):
    tokens = jnp.asarray(np.asarray(tokens, np.int32))
    lens = None if lengths is None else jnp.asarray(np.asarray(lengths, np.int32))
    logits, state = prefill_oneshot(params, cfg, policy_obj(name, sinks), capacity, tokens, lens)
    return np.asarray(logits), state


def run_chunked(params, cfg, name, capacity, tokens, S, sinks=4, pad=True, active=None):
    """Drive chunk_step over chunks of S tokens (the last one may be shorter: padded with
    active=False when `pad`, else called with the shorter shape). Returns (logits [B,T,V],
    sorted kept positions after every chunk [n, L, B, Hkv, C], final state)."""
    tokens = np.asarray(tokens, np.int32)
    B, n_tok = tokens.shape
    if active is None:
        active = np.ones((B, n_tok), bool)
    state = State.init(cfg, B, capacity)
    policy = policy_obj(name, sinks)
    logits, kept = [], []
    for start in range(0, n_tok, S):
        tok, act = tokens[:, start:start + S], active[:, start:start + S]
        n = tok.shape[1]
        if pad and n < S:
            tok = np.pad(tok, ((0, 0), (0, S - n)))
            act = np.pad(act, ((0, 0), (0, S - n)))  # pads with False
        out, state = chunk_step(params, cfg, policy, state, jnp.asarray(tok), jnp.asarray(act))
        logits.append(np.asarray(out)[:, :n])
        kept.append(sorted_pos(state.pos))
    return np.concatenate(logits, 1), np.stack(kept), state


def check_chunked(kind, name, capacity, seed, S=5, sinks=4, pad=True):
    """Chunked prefill of T random tokens (one row) against the reference: the same kept
    positions after every chunk and the same logits. Returns (state, reference)."""
    cfg = tiny_config(kind)
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, (1, T), seed=seed)
    logits, kept, state = run_chunked(params, cfg, name, capacity, tokens, S, sinks, pad=pad)
    ref_logits, ref_kept, ref = reference_chunked(params, cfg, name, capacity, tokens[0], S, sinks)
    assert len(kept) == len(ref_kept)
    for i in range(len(ref_kept)):
        np.testing.assert_array_equal(kept[i, :, 0], ref_kept[i], err_msg=f"after chunk {i}")
    np.testing.assert_allclose(logits[0], ref_logits, atol=ATOL, rtol=RTOL)
    return state, ref


def continue_exact(params, cfg, name, state, ref, tokens, sinks=4):
    """Decode `tokens` [T2] after a prefill in both the implementation and the reference;
    kept positions must agree after every step."""
    logits, state, pos = scan(params, cfg, policy_obj(name, sinks), state,
                                     jnp.asarray(np.asarray(tokens, np.int32)[None]), None, emit="logits+pos")
    pos = sorted_pos(pos)
    for t, tok in enumerate(tokens):
        ref_logits = ref.step(tok)
        np.testing.assert_array_equal(pos[t, :, 0], ref.kept_positions(), err_msg=f"decode step {t}")
        np.testing.assert_allclose(np.asarray(logits)[0, t], ref_logits, atol=ATOL, rtol=RTOL)


# -- oneshot ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,sinks", POLICIES, ids=IDS)
def test_oneshot_matches_reference(name, sinks):
    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, (1, T), seed=31)
    logits, state = run_oneshot(params, cfg, name, 6, tokens, sinks)
    ref_logits, ref_kept, ref = reference_oneshot(params, cfg, name, 6, tokens[0], sinks)
    np.testing.assert_array_equal(sorted_pos(state.pos)[:, 0], ref_kept)
    np.testing.assert_allclose(logits[0], ref_logits, atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(np.asarray(state.length), [T])
    if name == "window":
        assert (ref_kept == np.arange(T - 6, T)).all()
    if name == "sink":
        assert (ref_kept == [0, 1, 20, 21, 22, 23]).all()
    # decoding goes on from the pruned state exactly like the reference (32 tokens, capacity 6:
    # the shapes test_policies compiles)
    if name not in ("h2o", "h2o-head"):
        continue_exact(params, cfg, name, state, ref, random_tokens(cfg, 32, seed=32), sinks)


def test_one_forward_serves_every_cut():
    """`decoding.oneshot_prompt` runs the forward once; `cut_prompt` then cuts it for each
    policy and capacity (`eval ruler --mode once`): every cut keeps the reference's positions
    (H2O's scores too), two rows of different lengths, the forward never changed by a cut."""
    from msrnn_jax.run.decoding import cut_prompt, oneshot_prompt

    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    rows = [random_tokens(cfg, T, seed=31).tolist(), random_tokens(cfg, T - 7, seed=35).tolist()]
    last, prompt = oneshot_prompt(params, cfg, rows)
    before = [np.asarray(a).copy() for a in jax.tree.leaves(prompt)]
    for name, C in [("tova", 6), ("h2o", 6), ("tova-head", 9), ("sink", 9), ("tova", 9)]:
        state = cut_prompt(params, cfg, policy_obj(name), C, prompt)
        for b, row in enumerate(rows):
            ref_logits, ref_kept, ref = reference_oneshot(params, cfg, name, C, np.asarray(row))
            np.testing.assert_array_equal(sorted_pos(state.pos)[:, b], ref_kept, err_msg=f"{name} C={C} row {b}")
            np.testing.assert_allclose(np.asarray(last)[b], ref_logits[-1], atol=ATOL, rtol=RTOL)
            if name == "h2o":
                np.testing.assert_allclose(slot_scores_by_pos(state.pos, state.score)[:, b], ref.kept_scores(),
                                           atol=1e-5, rtol=1e-5)
        assert np.array_equal(np.asarray(state.length), [T, T - 7])
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(prompt)))


@pytest.mark.parametrize("name", ["h2o", "h2o-head"])
def test_oneshot_h2o_scores_and_continuation(name):
    """After oneshot, H2O's `score` of each kept slot is its column-summed attention over
    the prompt (the accumulated attention), so decoding continues like the reference."""
    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, (1, T), seed=31)
    logits, state = run_oneshot(params, cfg, name, 6, tokens)
    ref_logits, ref_kept, ref = reference_oneshot(params, cfg, name, 6, tokens[0])
    np.testing.assert_array_equal(sorted_pos(state.pos)[:, 0], ref_kept)
    np.testing.assert_allclose(slot_scores_by_pos(state.pos, state.score)[:, 0], ref.kept_scores(),
                               atol=1e-5, rtol=1e-5)
    continue_exact(params, cfg, name, state, ref, random_tokens(cfg, 32, seed=32))


@pytest.mark.parametrize("name", ["tova", "h2o"])
def test_oneshot_sliding_window(name):
    cfg = tiny_config("mistral")
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, (1, T), seed=33)
    logits, state = run_oneshot(params, cfg, name, 8, tokens)
    ref_logits, ref_kept, _ = reference_oneshot(params, cfg, name, 8, tokens[0])
    np.testing.assert_array_equal(sorted_pos(state.pos)[:, 0], ref_kept)
    np.testing.assert_allclose(logits[0], ref_logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name,n", [("tova", 5), ("h2o", 8)])
def test_oneshot_short_prompt_keeps_everything(name, n):
    """T <= C: nothing to evict; the state holds positions 0..T-1 in every head."""
    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, (1, n), seed=34)
    logits, state = run_oneshot(params, cfg, name, 8, tokens)
    pos = sorted_pos(state.pos)
    want = np.concatenate([np.full(8 - n, -1), np.arange(n)])
    assert (pos == want).all(), pos
    np.testing.assert_array_equal(np.asarray(state.length), [n])
    ref_logits, ref_kept, _ = reference_oneshot(params, cfg, name, 8, tokens[0])
    np.testing.assert_array_equal(pos[:, 0], ref_kept)
    np.testing.assert_allclose(logits[0], ref_logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["tova", "h2o-head"])
def test_oneshot_rows_with_lengths(name):
    """A right-padded batch: each row is pruned from its own prompt only."""
    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, (2, T), seed=35)
    lengths = [T, 17]
    logits, state = run_oneshot(params, cfg, name, 6, tokens, lengths=lengths)
    np.testing.assert_array_equal(np.asarray(state.length), lengths)
    pos = sorted_pos(state.pos)
    for b, n in enumerate(lengths):
        ref_logits, ref_kept, _ = reference_oneshot(params, cfg, name, 6, tokens[b, :n])
        np.testing.assert_array_equal(pos[:, b], ref_kept, err_msg=f"row {b}")
        np.testing.assert_allclose(logits[b, :n], ref_logits, atol=ATOL, rtol=RTOL)


# -- chunked --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,sinks", POLICIES, ids=IDS)
def test_chunked_matches_reference(name, sinks):
    """S=5 does not divide T=24: the last chunk is padded with active=False."""
    state, ref = check_chunked("gqa", name, 6, seed=41, sinks=sinks)
    np.testing.assert_array_equal(np.asarray(state.length), [T])
    if name in ("h2o", "h2o-head"):
        np.testing.assert_allclose(slot_scores_by_pos(state.pos, state.score)[:, 0], ref.kept_scores(),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,sinks", [("tova", 4), ("h2o-head", 4), ("sink", 1)], ids=["tova", "h2o-head", "sink1"])
def test_chunk_longer_than_capacity(name, sinks):
    """S=5 > C=3: most of every chunk is evicted right away."""
    check_chunked("gqa", name, 3, seed=42, sinks=sinks)


@pytest.mark.parametrize("name", ["tova", "h2o"])
def test_chunked_short_last_chunk_shape(name):
    """The shorter last chunk called with its own shape [1, 4] gives the same as padding."""
    check_chunked("gqa", name, 6, seed=41, pad=False)


@pytest.mark.parametrize("name", ["tova", "h2o"])
def test_chunked_sliding_window(name):
    check_chunked("mistral", name, 8, seed=43)


def test_chunked_rows_with_padding():
    """Batch of 2, row 1 right-padded (17 tokens): a wholly inactive chunk leaves it as is."""
    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, (2, T), seed=44)
    active = np.ones((2, T), bool)
    active[1, 17:] = False
    logits, kept, state = run_chunked(params, cfg, "tova", 6, tokens, 5, active=active)
    np.testing.assert_array_equal(np.asarray(state.length), [T, 17])
    for b, n in enumerate([T, 17]):
        ref_logits, ref_kept, _ = reference_chunked(params, cfg, "tova", 6, tokens[b, :n], 5)
        np.testing.assert_array_equal(kept[:len(ref_kept), :, b], ref_kept, err_msg=f"row {b}")
        np.testing.assert_array_equal(kept[-1, :, b], ref_kept[-1])
        np.testing.assert_allclose(logits[b, :n], ref_logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name,sinks", [("tova", 4), ("h2o", 4), ("h2o-head", 4), ("sink", 2)],
                         ids=["tova", "h2o", "h2o-head", "sink2"])
def test_chunked_S1_equals_exact(name, sinks):
    """chunk_step one token at a time is the exact step (capacity 6, 32 tokens: the shapes
    test_policies compiles for scan)."""
    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, (1, 32), seed=45)
    logits, kept, _ = run_chunked(params, cfg, name, 6, tokens, 1, sinks)
    exact_logits, _, exact_pos = scan(params, cfg, policy_obj(name, sinks), State.init(cfg, 1, 6),
                                             jnp.asarray(tokens), None, emit="logits+pos")
    exact_pos = sorted_pos(exact_pos)
    np.testing.assert_array_equal(kept, exact_pos)
    np.testing.assert_allclose(logits, np.asarray(exact_logits), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name,sinks", POLICIES, ids=IDS)
def test_reference_chunked_S1_is_reference_exact(name, sinks):
    """Self-check of the reference: its two code paths (drop-one vs keep-top-C) agree."""
    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, 32, seed=46)
    ex_logits, ex_kept = reference_run(params, cfg, name, 6, tokens, sinks)
    ch_logits, ch_kept, _ = reference_chunked(params, cfg, name, 6, tokens, 1, sinks)
    np.testing.assert_array_equal(ch_kept, ex_kept)
    np.testing.assert_allclose(ch_logits, ex_logits, atol=1e-6, rtol=1e-6)


# -- exact ties and guards for the setup ------------------------------------------------------------
@pytest.mark.parametrize("name", ["tova", "tova-head", "h2o", "h2o-head"])
def test_prefill_exact_ties(name):
    """Uniform attention: oneshot/chunked TOVA rank everything equal and must drop the
    smallest positions first, i.e. keep the last C (H2O: whatever the reference keeps)."""
    cfg = tiny_config("gqa")
    params = uniform_params(cfg)
    tokens = random_tokens(cfg, (1, T), seed=51)
    _, state = run_oneshot(params, cfg, name, 6, tokens)
    _, ref_kept, _ = reference_oneshot(params, cfg, name, 6, tokens[0])
    np.testing.assert_array_equal(sorted_pos(state.pos)[:, 0], ref_kept)
    _, kept, _ = run_chunked(params, cfg, name, 6, tokens, 5)
    _, ref_kept_ch, _ = reference_chunked(params, cfg, name, 6, tokens[0], 5)
    np.testing.assert_array_equal(kept[:, :, 0], ref_kept_ch)
    if name.startswith("tova"):
        assert (ref_kept == np.arange(T - 6, T)).all()
        assert (ref_kept_ch[-1] == np.arange(T - 6, T)).all()


@pytest.mark.parametrize("name", ["h2o", "h2o-head"])
def test_prefill_h2o_score_ties(name):
    """Window 4 + uniform attention: column sums of every token fully seen by 4 later
    queries are exactly 1.0 — ties, which must drop the smallest position first."""
    cfg = tiny_config("mistral-w4")
    params = uniform_params(cfg)
    tokens = random_tokens(cfg, (1, T), seed=52)
    _, state = run_oneshot(params, cfg, name, 8, tokens)
    _, ref_kept, _ = reference_oneshot(params, cfg, name, 8, tokens[0])
    np.testing.assert_array_equal(sorted_pos(state.pos)[:, 0], ref_kept)
    assert (ref_kept == [0, 1, 2, T - 5, T - 4, T - 3, T - 2, T - 1]).all()
    _, kept, _ = run_chunked(params, cfg, name, 8, tokens, 5)
    _, ref_kept_ch, _ = reference_chunked(params, cfg, name, 8, tokens[0], 5)
    np.testing.assert_array_equal(kept[:, :, 0], ref_kept_ch)


def test_prefill_modes_really_differ():
    """Guard for the test setup: on the random model, oneshot, chunked and exact keep
    different sets for TOVA, and H2O's accumulated scores differ between chunked and exact
    (so the tests above could tell the modes apart)."""
    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, T, seed=41)
    for name in ["tova", "tova-head"]:
        exact = reference_run(params, cfg, name, 6, tokens)[1][-1]
        one = reference_oneshot(params, cfg, name, 6, tokens)[1]
        chunked = reference_chunked(params, cfg, name, 6, tokens, 5)[1][-1]
        assert not np.array_equal(exact, one), name
        assert not np.array_equal(exact, chunked), name
        assert not np.array_equal(one, chunked), name
    assert not np.array_equal(reference_run(params, cfg, "h2o-head", 6, tokens)[1][-1],
                              reference_oneshot(params, cfg, "h2o-head", 6, tokens)[1])
    ex = ReferenceMSRNN(params, cfg, "h2o", 6)
    for t in tokens:
        ex.step(t)
    ch = reference_chunked(params, cfg, "h2o", 6, tokens, 5)[2]
    assert np.abs(ex.kept_scores() - ch.kept_scores()).max() > 1e-2
