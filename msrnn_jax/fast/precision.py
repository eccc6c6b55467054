"""The matmul precision policy (docs/design.md, "Precision").

fp32 params mean fp32-exact matrix products (`highest`) on every backend: on a GPU, XLA's
default for float32 dot products is TF32 (10 mantissa bits), which moved logits by 3e-3
to 1e-2 and changed eviction decisions on an H200. bf16 params use the backend's default
(bf16 products are exact in either setting up to their own rounding, and the default is
the fast one).

Two layers:

* `exact_for_f32`, a decorator on every jitted entry point of `model` and `decoding`
  (and on `core.step.step`, which callers may run eagerly). At trace time it wraps the body
  in `jax.default_matmul_precision("highest")` when the params hold float32 matrices and
  nobody chose a precision, so the low-level functions are exact for fp32 params however
  they are called. `jax.default_matmul_precision` inside a traced function sets the
  precision of every dot traced within it (it is read when the dot is bound).
* An explicit choice wins: `Model.precision` ("default", "high", "highest"; from
  `load_model(precision=...)` or `--precision`), applied with
  `jax.default_matmul_precision(...)` around the calls, or the `JAX_DEFAULT_MATMUL_PRECISION`
  environment variable. Either sets JAX's config, which also keys jit's cache, so a
  program compiled under one precision is never reused under another.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import jax
import jax.numpy as jnp

from ..errors import check_choice

PRECISIONS = ("default", "high", "highest")


def check_precision(value: str | None) -> str | None:
    """None (choose by the params' dtype) or one of PRECISIONS."""
    if value is None:
        return None
    return check_choice("precision", value, PRECISIONS, "precision")


def for_params(params) -> str:
    """The precision the policy gives these params: "highest" when any matrix (ndim >= 2)
    is float32, "default" otherwise (bf16)."""
    for leaf in jax.tree.leaves(params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and getattr(leaf, "ndim", 0) >= 2 and jnp.dtype(dtype) == jnp.float32:
            return "highest"
    return "default"


def chosen() -> str | None:
    """The precision a caller set explicitly (context or environment), else None."""
    return jax.config.jax_default_matmul_precision


def precision_for(params):
    """A context: the caller's explicit precision if any, else the one for `params`' dtype."""
    if chosen() is not None or for_params(params) == "default":
        return contextlib.nullcontext()  # the caller's choice, or the backend's default (bf16)
    return jax.default_matmul_precision("highest")


def scope(precision: str | None):
    """A context applying an explicit precision (None: leave the choice to the dtype)."""
    if precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(check_precision(precision))


def exact_for_f32(fn):
    """Run `fn(params, ...)` under `precision_for(params)` (see the module docstring).
    The wrapper keeps `fn`'s signature, so jit's static and donated argument names work."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        params = args[0] if args else kwargs.get(next(iter(sig.parameters)))
        with precision_for(params):
            return fn(*args, **kwargs)

    return wrapped
