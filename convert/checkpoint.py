"""A converted model folder: orbax params + config + tokenizer, written atomically.

Layout of ``OUT/``::

    config.json     ModelConfig.to_dict() plus a "msrnn_provenance" entry
    params/         the param tree, an orbax checkpoint (numpy arrays, bit-exact)
    tokenizer/      tokenizer.save_pretrained() output (absent when there is none)
    msrnn.json      the marker: format + version, written last

Everything is written into a sibling ``OUT.tmp-<random>`` folder that is renamed to OUT
only once complete, and removed on any failure or interrupt; a folder without the marker
(say, copied half-way) is refused by `load_converted`.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import MsrnnError
from ..io.files import temp_folder, temporary
from ..params import check_params
from ._common import as_dtype, cast_tree, dtype_name, one_line

MARKER = "msrnn.json"
FORMAT = "msrnn-jax-converted"
VERSION = 1
PROVENANCE_KEY = "msrnn_provenance"


def is_converted_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def _package_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("msrnn-jax")
    except Exception:
        return None


def _to_numpy(params: dict) -> dict:
    return {k: _to_numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in params.items()}


def _leaf_dtypes(params: dict) -> set:
    out = set()
    for v in params.values():
        out |= _leaf_dtypes(v) if isinstance(v, dict) else {np.asarray(v).dtype}
    return out


def _checkpointer():
    import orbax.checkpoint as ocp

    # Synchronous on purpose: nothing may still be writing after an interrupt is handled.
    return ocp, ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def check_output_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The absolute output folder, if a conversion may be written there (checked before
    any work): absent, empty, or (with `overwrite`) a folder to replace."""
    out = Path(out_dir).absolute()
    if out.exists():
        if not out.is_dir():
            raise MsrnnError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise MsrnnError(f"{out} already exists and is not empty (overwrite replaces it)", "overwrite")
    return out


def save_converted(out_dir: str | os.PathLike, cfg: ModelConfig, params: dict, tokenizer=None,
                   source: str | None = None, dtype=None, overwrite: bool = False) -> Path:
    """Write a self-contained converted model folder; atomic (all or nothing).

    `dtype` ("float32", "bfloat16", np dtype; None = keep) casts every array first.
    Refuses an existing non-empty `out_dir` unless `overwrite`. Returns the folder.
    """
    out = check_output_folder(out_dir, overwrite)
    check_params(cfg, params)
    params = _to_numpy(cast_tree(params, dtype) if dtype is not None else params)
    dtypes = _leaf_dtypes(params)
    if len(dtypes) != 1:
        raise MsrnnError(f"parameters have mixed dtypes {sorted(d.name for d in dtypes)}; pass dtype")
    (param_dtype,) = dtypes
    as_dtype(param_dtype)  # only float32 / bfloat16 / float16

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(out)
    try:
        with temporary(tmp):
            created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            provenance = {"source": source, "dtype": dtype_name(param_dtype), "created": created,
                          "msrnn_jax_version": _package_version()}
            _write_json(tmp / "config.json", {**cfg.to_dict(), PROVENANCE_KEY: provenance})
            ocp, ckpt = _checkpointer()
            try:
                ckpt.save(tmp / "params", args=ocp.args.StandardSave(params))
            finally:
                ckpt.close()
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
            _write_json(tmp / MARKER, {"format": FORMAT, "version": VERSION,
                                       "dtype": dtype_name(param_dtype),
                                       "tokenizer": tokenizer is not None, "source": source,
                                       "created": created})
            _publish(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (MsrnnError, KeyboardInterrupt, SystemExit)) or not isinstance(e, Exception):
            raise
        raise MsrnnError(f"cannot write {out}: {one_line(e)}") from e
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished temp folder to `out` (replacing what is there)."""
    old = None
    if out.exists() and any(out.iterdir()):
        old = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)  # onto a missing or empty folder: atomic on POSIX
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MsrnnError(f"{path.parent}: missing {path.name} ({what})") from None
    except (OSError, ValueError) as e:
        raise MsrnnError(f"{path}: unreadable {what} ({one_line(e)})") from e


def read_converted_config(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(cfg, marker) of a converted folder, without touching the params."""
    folder = Path(path)
    if not folder.is_dir():
        raise MsrnnError(f"converted model folder not found: {folder}")
    if not (folder / MARKER).is_file():
        raise MsrnnError(f"{folder}: not a finished msrnn conversion (no {MARKER}; "
                         "was the conversion interrupted? convert it again)")
    marker = _read_json(folder / MARKER, "marker")
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise MsrnnError(f"{folder / MARKER}: not an msrnn marker file")
    if int(marker.get("version", 0)) > VERSION:
        raise MsrnnError(f"{folder}: written by a newer msrnn-jax (format version "
                         f"{marker.get('version')}, this one reads {VERSION})")
    d = _read_json(folder / "config.json", "model config")
    if not isinstance(d, dict):
        raise MsrnnError(f"{folder / 'config.json'}: expected a JSON object")
    d.pop(PROVENANCE_KEY, None)
    try:
        cfg = ModelConfig.from_dict(d)
    except MsrnnError as e:
        raise type(e)(f"{folder / 'config.json'}: {e}") from e
    except (TypeError, ValueError) as e:
        raise MsrnnError(f"{folder / 'config.json'}: bad model config ({one_line(e)})") from e
    return cfg, marker


def load_converted(path: str | os.PathLike, dtype=None, tokenizer: bool = True):
    """Restore a folder written by `save_converted` -> (cfg, params, tokenizer or None).

    Params are numpy arrays, bit-identical to what was saved (cast only if `dtype`).
    """
    folder = Path(path).absolute()
    cfg, marker = read_converted_config(folder)
    if not (folder / "params").is_dir():
        raise MsrnnError(f"{folder}: missing params/ folder")
    try:
        ocp, ckpt = _checkpointer()
        try:
            params = ckpt.restore(folder / "params")
        finally:
            ckpt.close()
    except Exception as e:
        raise MsrnnError(f"{folder / 'params'}: cannot restore the parameters ({one_line(e)})") from e
    if not isinstance(params, dict):
        raise MsrnnError(f"{folder / 'params'}: not a parameter tree")
    params = _to_numpy(params)
    check_params(cfg, params)
    want = marker.get("dtype")
    got = sorted(d.name for d in _leaf_dtypes(params))
    if want and got != [want]:
        raise MsrnnError(f"{folder / 'params'}: dtype {got} does not match the marker's {want!r}")
    if dtype is not None:
        params = cast_tree(params, dtype)
    tok = None
    if tokenizer and marker.get("tokenizer"):
        tok_dir = folder / "tokenizer"
        if not tok_dir.is_dir():
            raise MsrnnError(f"{folder}: missing tokenizer/ folder")
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except Exception as e:
            raise MsrnnError(f"{tok_dir}: cannot load the tokenizer ({one_line(e)})") from e
    return cfg, params, tok
