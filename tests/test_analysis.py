"""msrnn_jax.run.analysis (retention statistics, token kinds, recordings) and the notebook
figures in msrnn_jax.run.plots: synthetic position records and a tiny random model."""

from __future__ import annotations

import io

import jax
import numpy as np
import pytest

from msrnn_jax.run import analysis, api, evaluate, plots
from msrnn_jax.config import ModelConfig
from msrnn_jax.params import init_params

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny():
    params = init_params(CFG, jax.random.key(0), scale=0.3)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 13)).astype(np.int32)
    return params, tokens


def window_pos(T, C, L=1, B=1, H=1):
    """What a window of C slots holds after each of T steps: [T, L, B, H, C] (slot order
    as the step writes it: position p lands in slot p % C)."""
    pos = np.full((T, L, B, H, C), -1, np.int32)
    cur = np.full(C, -1, np.int32)
    for t in range(T):
        cur[t % C] = t
        pos[t] = cur
    return pos


# -- token kinds -----------------------------------------------------------------------
@pytest.mark.parametrize("text,kind", [
    ("\n", "newline"), (".\n", "newline"), ("\n\n", "newline"),
    (" .", "punctuation"), (",", "punctuation"), ("--", "punctuation"), (" (", "punctuation"),
    (' "', "quote"), ("'", "quote"), ("\u201c", "quote"), (".\u201d", "quote"), ('."', "quote"),
    (" 1890", "digit"), ("7", "digit"),
    (" London", "capitalised"), ("I", "capitalised"), (" THE", "capitalised"),
    (" the", "other"), ("ing", "other"), (" ", "other"), ("", "other"), ("\ufffd", "other"),
    ("'s", "other"),
])
def test_token_kind(text, kind):
    assert analysis.token_kind(text) == kind
    assert kind in analysis.TOKEN_KINDS


def test_token_kinds_keeps_shape_and_decodes_each_id_once():
    calls = []

    def decode(ids):
        calls.append(list(ids))
        return "".join(chr(i) for i in ids)

    ids = np.array([[ord("A"), ord("."), 10, ord("7")], [ord("a"), ord('"'), ord("A"), ord("A")]])
    kinds = analysis.token_kinds(decode, ids)
    assert kinds.shape == (2, 4)
    assert kinds.tolist() == [["capitalised", "punctuation", "newline", "digit"],
                              ["other", "quote", "capitalised", "capitalised"]]
    assert all(len(c) == 1 for c in calls) and len(calls) == len(np.unique(ids))


# -- statistics on synthetic records ---------------------------------------------------
def test_kept_map_of_a_window_is_a_band():
    m = analysis.kept_map(window_pos(8, 3), layer=0)
    assert m.shape == (8, 8) and m.dtype == bool
    for t in range(8):
        assert np.flatnonzero(m[t]).tolist() == list(range(max(0, t - 2), t + 1))


def test_retention_of_a_window():
    T, C = 9, 3
    steps, to_end = analysis.retention(window_pos(T, C))
    assert steps.shape == (1, 1, 1, T)
    assert steps[0, 0, 0].tolist() == [min(C, T - p) for p in range(T)]
    assert to_end[0, 0, 0].tolist() == [p >= T - C for p in range(T)]


def test_retention_counts_a_token_dropped_on_arrival_as_zero():
    # C = 1: token 0 is kept forever, every later token is dropped on arrival
    pos = np.zeros((5, 1, 1, 1, 1), np.int32)
    steps, to_end = analysis.retention(pos)
    assert steps[0, 0, 0].tolist() == [5, 0, 0, 0, 0]
    assert to_end[0, 0, 0].tolist() == [True, False, False, False, False]
    assert analysis.first_token_kept(pos).tolist() == [True]


def test_recent_share_and_ages_of_a_window():
    T, C = 10, 4
    pos = window_pos(T, C, L=2)
    share = analysis.recent_share(pos, recent=C)
    assert share.shape == (T, 2) and np.all(share == 1.0)
    share2 = analysis.recent_share(pos, recent=2)
    assert np.allclose(share2[C:], 0.5)  # full state: 2 of the 4 kept tokens are recent
    assert share2[0, 0] == 1.0  # one kept token, and it is recent
    ages = analysis.kept_ages(pos, start=C)
    assert set(ages.tolist()) == set(range(C)) and ages.size == 2 * (T - C) * C
    assert analysis.kept_ages(pos, layer=1).size == sum(min(t + 1, C) for t in range(T))


def test_first_token_kept_per_layer():
    T, C = 7, 3
    pos = np.concatenate([window_pos(T, C), window_pos(T, C)], 1)  # 2 layers
    pos[:, 1, :, :, 0] = 0  # layer 1 keeps the first token in slot 0
    assert analysis.first_token_kept(pos).tolist() == [False, True]
    assert analysis.first_token_kept(window_pos(3, 3)).tolist() == [True]  # never full


def test_retention_by_kind():
    T, C = 8, 2
    pos = window_pos(T, C, B=2)
    kinds = np.array([["other", "quote", "digit", "quote", "newline", "other", "other", "other"]] * 2)
    stats = analysis.retention_by_kind(pos, kinds)  # positions 1..3 (upto = T // 2)
    assert set(stats) == set(analysis.TOKEN_KINDS)
    assert stats["quote"] == (2.0, 4) and stats["digit"] == (2.0, 2)
    assert np.isnan(stats["newline"][0]) and stats["newline"][1] == 0
    assert stats["other"][1] == 0  # position 0 skipped, 5.. beyond upto
    with_first = analysis.retention_by_kind(pos, kinds, upto=T, skip_first=False)
    assert with_first["other"] == (np.mean([2, 2, 2, 1] * 2), 8)


