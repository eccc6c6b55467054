"""What a new user meets in the first hour: interrupts, output paths checked before any
work, file modes, help texts, case-insensitive policies, convert --overwrite, chat on a
terminal (Ctrl-C, Ctrl-D, /exit)."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msrnn_jax import cli

from test_cli import assert_one_line_error, run_cli, text_file, tiny  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")


def communicate_or_dump(p, timeout):
    """`p.communicate(timeout)`; if the child is still running then, abort it so that
    faulthandler prints every thread's stack, and fail with that instead of a bare timeout."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)
        out, err = p.communicate(timeout=30)
        pytest.fail(f"still running {timeout} s after the signal; its threads:\n{err[-8000:]}")


@pytest.fixture(autouse=True)
def sigint_as_on_a_terminal():
    """Every child of these tests starts with SIGINT at its default, as a foreground
    command on a terminal does. A background job of a non-interactive shell (`pytest &`,
    as .ci/gpu-suite starts its groups) inherits SIGINT ignored, its children too, and
    Python then installs no KeyboardInterrupt handler. A handler here (not SIG_IGN) is
    reset to the default by exec, so no child needs a preexec_fn (which forks)."""
    old = signal.getsignal(signal.SIGINT)
    if old == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def msrnn(*argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "msrnn_jax.cli", *map(str, argv)], cwd=REPO,
                            env=ENV, text=True, **kw)


