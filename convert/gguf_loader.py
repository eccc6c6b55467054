"""Load a llama.cpp GGUF file (llama / mistral and mixtral as llama / qwen2 / qwen3 / qwen3moe / phi3 /
gemma3) into params.

Every tensor is dequantized with gguf-py's own `gguf.quants.dequantize` (exactly what
transformers' GGUF loader does), reshaped to the reversed ggml shape, and renamed to the
Hugging Face layout. llama.cpp's converter permutes the rows of the q/k projections of
llama-family models (per head it interleaves the two rotary halves, for ggml's
"normal" RoPE); that permutation is undone here so q/k are in Hugging Face's rotate-half
layout again. qwen2, qwen3, qwen3moe and phi3 files use NEOX RoPE in llama.cpp and are
stored unpermuted; phi3's joined attn_qkv and ffn_up (gate | up) and qwen3moe's stacked
experts are split by `hf.canonical_tensors`.
(This module is not called `gguf.py` so as not to shadow the `gguf` package.)
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import MsrnnError, UnsupportedConfigError
from ._common import as_dtype, one_line
from .gguf_tokenizer import build_tokenizer, tokenizer_metadata
from .hf import assemble, expected_tensors

ROPE_FACTORS = {"rope_factors_long.weight", "rope_factors_short.weight"}  # read into the config
ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "phi3", "gemma3")
FAMILY = {"qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}  # GGUF architecture -> model_type, where they differ

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
}
# phi3 stores its joined gate | up projection as ffn_up
_PHI3_NAMES = {"ffn_up.weight": "mlp.gate_up_proj.weight"}
# gemma3: its four norms per layer (ffn_norm is the pre-MLP one), all stored as 1 + w by
# llama.cpp's converter (`GEMMA3_NORM_SHIFT`, undone on load)
_GEMMA3_NAMES = {"ffn_norm.weight": "pre_feedforward_layernorm.weight",
                 "post_attention_norm.weight": "post_attention_layernorm.weight",
                 "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
GEMMA3_NORM_SHIFT = 1.0
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")

# Metadata that would change the math if present with a non-neutral value.
_MATH_KEYS = {
    "expert_count": 0, "expert_used_count": 0, "logit_scale": 1.0, "embedding_scale": 1.0,
    "residual_scale": 1.0, "attention.scale": None, "attn_logit_softcapping": 0.0,
    "final_logit_softcapping": 0.0, "attention.clamp_kqv": 0.0,
}


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor, or None if it has none."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    names = {**_LAYER_NAMES, **{"phi3": _PHI3_NAMES, "gemma3": _GEMMA3_NAMES}.get(arch, {})}
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}"
    return None


def gguf_tensor_name(hf_name: str) -> str:
    """Inverse of `hf_tensor_name` (for error messages about missing tensors)."""
    for g, h in _TOP_NAMES.items():
        if h == hf_name:
            return g
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf_name)
    if m:
        for g, h in _LAYER_NAMES.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}"
    return hf_name


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute`: HF rotate-half rows -> interleaved pairs."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk` (transformers' `_reverse_permute_weights`)."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _f32(v) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.9999997e-06)."""
    return float(repr(np.float32(v)).removeprefix("np.float32(").removesuffix(")"))


def gguf_dequantize(t) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(t.data, t.tensor_type)


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise MsrnnError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # ValueError (bad magic/version), IndexError/ValueError (truncated), ...
        raise MsrnnError(f"cannot read GGUF file {path}: {one_line(e)} (truncated or corrupt?)") from e


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:
        raise MsrnnError(f"GGUF metadata {key!r} is unreadable: {one_line(e)}") from e


