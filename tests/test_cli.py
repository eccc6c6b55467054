"""The `msrnn` command: success paths on a tiny model, and every bad input of docs/design.md §6
as one line `msrnn: error: ...`, the right exit status, no traceback, no partial output."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msrnn_jax.cli import main

from hf_models import make_hf_model, save_hf_model, save_tiny_model

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness. Paris is the capital of France.\n") * 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "book.txt"
    p.write_text(TEXT, encoding="utf-8")
    return str(p)


def run_cli(capsys, *argv):
    capsys.readouterr()  # only what the command itself prints
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, status, needle=""):
    assert code == status, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("msrnn: error: "), err
    assert "Traceback" not in err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert out == ""


# -- usage errors: exit 2 -----------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    ([], "command is required"),
    (["frobnicate"], "invalid choice"),
    (["ppl", "{text}", "--policy", "lru", "--capacity", "8"], "unknown policy"),
    (["ppl", "{text}", "--policy", "tova", "--capacity", "0"], "--capacity must be >= 1"),
    (["ppl", "{text}", "--policy", "tova"], "--capacity"),
    (["ppl", "{text}", "--policy", "sink", "--capacity", "4", "--sinks", "4"], "capacity > sinks"),
    (["ppl", "{text}", "--policy", "full", "--tokens", "1"], "--tokens must be >= 2"),
    (["ppl", "{text}", "--policy", "full", "--tokens", "100000", "--model", "{model}"], "trained context"),
    (["ppl", "{text}", "--policy", "full", "--prefill", "chunked"], "--chunk"),
    (["generate", "--model", "{model}"], "empty prompt"),
    (["generate", "   ", "--model", "{model}"], "empty prompt"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "hi", "--temperature", "0"], "--temperature must be > 0"),
    (["generate", "hi", "--temperature", "-1"], "--temperature must be > 0"),
    (["generate", "hi", "--temperature", "2.5"], "--temperature must be in [0.0, 2.0]"),  # the one rule
    (["generate", "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "hi", "--top-k", "0"], "--top-k must be >= 1"),
    (["generate", "hi", "--greedy", "--temperature", "0.7"], "--greedy"),
    (["generate", "hi", "--policy", "tova"], "needs --capacity"),
    (["serve", "--prefill-share", "0"], "--prefill-share must be in (0.0, 1.0]"),
    (["serve", "--prefill-share", "1.5"], "--prefill-share must be in (0.0, 1.0]"),
    (["serve", "--port", "70000"], "--port must be in [0, 65535]"),
    (["serve", "--policy", "tova,full"], "full cannot share the state"),
    (["serve", "--policies", "tova,window,h2o", "--max-batch", "2"], "--max-batch 2 gives no row"),
    (["serve", "--policy", "tova,sink", "--capacity", "4", "--sinks", "4"], "capacity > sinks"),
])
def test_usage_errors(capsys, tiny, text_file, argv, needle):
    argv = [a.format(text=text_file, model=tiny) for a in argv]
    assert_one_line_error(*run_cli(capsys, *argv), 2, needle)


def test_prompts_file_with_empty_line(capsys, tiny, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("first prompt\n\nthird\n")
    assert_one_line_error(*run_cli(capsys, "generate", "--prompts", f, "--model", tiny), 2, "line 2 is empty")


# -- other errors: exit 1 ------------------------------------------------------------------
def test_missing_empty_non_utf8_files(capsys, tiny, tmp_path):
    assert_one_line_error(*run_cli(capsys, "ppl", tmp_path / "nope.txt", "--policy", "full"), 1, "not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_one_line_error(*run_cli(capsys, "ppl", empty, "--policy", "full"), 1, "empty")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café crème".encode("latin-1"))
    assert_one_line_error(*run_cli(capsys, "ppl", latin, "--policy", "full"), 1, "not UTF-8")
    assert_one_line_error(*run_cli(capsys, "ppl", tmp_path, "--policy", "full"), 1, "directory")


def test_model_errors(capsys, text_file, tmp_path):
    args = ["ppl", text_file, "--policy", "full", "--tokens", "16", "--model"]
    assert_one_line_error(*run_cli(capsys, *args, tmp_path / "no-such-model"), 1, "not found")

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    assert_one_line_error(*run_cli(capsys, *args, gpt2), 1, "gpt2")

    yarn = Path(save_hf_model(make_hf_model("llama-gqa"), tmp_path / "yarn"))
    cfg = json.loads((yarn / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    cfg.pop("rope_parameters", None)
    (yarn / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_cli(capsys, *args, yarn), 1, "yarn")

    broken = Path(save_hf_model(make_hf_model("llama-gqa"), tmp_path / "broken"))
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    assert_one_line_error(*run_cli(capsys, *args, broken), 1, "")

    bad_gguf = tmp_path / "model.gguf"
    bad_gguf.write_bytes(b"GGUF" + os.urandom(100))
    assert_one_line_error(*run_cli(capsys, *args, bad_gguf), 1, "")


def test_convert_refuses_non_empty_output(capsys, tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(*run_cli(capsys, "convert", tiny, out), 1, "")
    assert (out / "keep.txt").read_text() == "mine"


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    """The console script itself: one line, status, nothing on stdout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for argv, status in [(["ppl", str(tmp_path / "missing.txt"), "--policy", "full"], 1),
                         (["ppl", str(tmp_path), "--policy", "tova"], 2),
                         (["generate", "x", "--policy", "nope"], 2)]:
        p = subprocess.run([sys.executable, "-m", "msrnn_jax.cli", *argv], capture_output=True,
                           text=True, env=env, timeout=120)
        assert p.returncode == status, p.stderr
        assert p.stdout == ""
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("msrnn: error: "), p.stderr


