"""Small helpers shared by the loaders: dtype names and one-line error messages."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ..errors import MsrnnError

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}


def as_dtype(dtype) -> np.dtype | None:
    """`np.float32`, `jnp.bfloat16`, "bfloat16", ... -> a numpy dtype; None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise MsrnnError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        return DTYPES[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise MsrnnError(f"unsupported dtype {dtype!r}") from e
    if dt not in DTYPES.values():
        raise MsrnnError(f"unsupported dtype {dt.name!r} (choose from {', '.join(DTYPES)})")
    return dt


def dtype_name(dt) -> str:
    return np.dtype(dt).name


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (some libraries write paragraphs)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0].strip()


def cast_tree(params: dict, dtype) -> dict:
    """Cast every leaf of a nested dict of arrays to `dtype` (numpy, on the host)."""
    dt = as_dtype(dtype)
    if dt is None:
        return params
    out = {}
    for k, v in params.items():
        out[k] = cast_tree(v, dt) if isinstance(v, dict) else np.asarray(v).astype(dt, copy=False)
    return out
