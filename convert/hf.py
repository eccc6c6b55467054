"""Load a Hugging Face folder (config.json + safetensors) of any family of `config.FAMILIES`.

The name map is explicit: every tensor of the checkpoint is either placed, knowingly
ignored (``rotary_emb.inv_freq``, a tied ``lm_head.weight``) or reported as an error, so a
checkpoint of some other layout fails loudly instead of loading half its weights. Layouts
that join several of our arrays in one tensor (phi3's ``qkv_proj`` and ``gate_up_proj``,
experts stacked in one 3-D tensor) and Mixtral's names are first split and renamed to the
one layout below (`canonical_tensors`).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ..config import ModelConfig
from ..errors import MsrnnError
from ..params import param_shapes
from ._common import as_dtype, one_line

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# params key (under "layers") -> (HF name inside model.layers.{i}., is a Linear weight)
LAYER_MAP = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "router": ("mlp.gate.weight", True),
}
# gemma3: its norm before the MLP is pre_feedforward_layernorm, and post_attention_layernorm
# is the sandwich norm of the attention's output
GEMMA3_LAYER_MAP = {**LAYER_MAP, "mlp_norm": ("pre_feedforward_layernorm.weight", False),
                    "post_attn_norm": ("post_attention_layernorm.weight", False),
                    "post_mlp_norm": ("post_feedforward_layernorm.weight", False)}
# routed experts: params key -> HF name inside model.layers.{i}.mlp.experts.{e}.
EXPERT_MAP = {"experts_gate": "gate_proj.weight", "experts_up": "up_proj.weight",
              "experts_down": "down_proj.weight"}
TOP_MAP = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
# Tensors that some checkpoints carry and that carry no information for us.
IGNORABLE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[str, int | tuple | None, bool, tuple]]:
    """HF tensor name -> (params key, index (layer, or (layer, expert)) or None, transpose?,
    HF-layout shape)."""
    shapes = param_shapes(cfg)
    out = {}
    for key, (name, linear) in TOP_MAP.items():
        if key in shapes:
            shape = tuple(shapes[key])
            out[name] = (key, None, linear, shape[::-1] if linear else shape)
    for key, shape in shapes["layers"].items():
        if key in EXPERT_MAP:
            per = tuple(shape[2:])[::-1]
            for i in range(cfg.num_layers):
                for e in range(cfg.num_experts):
                    out[f"model.layers.{i}.mlp.experts.{e}.{EXPERT_MAP[key]}"] = (key, (i, e), True, per)
            continue
        name, linear = (GEMMA3_LAYER_MAP if cfg.gemma else LAYER_MAP)[key]
        per_layer = tuple(shape[1:])
        for i in range(cfg.num_layers):
            out[f"model.layers.{i}.{name}"] = (key, i, linear, per_layer[::-1] if linear else per_layer)
    return out


_MIXTRAL = {"gate.weight": "mlp.gate.weight", "w1.weight": "gate_proj.weight",
            "w3.weight": "up_proj.weight", "w2.weight": "down_proj.weight"}
# experts stacked in one tensor [N, ...]: transformers' joined gate_up_proj and down_proj,
# and GGUF's ffn_{gate,up,down}_exps (named as below by `gguf_loader`)
_STACKED = {"mlp.experts.gate_up_proj": ("gate_proj.weight", "up_proj.weight"),
            "mlp.experts.down_proj": ("down_proj.weight",), "mlp.experts.gate_proj": ("gate_proj.weight",),
            "mlp.experts.up_proj": ("up_proj.weight",)}
_LAYER = re.compile(r"^(model\.layers\.\d+\.)(.+)$")
# a gemma3 (multimodal) checkpoint: the text model under language_model, beside the vision
# tower and its projector (not read: text only)
_GEMMA3_TEXT = (("language_model.model.", "model."), ("model.language_model.", "model."),
                ("language_model.lm_head.", "lm_head."))
_GEMMA3_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def canonical_tensors(cfg: ModelConfig, tensors: dict, where: str, display: dict) -> dict:
    """The checkpoint's tensors (name -> array or zero-arg callable) under the names of
    `expected_tensors`: phi3's qkv_proj (rows q | k | v) and gate_up_proj (gate | up) split,
    Mixtral's block_sparse_moe names renamed, experts stacked in 3-D tensors (transformers'
    gate_up_proj [N, 2F, E] and down_proj [N, E, F]) split per expert. Lazy: a joined tensor
    is read once, when the first of its parts is. `display` learns each new name's source."""
    q, kv, F = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    out, cache = {}, {}

    def split(name, t, rows, pieces):
        """pieces {new name: (first row, end row)} of the tensor `name`, whose rows (after
        stacked experts are laid one after another) must number `rows`."""
        def read():
            if name not in cache:
                arr = np.asarray(t() if callable(t) else t)
                arr = arr.reshape(-1, arr.shape[-1]) if arr.ndim == 3 else arr
                if arr.shape[0] != rows:
                    raise MsrnnError(f"{where}: tensor {display.get(name, name)!r} has {arr.shape[0]} "
                                     f"rows, expected {rows}")
                cache[name] = arr
            return cache[name]
        for new, (a, b) in pieces.items():
            out[new] = lambda a=a, b=b: read()[a:b]
            display.setdefault(new, display.get(name, name))

    for name, t in tensors.items():
        if cfg.gemma:
            if name.startswith(_GEMMA3_VISION):
                continue
            for old, new in _GEMMA3_TEXT:
                if name.startswith(old):
                    display.setdefault(new + name[len(old):], name)
                    name = new + name[len(old):]
                    break
        m = _LAYER.match(name)
        pre, rest = m.groups() if m else ("", "")
        if rest == "self_attn.qkv_proj.weight":
            split(name, t, q + 2 * kv, {pre + "self_attn.q_proj.weight": (0, q),
                                        pre + "self_attn.k_proj.weight": (q, q + kv),
                                        pre + "self_attn.v_proj.weight": (q + kv, q + 2 * kv)})
        elif rest == "mlp.gate_up_proj.weight":
            split(name, t, 2 * F, {pre + "mlp.gate_proj.weight": (0, F), pre + "mlp.up_proj.weight": (F, 2 * F)})
        elif rest in _STACKED and cfg.moe:  # [N, rows of the parts, E or F], expert after expert
            parts = _STACKED[rest]
            n = cfg.hidden_size if parts == ("down_proj.weight",) else cfg.moe_intermediate_size
            split(name, t, cfg.num_experts * len(parts) * n, {
                f"{pre}mlp.experts.{e}.{part}": ((e * len(parts) + j) * n, (e * len(parts) + j + 1) * n)
                for e in range(cfg.num_experts) for j, part in enumerate(parts)})
        elif rest.startswith("block_sparse_moe.") and cfg.family == "mixtral":
            tail = rest.removeprefix("block_sparse_moe.")
            new = _MIXTRAL.get(tail) or re.sub(r"^experts\.(\d+)\.(w[123]\.weight)$",
                                               lambda x: f"mlp.experts.{x.group(1)}.{_MIXTRAL[x.group(2)]}", tail)
            out[pre + new] = t
            display.setdefault(pre + new, name)
        else:
            out[name] = t
    return out


