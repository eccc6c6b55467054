"""The newer families (qwen3, phi3 with and without LongRoPE, qwen3_moe, mixtral) against
transformers' PyTorch models (fp32) and the slow reference: every policy's kept positions,
the prefill modes and `reindex` positions, greedy generation, `msrnn ppl` and `msrnn
generate`, and GGUF files written with gguf's writer. The parallel forward and the
step-by-step full state are checked for every family in tests/test_parity.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import hf_logits, make_hf_model, save_hf_model, save_tiny_model
from msrnn_jax.convert.gguf_loader import load_gguf
from msrnn_jax.convert.hf import load_hf_folder
from reference import (
    policy_obj,
    reference_chunked,
    reference_oneshot,
    reference_run,
    sorted_pos,
)

from msrnn_jax.cli import main
from msrnn_jax.config import ModelConfig
from msrnn_jax.core.parallel import chunk_step, forward_parallel, prefill_oneshot
from msrnn_jax.core.policies import PerRow
from msrnn_jax.core.state import State
from msrnn_jax.core.step import scan
from msrnn_jax.errors import UnsupportedConfigError

NEW = ["qwen3", "phi3", "phi3-longrope", "qwen3-moe", "mixtral"]  # qwen3-yarn: tests/test_parity.py
POLICIES = [("window", 4), ("sink", 2), ("tova", 4), ("tova-head", 4), ("h2o", 4), ("h2o-head", 4)]
T, C = 16, 6
ATOL = RTOL = 1e-5  # against the reference, as tests/test_policies.py


@pytest.fixture(scope="module", params=NEW)
def fam(request, tmp_path_factory):
    model = make_hf_model(request.param)
    folder = save_hf_model(model, tmp_path_factory.mktemp(request.param))
    cfg, params = load_hf_folder(folder)
    return request.param, model, folder, cfg, jax.tree.map(jnp.asarray, params)


def tokens_of(cfg, n, seed):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, n).astype(np.int32)


def assert_same_kept(got, want, what):
    for t in range(len(want)):
        assert np.array_equal(got[t], want[t]), f"{what}: kept positions differ after step {t}"


def test_every_policy_matches_reference(fam):
    """Exact mode, every bounded policy (side by side as batch rows, `PerRow`: one
    compile): the kept positions after every step equal the reference's, and the logits
    within 1e-5."""
    family, _, _, cfg, params = fam
    tokens = tokens_of(cfg, T, seed=7)
    pol = PerRow(policies=tuple(policy_obj(n, i) for n, i in POLICIES))
    logits, _, pos = scan(params, cfg, pol, State.init(cfg, len(POLICIES), C),
                          jnp.asarray(pol.spread(tokens[None])), emit="logits+pos")
    for row, (name, sinks) in enumerate(POLICIES):
        ref_logits, ref_pos = reference_run(params, cfg, name, C, tokens, sinks)
        assert_same_kept(sorted_pos(pos)[:, :, row], ref_pos, f"{family} {name}")
        np.testing.assert_allclose(np.asarray(logits)[row], ref_logits, atol=ATOL, rtol=RTOL,
                                   err_msg=f"{family} {name}")


def test_prefill_modes_and_reindex_match_reference(fam):
    """tova: oneshot and chunked prefill, and exact mode under `reindex` positions."""
    family, _, _, cfg, params = fam
    tokens = tokens_of(cfg, T, seed=8)
    pol = policy_obj("tova")
    logits, state = prefill_oneshot(params, cfg, pol, C, jnp.asarray(tokens[None]))
    ref_logits, ref_kept, _ = reference_oneshot(params, cfg, "tova", C, tokens)
    assert np.array_equal(sorted_pos(state.pos)[:, 0], ref_kept), family
    np.testing.assert_allclose(np.asarray(logits)[0], ref_logits, atol=ATOL, rtol=RTOL)

    S, state, kept, out = 5, State.init(cfg, 1, C), [], []
    for start in range(0, T, S):
        chunk = np.pad(tokens[start:start + S], (0, S - len(tokens[start:start + S])))
        active = np.arange(S) < len(tokens[start:start + S])
        lg, state = chunk_step(params, cfg, pol, state, jnp.asarray(chunk[None]), jnp.asarray(active[None]))
        out.append(np.asarray(lg)[0, :active.sum()])
        kept.append(sorted_pos(state.pos)[:, 0])
    ref_logits, ref_kept, _ = reference_chunked(params, cfg, "tova", C, tokens, S)
    assert_same_kept(kept, ref_kept, f"{family} chunked")
    np.testing.assert_allclose(np.concatenate(out), ref_logits, atol=ATOL, rtol=RTOL)

    logits, _, pos = scan(params, cfg, pol, State.init(cfg, 1, C), jnp.asarray(tokens[None]),
                          emit="logits+pos", positions="reindex")
    ref_logits, ref_pos = reference_run(params, cfg, "tova", C, tokens, positions="reindex")
    assert_same_kept(sorted_pos(pos)[:, :, 0], ref_pos, f"{family} reindex")
    np.testing.assert_allclose(np.asarray(logits)[0], ref_logits, atol=ATOL, rtol=RTOL)


def test_longrope_switches_like_transformers_decoding():
    """Phi-3's LongRoPE rotates with the short factors below its original context (32
    here) and with the long ones from there on: the rule of transformers' token-by-token
    decoding with a cache. (Its forward over a longer sequence, and its `generate`, which
    recomputes the cache once the sequence crosses the original context, rotate every
    position with the long factors: a state that has evicted tokens cannot recompute them,
    docs/design.md §7.) Over 48 tokens the step equals that decoding; the parallel forward
    equals the step."""
    model = make_hf_model("phi3-longrope", original_max_position_embeddings=32)
    short_only = make_hf_model("phi3-longrope", original_max_position_embeddings=32, rope_scaling={
        **model.config.rope_parameters, "long_factor": model.config.rope_parameters["short_factor"]})
    tokens = np.random.default_rng(10).integers(0, 96, 48)

    def decode(hf):
        cache, out = None, []
        with torch.no_grad():
            for t in tokens:
                o = hf(torch.tensor([[int(t)]]), past_key_values=cache, use_cache=True)
                cache = o.past_key_values
                out.append(o.logits[0, -1].float().numpy())
        return np.stack(out)

    want = decode(model)
    assert np.abs(want[32:] - decode(short_only)[32:]).max() > 1e-3  # the long factors matter
    np.testing.assert_allclose(want[:32], hf_logits(model, tokens[:32])[0], atol=1e-4, rtol=0)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        cfg, params = load_hf_folder(save_hf_model(model, d))
    params = jax.tree.map(jnp.asarray, params)
    got, _ = scan(params, cfg, policy_obj("full"), State.init(cfg, 1, 48), jnp.asarray(tokens[None]))
    np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-4, rtol=0)
    par = forward_parallel(params, cfg, jnp.asarray(tokens[None]))[0]
    np.testing.assert_allclose(np.asarray(par)[0], want, atol=1e-4, rtol=0)


def test_the_family_switches_matter():
    """The parity tests above test something: each family's switch changes transformers'
    own logits (YaRN, the q/k norms' weights, the partial rotary, renormalised routing)."""
    tokens = np.random.default_rng(12).integers(0, 96, (1, 20))

    def differ(a, b):
        return np.abs(hf_logits(a, tokens) - hf_logits(b, tokens)).max() > 1e-3

    assert differ(make_hf_model("qwen3-yarn"), make_hf_model("qwen3-yarn", rope_scaling=None))
    qwen3 = make_hf_model("qwen3")
    plain = make_hf_model("qwen3")
    with torch.no_grad():
        for layer in plain.model.layers:
            layer.self_attn.q_norm.weight.fill_(1.0)
    assert differ(qwen3, plain)
    longrope = make_hf_model("phi3-longrope")
    assert differ(longrope, make_hf_model("phi3-longrope", partial_rotary_factor=1.0, rope_scaling={
        **longrope.config.rope_parameters, "partial_rotary_factor": 1.0,
        "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}))
    assert differ(make_hf_model("qwen3-moe"), make_hf_model("qwen3-moe", norm_topk_prob=True))


# -- the command line on tiny saved checkpoints with a tokenizer --------------------------------
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom. "
        "Paris is the capital of France.\n") * 6


@pytest.mark.parametrize("family", ["qwen3", "phi3-longrope", "qwen3-moe", "mixtral"])  # one of each family
def test_cli_ppl_and_generate_equal_transformers(family, tmp_path, capsys):
    """On a saved checkpoint with a tokenizer: `msrnn ppl --policy full` is transformers'
    loss, and `msrnn generate --greedy` prints the text of transformers' 32 greedy tokens
    (both stop at the tokenizer's EOS)."""
    folder = save_tiny_model(tmp_path / family, family)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(folder)
    hf = __import__("transformers").AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    capsys.readouterr()
    assert main(["ppl", str(text), "--model", folder, "--policy", "full", "--tokens", "40", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["mean_nll"]
    ids = torch.tensor([tok(TEXT)["input_ids"][:40]])
    with torch.no_grad():
        want = hf(ids, labels=ids).loss.item()
    assert abs(got - want) / want < 1e-5

    prompt = "Paris is the"
    p_ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        new = hf.generate(p_ids, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)[0, p_ids.shape[1]:]
    assert len(new) >= 8  # a real test: transformers' greedy run did not stop at once
    want_text = tok.decode(new, skip_special_tokens=True)
    if family == "qwen3-moe":  # one real process, its model split over 2 CPU devices (--mesh):
        # the new weights (q/k norms, router, experts) sharded by heads and MLP columns keep
        # the one-device numbers
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        p = subprocess.run([sys.executable, "-m", "msrnn_jax.cli", "generate", prompt, "--model", folder,
                            "--greedy", "--max-new-tokens", "32", "--mesh", "model=2"], capture_output=True,
                           text=True, env=env, timeout=300, check=False)
        assert p.returncode == 0, p.stderr
        out = p.stdout
    else:
        assert main(["generate", prompt, "--model", folder, "--greedy", "--max-new-tokens", "32"]) == 0
        out = capsys.readouterr().out
    assert out.strip() == want_text.strip()


# -- GGUF -------------------------------------------------------------------------------------
def write_gguf(path, cfg, sd, arch):
    """`sd` (a transformers state dict) as llama.cpp's convert_hf_to_gguf.py writes these
    architectures (F32 tensors; experts stacked; NEOX RoPE: no permutation, except under
    `llama` (Mixtral), whose q/k rows are interleaved per head)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    for e in cfg.eos_token_ids:
        w.add_eos_token_id(e)
    if cfg.rotary != cfg.head_dim:
        w.add_rope_dimension_count(cfg.rotary)
    if cfg.long_rope is not None:  # as llama.cpp's Phi3MiniModel writes LongRoPE
        _, short, long, old, factor = cfg.rope_scaling
        w.add_rope_scaling_attn_factors(factor)
        w.add_rope_scaling_orig_ctx_len(old)
        w.add_tensor("rope_factors_long.weight", np.asarray(long, np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(short, np.float32))
    if cfg.moe:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.experts_per_token)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    names = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "attn_q",
             "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
             "self_attn.o_proj.weight": "attn_output", "self_attn.q_norm.weight": "attn_q_norm",
             "self_attn.k_norm.weight": "attn_k_norm", "post_attention_layernorm.weight": "ffn_norm",
             "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
             "mlp.gate.weight": "ffn_gate_inp", "self_attn.qkv_proj.weight": "attn_qkv",
             "mlp.gate_up_proj.weight": "ffn_up"}
    top = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    for name, t in sd.items():
        a = t.float().numpy()
        if name in top:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            w.add_tensor(top[name] + ".weight", a)
            continue
        _, _, i, rest = name.split(".", 3)
        if rest == "mlp.experts.gate_up_proj":  # [N, 2F, E] -> ffn_gate_exps, ffn_up_exps [N, F, E]
            gate, up = np.split(a, 2, axis=1)
            w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(up))
        elif rest == "mlp.experts.down_proj":  # [N, E, F]
            w.add_tensor(f"blk.{i}.ffn_down_exps.weight", np.ascontiguousarray(a))
        else:
            if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                n = cfg.num_heads if "q_proj" in rest else cfg.num_kv_heads  # llama.cpp's permute
                a = a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
            w.add_tensor(f"blk.{i}.{names[rest]}.weight", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family,arch,extra", [
    ("qwen3", "qwen3", {}), ("qwen3-moe", "qwen3moe", {"norm_topk_prob": True}), ("phi3", "phi3", {}),
    ("phi3-longrope", "phi3", {}), ("mixtral", "llama", {})])
def test_gguf_round_trip(tmp_path, family, arch, extra):
    """A GGUF file written from a transformers checkpoint loads to the same config and
    bit-identical params as the checkpoint's folder, and so to the same logits."""
    model = make_hf_model(family, **extra)
    folder = save_hf_model(model, tmp_path / "hf")
    cfg, params = load_hf_folder(folder)
    path = write_gguf(tmp_path / "tiny.gguf", cfg, model.state_dict(), arch)
    g_cfg, g_params = load_gguf(path)
    if cfg.long_rope is not None:  # GGUF keeps LongRoPE's factors in float32: the same RoPE
        f32 = [np.asarray(x, np.float32) for x in cfg.rope_scaling[1:]]
        assert all(np.array_equal(a, np.asarray(b, np.float32)) for a, b in zip(f32, g_cfg.rope_scaling[1:]))
        g_cfg = dataclasses.replace(g_cfg, rope_scaling=cfg.rope_scaling)
    assert g_cfg == cfg
    flat, g_flat = jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(g_params)
    assert [p for p, _ in flat] == [p for p, _ in g_flat]
    for (p, a), (_, b) in zip(flat, g_flat):
        assert np.array_equal(a, b), jax.tree_util.keystr(p)
    tokens = tokens_of(cfg, 12, seed=11)[None]
    np.testing.assert_allclose(np.asarray(forward_parallel(jax.tree.map(jnp.asarray, g_params), g_cfg,
                                                           jnp.asarray(tokens))[0]),
                               hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_converted_folder_keeps_the_config(tmp_path):
    """`msrnn convert`'s folder restores the same config (LongRoPE's two factor lists are
    tuples in a hashable config, lists in JSON) and params."""
    import msrnn_jax.convert as convert

    folder = save_hf_model(make_hf_model("phi3-longrope", num_hidden_layers=1), tmp_path / "hf")
    out = convert.convert_cli(folder, tmp_path / "conv", dtype="float32")
    a, b = convert.load_model(folder), convert.load_model(str(out))
    assert a.cfg == b.cfg
    assert jax.tree.all(jax.tree.map(np.array_equal, a.params, b.params))


def test_phi4_mini_config_reads_as_transformers_does():
    """Phi-4-mini's own config.json (its 48 LongRoPE factors, partial rotary 0.75, the
    remote code's neutral switches): the same RoPE frequencies and attention factor as
    transformers computes from it."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    long = [1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
            2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
            5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
            11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
            25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
            32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77]
    hf = {"architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
          "bos_token_id": 199999, "embd_pdrop": 0.0, "eos_token_id": 199999, "full_attn_mod": 1,
          "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
          "interpolate_factor": 1, "lm_head_bias": False, "max_position_embeddings": 131072,
          "mlp_bias": False, "model_type": "phi3", "num_attention_heads": 24, "num_hidden_layers": 32,
          "num_key_value_heads": 8, "original_max_position_embeddings": 4096, "pad_token_id": 199999,
          "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
          "rope_scaling": {"long_factor": long, "short_factor": [1.0] * 48, "type": "longrope"},
          "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True,
          "torch_dtype": "bfloat16", "transformers_version": "4.45.0", "use_cache": True, "vocab_size": 200064}
    cfg = ModelConfig.from_hf_config(hf)
    assert (cfg.rotary, cfg.head_dim, cfg.long_rope[0]) == (96, 128, 4096)
    t_cfg = __import__("transformers").Phi3Config(**{k: v for k, v in hf.items() if k != "torch_dtype"})
    fn = ROPE_INIT_FUNCTIONS["longrope"]
    short, factor = fn(t_cfg, None)
    long_inv, _ = fn(t_cfg, None, seq_len=4097)
    assert factor == pytest.approx(cfg.rope_attention_factor, rel=1e-12)
    # float32 powers: numpy's and torch's differ in the last bit for a few dims
    np.testing.assert_allclose(cfg.inv_freq(), short.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(cfg.inv_freq(long=True), long_inv.numpy(), rtol=1e-6, atol=0)
    with pytest.raises(UnsupportedConfigError, match="full_attn_mod"):
        ModelConfig.from_hf_config({**hf, "full_attn_mod": 2})


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family,changes,needle", [
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("qwen3-moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
    ("qwen3-moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ("qwen3", {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e6}}, "dynamic"),
    ("qwen3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("qwen3", {"model_type": "gemma3_text"}, "hidden_activation='silu'"),
])
def test_unhandled_config_fields_are_refused(tmp_path, family, changes, needle):
    folder = tmp_path / family
    save_hf_model(make_hf_model(family, num_hidden_layers=1), folder)
    hf = json.loads((folder / "config.json").read_text())
    hf.update(changes)
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UnsupportedConfigError, match=needle) as e:
        load_hf_folder(folder)
    assert "\n" not in str(e.value)
