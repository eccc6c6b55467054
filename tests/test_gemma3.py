"""Gemma 3 (text) and layer groups (docs/design.md §12) against transformers' PyTorch
Gemma3ForCausalLM (fp32) and the slow reference: its sliding layers keep exactly their
window under `window`, the user's policy bounds the global layers only. Tiny model: 4
layers (sliding, sliding, global, sliding), window 5, every prompt longer than the window.
(The parallel forward and the step's full state over a ragged batch: tests/test_parity.py.)"""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import hf_logits, make_hf_model, save_hf_model, save_tiny_model
from reference import policy_obj, reference_chunked, reference_oneshot, reference_run, sorted_pos

from msrnn_jax.cli import main
from msrnn_jax.config import ModelConfig, preset
from msrnn_jax.convert.gguf_loader import load_gguf
from msrnn_jax.convert.hf import load_hf_folder
from msrnn_jax.core.parallel import chunk_step, prefill_oneshot
from msrnn_jax.core.policies import PerRow
from msrnn_jax.core.state import Groups, State, init_state
from msrnn_jax.core.step import scan
from msrnn_jax.errors import InvalidArgument, UnsupportedConfigError
from msrnn_jax.run.decoding import generate_tokens
from msrnn_jax.run.spec import RunSpec

POLICIES = [("window", 4), ("sink", 2), ("tova", 4), ("tova-head", 4), ("h2o", 4), ("h2o-head", 4)]
T, C = 16, 6
ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    model = make_hf_model("gemma3")
    folder = save_hf_model(model, tmp_path_factory.mktemp("gemma3"))
    cfg, params = load_hf_folder(folder)
    return model, folder, cfg, jax.tree.map(jnp.asarray, params)


def tokens_of(cfg, n, seed):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, n).astype(np.int32)


def same_kept(got, want, what):
    """got, want: one [T, Lg, Hkv, Cg] per group (the implementation's already sorted)."""
    assert len(got) == len(want) == 2, what
    for g, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, (what, g, a.shape, b.shape)
        for t in range(len(b)):
            assert np.array_equal(a[t], b[t]), f"{what}: group {g} kept positions differ after step {t}"