def assemble(cfg: ModelConfig, tensors: dict, where: str, dtype=np.float32,
             display: dict[str, str] | None = None) -> dict:
    """Check HF-layout tensors (name -> array or zero-arg callable) and build the params tree.

    Raises MsrnnError naming the tensor (as `display` names it) on anything missing,
    misshapen or unexpected.
    """
    dt = as_dtype(dtype)
    display = dict(display or {})
    tensors = canonical_tensors(cfg, tensors, where, display)
    want = expected_tensors(cfg)
    for name in tensors:
        if name in want or IGNORABLE.match(name):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the output projection is the embedding
        raise MsrnnError(f"{where}: unexpected tensor {display.get(name, name)!r} "
                         f"(not part of a {cfg.family} model)")
    for name in want:
        if name not in tensors:
            raise MsrnnError(f"{where}: missing tensor {display.get(name, name)!r}")

    layers: dict[str, np.ndarray] = {}
    top: dict[str, np.ndarray] = {}
    for name, (key, layer, linear, shape) in want.items():
        t = tensors[name]
        arr = t() if callable(t) else t
        arr = np.asarray(arr)
        if tuple(arr.shape) != shape:
            raise MsrnnError(f"{where}: tensor {display.get(name, name)!r} has shape "
                             f"{tuple(arr.shape)}, expected {shape}")
        if linear:
            arr = arr.T
        if layer is None:  # always an owned, writable copy (never a view of a mapped file)
            top[key] = np.array(arr, dtype=dt if dt is not None else arr.dtype, order="C")
        else:  # one C-ordered [L, ...] array per key, filled layer by layer (one copy)
            if key not in layers:
                layers[key] = np.empty(param_shapes(cfg)["layers"][key],
                                       dtype=dt if dt is not None else arr.dtype)
            layers[key][layer] = arr
    params = {"embed": top["embed"], "layers": layers, "final_norm": top["final_norm"]}
    if "lm_head" in top:
        params["lm_head"] = top["lm_head"]
    return params


