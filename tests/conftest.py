"""Suite-wide hygiene: one pytest process runs every module, so each module's compiled
programs are dropped when it ends (the suite compiles many hundreds of small programs;
keeping them all alive grew the process and once ended in an abort inside XLA's compiler
late in a CI run)."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    yield
    import jax

    jax.clear_caches()
    gc.collect()
