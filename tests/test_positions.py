"""Positions within the state (docs/design.md §8): `absolute` against `reindex`.

* With nothing evicted, reindex is absolute, for every family (Mistral's window too).
* After evictions, the implementation matches the independent numpy reference
  (tests/reference.py, which rotates each kept key by its rank) step by step, in exact
  and chunked prefill: logits and kept positions.
* Under reindex no query or key is rotated by a position above C.
* oneshot + reindex is refused; past the trained context absolute warns, reindex does
  not, `full` is refused.
"""

from __future__ import annotations

import dataclasses
import warnings

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msrnn_jax.core import positions as pos_mod
from msrnn_jax.run import decoding
from msrnn_jax.core.layers import rope_table, rotate
from msrnn_jax.core.policies import heads_agree
from msrnn_jax.core.positions import slot_ranks
from msrnn_jax.run.api import Model
from msrnn_jax.fast.attention import StepImpl
from msrnn_jax.convert.hf import load_hf_folder
from msrnn_jax import errors
from msrnn_jax.errors import InvalidArgument, MsrnnWarning
from msrnn_jax.run.evaluate import nll_curve, run_policy
from msrnn_jax.core.positions import advance_ranks, slot_ranks
from msrnn_jax.core.parallel import chunk_step
from msrnn_jax.core.step import scan, step, write_slots
from msrnn_jax.core.state import State, init_state

from hf_models import FAMILIES, make_hf_model, save_hf_model
from reference import (policy_obj, random_tokens, reference_chunked, reference_run, sorted_pos,
                       tiny_config, tiny_params)

ATOL = RTOL = 1e-5
POLICIES = [("window", 4), ("sink", 2), ("tova", 4), ("tova-head", 4), ("h2o", 4)]
IDS = [n for n, _ in POLICIES]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    folder = save_hf_model(make_hf_model(request.param), tmp_path_factory.mktemp(request.param))
    cfg, params = load_hf_folder(folder)
    import jax
    return request.param, cfg, jax.tree.map(jnp.asarray, params)


def _groups(fn, pos):
    """fn over the kept positions, group by group for a model with layer groups (gemma3)."""
    return tuple(fn(p) for p in pos) if isinstance(pos, tuple) else fn(pos)


def _exact(params, cfg, policy, capacity, tokens, positions):
    state = init_state(cfg, tokens.shape[0], capacity)
    logits, state, pos = scan(params, cfg, policy, state, jnp.asarray(tokens), emit="logits+pos",
                                     positions=positions)
    return np.asarray(logits), _groups(np.asarray, pos), state


def _chunked(params, cfg, policy, capacity, tokens, S, positions):
    state = init_state(cfg, tokens.shape[0], capacity)
    logits, kept = [], []
    for start in range(0, tokens.shape[1], S):
        out, state = chunk_step(params, cfg, policy, state, jnp.asarray(tokens[:, start:start + S]),
                                positions=positions)
        logits.append(np.asarray(out))
        kept.append(_groups(sorted_pos, state.pos))
    return np.concatenate(logits, 1), kept


# -- nothing evicted: reindex == absolute ------------------------------------------------
@pytest.mark.parametrize("name", ["full", "tova"])
def test_reindex_equals_absolute_without_eviction(family, name):
    """C >= T: the ranks are the original positions, so the two modes agree (the mistral
    family's window of 7 masks from the original positions in both)."""
    fam, cfg, params = family
    T = 20
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, T)).astype(np.int32)
    pol = policy_obj(name)
    a, pos_a, _ = _exact(params, cfg, pol, T + 4, tokens, "absolute")
    r, pos_r, _ = _exact(params, cfg, pol, T + 4, tokens, "reindex")
    chex.assert_trees_all_close(r, a, atol=ATOL, rtol=0)
    chex.assert_trees_all_equal(_groups(sorted_pos, pos_r), _groups(sorted_pos, pos_a))
    ca, _ = _chunked(params, cfg, pol, T + 4, tokens, 6, "absolute")
    cr, _ = _chunked(params, cfg, pol, T + 4, tokens, 6, "reindex")
    chex.assert_trees_all_close(cr, ca, atol=ATOL, rtol=0)
    chex.assert_trees_all_close(cr, a, atol=ATOL, rtol=0)


