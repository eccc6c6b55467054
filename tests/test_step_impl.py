"""The two layer loops of `step` (lax.scan over stacked layers, the library default;
unrolled over `split_layers` params, what the GPU benchmarks run) compute the same thing,
and neither copies the state inside a compiled decode loop."""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msrnn_jax.config import preset
from msrnn_jax.core.parallel import chunk_step, forward_parallel
from msrnn_jax.fast.layouts import fuse_projections, split_layers
from msrnn_jax.fast.layer_major import layer_scan
from msrnn_jax.core.step import scan
from msrnn_jax import testing
from msrnn_jax.core.policies import make_policy
from msrnn_jax.fast.attention import StepImpl
from msrnn_jax.run.spec import RunSpec


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny")
    return cfg, testing.device_params(cfg, jnp.float32)


@pytest.mark.parametrize("pname", ["tova", "window", "sink", "h2o-head"])
def test_split_layers_step_matches_scan(tiny, pname):
    cfg, params = tiny
    pol = make_policy(pname)
    st = testing.fabricate_state(cfg, 3, 8, 6, jnp.float32)  # partly empty: fills, then evicts
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (3, 7)), jnp.int32)
    logits_a, st_a = scan(params, cfg, pol, jax.tree.map(jnp.copy, st), tokens, emit="logits")
    logits_b, st_b = scan(split_layers(params), cfg, pol, st, tokens, emit="logits")
    np.testing.assert_allclose(np.asarray(logits_a), np.asarray(logits_b), rtol=1e-5, atol=1e-5)
    assert (np.asarray(st_a.pos) == np.asarray(st_b.pos)).all()
    np.testing.assert_allclose(np.asarray(st_a.keys), np.asarray(st_b.keys), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(st_a.values), np.asarray(st_b.values), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["tiny", "qwen2"])
def test_fused_projections_compute_the_same(kind):
    """`fuse_projections` (q|k|v and gate|up joined, what the `fused:` benchmark variant
    runs) gives the same logits and kept positions, stepped and layer by layer, with and
    without the q/k/v biases; the fused layout holds no separate wq or w_gate."""
    cfg = preset("tiny")
    if kind == "qwen2":
        cfg = dataclasses.replace(cfg, family="qwen2", qkv_bias=True)
    params = testing.device_params(cfg, jnp.float32)
    fused = fuse_projections(split_layers(params))
    assert "wqkv" in fused["layers"][0] and "wq" not in fused["layers"][0] and "w_gate" not in fused["layers"][0]
    assert ("bqkv" in fused["layers"][0]) == cfg.qkv_bias
    pol = make_policy("tova")
    st = testing.fabricate_state(cfg, 2, 8, 6, jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, cfg.vocab_size, (2, 9)), jnp.int32)
    logits_a, st_a = scan(params, cfg, pol, jax.tree.map(jnp.copy, st), tokens, emit="logits")
    logits_b, st_b = scan(fused, cfg, pol, jax.tree.map(jnp.copy, st), tokens, emit="logits")
    np.testing.assert_allclose(np.asarray(logits_a), np.asarray(logits_b), rtol=1e-5, atol=1e-5)
    assert (np.asarray(st_a.pos) == np.asarray(st_b.pos)).all()
    nll_a, lm_a = layer_scan(params, cfg, pol, jax.tree.map(jnp.copy, st), tokens, emit="nll", targets=tokens)
    nll_b, lm_b = layer_scan(fuse_projections(params), cfg, pol, st, tokens, emit="nll", targets=tokens)
    np.testing.assert_allclose(np.asarray(nll_a), np.asarray(nll_b), rtol=1e-5, atol=1e-5)
    assert (np.asarray(lm_a.pos) == np.asarray(lm_b.pos)).all()


@pytest.mark.parametrize("split", [False, True], ids=["scan", "split"])
@pytest.mark.parametrize("pname", ["tova", "window"])
def test_decode_loop_has_no_state_copy(tiny, split, pname):
    """The optimised HLO of a compiled 4-step decode holds no copy as large as one layer's
    keys: the state is updated in place. (Unrolled layers once copied the whole keys and
    values buffers every step: the last layer's reads were not ordered before the write.)"""
    cfg, params = tiny
    prm = split_layers(params) if split else params
    st, tok = testing.decode_inputs(cfg, 64, 256, jnp.float32)
    compiled = testing.greedy_decode.lower(prm, cfg, make_policy(pname), 4, st, tok).compile()
    assert testing.state_copies(compiled, cfg, 256, 64) == []


@pytest.mark.parametrize("variant", ["split:reduce", "scan:reduce", "unroll:einsum:nobar", "split:pallas", "scan:pallas"])
def test_step_implementations_agree(tiny, variant):
    """Every StepImpl the benchmarks time decodes the same tokens into the same state."""
    cfg, params = tiny
    pol = make_policy("tova")
    st = testing.fabricate_state(cfg, 2, 8, 20, jnp.float32)
    tok = jnp.ones((2,), jnp.int32)
    ref_toks, ref = testing.greedy_decode(params, cfg, pol, 5, jax.tree.map(jnp.copy, st), tok)
    split, impl = testing.parse_variant(variant)
    prm = split_layers(params) if split else params
    toks, out = testing.greedy_decode(prm, cfg, pol, 5, st, tok, impl)
    assert np.asarray(toks).tolist() == np.asarray(ref_toks).tolist()
    assert (np.asarray(out.pos) == np.asarray(ref.pos)).all()
    np.testing.assert_allclose(np.asarray(out.values), np.asarray(ref.values), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["split", "fused"])