# -- safetensors --------------------------------------------------------------------------
def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise MsrnnError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise MsrnnError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise MsrnnError(f"{path}: corrupt safetensors header ({one_line(e)})") from e
    return header, 8 + n


def _read_bf16(path: Path, name: str, header: dict, start: int) -> np.ndarray:
    info = header[name]
    b, e = info["data_offsets"]
    shape = tuple(info["shape"])
    raw = np.fromfile(path, dtype=np.uint8, count=e - b, offset=start + b)  # a copy, not a map
    if raw.size != e - b:
        raise MsrnnError(f"{path}: tensor {name!r} is truncated")
    return raw.view(ml_dtypes.bfloat16).reshape(shape)


class _SafetensorsFile:
    """One safetensors file: its tensor names, and each tensor read on demand."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            # safe_open validates the header against the file size (truncation shows here).
            self._f = safe_open(str(path), framework="numpy")
            self.names = list(self._f.keys())
            self.dtypes = {k: self._f.get_slice(k).get_dtype() for k in self.names}
        except MsrnnError:
            raise
        except Exception as e:  # SafetensorError, OSError, ...
            raise MsrnnError(f"cannot read {path}: {one_line(e)}") from e
        self._header = None

    def read(self, name: str) -> np.ndarray:
        try:
            if self.dtypes[name] == "BF16":  # numpy has no bfloat16: read the raw bytes
                if self._header is None:
                    self._header = _header(self.path)
                return _read_bf16(self.path, name, *self._header)
            return self._f.get_tensor(name)
        except MsrnnError:
            raise
        except Exception as e:
            raise MsrnnError(f"cannot read tensor {name!r} from {self.path}: {one_line(e)}") from e


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise MsrnnError(f"{index}: corrupt index ({one_line(e)})") from e
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                raise MsrnnError(f"{folder}: shard {name!r} listed in {INDEX_FILE} is missing")
        return [folder / n for n in files]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        raise MsrnnError(f"{folder}: only pickle (.bin/.pth) weights found; safetensors are required")
    raise MsrnnError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found")


def read_hf_config(folder: str | os.PathLike) -> ModelConfig:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise MsrnnError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        hf = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise MsrnnError(f"{path}: invalid JSON ({one_line(e)})") from e
    if not isinstance(hf, dict):
        raise MsrnnError(f"{path}: expected a JSON object")
    try:
        return ModelConfig.from_hf_config(hf)
    except MsrnnError as e:
        raise type(e)(f"{path}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise MsrnnError(f"{path}: bad or missing field ({one_line(e)})") from e


def load_hf_folder(path: str | os.PathLike, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """Read a Hugging Face folder (single or sharded safetensors) -> (config, params).

    `dtype` is the dtype of every returned array (None keeps the checkpoint's own).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MsrnnError(f"model folder not found: {folder}")
    if (folder / "params").is_dir() and not any(folder.glob("*.safetensors")):
        raise MsrnnError(f"{folder}: not a finished msrnn conversion (no msrnn.json; was the "
                         "conversion interrupted? convert it again)")
    cfg = read_hf_config(folder)
    tensors = {}
    for file in _safetensors_files(folder):
        st = _SafetensorsFile(file)
        for name in st.names:
            if name in tensors:
                raise MsrnnError(f"{folder}: tensor {name!r} appears in more than one file")
            tensors[name] = (lambda st=st, name=name: st.read(name))
    return cfg, assemble(cfg, tensors, str(folder), dtype)


def resolve_hub_id(repo_id: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The local snapshot folder of a hub model already in the Hugging Face cache.

    Never downloads (``local_files_only=True``); raises MsrnnError when it is not cached.
    """
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir)
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError, ...
        raise MsrnnError(f"model {repo_id!r} not found locally; nothing is downloaded at run time") from e