# -- after evictions: against the independent reference -----------------------------------
@pytest.mark.parametrize("kind", ["gqa", "mistral"])
@pytest.mark.parametrize("name,sinks", POLICIES, ids=IDS)
def test_exact_reindex_matches_reference(kind, name, sinks):
    cfg = tiny_config(kind)
    params = tiny_params(cfg)
    T, C = 24, 6 if kind == "gqa" else 4  # mistral: C=4 < its window 6, so that kept runs can have gaps
    tokens = random_tokens(cfg, (1, T), seed=3)
    logits, pos, _ = _exact(params, cfg, policy_obj(name, sinks), C, tokens, "reindex")
    ref_logits, ref_kept = reference_run(params, cfg, name, C, tokens[0], sinks, positions="reindex")
    pos = sorted_pos(pos)
    for t in range(T):
        np.testing.assert_array_equal(pos[t, :, 0], ref_kept[t], err_msg=f"step {t}")
    np.testing.assert_allclose(logits[0], ref_logits, atol=ATOL, rtol=RTOL)
    if kind == "mistral":  # its window masks most kept tokens: the visible ones are mostly a
        return             # contiguous recent run, where the modes agree; the reference is the check
    abs_logits, _, _ = _exact(params, cfg, policy_obj(name, sinks), C, tokens, "absolute")
    gap = np.abs(abs_logits[0, C + 2:] - logits[0, C + 2:]).max()
    if name == "window":  # a contiguous kept run: RoPE is relative, so the offsets are the same
        assert gap < 1e-4
    else:  # the check means something: after the first eviction the positions matter
        assert gap > 1e-3


@pytest.mark.parametrize("name,sinks", POLICIES, ids=IDS)
def test_chunked_reindex_matches_reference(name, sinks):
    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    T, C, S = 24, 6, 5
    tokens = random_tokens(cfg, (1, T), seed=4)
    # the last chunk is shorter (24 = 4 x 5 + 4): its own shape, as the reference reads it
    logits, kept = _chunked(params, cfg, policy_obj(name, sinks), C, tokens, S, "reindex")
    ref_logits, ref_kept, _ = reference_chunked(params, cfg, name, C, tokens[0], S, sinks,
                                                positions="reindex")
    assert len(kept) == len(ref_kept)
    for i in range(len(ref_kept)):
        np.testing.assert_array_equal(kept[i][:, 0], ref_kept[i], err_msg=f"after chunk {i}")
    np.testing.assert_allclose(logits[0], ref_logits, atol=ATOL, rtol=RTOL)


def test_slot_ranks():
    """Ranks in order of original position over the kept slots; empty slots after them."""
    P = np.array([[7, -1, 2, 30, -1, 5]], np.int32)
    rank, n = slot_ranks(jnp.asarray(P))
    rank = np.asarray(rank)[0]
    kept = P[0] >= 0
    assert int(n[0]) == kept.sum()
    order = np.argsort(np.where(kept, P[0], np.iinfo(np.int32).max), kind="stable")
    np.testing.assert_array_equal(rank[order], np.arange(P.shape[1]))
    assert sorted(rank[kept]) == list(range(kept.sum()))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_advance_ranks_equals_a_fresh_sort(C, seed):
    """The ranks the layer-major step carries through its token loop (`advance_ranks`, no
    sort) equal `slot_ranks` of the slots after each write, empty slots included, over a
    random run of writes: into empty slots, over kept ones, and drops (slot = C)."""
    rng = np.random.default_rng(seed)
    P = np.full((2, 3, C), -1, np.int32)  # [B, Hkv, C]
    rank, n = slot_ranks(jnp.asarray(P))
    for t in range(3 * C + 2):
        slot = jnp.asarray(rng.integers(0, C + 1, size=(2, 3)), jnp.int32)  # C: dropped
        rank, n = advance_ranks(rank, n, jnp.asarray(P), slot)
        zeros = jnp.zeros(P.shape + (1,))
        _, _, P = write_slots(zeros, zeros, jnp.asarray(P), slot, zeros[..., 0, :], zeros[..., 0, :],
                              jnp.full(slot.shape, t, jnp.int32))
        P = np.asarray(P)
        want_rank, want_n = slot_ranks(jnp.asarray(P))
        np.testing.assert_array_equal(np.asarray(n), np.asarray(want_n), err_msg=f"write {t}")
        np.testing.assert_array_equal(np.asarray(rank), np.asarray(want_rank), err_msg=f"write {t}")