def test_split_layout_model_gives_the_same_results(tmp_path, layout):
    """load_model(layers="split" or "fused") (the layouts used on accelerators) gives the
    same perplexity run, oneshot and chunked prefill and generation as the stacked layout."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from hf_models import save_tiny_model
    from msrnn_jax.run import api, evaluate
    from msrnn_jax.run.decoding import generate_tokens as generate

    folder = save_tiny_model(tmp_path / "m")
    stacked = api.load_model(folder, layers="stacked")
    split = api.load_model(folder, layers=layout)
    assert isinstance(split.params["layers"], list) and not isinstance(stacked.params["layers"], list)
    assert ("wqkv" in split.params["layers"][0]) == (layout == "fused")
    ids = np.random.default_rng(1).integers(1, stacked.cfg.vocab_size, 40).tolist()
    for prefill, chunk in (("exact", None), ("chunked", 8)):
        a = evaluate.run_policy(stacked, "tova", 16, ids, prefill=prefill, chunk=chunk)
        b = evaluate.run_policy(split, "tova", 16, ids, prefill=prefill, chunk=chunk)
        np.testing.assert_allclose(a.nll, b.nll, rtol=1e-5, atol=1e-5)
        assert (np.asarray(a.state.pos) == np.asarray(b.state.pos)).all()
    pol = make_policy("tova")
    for mode in ("exact", "oneshot"):
        ga = generate(stacked.params, stacked.cfg, RunSpec(pol, 16, mode), [ids[:30], ids[:5]], 10)
        gb = generate(split.params, split.cfg, RunSpec(pol, 16, mode), [ids[:30], ids[:5]], 10)
        assert ga.tokens == gb.tokens
    with pytest.raises(api.MsrnnError):
        api.load_model(folder, layers="diagonal")


def test_generate_with_the_pallas_kernels(tiny):
    """generate(impl=StepImpl(attention="pallas")) (the largest-batch path on GPU; Pallas'
    interpreter here) emits the same tokens and state as the default step."""
    from msrnn_jax.run.decoding import generate_tokens as generate
    cfg, params = tiny
    prompts = [[5, 9, 2, 7, 1, 3], [4, 4, 8]]
    ref = generate(params, cfg, RunSpec(make_policy("tova"), 6), prompts, 10)
    out = generate(split_layers(params), cfg, RunSpec(make_policy("tova"), 6), prompts, 10,
                   impl=StepImpl(attention="pallas"))
    assert out.tokens == ref.tokens
    assert (np.asarray(out.state.pos) == np.asarray(ref.state.pos)).all()
    np.testing.assert_allclose(np.asarray(out.state.keys), np.asarray(ref.state.keys), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["einsum", "reduce"])
@pytest.mark.parametrize("pname", ["tova", "tova-head", "sink"])
def test_reindex_scores_fused_equal_the_rotated_copy(tiny, attention, pname):
    """Under reindex positions, rotating each kept key inside the score product (the GPU
    default: no rotated copy of the keys is stored) gives the rotated copy's logits,
    tokens and kept positions."""
    cfg, params = tiny
    pol = make_policy(pname)
    st = testing.fabricate_state(cfg, 2, 8, 20, jnp.float32)
    logits, outs = {}, {}
    for how in ("copy", "fused"):
        impl = StepImpl(attention=attention, reindex_scores=how)
        tokens = jnp.asarray(np.random.default_rng(1).integers(1, cfg.vocab_size, (2, 9)), jnp.int32)
        logits[how], outs[how] = scan(params, cfg, pol, jax.tree.map(jnp.copy, st), tokens, emit="logits",
                                                   positions="reindex", impl=impl)
    np.testing.assert_allclose(np.asarray(logits["fused"]), np.asarray(logits["copy"]), rtol=1e-5, atol=1e-5)
    assert (np.asarray(outs["fused"].pos) == np.asarray(outs["copy"].pos)).all()


def test_step_impl_rejects_unknown_choices():
    with pytest.raises(ValueError, match="attention"):
        StepImpl(attention="palas")
    with pytest.raises(ValueError, match="layer_loop"):
        StepImpl(layer_loop="unrolled")
    with pytest.raises(ValueError, match="reindex_scores"):
        StepImpl(reindex_scores="rotated")


@pytest.mark.parametrize("path", ["chunk_step", "layer_scan", "forward_parallel"])
def test_parallel_paths_read_split_weights_in_place(tiny, path):
    """With per-layer params (`split_layers`, the accelerator layout) the parallel paths
    unroll their layer loop (`scan_layers`) instead of restacking the weights inside
    the program: no instruction of the optimised HLO builds a stacked weight (for the
    Llama-2-7B shape that was a 13.5 GB copy per chunked prefill piece); the stacked
    params, scanned, do hold the stack (as a parameter), so the check can tell."""
    cfg, params = tiny
    pol = make_policy("tova")
    st = testing.fabricate_state(cfg, 2, 8, 4, jnp.float32)
    tokens = jnp.ones((2, 4), jnp.int32)
    w = params["layers"]["wq"]
    stacked = f"f32[{','.join(map(str, w.shape))}]"
    if path == "chunk_step":
        lower = lambda p: chunk_step.lower(p, cfg, pol, st, tokens)
    elif path == "layer_scan":
        lower = lambda p: layer_scan.lower(p, cfg, pol, st, tokens, emit="nll", targets=tokens)
    else:
        lower = lambda p: forward_parallel.lower(p, cfg, tokens)
    assert stacked in lower(params).compile().as_text()
    text = lower(split_layers(params)).compile().as_text()
    assert stacked not in text, [line for line in text.splitlines() if stacked in line][:3]