def test_first_token_attention():
    a = np.full((3, 2, 2, 5), 0.1, np.float32)  # [L, B, Hkv, T]
    a[..., 0] = 0.6
    a[1, :, :, 3] = 0.0
    out = analysis.first_token_attention(a)
    assert np.allclose(out["first"], 0.6)
    assert np.allclose(out["median_other"], 0.1)
    assert np.allclose(out["min_other"], [0.1, 0.0, 0.1])
    assert np.allclose(out["uniform"], 0.2)


# -- recordings of a tiny model --------------------------------------------------------
@pytest.mark.parametrize("policy,capacity", [("tova", 4), ("window", 4), ("h2o-head", 6), ("full", None)])
def test_record_run_matches_run_policy(tiny, policy, capacity):
    params, tokens = tiny
    T = tokens.shape[1]
    rec = analysis.record_run(api.Model(CFG, params), policy, capacity, tokens, steps_per_call=5)
    run = evaluate.run_policy(api.Model(CFG, params, None, "tiny"), policy, capacity, tokens)
    C = T if policy == "full" else capacity
    assert rec.policy == policy and rec.capacity == C
    assert rec.nll.shape == (2, T - 1) and rec.pos.shape == (T, CFG.num_layers, 2, CFG.num_kv_heads, C)
    np.testing.assert_allclose(rec.nll, run.nll, rtol=1e-4, atol=1e-5)
    assert rec.ppl == pytest.approx(run.ppl, rel=1e-4)
    # the record ends where the run's state ends (run_policy does not read the last token)
    np.testing.assert_array_equal(rec.pos[T - 2], np.asarray(run.state.pos))
    kept = (rec.pos >= 0).sum(-1)  # one new token per step until full
    assert kept[:, 0, 0, 0].tolist() == [min(t + 1, C) for t in range(T)]


def test_record_run_window_is_the_last_c_tokens(tiny):
    params, tokens = tiny
    rec = analysis.record_run(api.Model(CFG, params), "window", 3, tokens)
    for t in range(tokens.shape[1]):
        assert sorted(rec.pos[t, 1, 0, 1].tolist()) == sorted(
            list(range(max(0, t - 2), t + 1)) + [-1] * max(0, 2 - t))


def test_record_policies_equals_one_run_per_policy(tiny):
    params, tokens = tiny
    names = ["window", "sink", "h2o", "tova", "tova-head"]
    recs = analysis.record_policies(api.Model(CFG, params), names, 5, tokens, sinks=2, steps_per_call=4)
    assert list(recs) == names
    for name in names:
        alone = analysis.record_run(api.Model(CFG, params), name, 5, tokens, sinks=2)
        rec = recs[name]
        assert rec.policy == name and rec.capacity == 5
        np.testing.assert_array_equal(rec.tokens, tokens)
        np.testing.assert_array_equal(rec.pos, alone.pos)
        np.testing.assert_allclose(rec.nll, alone.nll, rtol=1e-5, atol=1e-5)
    one = analysis.record_policies(api.Model(CFG, params), ["tova"], 5, tokens)
    np.testing.assert_array_equal(one["tova"].pos, recs["tova"].pos)


def test_record_policies_rejects_full_and_duplicates(tiny):
    params, tokens = tiny
    for bad in (["full", "tova"], ["tova", "tova"], []):
        with pytest.raises(Exception, match="distinct bounded"):
            analysis.record_policies(api.Model(CFG, params), bad, 4, tokens)


def test_record_run_rejects_bad_input(tiny):
    params, tokens = tiny
    with pytest.raises(Exception):
        analysis.record_run(api.Model(CFG, params), "tova", None, tokens)
    with pytest.raises(Exception):
        analysis.record_run(api.Model(CFG, params), "tova", 4, tokens[:, :1])
    with pytest.raises(Exception):
        analysis.record_run(api.Model(CFG, params), "sink", 4, tokens, sinks=4)


# -- figures ---------------------------------------------------------------------------
def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_notebook_figures_render():
    from matplotlib.figure import Figure

    figs = [
        plots.plot_state_bytes([1, 2, 3], {"full": [10, 20, 30], "tova C=2": [20, 20, 20]}),
        plots.plot_kept_maps({f"layer {i}": analysis.kept_map(window_pos(6, 2), 0) for i in range(7)},
                             ncols=3, title="maps"),
        plots.plot_kept_maps({"one": np.eye(4, dtype=bool)}),
        plots.plot_per_layer({"a": [1.0, 2.0], "b": [0.5, 0.1]}, "weight", logy=True),
        plots.plot_lines([0, 1, 2], {"loss": [3.0, 2.0, 1.5]}, "step", "loss"),
        plots.plot_bars({"x": 1.0, "y": 2.0}, "steps", annotations={"x": "n=3"}),
        plots.plot_histograms({"a": np.arange(10), "b": np.ones(3)}, "age"),
    ]
    for fig in figs:
        assert isinstance(fig, Figure)
        assert _png(fig).startswith(b"\x89PNG")