# -- no rotation above C ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["window", "tova-head"])
def test_reindex_never_rotates_above_capacity(monkeypatch, name):
    """Run the step eagerly (unrolled layers, no tracing) with probes on every rotation:
    under reindex the largest position any query or key is rotated by is C (the query of
    a full state); under absolute it reaches T - 1 (so the probes see the rotations)."""
    seen = []
    rope, rotate_at, ranks = pos_mod.rope_at, pos_mod.rotate_at, pos_mod.slot_ranks

    def rope_probe(cfg, x, positions):
        seen.append(int(np.max(np.asarray(positions))))
        return rope(cfg, x, positions)

    def rotate_at_probe(x, positions, table):
        seen.append(int(np.max(np.asarray(positions))))
        return rotate_at(x, positions, table)

    def ranks_probe(P):
        rank, n = ranks(P)
        seen.append(int(np.max(np.where(np.asarray(P) >= 0, np.asarray(rank), 0))))
        return rank, n

    monkeypatch.setattr(pos_mod, "rope_at", rope_probe)
    monkeypatch.setattr(pos_mod, "rotate_at", rotate_at_probe)
    monkeypatch.setattr(pos_mod, "slot_ranks", ranks_probe)
    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    T, C = 30, 8
    tokens = random_tokens(cfg, (2, T), seed=5)
    impl = StepImpl(layer_loop="unroll")
    most = {}
    for positions in ("absolute", "reindex"):
        seen.clear()
        state = State.init(cfg, 2, C)
        for t in range(T):
            _, state = step(params, cfg, policy_obj(name), state, jnp.asarray(tokens[:, t]), impl=impl,
                            positions=positions)
        most[positions] = max(seen)
    assert most == {"absolute": T - 1, "reindex": C}