def test_compiled_programs_persist_between_runs(tiny, tmp_path):
    """`msrnn` keeps XLA's compiled programs in $MSRNN_CACHE/xla: a second run of the same
    command loads them (nothing new is written) and prints the same tokens."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the suite's own
    env.update(HF_HUB_OFFLINE="1", MSRNN_CACHE=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # the tiny model compiles fast
    argv = [sys.executable, "-m", "msrnn_jax.cli", "generate", "a b c", "--model", tiny,
            "--policy", "tova", "--capacity", "8", "--max-new-tokens", "6"]

    def run(**extra):
        p = subprocess.run(argv, capture_output=True, text=True, env={**env, **extra}, timeout=300)
        assert p.returncode == 0, p.stderr
        return p.stdout

    first = run()
    cached = sorted(p.name for p in (tmp_path / "cache" / "xla").iterdir())
    assert any(name.startswith("jit_decode_rows") for name in cached), cached
    assert run() == first
    assert sorted(p.name for p in (tmp_path / "cache" / "xla").iterdir()) == cached


def test_compile_cache_keeps_the_users_and_turns_off(monkeypatch, tmp_path):
    """A cache folder already chosen (here the suite's own, JAX_COMPILATION_CACHE_DIR) is
    kept; MSRNN_COMPILE_CACHE=0 turns the cache off without touching JAX's setting."""
    import jax

    from msrnn_jax import use_compile_cache

    chosen = jax.config.jax_compilation_cache_dir
    assert chosen == os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert use_compile_cache(tmp_path / "other") == Path(chosen)
    monkeypatch.setenv("MSRNN_COMPILE_CACHE", "0")
    assert use_compile_cache(tmp_path / "other") is None
    assert jax.config.jax_compilation_cache_dir == chosen and not (tmp_path / "other").exists()


# -- success paths ---------------------------------------------------------------------------
def test_ppl_json_csv_plot_sweep(capsys, tiny, text_file, tmp_path):
    csv_path, png = tmp_path / "r.csv", tmp_path / "r.png"
    code, out, err = run_cli(capsys, "ppl", text_file, "--model", tiny, "--policy", "full,window,tova",
                             "--capacity", "8,16", "--tokens", "48", "--json", "--csv", csv_path,
                             "--plot", png)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["policy"], r["capacity"]) for r in rows] == [
        ("full", 48), ("window", 8), ("tova", 8), ("window", 16), ("tova", 16)]
    for r in rows:
        assert {"policy", "capacity", "tokens", "mean_nll", "ppl", "tokens_per_s"} <= set(r)
        assert r["tokens"] == 48 and math.isclose(r["ppl"], math.exp(r["mean_nll"]), rel_tol=1e-9)
        assert r["tokens_per_s"] > 0
    assert csv_path.read_text().splitlines()[0].startswith("policy,capacity,tokens")
    assert len(csv_path.read_text().splitlines()) == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fused_sweep_equals_one_policy_at_a_time(capsys, tiny, text_file):
    """Policies sharing a run as batch rows give what each gives alone."""
    argv = ["ppl", text_file, "--model", tiny, "--policy", "window,sink,tova,tova-head,h2o,h2o-head",
            "--capacity", "6,12", "--sinks", "2", "--tokens", "40", "--json"]
    code, fused, err = run_cli(capsys, *argv)
    assert code == 0, err
    code, alone, err = run_cli(capsys, *argv, "--no-fuse")
    assert code == 0, err
    fused = {(r["policy"], r["capacity"]): r for r in map(json.loads, fused.splitlines())}
    alone = {(r["policy"], r["capacity"]): r for r in map(json.loads, alone.splitlines())}
    assert fused.keys() == alone.keys() and len(fused) == 12
    for k in fused:
        assert fused[k]["shared_with"] == 6 and alone[k]["shared_with"] == 1
        assert abs(fused[k]["mean_nll"] - alone[k]["mean_nll"]) < 1e-5, k
    # and the policies really differ from one another
    assert len({round(r["mean_nll"], 6) for r in fused.values()}) > 6


