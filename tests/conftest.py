"""Suite-wide hygiene: one pytest process runs every module, so each module's compiled
programs are dropped when it ends (the suite compiles many hundreds of small programs;
keeping them all alive grew the process and once ended in an abort inside XLA's compiler
late in a CI run).

The run's compiled programs persist in a fresh folder of its own (JAX's compilation
cache, as `msrnn` keeps one in ~/.cache/msrnn_jax/xla): a program that another test or a
test's child process already compiled in this run is loaded, not compiled again. Every
run starts empty, and the user's own cache is never read or written."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile

import pytest

_XLA_CACHE = tempfile.mkdtemp(prefix="msrnn-tests-xla-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE  # before jax loads: here and in children


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


# The longest modules first: with `-n 2 --dist loadfile` (the README's command) a module runs
# on one worker, and one of these started last would run on alone at the end.
_FIRST = ("test_sharding.py", "test_notebooks.py", "test_eval.py", "test_convert.py", "test_readme.py",
          "test_serve.py", "test_benchmark_smoke.py", "test_real_model.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(_FIRST)))  # stable: the rest as collected


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    yield
    import jax

    jax.clear_caches()
    gc.collect()


# -- the tiny model most modules share (a module that means something else by `tiny` defines
# its own, which takes precedence) ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with a working tokenizer, saved as a HF folder once per module."""
    from hf_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """That model, loaded (`msrnn_jax.load_model`)."""
    import msrnn_jax

    return msrnn_jax.load_model(tiny_dir)