# -- refusals, and streams past the trained context --------------------------------------
def test_oneshot_reindex_refused(capsys):
    cfg = tiny_config("gqa")
    with pytest.raises(InvalidArgument, match="oneshot"):
        decoding.prefill(tiny_params(cfg), cfg, policy_obj("tova"), None, 8, [[1, 2, 3]], "oneshot",
                         positions="reindex")
    from msrnn_jax.cli import main

    code = main(["generate", "hi", "--policy", "tova", "--capacity", "8", "--prefill", "oneshot",
                 "--positions", "reindex"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("msrnn: error: ") and "--positions" in err[0], err


def test_long_stream_past_trained_context(monkeypatch):
    """A tiny model trained (nominally) to 64 positions reads 2,048 tokens with C=16:
    absolute warns once, reindex does not; both stay finite; full is refused."""
    monkeypatch.setattr(errors, "_WARNED", set())  # warnings are once per process
    cfg = dataclasses.replace(tiny_config("gqa"), max_position_embeddings=64)
    model = Model(cfg, tiny_params(tiny_config("gqa")))
    tokens = random_tokens(cfg, (1, 2048), seed=6)
    errs = {}
    for positions in ("absolute", "reindex"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = run_policy(model, "tova", 16, tokens, positions=positions)
        errs[positions] = [str(w.message) for w in caught if issubclass(w.category, MsrnnWarning)]
        assert run.nll.shape == (1, 2047) and np.isfinite(run.nll).all()
        assert int(run.state.length[0]) == 2047
    assert len(errs["absolute"]) == 1, errs
    assert "trained context of 64" in errs["absolute"][0]
    assert errs["reindex"] == []
    with pytest.raises(InvalidArgument, match="trained context"):
        run_policy(model, "full", None, tokens[:, :100])


def test_nll_curve_buckets():
    nll = np.random.default_rng(7).random((3, 25)).astype(np.float32)
    curve = nll_curve(nll, 10)
    assert [(c["start"], c["end"]) for c in curve] == [(0, 10), (10, 20), (20, 25)]
    for c in curve:
        np.testing.assert_allclose(c["mean_nll"], nll[:, c["start"]:c["end"]].mean(), rtol=1e-6)
    with pytest.raises(InvalidArgument):
        nll_curve(nll, 0)


def test_ppl_curve_json_csv_plot(capsys, tmp_path):
    """`msrnn ppl --curve-every N --positions reindex`: the JSON curve averages back to the
    mean NLL, the CSV has one row per bucket after the summary, the plot is a PNG."""
    import csv
    import json

    from hf_models import save_tiny_model
    from msrnn_jax.cli import main

    folder = save_tiny_model(tmp_path / "model")
    text = tmp_path / "book.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 20, encoding="utf-8")
    csv_path, png = tmp_path / "out.csv", tmp_path / "out.png"
    code = main(["ppl", str(text), "--policy", "tova,sink", "--capacity", "8", "--tokens", "100",
                 "--curve-every", "16", "--positions", "reindex", "--json", "--csv", str(csv_path),
                 "--plot", str(png), "--model", folder])
    out = capsys.readouterr().out
    assert code == 0
    recs = [json.loads(l) for l in out.splitlines()]
    assert [r["policy"] for r in recs] == ["sink", "tova"] or [r["policy"] for r in recs] == ["tova", "sink"]
    for r in recs:
        assert r["positions"] == "reindex"
        sizes = [c["end"] - c["start"] for c in r["curve"]]
        assert sum(sizes) == 99 and sizes[:-1] == [16] * (len(sizes) - 1)
        mean = sum(c["mean_nll"] * n for c, n in zip(r["curve"], sizes)) / 99
        np.testing.assert_allclose(mean, r["mean_nll"], rtol=1e-5)
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == len(recs) * (1 + len(recs[0]["curve"]))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("impl", [StepImpl(attention="reduce"), StepImpl(attention="pallas"),
                                  StepImpl(layer_loop="unroll")], ids=["reduce", "pallas", "unroll"])
def test_reindex_step_impls_agree(impl):
    """How the step computes never changes what it computes, under reindex too (Pallas
    reads a rotated copy of the layer's keys)."""
    from msrnn_jax.testing import greedy_decode

    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    tok = jnp.asarray(random_tokens(cfg, (2,), seed=8))
    pol = policy_obj("tova")
    ref, ref_state = greedy_decode(params, cfg, pol, 12, State.init(cfg, 2, 5), tok, positions="reindex")
    got, got_state = greedy_decode(params, cfg, pol, 12, State.init(cfg, 2, 5), tok, impl, positions="reindex")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    np.testing.assert_array_equal(sorted_pos(got_state.pos), sorted_pos(ref_state.pos))
    chex.assert_trees_all_close(got_state.keys, ref_state.keys, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shared", [True, False], ids=["angles-shared", "per-head"])
def test_rotated_scores_equal_a_rotated_copy(shared):
    """Both forms of the fused score product (`attention.rotated_scores`) equal the product
    with keys rotated first, for angles shared by the heads ([B,1,C,D]) and per head."""
    from msrnn_jax.fast.attention import rotated_scores

    rng = np.random.default_rng(3)
    B, H, G, C, D = 2, 3, 2, 7, 8
    q = jnp.asarray(rng.standard_normal((B, H, G, D)), jnp.float32)
    K = jnp.asarray(rng.standard_normal((B, H, C, D)), jnp.float32)
    cos, sin = rope_table(C, jnp.asarray(1.0 / 10000 ** (np.arange(0, D, 2) / D), jnp.float32))
    rank = jnp.asarray(rng.permuted(np.tile(np.arange(C), (B, 1 if shared else H, 1)), axis=-1))
    want = jnp.einsum("bhgd,bhcd->bhgc", q, rotate(K, cos[rank], sin[rank]), precision="highest")
    for form in ("auto", "sum", "query"):
        np.testing.assert_allclose(rotated_scores(q, K, cos[rank], sin[rank], form), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["window", "sink", "tova", "h2o"])
def test_layer_wise_policies_keep_one_slot_layout_per_layer(name):
    """What `core.positions.ranks_of` relies on to sort once per layer: under a layer-wise policy
    every KV head of a layer holds the same positions in the same slots, after a chunked
    prefill and after decoding; a head-wise policy does not."""
    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    pol = policy_obj(name)
    assert heads_agree(pol) and not heads_agree(policy_obj("tova-head"))
    tokens = random_tokens(cfg, (2, 18), seed=4)
    state = State.init(cfg, 2, 5)
    _, state = chunk_step(params, cfg, pol, state, jnp.asarray(tokens[:, :9]), positions="reindex")
    _, state, _ = scan(params, cfg, pol, state, jnp.asarray(tokens[:, 9:]), emit="logits+pos",
                              positions="reindex")
    P = np.asarray(state.pos)  # [L, B, Hkv, C]
    assert (P >= 0).all()
    np.testing.assert_array_equal(P, np.broadcast_to(P[:, :, :1], P.shape))