def test_sigint_stops_a_long_ppl_at_once(tiny, text_file, tmp_path):
    """Ctrl-C during a sweep that compiles one program per capacity: exit 130 within a few
    seconds with one line, the JSON lines already printed kept, no CSV or temporary left."""
    caps = ",".join(str(c) for c in range(4, 60))
    csv_path = tmp_path / "out.csv"
    p = msrnn("ppl", text_file, "--model", tiny, "--policy", "window,tova", "--capacity", caps,
              "--tokens", "48", "--json", "--csv", csv_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = p.stdout.readline()  # a result is out: the sweep is well under way
        assert first, p.stderr.read()
        time.sleep(0.5)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = communicate_or_dump(p, 30)
        waited = time.monotonic() - t0
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "msrnn: interrupted", err
    assert "Traceback" not in err
    assert waited < 5, f"took {waited:.1f} s to stop"
    for line in [first, *out.splitlines()]:
        assert json.loads(line)["policy"] in ("window", "tova")
    assert not csv_path.exists() and list(tmp_path.iterdir()) == []


def test_output_paths_are_checked_before_the_model_loads(capsys, text_file, tmp_path, monkeypatch):
    from msrnn_jax.run import api

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(api, "load_model", no_load)
    missing = tmp_path / "missing" / "x.csv"
    assert_one_line_error(*run_cli(capsys, "ppl", text_file, "--csv", missing), 1, "folder does not exist")
    assert_one_line_error(*run_cli(capsys, "ppl", text_file, "--plot", tmp_path / "missing" / "p.png"),
                          1, "folder does not exist")
    assert_one_line_error(*run_cli(capsys, "ppl", text_file, "--plot", tmp_path / "p.jpg"), 2, "--plot")
    assert_one_line_error(*run_cli(capsys, "ppl", text_file, "--csv", tmp_path), 1, "folder")
    taken = tmp_path / "state"
    taken.mkdir()
    (taken / "x").write_text("mine")
    assert_one_line_error(*run_cli(capsys, "generate", "hi", "--save-state", taken), 1, "already exists")
    assert (taken / "x").read_text() == "mine"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(capsys, tiny, text_file, tmp_path, umask):
    old = os.umask(umask)
    try:
        code, _, err = run_cli(capsys, "ppl", text_file, "--model", tiny, "--policy", "full",
                               "--tokens", "24", "--csv", tmp_path / "r.csv", "--plot", tmp_path / "r.png")
    finally:
        os.umask(old)
    assert code == 0, err
    for name in ("r.csv", "r.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_every_flag_has_help_and_the_defaults_show():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"generate", "chat", "ppl", "convert"}
    for name, q in sub.choices.items():
        for action in q._actions:
            if action.dest != "help":
                assert action.help, f"msrnn {name} {action.option_strings or action.dest} has no help"
        text = q.format_help()
        assert "examples:" in text, name
    gen = sub.choices["generate"].format_help()
    assert "(default: full)" in gen and "(default: 128)" in gen
    assert "(default: full)" in sub.choices["ppl"].format_help()  # ppl and generate agree


def test_policy_names_ignore_case(capsys, tiny, text_file):
    code, out, err = run_cli(capsys, "ppl", text_file, "--model", tiny, "--policy", "TOVA,Window",
                             "--capacity", "8", "--tokens", "24", "--json")
    assert code == 0, err
    assert [json.loads(line)["policy"] for line in out.splitlines()] == ["tova", "window"]


def test_convert_overwrite_is_what_the_message_names(capsys, tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "convert", tiny, out)
    assert code == 1 and "--overwrite" in err, err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, "convert", tiny, out, "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "msrnn.json").is_file()


def test_chat_on_a_terminal(tiny):
    """Driven through a pseudo-terminal: a banner says how to quit, Ctrl-C stops an endless
    reply and returns to the prompt, the chat goes on, and Ctrl-D exits 0."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "msrnn_jax.cli", "chat", "--model", str(tiny),
                                           "--policy", "window", "--capacity", "16",
                                           "--max-new-tokens", "100000000"],
                          cwd=str(REPO), env=ENV, encoding="utf-8", timeout=120)
    try:
        child.expect("Ctrl-D or /exit")
        child.expect("> ")
        child.sendline("hello there")
        time.sleep(3)  # the reply streams (a window policy never runs out of room)
        child.sendintr()
        child.expect(r"\[reply interrupted\]", timeout=30)
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=60)
        child.close()
        assert child.exitstatus == 0, child.before
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)


def test_chat_ctrl_d_exits_cleanly(tiny):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "msrnn_jax.cli", "chat", "--model", str(tiny),
                                           "--policy", "window", "--capacity", "16"],
                          cwd=str(REPO), env=ENV, encoding="utf-8", timeout=120)
    try:
        child.expect("> ")
        child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, not the end
        child.expect("> ")
        child.sendeof()
        child.expect(pexpect.EOF, timeout=60)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)


# -- the newcomer's list ------------------------------------------------------------------------
def test_version_and_the_top_level_help_lists_every_command(capsys):
    from msrnn_jax import __version__

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"msrnn {__version__}"
    from importlib.metadata import PackageNotFoundError, version
    try:  # the installed package's own version ("0+unknown" only where it is not installed)
        assert __version__ == version("msrnn-jax") != "0+unknown"
    except PackageNotFoundError:
        assert __version__ == "0+unknown"
    import msrnn_jax

    assert "importlib" not in dir(msrnn_jax) and not hasattr(msrnn_jax, "importlib")
    assert len(msrnn_jax.__all__) == len(set(msrnn_jax.__all__)) <= 30  # a curated API
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("generate", "chat", "ppl", "eval", "serve", "convert"):
        assert f"    {command} " in out, (command, out)


def test_eval_help_shows_defaults_as_values(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 1024)" in out and "(default: 0,0.25,0.5,0.75,1)" in out
    assert "[1024]" not in out and "default: [" not in out


def test_serve_on_a_busy_port_is_one_line(tiny):
    """A port another process holds: one `msrnn: error:` line naming it, exit 1, at once
    (the port is bound before the model loads)."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        p = msrnn("serve", "--model", tiny, "--port", port, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = communicate_or_dump(p, 120)
    lines = err.strip().splitlines()
    assert p.returncode == 1, err
    assert lines == [f"msrnn: error: cannot listen on 127.0.0.1:{port}: the port is already in use"], err
    assert out == ""


def test_chat_says_when_a_reply_is_cut(tiny):
    """A reply that reaches --max-new-tokens without its end of turn says so on stderr;
    the chat goes on."""
    p = msrnn("chat", "--model", tiny, "--policy", "window", "--capacity", "16", "--max-new-tokens", "3",
              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = communicate_or_dump_input(p, "hello there\nand again\n", 180)
    assert p.returncode == 0, err
    cut = [line for line in err.splitlines() if line.startswith("[reply cut at 3 tokens")]
    assert len(cut) == 2 and "--max-new-tokens" in cut[0], err
    assert len(out.splitlines()) == 2, out  # one line of reply per turn


def communicate_or_dump_input(p, text, timeout):
    try:
        return p.communicate(text, timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate(timeout=30)
        pytest.fail(f"still running after {timeout} s:\n{err[-8000:]}")


def test_a_warning_prints_above_the_progress_bar(tmp_path, text_file):
    """On a terminal, a warning during a sweep (a bounded policy past a trained context of
    32) is a line of its own above the live bar, not text appended to the bar's line."""
    pexpect = pytest.importorskip("pexpect")
    from hf_models import save_tiny_model

    model = save_tiny_model(tmp_path / "short", max_position_embeddings=32)
    child = pexpect.spawn(sys.executable, ["-m", "msrnn_jax.cli", "ppl", text_file, "--model", model,
                                           "--policy", "window,tova", "--capacity", "8,16", "--tokens", "200"],
                          cwd=str(REPO), env=ENV, encoding="utf-8", timeout=180)
    try:
        child.expect(pexpect.EOF)
        child.close()
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)
    assert child.exitstatus == 0, child.before
    segments = [s.strip() for s in re.split(r"[\r\n]", child.before) if s.strip()]
    warned = [s for s in segments if "msrnn: warning:" in s]
    assert warned and all(s.startswith("msrnn: warning:") for s in warned), segments
    assert any(s.startswith("perplexity, ") for s in segments), segments  # the bar was live
    assert "trained context of 32" in warned[0]


def test_ppl_notes_that_full_ignores_capacity(capsys, tiny, text_file):
    code, out, err = run_cli(capsys, "ppl", text_file, "--model", tiny, "--policy", "full", "--capacity", "64",
                             "--tokens", "16")
    assert code == 0, err
    assert "msrnn: note: the full policy keeps every token and ignores --capacity" in err
