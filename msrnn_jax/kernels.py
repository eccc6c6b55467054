"""Pallas kernels for the two products of a decode step with the state.

`model.step` with `StepImpl(attention="pallas")` reads each layer's keys and values
through these instead of `jnp.einsum`. They take the *whole* keys or values buffer
[L, B, Hkv, C, D] and a static layer index, and read that layer's slots where they lie.
A custom call is opaque to XLA: it does not change the layout of the loop-carried state
buffers, and XLA's autotuner does not run it on scratch copies of its operands. With
XLA's own kernels on the Llama-2 (MHA) shape, those two things kept the largest batches
from fitting on an H200 (benchmarks/results/decode-2026-11-29.md).

Each program handles one (row, KV head, block of Cb slots); the value mix sums its
per-block partial products afterwards (split-K), so a batch-1 step still has
Hkv * C / Cb programs. On the CPU the kernels run in Pallas' interpreter (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32


def slot_block(capacity: int, limit: int = 256) -> int:
    """The slots per program: the largest power of two <= limit dividing C (Triton blocks
    are powers of two; C = 4128 = 129 x 32 gives 32)."""
    cb = 1
    while cb * 2 <= limit and capacity % (cb * 2) == 0:
        cb *= 2
    return cb


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pad_rows(x, rows):
    return x if x.shape[2] == rows else jnp.pad(x, ((0, 0), (0, 0), (0, rows - x.shape[2]), (0, 0)))


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


@functools.partial(jax.jit, static_argnames=("layer", "block"))
def slot_scores(q, keys, layer: int, block: int | None = None):
    """q [B,Hkv,G,D] . keys[layer] [B,Hkv,C,D] -> [B,Hkv,G,C] float32 (f32 products and sums)."""
    B, H, G, D = q.shape
    C = keys.shape[3]
    cb = block or slot_block(C)
    gp = _pow2(G)

    def kernel(q_ref, k_ref, o_ref):
        k = k_ref[...].astype(F32)  # [Cb, D]
        for g in range(gp):
            o_ref[g, :] = jnp.sum(k * q_ref[g, :].astype(F32)[None, :], axis=1)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, H, gp, C), F32),
        grid=(B, H, C // cb),
        in_specs=[pl.BlockSpec((None, None, gp, D), lambda b, h, c: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, None, cb, D), lambda b, h, c: (layer, b, h, c, 0))],
        out_specs=pl.BlockSpec((None, None, gp, cb), lambda b, h, c: (b, h, 0, c)),
        interpret=_interpret(),
        name="msrnn_slot_scores",
    )(_pad_rows(q, gp), keys)
    return out[:, :, :G]


@functools.partial(jax.jit, static_argnames=("layer", "block"))
def slot_mix(w, values, layer: int, block: int | None = None):
    """w [B,Hkv,G,C] . values[layer] [B,Hkv,C,D] -> [B,Hkv,G,D] float32 (w in any float
    dtype; f32 products and sums)."""
    B, H, G, C = w.shape
    D = values.shape[4]
    cb = block or slot_block(C)
    gp = _pow2(G)
    n = C // cb

    def kernel(w_ref, v_ref, o_ref):
        v = v_ref[...].astype(F32)  # [Cb, D]
        for g in range(gp):
            o_ref[g, :] = jnp.sum(w_ref[g, :].astype(F32)[:, None] * v, axis=0)

    part = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, H, n, gp, D), F32),
        grid=(B, H, n),
        in_specs=[pl.BlockSpec((None, None, gp, cb), lambda b, h, c: (b, h, 0, c)),
                  pl.BlockSpec((None, None, None, cb, D), lambda b, h, c: (layer, b, h, c, 0))],
        out_specs=pl.BlockSpec((None, None, None, gp, D), lambda b, h, c: (b, h, c, 0, 0)),
        interpret=_interpret(),
        name="msrnn_slot_mix",
    )(_pad_rows(w, gp), values)
    return part.sum(2)[:, :, :G]
