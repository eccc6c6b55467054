"""The 8-bit state (docs/design.md §13): the storage rule against the reference's numpy
rule, every policy's kept positions on the quantized state against the reference that
stores the same way, every prefill mode and position mode, and the state's bytes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msrnn_jax.core.parallel import chunk_step
from msrnn_jax.core.reference import stored
from msrnn_jax.core.state import QUANTIZED, Quantized, State, quantize
from msrnn_jax.core.step import scan
from msrnn_jax.errors import InvalidArgument
from msrnn_jax.fast.attention import StepImpl
from msrnn_jax.fast.layer_major import layer_scan
from msrnn_jax.run.decoding import prefill
from msrnn_jax.run.spec import RunSpec

from reference import (policy_obj, random_tokens, reference_chunked, reference_oneshot, reference_run,
                       sorted_pos, tiny_config, tiny_params)

KINDS = ("int8", "fp8")


def vectors(seed=0):
    """Slot vectors that stress the rule: ordinary, tiny, huge, one outlier, all zero,
    exact ties at rounding midpoints, negative maxima."""
    rng = np.random.default_rng(seed)
    rows = [rng.normal(size=16), 1e-6 * rng.normal(size=16), 1e4 * rng.normal(size=16),
            np.r_[rng.normal(size=15) * 0.01, 50.0], np.zeros(16), np.r_[np.arange(-7, 8) / 2.0, -8.0],
            -np.abs(rng.normal(size=16))]
    return np.asarray(rows, np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_the_storage_rule_equals_the_references(kind):
    x = vectors()
    q, s = quantize(jnp.asarray(x), kind)
    assert q.dtype == QUANTIZED[kind][0] and s.dtype == jnp.float32 and s.shape == x.shape[:1]
    got = np.asarray(Quantized(q, s).dequantize())
    want = np.stack([stored(row, kind) for row in x])
    # the same codes (a different code would be a whole step, >= 1/448 of the slot's max,
    # away); the scale may differ in its last bit (XLA may divide by a constant as a product)
    np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)


@pytest.mark.parametrize("kind,bound", [("int8", 0.5 / 127), ("fp8", 2.0 ** -4)])
def test_round_trip_error_bounds(kind, bound):
    """|x - read(x)| <= bound * max|x| per slot (int8: half a step of max/127; fp8: half
    an ulp of 3 mantissa bits, relative to each number, at most max * 2^-4); zeros stay
    zero, and the largest magnitude of a slot is kept exactly."""
    x = vectors(1)
    got = np.asarray(Quantized.of(jnp.asarray(x), kind).dequantize())
    top = np.abs(x).max(1, keepdims=True)
    assert (np.abs(got - x) <= bound * top * (1 + 1e-6)).all()
    np.testing.assert_array_equal(got[4], 0.0)
    i = np.abs(x).argmax(1)
    np.testing.assert_allclose(got[np.arange(len(x)), i], x[np.arange(len(x)), i], rtol=1e-6)
    if kind == "fp8":  # relative error per number (normal range): half an ulp of 3 bits
        normal = np.abs(x) >= top / 448 * 2.0 ** -6
        assert (np.abs(got - x)[normal] <= 2.0 ** -4 * np.abs(x)[normal] * (1 + 1e-6)).all()


def test_state_bytes_and_shapes():
    cfg = tiny_config("gqa")
    f32, i8 = State.init(cfg, 3, 16), State.init(cfg, 3, 16, "int8")
    assert (f32.dtype, i8.dtype, State.init(cfg, 3, 16, "fp8").dtype) == ("float32", "int8", "fp8")
    assert i8.keys.shape == f32.keys.shape and i8.capacity == 16 and i8.batch == 3
    L, B, H, C, D = f32.keys.shape
    assert i8.nbytes() == 2 * L * B * H * C * (D + 4) + 2 * 4 * L * B * H * C + 4 * B
    two = i8.take_rows([0, 2])
    assert two.batch == 2 and isinstance(two.keys, Quantized) and two.keys.scale.shape == (L, 2, H, C)


CASES = [("gqa", 6, "tova"), ("gqa", 6, "tova-head"), ("gqa", 6, "h2o"), ("gqa", 5, "sink"),
         ("gqa", 6, "window"), ("mha", 4, "h2o-head"), ("mistral", 8, "tova")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model,capacity,name", CASES, ids=[f"{m}-{n}" for m, c, n in CASES])
def test_kept_positions_match_the_reference_on_the_same_storage(kind, model, capacity, name):
    """Exact steps (scan and layer-major) on an 8-bit state keep exactly the positions the
    reference keeps when it stores its entries by the same rule; logits agree closely.
    (The policy decides on the attention of what is stored, so the kept sets may differ
    from the full-precision state's: that they equal the quantized reference's is the
    point.)"""
    cfg = tiny_config(model)
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, (1, 24), seed=7 + capacity)
    pol = policy_obj(name, 2)
    logits, state, pos = scan(params, cfg, pol, State.init(cfg, 1, capacity, kind), jnp.asarray(tokens),
                              emit="logits+pos")
    ref_logits, ref_pos = reference_run(params, cfg, name, capacity, tokens[0], 2, state_dtype=kind)
    np.testing.assert_array_equal(sorted_pos(pos)[:, :, 0], ref_pos)
    np.testing.assert_allclose(np.asarray(logits[0]), ref_logits, atol=1e-5, rtol=1e-5)
    last, lm = layer_scan(params, cfg, pol, State.init(cfg, 1, capacity, kind), jnp.asarray(tokens), emit="last")
    np.testing.assert_array_equal(sorted_pos(lm.pos), sorted_pos(state.pos))
    np.testing.assert_allclose(np.asarray(last), np.asarray(logits[:, -1]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lm.keys.dequantize()), np.asarray(state.keys.dequantize()),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("positions", ["absolute", "reindex"])
def test_chunked_prefill_matches_the_reference(kind, positions):
    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, (1, 20), seed=3)
    state = State.init(cfg, 1, 6, kind)
    logits = []
    for start in range(0, 20, 8):
        lg, state = chunk_step(params, cfg, policy_obj("tova"), state, jnp.asarray(tokens[:, start:start + 8]),
                               positions=positions)
        logits.append(np.asarray(lg[0]))
    ref_logits, ref_kept, _ = reference_chunked(params, cfg, "tova", 6, tokens[0], 8, positions=positions,
                                                state_dtype=kind)
    np.testing.assert_array_equal(sorted_pos(state.pos)[:, 0], ref_kept[-1])
    np.testing.assert_allclose(np.concatenate(logits), ref_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_oneshot_prefill_matches_the_reference(kind):
    cfg = tiny_config("gqa")
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, (1, 14), seed=4)
    _, state = prefill(params, cfg, policy_obj("tova"), None, 6, [tokens[0].tolist()], "oneshot", dtype=kind)
    _, ref_kept, ref = reference_oneshot(params, cfg, "tova", 6, tokens[0], state_dtype=kind)
    np.testing.assert_array_equal(sorted_pos(state.pos)[:, 0], ref_kept)
    # what the state holds is the reference's stored entries, slot by slot
    P = np.asarray(state.pos)[0, 0, 0]
    K = np.asarray(state.keys.dequantize())[0, 0, 0]
    by_pos = {e.pos: e.k for e in ref.kept[0][0]}
    for slot, p in enumerate(P):
        np.testing.assert_allclose(K[slot], by_pos[int(p)], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model,positions,loop", [("gqa", "absolute", "scan"), ("mha", "reindex", "unroll"),
                                                  ("gqa", "reindex", "scan")])
def test_the_pallas_kernels_read_the_8bit_state_as_the_reference_stores_it(kind, model, positions, loop):
    """attention="pallas" reads the codes and scales in place (dequantized in registers)
    and keeps exactly the positions that the quantized reference keeps, with the codes the
    einsum path stores."""
    cfg = tiny_config(model)
    params = tiny_params(cfg)
    tokens = random_tokens(cfg, (1, 20), seed=11)
    pol = policy_obj("tova")
    impl = StepImpl(attention="pallas", layer_loop=loop)
    logits, state, pos = scan(params, cfg, pol, State.init(cfg, 1, 16, kind), jnp.asarray(tokens),
                              emit="logits+pos", impl=impl, positions=positions)
    ref_logits, ref_pos = reference_run(params, cfg, "tova", 16, tokens[0], 2, state_dtype=kind,
                                        positions=positions)
    np.testing.assert_array_equal(sorted_pos(pos)[:, :, 0], ref_pos)
    np.testing.assert_allclose(np.asarray(logits[0]), ref_logits, atol=1e-5, rtol=1e-5)
    _, ein = scan(params, cfg, pol, State.init(cfg, 1, 16, kind), jnp.asarray(tokens), positions=positions)
    assert (np.asarray(state.keys.data) == np.asarray(ein.keys.data)).mean() > 0.999


def test_the_spec_checks_the_state_dtype():
    assert RunSpec.of("tova", 8, state_dtype="INT8").state_dtype == "int8"
    with pytest.raises(InvalidArgument) as e:
        RunSpec.of("tova", 8, state_dtype="int4")
    assert e.value.param == "state_dtype"


def test_generation_and_perplexity_on_an_8bit_state():
    """The Python API end to end: a kept 8-bit state continues (and refuses another
    storage), and a perplexity run reports the state it ran on."""
    from msrnn_jax.run import evaluate

    class Tiny:  # the parts of a Model the runs use
        cfg = tiny_config("gqa")
        params = tiny_params(cfg)
        mesh = None
        precision = None

    tokens = random_tokens(Tiny.cfg, (2, 30), seed=9)
    run = evaluate.run_policy(Tiny, "tova", 8, tokens, state_dtype="fp8")
    assert run.state.dtype == "fp8" and np.isfinite(run.nll).all()
    ref = evaluate.run_policy(Tiny, "tova", 8, tokens)
    assert abs(run.mean_nll - ref.mean_nll) < 0.05 * ref.mean_nll
    from msrnn_jax.run.decoding import generate_tokens

    spec = RunSpec.of("tova", 8, state_dtype="int8")
    res = generate_tokens(Tiny.params, Tiny.cfg, spec, [tokens[0, :12].tolist()], 6)
    assert res.state.dtype == "int8"
    more = generate_tokens(Tiny.params, Tiny.cfg, spec, [[3, 4]], 4, state=res.state)
    assert more.state.dtype == "int8" and int(more.state.length[0]) == int(res.state.length[0]) + 2 + 4
    with pytest.raises(InvalidArgument, match="stores int8"):
        generate_tokens(Tiny.params, Tiny.cfg, RunSpec.of("tova", 8, state_dtype="fp8"), [[3]], 2,
                        state=res.state)


@pytest.mark.parametrize("prefill,chunk", [("exact", None), ("chunked", 8)])
def test_the_engine_serves_an_8bit_state_as_generate_reads_it(tmp_path, prefill, chunk):
    """Continuous batching over an int8 state: each request's greedy tokens equal the
    same prompt generated alone on an int8 state."""
    import msrnn_jax as m
    from msrnn_jax.serve.engine import Engine

    from hf_models import save_tiny_model

    model = m.load_model(save_tiny_model(tmp_path / "tiny"))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, model.cfg.vocab_size, n).tolist() for n in (5, 19, 11)]
    eng = Engine(model, "tova", 12, max_batch=2, steps_per_call=4, prefill=prefill, chunk=chunk, dtype="int8",
                 log_requests=False).start()
    try:
        assert eng.ready.wait(120)
        assert eng.state.dtype == "int8"
        reqs = [eng.submit(p, 10, temperature=0.0, ignore_eos=True) for p in prompts]
        got = [r.result(120).tokens for r in reqs]
    finally:
        eng.stop()
    spec = RunSpec.of("tova", 12, prefill=prefill, chunk=chunk, state_dtype="int8")
    from msrnn_jax.run.decoding import generate_tokens

    want = [generate_tokens(model.params, model.cfg, spec, [p], 10).tokens[0] for p in prompts]
    assert got == want