def test_config_groups_and_the_window_matter(gemma):
    """The tiny model's groups: its three sliding layers keep W - 1 = 4 slots, its global
    layer C; transformers' logits change with the window and with the local RoPE base (so
    the parity tests below test them)."""
    model, _, cfg, _ = gemma
    assert cfg.layer_groups == (((0, 1, 3), 5), ((2,), None))
    st = init_state(cfg, 2, 7)
    assert isinstance(st, Groups) and st.capacity == (4, 7) and st.windows == (5, None)
    assert st.nbytes() == sum(s.nbytes() for s in st.states)
    with pytest.raises(InvalidArgument, match="Groups"):
        State.init(cfg, 1, 8)
    tokens = tokens_of(cfg, 20, 1)[None]
    want = hf_logits(model, tokens)
    for change in ({"sliding_window": 9}, {"rope_parameters": {
            **model.config.rope_parameters, "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}}):
        assert np.abs(hf_logits(make_hf_model("gemma3", **change), tokens) - want).max() > 1e-3, change


def test_step_equals_transformers_past_the_window(gemma):
    """20 tokens (window 5): the step's full state gives transformers' logits; the sliding
    layers hold exactly the last 4 positions, the global layer all 20."""
    model, _, cfg, params = gemma
    tokens = tokens_of(cfg, 20, 2)[None]
    logits, state = scan(params, cfg, policy_obj("full"), init_state(cfg, 1, 20), jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(model, tokens), atol=2e-5, rtol=0)
    local, glob = (sorted_pos(p)[:, 0] for p in state.pos)
    assert (local == np.arange(16, 20)).all() and (glob == np.arange(20)).all()


def test_every_policy_matches_reference(gemma):
    """Exact mode, every bounded policy side by side (`PerRow`): the kept positions of both
    groups after every step equal the reference's (the sliding group's are the window's
    whatever the policy), logits within 1e-5; int8 state for tova too."""
    _, _, cfg, params = gemma
    tokens = tokens_of(cfg, T, 7)
    pol = PerRow(policies=tuple(policy_obj(n, i) for n, i in POLICIES))
    logits, _, pos = scan(params, cfg, pol, init_state(cfg, len(POLICIES), C),
                          jnp.asarray(pol.spread(tokens[None])), emit="logits+pos")
    window = None
    for row, (name, sinks) in enumerate(POLICIES):
        ref_logits, ref_pos = reference_run(params, cfg, name, C, tokens, sinks)
        same_kept([sorted_pos(p)[:, :, row] for p in pos], ref_pos, name)
        np.testing.assert_allclose(np.asarray(logits)[row], ref_logits, atol=ATOL, rtol=RTOL, err_msg=name)
        window = ref_pos[0] if window is None else window
        assert np.array_equal(ref_pos[0], window)  # the sliding layers: every policy alike
    assert not np.array_equal(ref_pos[1], reference_run(params, cfg, "window", C, tokens)[1][1])
    # (other tokens: with these, one int8 rounding sits on its boundary, 1e-7 from either side)
    tokens = tokens_of(cfg, T, 8)
    logits, _, pos = scan(params, cfg, policy_obj("tova"), init_state(cfg, 1, C, "int8"), jnp.asarray(tokens[None]),
                          emit="logits+pos")
    ref_logits, ref_pos = reference_run(params, cfg, "tova", C, tokens, state_dtype="int8")
    same_kept([sorted_pos(p)[:, :, 0] for p in pos], ref_pos, "tova int8")
    np.testing.assert_allclose(np.asarray(logits)[0], ref_logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("positions,state_dtype", [("absolute", "float32"), ("reindex", "float32"),
                                                     ("absolute", "int8")])
def test_pallas_kernels_run_the_groups(gemma, positions, state_dtype):
    """`attention="pallas"` over layer groups: each layer's kernels read its slots inside its
    group's whole buffers. Every policy side by side keeps exactly the reference's positions
    in both groups; the scan (layer after layer) and `layer_major` alike."""
    from msrnn_jax.fast.attention import StepImpl
    from msrnn_jax.fast.layer_major import layer_major

    _, _, cfg, params = gemma
    tokens = tokens_of(cfg, T, 8 if state_dtype == "int8" else 7)  # (seed 7: an int8 rounding on its boundary)
    pol = PerRow(policies=tuple(policy_obj(n, i) for n, i in POLICIES))
    impl = StepImpl(attention="pallas")
    spread = jnp.asarray(pol.spread(tokens[None]))
    logits, st, pos = scan(params, cfg, pol, init_state(cfg, len(POLICIES), C, state_dtype), spread, impl=impl,
                           positions=positions, emit="logits+pos")
    for row, (name, sinks) in enumerate(POLICIES):
        ref_logits, ref_pos = reference_run(params, cfg, name, C, tokens, sinks, positions=positions,
                                            state_dtype=None if state_dtype == "float32" else state_dtype)
        same_kept([sorted_pos(p)[:, :, row] for p in pos], ref_pos, f"{name} pallas")
        np.testing.assert_allclose(np.asarray(logits)[row], ref_logits, atol=ATOL, rtol=RTOL, err_msg=name)
    _, lm = layer_major(params, cfg, pol, init_state(cfg, len(POLICIES), C, state_dtype), spread,
                        jnp.ones(spread.shape, bool), impl, positions)
    for a, b in zip(lm.states, st.states):
        assert np.array_equal(np.asarray(a.pos), np.asarray(b.pos))


def test_record_run_keeps_every_layers_positions(gemma):
    """`record_run` (the analysis' recording) on layer groups: every layer's kept positions in
    the model's order, the sliding layers' W - 1 slots padded with -1 to the global layer's C,
    each equal to the reference's; the NLL that of the step's logits."""
    from msrnn_jax.run.analysis import record_run
    from msrnn_jax.run.api import Model

    _, _, cfg, params = gemma
    tokens = tokens_of(cfg, T, 7)
    rec = record_run(Model(cfg, params), "tova", C, tokens, steps_per_call=5)
    assert rec.pos.shape == (T, cfg.num_layers, 1, cfg.num_kv_heads, C)
    ref_logits, ref_pos = reference_run(params, cfg, "tova", C, tokens)
    for l, (g, i) in enumerate(cfg.layer_slots):
        Cg = ref_pos[g].shape[-1]
        assert (rec.pos[:, l, 0, :, Cg:] == -1).all()
        assert np.array_equal(sorted_pos(rec.pos[:, l, 0, :, :Cg]), sorted_pos(ref_pos[g][:, i])), l
    assert len({ref_pos[g].shape[-1] for g, _ in cfg.layer_slots}) == 2
    logp = jax.nn.log_softmax(jnp.asarray(ref_logits[:-1]), -1)
    want = -np.take_along_axis(np.asarray(logp), tokens[1:, None], 1)[:, 0]
    np.testing.assert_allclose(rec.nll[0], want, atol=1e-5, rtol=1e-5)


def test_prefill_modes_and_reindex_match_reference(gemma):
    """oneshot (h2o), chunked (tova, S=5) and exact under `reindex` positions (tova)."""
    _, _, cfg, params = gemma
    tokens = tokens_of(cfg, T, 8)
    logits, state = prefill_oneshot(params, cfg, policy_obj("h2o"), C, jnp.asarray(tokens[None]))
    ref_logits, ref_kept, _ = reference_oneshot(params, cfg, "h2o", C, tokens)
    same_kept([sorted_pos(p)[None, :, 0] for p in state.pos], [k[None] for k in ref_kept], "oneshot")
    np.testing.assert_allclose(np.asarray(logits)[0], ref_logits, atol=ATOL, rtol=RTOL)

    S, state, kept, out = 5, init_state(cfg, 1, C), [], []
    for start in range(0, T, S):
        part = tokens[start:start + S]
        active = np.arange(S) < len(part)
        lg, state = chunk_step(params, cfg, policy_obj("tova"), state, jnp.asarray(np.pad(part, (0, S - len(part)))[None]),
                               jnp.asarray(active[None]))
        out.append(np.asarray(lg)[0, :active.sum()])
        kept.append([sorted_pos(p)[:, 0] for p in state.pos])
    ref_logits, ref_kept, _ = reference_chunked(params, cfg, "tova", C, tokens, S)
    same_kept([np.stack(k) for k in zip(*kept)], ref_kept, "chunked")
    np.testing.assert_allclose(np.concatenate(out), ref_logits, atol=ATOL, rtol=RTOL)

    logits, _, pos = scan(params, cfg, policy_obj("tova"), init_state(cfg, 1, C), jnp.asarray(tokens[None]),
                          emit="logits+pos", positions="reindex")
    ref_logits, ref_pos = reference_run(params, cfg, "tova", C, tokens, positions="reindex")
    same_kept([sorted_pos(p)[:, :, 0] for p in pos], ref_pos, "reindex")
    np.testing.assert_allclose(np.asarray(logits)[0], ref_logits, atol=ATOL, rtol=RTOL)


def test_greedy_generation_equals_transformers(gemma):
    """32 greedy tokens after a 9-token prompt (window 5): transformers' own `generate`."""
    model, _, cfg, params = gemma
    prompt = tokens_of(cfg, 9, 3)
    with torch.no_grad():
        want = model.generate(torch.tensor(prompt[None], dtype=torch.long), max_new_tokens=32, do_sample=False,
                              min_new_tokens=32)[0, 9:].tolist()
    res = generate_tokens(params, cfg, RunSpec.of("full"), [prompt.tolist()], 32)
    assert res.tokens[0] == want
    assert isinstance(res.state, Groups) and res.state.capacity[0] == 4


TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom. "
        "Paris is the capital of France.\n") * 6


def test_cli_ppl_generate_and_bounded_global_layers(tmp_path, capsys):
    """`msrnn ppl --policy full` is transformers' loss, and `--policy tova --capacity 8`
    reports the bytes of both groups (the sliding ones at their window, the global one at
    8); `msrnn generate --greedy` prints transformers' greedy text for a prompt longer than
    the window."""
    folder = save_tiny_model(tmp_path / "g", "gemma3")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(folder)
    hf = __import__("transformers").AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    capsys.readouterr()
    assert main(["ppl", str(text), "--model", folder, "--policy", "full,tova", "--capacity", "8",
                 "--tokens", "40", "--json"]) == 0
    full, tova = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    ids = torch.tensor([tok(TEXT)["input_ids"][:40]])
    with torch.no_grad():
        want = hf(ids, labels=ids).loss.item()
    assert abs(full["mean_nll"] - want) / want < 1e-5
    cfg = ModelConfig.from_hf_config(json.loads((tmp_path / "g" / "config.json").read_text()))
    per_slot = 2 * cfg.num_kv_heads * cfg.head_dim * 4 + 2 * cfg.num_kv_heads * 4  # keys, values, pos, score
    assert tova["state_bytes"] == 3 * per_slot * 4 + per_slot * 8 + 2 * 4
    assert full["state_bytes"] == 3 * per_slot * 4 + per_slot * 40 + 2 * 4
    assert tova["mean_nll"] != full["mean_nll"]

    prompt = "It was the best of times, it was"
    p_ids = tok(prompt, return_tensors="pt").input_ids
    assert p_ids.shape[1] > 5
    with torch.no_grad():
        new = hf.generate(p_ids, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)[0, p_ids.shape[1]:]
    assert len(new) >= 8
    assert main(["generate", prompt, "--model", folder, "--greedy", "--max-new-tokens", "32"]) == 0
    assert capsys.readouterr().out.strip() == tok.decode(new, skip_special_tokens=True).strip()


def write_gemma3_gguf(path, cfg, sd):
    """`sd` as llama.cpp's convert_hf_to_gguf.py writes gemma3: F32, norms stored as 1 + w,
    the sliding pattern and the local RoPE base as keys."""
    import gguf

    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_freq_base_swa(cfg.rope_local_theta)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_scaling[1])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([l in cfg.sliding_layers for l in range(cfg.num_layers)])
    w.add_attention_scale(cfg.query_pre_attn_scalar ** -0.5)
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_bos_token_id(cfg.bos_token_id)
    for e in cfg.eos_token_ids:
        w.add_eos_token_id(e)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in sd.items():
        a = t.float().numpy() + (1.0 if name.endswith("norm.weight") else 0.0)
        if name == "lm_head.weight":
            continue
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            w.add_tensor("token_embd.weight" if "embed" in name else "output_norm.weight", a)
            continue
        _, _, i, rest = name.split(".", 3)
        w.add_tensor(f"blk.{i}.{names[rest.removesuffix('.weight')]}.weight", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_round_trip(gemma, tmp_path):
    """A gemma3 GGUF file written as llama.cpp does loads to the checkpoint's config and
    params (the norms' 1 + w undone: equal within float32 rounding), so to its logits."""
    model, _, cfg, params = gemma
    g_cfg, g_params = load_gguf(write_gemma3_gguf(tmp_path / "g.gguf", cfg, model.state_dict()))
    assert g_cfg == cfg
    flat, g_flat = jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(g_params)
    assert [p for p, _ in flat] == [p for p, _ in g_flat]
    for (p, a), (_, b) in zip(flat, g_flat):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-7 if "norm" in jax.tree_util.keystr(p) else 0,
                                   rtol=0, err_msg=jax.tree_util.keystr(p))
    tokens = tokens_of(cfg, 12, 11)[None]
    logits, _ = scan(jax.tree.map(jnp.asarray, g_params), g_cfg, policy_obj("full"), init_state(g_cfg, 1, 12),
                     jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(model, tokens), atol=2e-5, rtol=0)


GEMMA3_12B = {  # google/gemma-3-12b-it's config.json (the text part; transformers 4.50's layout)
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text",
                    "num_attention_heads": 16, "num_hidden_layers": 48, "num_key_value_heads": 8,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"}}


def test_real_configs_read_as_transformers_does():
    """Gemma-3-12B's config.json (a `gemma3` config: its text part over Gemma3TextConfig's
    defaults) gives the `gemma-3-12b` preset's shapes, and the layer types transformers
    derives from the pattern; unhandled switches are refused in one line."""
    import transformers

    cfg = ModelConfig.from_hf_config(GEMMA3_12B)
    want = preset("gemma-3-12b")
    for f in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "rope_theta", "rope_scaling", "sliding_window", "sliding_layers", "rope_local_theta",
              "query_pre_attn_scalar", "final_logit_softcapping", "tie_word_embeddings", "vocab_size"):
        assert getattr(cfg, f) == getattr(want, f), f
    base = {**GEMMA3_12B["text_config"], "vocab_size": 262208}
    t = transformers.Gemma3TextConfig(num_hidden_layers=14, sliding_window_pattern=4)
    ours = ModelConfig.from_hf_config({**base, "num_hidden_layers": 14, "sliding_window_pattern": 4})
    assert [l in ours.sliding_layers for l in range(14)] == [x == "sliding_attention" for x in t.layer_types]
    assert ours.sliding_layers != cfg.sliding_layers[:len(ours.sliding_layers)]  # pattern 4, not 6
    for change, needle in (({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
                           ({"hidden_activation": "gelu"}, "hidden_activation"),
                           ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
                           ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "yarn")):
        with pytest.raises(UnsupportedConfigError, match=needle) as e:
            ModelConfig.from_hf_config({**base, **change})
        assert "\n" not in str(e.value)


def test_converted_folder_keeps_the_groups(gemma, tmp_path):
    """`msrnn convert`'s folder restores the same config (its sliding layers, two RoPE
    bases, scalar, softcap) and params."""
    import msrnn_jax.convert as convert

    _, folder, cfg, _ = gemma
    out = convert.convert_cli(folder, tmp_path / "conv", dtype="float32")
    a, b = convert.load_model(folder), convert.load_model(str(out))
    assert a.cfg == b.cfg == cfg and b.cfg.grouped
    assert jax.tree.all(jax.tree.map(np.array_equal, a.params, b.params))


def test_saved_groups_continue_alike(tmp_path, capsys):
    """`msrnn generate --save-state` of a model with layer groups, then `--load-state`:
    the restored groups continue exactly as the kept ones (int8, tova on the global layers)."""
    from msrnn_jax import load_model
    from msrnn_jax.io.state_io import load_state, state_meta

    folder = save_tiny_model(tmp_path / "g", "gemma3")
    args = ["--model", folder, "--greedy", "--max-new-tokens", "6", "--policy", "tova", "--capacity", "8",
            "--state-dtype", "int8"]
    assert main(["generate", "It was the best of times", *args, "--save-state", str(tmp_path / "s")]) == 0
    meta = state_meta(tmp_path / "s")
    assert (meta["capacity"], meta["capacities"], meta["windows"]) == (8, [4, 8], [5, None])
    model = load_model(folder)
    st = load_state(tmp_path / "s", model)
    assert isinstance(st, Groups) and st.capacity == (4, 8) and st.dtype == "int8"
    capsys.readouterr()
    assert main(["generate", "Paris is", *args, "--load-state", str(tmp_path / "s")]) == 0
    resumed = capsys.readouterr().out
    first = generate_tokens(model.params, model.cfg, RunSpec.of("tova", 8, state_dtype="int8"),
                            [model.encode("It was the best of times")], 6, eos_ids=model.eos_ids)
    again = generate_tokens(model.params, model.cfg, RunSpec.of("tova", 8, state_dtype="int8"),
                            [model.encode("Paris is")], 6, state=first.state, eos_ids=model.eos_ids)
    assert resumed.strip() == model.decode(again.tokens[0]).strip()
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(first.state)))
    assert (np.asarray(st.states[1].pos) >= 0).sum() == 8 * cfg_heads(model)  # the global layer: full at C = 8


def cfg_heads(model):
    return model.cfg.num_kv_heads * len(model.cfg.layer_groups[1][0])


def test_serve_equals_generate(tmp_path):
    """A real `msrnn serve` process on a tiny Gemma 3 folder (layer groups): three greedy
    completions, sent at once to two rows (one waits for a row), of prompts longer than the
    window, equal offline `generate`'s tokens, under `--policy tova --capacity 8` (the global
    layer bounded) and under `full`."""
    import concurrent.futures as cf
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    httpx = pytest.importorskip("httpx")
    from msrnn_jax import generate, load_model

    folder = save_tiny_model(tmp_path / "g", "gemma3")
    model = load_model(folder)
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, model.cfg.vocab_size, 20 + 4 * k).tolist() for k in range(6)]
    # prompts whose answers differ under tova (C = 8) and full (the random model repeats itself)
    prompts = [model.encode("Paris is the capital of France and a city"), rows[2], rows[5]]
    assert min(map(len, prompts)) > 4 * model.cfg.layer_groups[0][1]  # past the window (5)
    n, answers = 12, {}
    root = Path(__file__).resolve().parents[1]
    for policy, capacity in (("tova", 8), ("full", None)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / f"{policy}.log"
        args = ["--policy", policy, *(["--capacity", str(capacity)] if capacity else []), "--max-batch", "2",
                "--steps-per-call", "4", "--served-model-name", "gemma3"]
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "msrnn_jax.cli", "serve", "--model", folder,
                                     "--port", str(port), *args], cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root)))
        try:
            end = time.time() + 240
            while True:
                assert proc.poll() is None, log.read_text()
                assert time.time() < end, f"not ready in 240 s:\n{log.read_text()}"
                try:
                    health = httpx.get(url + "/health", timeout=5)
                    if health.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            assert health.json()["policies"] == [policy]

            def complete(ids):
                r = httpx.post(url + "/v1/completions", timeout=120, json={
                    "model": "gemma3", "prompt": ids, "max_tokens": n, "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()

            with cf.ThreadPoolExecutor(len(prompts)) as pool:
                got = list(pool.map(complete, prompts))
            for ids, r in zip(prompts, got):
                want = generate(model, [ids], n, policy=policy, capacity=capacity).tokens[0]
                assert r["choices"][0]["text"] == model.decode(want), (policy, ids)
                assert r["usage"]["completion_tokens"] == len(want)
                answers.setdefault(policy, []).append(list(want))
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        assert proc.returncode == 0, log.read_text()
    assert all(a != b for a, b in zip(answers["tova"], answers["full"]))  # the bound on the global layer shows


def test_ruler_once_compresses_the_global_layers_alone(tmp_path):
    """`msrnn eval ruler --mode once` on a tiny Gemma 3: each policy's answers are those of a
    oneshot prefill of the context (the global layer cut to C, the sliding ones at their
    window), the global group alone widened for the rest, then greedy decoding run alone;
    the sliding group of the continued state is the window's, as in the model."""
    from msrnn_jax import load_model
    from msrnn_jax.core.policies import make_policy
    from msrnn_jax.run import ruler as R
    from msrnn_jax.run.decoding import prefill

    folder = save_tiny_model(tmp_path / "g", "gemma3")
    out = tmp_path / "once"
    argv = ["eval", "ruler", "--model", folder, "--policy", "full,tova,window", "--ratio", "0.5", "--lengths", "512",
            "--samples", "2", "--tasks", "niah_single_1", "--out", str(out)]
    assert main(argv) == 0
    model = load_model(folder)
    frame = R.prompt_frame(model)
    samples = R.build_samples(model, ["niah_single_1"], 512, 2, 0, frame=frame)["niah_single_1"]
    parts = [R.prompt_ids(model, s, False, frame) for s in samples]
    ctx, rest = [a for a, _ in parts], [b for _, b in parts]
    window = model.cfg.layer_groups[0][1]
    for name in ("tova", "window"):
        with open(out / f"ruler__512__g__{name}__0.50" / "predictions.csv") as f:
            rows = list(csv.DictReader(f))
        cap = int(rows[0]["capacity"])
        assert cap == int(0.5 * max(map(len, ctx))) > window
        pol = make_policy(name)
        extra = max(map(len, rest)) + 128
        _, state = prefill(model.params, model.cfg, pol, None, cap, ctx, "oneshot")
        wide = R._widen(state, extra)
        assert isinstance(wide, Groups) and wide.capacity == (window - 1, cap + extra)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(wide.states[0]), jax.tree.leaves(state.states[0])))
        assert (np.asarray(wide.states[1].pos)[..., cap:] == -1).all()
        res = generate_tokens(model.params, model.cfg, RunSpec(pol, cap + extra), rest, 128, state=wide,
                              eos_ids=model.eos_ids)
        assert [r["predicted_answer"] for r in rows] == [model.decode(t) for t in res.tokens], name