def _config(reader, path: Path) -> tuple[ModelConfig, str]:
    arch = _field(reader, "general.architecture")
    if arch is None:
        raise MsrnnError(f"{path}: no general.architecture in the GGUF metadata")
    if arch not in ARCHITECTURES:
        raise UnsupportedConfigError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: llama, "
            "mistral stored as llama, qwen2, qwen3, qwen3moe, phi3, gemma3)")
    if int(_field(reader, "split.count", 1) or 1) > 1:
        raise UnsupportedConfigError(f"{path}: split GGUF files are not supported; merge them first")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise MsrnnError(f"{path}: missing GGUF metadata {arch}.{key}")
        return v

    def scalar(key, v):
        if isinstance(v, list):  # per-layer arrays (some newer models)
            if len(set(v)) != 1:
                raise UnsupportedConfigError(f"{path}: per-layer {arch}.{key}={v} is not supported")
            v = v[0]
        return v

    # llama.cpp stores Mixtral as llama with experts (stacked ffn_*_exps tensors)
    mixtral = arch == "llama" and int(_field(reader, f"{arch}.expert_count", 0) or 0) > 0
    for key, neutral in _MATH_KEYS.items():
        if (arch == "qwen3moe" or mixtral) and key in ("expert_count", "expert_used_count"):
            continue  # read below
        if arch == "gemma3" and key in ("attention.scale", "final_logit_softcapping"):
            continue  # read below
        v = _field(reader, f"{arch}.{key}")
        if v is not None and v != neutral and not (neutral is None and v in (0, 0.0)):
            raise UnsupportedConfigError(f"{path}: unsupported GGUF metadata {arch}.{key}={v!r}")

    tensor_names = {t.name for t in reader.tensors}
    long_rope = None
    if ROPE_FACTORS & tensor_names:  # phi3's LongRoPE: its two factor lists stored as tensors
        if arch != "phi3" or not ROPE_FACTORS <= tensor_names:
            raise UnsupportedConfigError(f"{path}: GGUF tensors {sorted(ROPE_FACTORS & tensor_names)} "
                                         f"are only read in a phi3 file holding both")
        factors = {t.name: [_f32(x) for x in np.asarray(gguf_dequantize(t)).reshape(-1)]
                   for t in reader.tensors if t.name in ROPE_FACTORS}
        long_rope = {"rope_type": "longrope", "short_factor": factors["rope_factors_short.weight"],
                     "long_factor": factors["rope_factors_long.weight"],
                     "original_max_position_embeddings": int(need("rope.scaling.original_context_length")),
                     "attention_factor": float(_f32(need("rope.scaling.attn_factor")))}
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedConfigError(
            f"{path}: GGUF tensor 'rope_freqs.weight' (llama3-style RoPE frequency factors) is not "
            "supported; convert the Hugging Face checkpoint instead")

    name = str(_field(reader, "general.name", "") or "")
    family = "mistral" if arch == "llama" and "mistral" in name.lower() else FAMILY.get(arch, arch)
    family = "mixtral" if mixtral else family
    E = int(need("embedding_length"))
    H = int(scalar("attention.head_count", need("attention.head_count")))
    Hkv = int(scalar("attention.head_count_kv", _field(reader, f"{arch}.attention.head_count_kv", H)))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", 0) or 0) or E // H
    v_dim = int(_field(reader, f"{arch}.attention.value_length", head_dim))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if v_dim != head_dim:
        raise UnsupportedConfigError(f"{path}: key_length {head_dim} != value_length {v_dim}")
    if rope_dim != head_dim and arch != "phi3":
        raise UnsupportedConfigError(
            f"{path}: partial rotary embedding (rope.dimension_count={rope_dim}, head_dim={head_dim})")

    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise MsrnnError(f"{path}: missing tensor 'token_embd.weight'")
        vocab = int(embd.shape[-1])

    scaling = None
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    legacy = _field(reader, f"{arch}.rope.scale_linear")
    if kind is None and legacy not in (None, 1.0):
        kind, factor = "linear", legacy
    if kind not in (None, "none") and not (kind == "linear" and factor in (None, 1.0)):
        scaling = {"rope_type": kind, "factor": _f32(factor) if factor is not None else 1.0}
        old = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if old is not None:
            scaling["original_max_position_embeddings"] = int(old)

    sliding = _field(reader, f"{arch}.attention.sliding_window")
    if sliding and family not in ("mistral", "phi3", "gemma3_text"):
        raise UnsupportedConfigError(f"{path}: unsupported GGUF metadata {arch}.attention.sliding_window")

    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(int(e) for e in eos if e is not None))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    hf = {
        "model_type": family,
        "vocab_size": int(vocab),
        "hidden_size": E,
        "intermediate_size": int(scalar("feed_forward_length", need("feed_forward_length"))),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": H,
        "num_key_value_heads": Hkv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": scaling,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "bos_token_id": int(bos) if bos is not None else None,
        "eos_token_id": eos,
        "sliding_window": int(sliding) if sliding else None,
    }
    if rope_dim != head_dim:  # phi3 (Phi-4-mini): RoPE on the first rope_dim dims
        hf["partial_rotary_factor"] = rope_dim / head_dim
    if long_rope is not None:
        hf["rope_scaling"] = long_rope
    if mixtral:
        hf.update(num_local_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")))
    if arch == "qwen3moe":
        norm = _field(reader, f"{arch}.expert_weights_norm")
        hf.update(num_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
                  moe_intermediate_size=int(need("expert_feed_forward_length")),
                  # llama.cpp renormalises qwen3moe's chosen weights unless told otherwise
                  norm_topk_prob=True if norm is None else bool(norm))
    if arch == "gemma3":  # llama.cpp's gemma3: global every 6th layer, local RoPE base 1e4 unless said
        L = hf["num_hidden_layers"]
        pattern = _field(reader, f"{arch}.attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # per layer: True = sliding
            swa = [bool(x) for x in pattern]
        else:
            swa = [bool((i + 1) % int(pattern)) for i in range(L)]
        scale = _field(reader, f"{arch}.attention.scale")
        # llama.cpp scales scores by attention.scale, else (Gemma-3-27B, 62 layers) by
        # 1/sqrt(E / H), else by 1/sqrt(head_dim)
        qpas = 1.0 / float(scale) ** 2 if scale else (E / H if L == 62 else head_dim)
        qpas = float(round(qpas)) if abs(qpas - round(qpas)) < 1e-4 * qpas else qpas  # a float32 scale's
        cap = _field(reader, f"{arch}.final_logit_softcapping")
        hf.update(layer_types=["sliding_attention" if x else "full_attention" for x in swa],
                  rope_local_base_freq=_f32(_field(reader, f"{arch}.rope.freq_base_swa", 10000.0)),
                  query_pre_attn_scalar=qpas, final_logit_softcapping=float(_f32(cap)) if cap else None)
    try:
        return ModelConfig.from_hf_config(hf), arch
    except MsrnnError as e:
        raise type(e)(f"{path}: {e}") from e


def _load(path, dtype=np.float32, notify=None, tokenizer: bool = True):
    """(cfg, params, tokenizer): one parse of the file for all three (the tokenizer is None
    when the file carries none or `tokenizer` is False; `gguf_tokenizer` builds it, no
    PyTorch). `notify()` is called
    once the file's header reads well, before the slow part, which then shows a bar over
    the tensors on stderr when that is a terminal."""
    import gguf
    from tqdm.auto import tqdm

    path = Path(path)
    reader = _reader(path)
    cfg, arch = _config(reader, path)
    dt = as_dtype(dtype)
    if notify is not None:
        notify()

    def dequant(t):
        def read():
            try:
                w = gguf.quants.dequantize(t.data, t.tensor_type)
                w = np.asarray(w).reshape(tuple(int(x) for x in reversed(t.shape.tolist())))
            except Exception as e:
                raise MsrnnError(f"{path}: cannot dequantize tensor {t.name!r} "
                                 f"({t.tensor_type.name}): {one_line(e)}") from e
            if arch == "llama" and t.name.endswith((".attn_q.weight", ".attn_k.weight")):
                n = cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads
                if w.shape[0] % (2 * n):
                    raise MsrnnError(f"{path}: tensor {t.name!r} has shape {w.shape}, "
                                     f"not divisible into {n} heads")
                w = unpermute_qk(w, n)
            if arch == "gemma3" and t.name.endswith("norm.weight"):  # stored as 1 + w
                w = (np.asarray(w, np.float32) - np.float32(GEMMA3_NORM_SHIFT))
            bar.update(1)
            return w if dt is None else w.astype(dt, copy=False)
        return read

    bar = tqdm(total=len(reader.tensors), unit="tensor", desc="converting", leave=False,
               file=sys.stderr, disable=None if notify is not None else True)
    tensors = {}
    display = {name: gguf_tensor_name(name) for name in expected_tensors(cfg)}
    for t in reader.tensors:
        if t.name in ROPE_FACTORS:
            continue
        hf = hf_tensor_name(t.name, arch) or t.name
        tensors[hf] = dequant(t)
        display[hf] = t.name
    with bar:
        params = assemble(cfg, tensors, str(path), dt, display=display)
    meta = tokenizer_metadata(reader, path) if tokenizer else {}
    return cfg, params, build_tokenizer(meta, path) if "tokenizer.ggml.model" in meta else None


def load_gguf(path: str | os.PathLike, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """Read a GGUF file -> (config, params) in float32 (or `dtype`); needs no tokenizer."""
    cfg, params, _ = _load(path, dtype, tokenizer=False)
    return cfg, params