def test_ppl_full_equals_transformers_cross_entropy(capsys, tiny, text_file):
    """mean_nll of `msrnn ppl --policy full` is transformers' mean next-token loss."""
    import transformers

    code, out, err = run_cli(capsys, "ppl", text_file, "--model", tiny, "--policy", "full",
                             "--tokens", "40", "--json")
    assert code == 0, err
    got = json.loads(out)["mean_nll"]
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    ids = torch.tensor([tok(TEXT)["input_ids"][:40]])
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(ids, labels=ids).loss.item()
    assert abs(got - want) / want < 1e-5


def test_ppl_batch_windows(capsys, tiny, text_file):
    code, out, err = run_cli(capsys, "ppl", text_file, "--model", tiny, "--policy", "tova",
                             "--capacity", "8", "--tokens", "24", "--batch", "3", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["batch"] == 3 and r["tokens"] == 24


def test_generate_greedy_and_batch(capsys, tiny, tmp_path):
    code, out, err = run_cli(capsys, "generate", "Paris is the", "--model", tiny, "--max-new-tokens", "6")
    assert code == 0, err
    assert out.strip()
    prompts = tmp_path / "p.txt"
    prompts.write_text("Paris is the\nThe quick brown fox jumps\n")
    code, out2, err = run_cli(capsys, "generate", "--prompts", prompts, "--model", tiny,
                              "--max-new-tokens", "6", "--policy", "tova", "--capacity", "8", "--stats")
    assert code == 0, err
    assert out2.count("---") == 1
    assert "time to first token" in err and "tokens/s" in err and "bytes" in err


def test_convert_then_load_gives_same_output(capsys, tiny, tmp_path):
    out = tmp_path / "converted"
    code, _, err = run_cli(capsys, "convert", tiny, out, "--dtype", "float32")
    assert code == 0, err
    a = run_cli(capsys, "generate", "Paris is the", "--model", tiny, "--max-new-tokens", "5")
    b = run_cli(capsys, "generate", "Paris is the", "--model", out, "--max-new-tokens", "5")
    assert a[0] == b[0] == 0 and a[1] == b[1]


def test_saved_state_continues_and_refuses_mismatches(capsys, tiny, tmp_path):
    saved = tmp_path / "state"
    code, out, err = run_cli(capsys, "generate", "Paris is the", "--model", tiny, "--policy", "tova",
                             "--capacity", "16", "--max-new-tokens", "4", "--save-state", saved)
    assert code == 0, err
    assert (saved / "state.json").is_file()
    code, out, err = run_cli(capsys, "generate", "capital", "--model", tiny, "--policy", "tova",
                             "--capacity", "16", "--max-new-tokens", "4", "--load-state", saved)
    assert code == 0, err
    code, out2, err = run_cli(capsys, "generate", "capital", "--model", tiny, "--policy", "tova",
                              "--max-new-tokens", "4", "--load-state", saved)  # capacity from the state
    assert code == 0, err
    assert out2 == out
    # another capacity, another policy, another model
    assert_one_line_error(*run_cli(capsys, "generate", "x", "--model", tiny, "--policy", "tova",
                                   "--capacity", "8", "--load-state", saved), 2, "capacity")
    assert_one_line_error(*run_cli(capsys, "generate", "x", "--model", tiny, "--policy", "window",
                                   "--capacity", "16", "--load-state", saved), 2, "policy")
    other = save_tiny_model(tmp_path / "other", seed=5)
    assert_one_line_error(*run_cli(capsys, "generate", "x", "--model", other, "--policy", "tova",
                                   "--capacity", "16", "--load-state", saved), 2, "another model")
    assert_one_line_error(*run_cli(capsys, "generate", "x", "--model", tiny, "--policy", "tova",
                                   "--capacity", "16", "--load-state", tmp_path), 1, "not a saved state")


def test_chat_state_carries_across_turns(capsys, tiny, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\nwhat is the capital?\n"))
    code, out, err = run_cli(capsys, "chat", "--model", tiny, "--policy", "tova", "--capacity", "24",
                             "--max-new-tokens", "5", "--stats")
    assert code == 0, err
    stats = [line for line in err.splitlines() if line.startswith("[stats]")]
    assert len(stats) == 2  # two turns (the blank line is skipped)
    assert all("capacity 24" in s for s in stats)


def test_chat_under_full_keeps_the_whole_conversation(capsys, tiny, monkeypatch):
    """`full` never drops a token: the chat's state has the trained context's slots from
    the first turn on (a state sized to the first turn would have to drop tokens later)."""
    import io
    import json
    from pathlib import Path

    limit = json.loads((Path(tiny) / "config.json").read_text())["max_position_embeddings"]
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand again\nonce more\n"))
    code, out, err = run_cli(capsys, "chat", "--model", tiny, "--policy", "full", "--max-new-tokens", "40",
                             "--stats")
    assert code == 0, err
    stats = [line for line in err.splitlines() if line.startswith("[stats]")]
    assert len(stats) == 3 and all(f"capacity {limit})" in s for s in stats), stats


def test_state_dtype_on_ppl_generate_and_saved_states(capsys, tiny, text_file, tmp_path):
    """--state-dtype: every ppl --json line carries the state's dtype and bytes (8 bits and
    a float32 scale per slot: under half of float32's at this tiny head size of 8); an
    8-bit state is saved and continued as itself, and one stored otherwise is refused."""
    rows = {}
    for dtype in ("float32", "int8", "fp8"):
        code, out, err = run_cli(capsys, "ppl", text_file, "--model", tiny, "--policy", "tova", "--capacity",
                                 "16", "--tokens", "40", "--state-dtype", dtype, "--json")
        assert code == 0, err
        rows[dtype] = json.loads(out)
    assert {r["state_dtype"] for r in rows.values()} == {"float32", "int8", "fp8"}
    assert rows["int8"]["state_bytes"] == rows["fp8"]["state_bytes"] < 0.5 * rows["float32"]["state_bytes"]
    assert abs(rows["int8"]["mean_nll"] / rows["float32"]["mean_nll"] - 1) < 0.02
    saved = tmp_path / "state"
    code, out, err = run_cli(capsys, "generate", "Paris is the", "--model", tiny, "--policy", "tova",
                             "--capacity", "16", "--max-new-tokens", "4", "--state-dtype", "int8",
                             "--save-state", saved)
    assert code == 0, err
    assert json.loads((saved / "state.json").read_text())["dtype"] == "int8"
    code, out, err = run_cli(capsys, "generate", "capital", "--model", tiny, "--policy", "tova",
                             "--max-new-tokens", "4", "--state-dtype", "int8", "--load-state", saved, "--stats")
    assert code == 0, err
    assert_one_line_error(*run_cli(capsys, "generate", "capital", "--model", tiny, "--policy", "tova",
                                   "--state-dtype", "fp8", "--load-state", saved), 2, "stores int8")
    assert_one_line_error(*run_cli(capsys, "ppl", text_file, "--model", tiny, "--policy", "tova",
                                   "--capacity", "16", "--state-dtype", "int4"), 2, "int4")
