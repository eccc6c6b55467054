"""Pallas kernels for the two products of a decode step with the state.

`core.step.step` with `StepImpl(attention="pallas")` reads each layer's keys and values
through these instead of `jnp.einsum`. They take the *whole* keys or values buffer
[L, B, Hkv, C, D] and a static layer index, and read that layer's slots where they lie.
A custom call is opaque to XLA: it does not change the layout of the loop-carried state
buffers, and XLA's autotuner does not run it on scratch copies of its operands. With
XLA's own kernels on the Llama-2 (MHA) shape, those two things kept the largest batches
from fitting on an H200 (docs/performance.md).

Each program handles one (row, KV head, block of Cb slots); the value mix sums its
per-block partial products afterwards (split-K), so a batch-1 step still has
Hkv * C / Cb programs. With one query head per KV head (MHA) a program multiplies and
sums in float32; with several (GQA) it runs the product on tensor cores, the query
rows padded to Triton's 16 and only the real rows stored. Timed alone on an H200
(benchmarks/results/kernels-*.md), each choice is the faster for its case: MHA reads
at ~100% of the copy bandwidth (80-83% padded for tensor cores); Mistral's G=4 at
73-79% on tensor cores (33-39% multiplying and summing). On the CPU the kernels run
in Pallas' interpreter (tests).

An 8-bit state (docs/design.md §13) is read in place: the kernels take its codes
[L,B,Hkv,C,D] and scales [L,B,Hkv,C] (half the bytes). On tensor cores each block is
dequantized in registers to the query's dtype (`codes * scale`, the numbers the einsum
path reads); the float32 multiply-and-sum (MHA) multiplies the codes and applies each
slot's scale once, to its score or to its weight (dequantizing every number first read
the slots at 42% of the copy bandwidth on an H200, against 78% for bfloat16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..core.state import Quantized

F32 = jnp.float32

# (slots per program limit, Triton num_warps or None) by the stored slots' bytes per number.
# The 16-bit choice was tuned on an H200 (benchmarks/results/kernels-*.md); an 8-bit block of
# the same slots is half the bytes, so its own entry (benchmarks.kernel_bench --state-dtype).
TUNING = {2: (256, None), 4: (256, None), 1: (256, None)}


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


def _call_options(warps: int | None) -> dict:
    if warps is None or _interpret():
        return {}
    from jax.experimental.pallas import triton as plt
    return {"compiler_params": plt.CompilerParams(num_warps=warps)}


def _choose(G: int, cb: int, mma: bool | None, warps: int | None) -> tuple[int, bool, int | None]:
    """(query rows per program, tensor cores or not, num_warps). mma=None: tensor cores
    when several query heads share a KV head (GQA). With one (MHA) the product is a
    matrix-vector one: the f32 multiply-and-sum reads the slots at the copy bandwidth,
    and padding the query to Triton's 16 rows costs more than it gains; with several query
    heads per KV head (Mistral) the tensor-core product is faster (docs/performance.md).
    A tensor-core product needs 16 rows and 16 slots at least (Triton's smallest dot)."""
    mma = (G >= 2 if mma is None else mma) and cb >= 16
    if warps is None and mma:
        warps = 8
    return (max(16, _pow2(G)) if mma else _pow2(G)), mma, warps


def _store_rows(o_ref, val, rows: int):
    """o_ref[...] = val, writing only the first `rows` rows (the padding rows of a
    tensor-core product are never written: the output is G / 16 of the bytes)."""
    if rows == val.shape[0]:
        o_ref[...] = val
        return
    from jax.experimental.pallas import triton as plt
    plt.store(o_ref, val, mask=jax.lax.broadcasted_iota(jnp.int32, val.shape, 0) < rows)


def _tuned(x, C: int, block: int | None, warps: int | None) -> tuple[int, int | None]:
    """The block of slots per program and num_warps for buffer x of capacity C: the
    caller's, else TUNING's for the bytes of its stored numbers."""
    limit, w = TUNING.get(jnp.dtype((x.data if isinstance(x, Quantized) else x).dtype).itemsize, (256, None))
    return block or slot_block(C, limit), (w if warps is None else warps)


def _slots(x, cb: int, layer: int):
    """A float or 8-bit buffer as a kernel reads it: (the stored slots [L,B,Hkv,C,D], the
    extra operands and their block specs: an 8-bit buffer's scales [L,B,Hkv,C], Cb at a
    time beside their slots)."""
    if not isinstance(x, Quantized):
        return x, [], []
    return x.data, [x.scale], [pl.BlockSpec((None, None, None, cb), lambda b, h, c: (layer, b, h, c))]


def _refs(refs):
    """A kernel's (scale ref or None, output ref) after its two inputs."""
    return (refs[0] if len(refs) == 2 else None), refs[-1]


def _load(ref, scale_ref, dtype):
    """A block of slots [Cb, D] as `dtype`: as stored, or dequantized in registers (the
    rounding of `Quantized.dequantize(dtype)`)."""
    if scale_ref is None:
        return ref[...].astype(dtype)
    return (ref[...].astype(F32) * scale_ref[...][:, None]).astype(dtype)


def _dot(a, b, contract):
    prec = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=prec, preferred_element_type=F32)


@functools.partial(jax.jit, static_argnames=("layer", "block", "mma", "warps"))
def slot_scores(q, keys, layer: int, block: int | None = None, mma: bool | None = None,
                warps: int | None = None):
    """q [B,Hkv,G,D] . keys[layer] [B,Hkv,C,D] -> [B,Hkv,G,C] float32 (f32 sums).
    keys: an array, or `Quantized` (8 bits and a scale per slot, dequantized in registers).
    mma: the product on tensor cores (query rows padded to 16, q cast to the keys' dtype,
    or kept in its own for 8-bit keys; None: when G >= 2); warps: Triton's num_warps
    (None: 8 with tensor cores, else Triton's)."""
    B, H, G, D = q.shape
    C = keys.shape[3]
    cb, warps = _tuned(keys, C, block, warps)
    data, scales, scale_specs = _slots(keys, cb, layer)
    gp, mma, warps = _choose(G, cb, mma, warps)
    if mma and not scales:
        q = q.astype(data.dtype)

    def kernel(q_ref, k_ref, *refs):
        s_ref, o_ref = _refs(refs)
        if mma:
            k = _load(k_ref, s_ref, q_ref.dtype)
            _store_rows(o_ref, _dot(q_ref[...], k, ((1,), (1,))), G)
            return
        k = k_ref[...].astype(F32)  # [Cb, D]; 8-bit: the codes, each slot's scale after the sum
        for g in range(gp):
            row = jnp.sum(k * q_ref[g, :].astype(F32)[None, :], axis=1)
            o_ref[g, :] = row if s_ref is None else row * s_ref[...]

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, H, gp, C), F32),
        grid=(B, H, C // cb),
        in_specs=[pl.BlockSpec((None, None, gp, D), lambda b, h, c: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, None, cb, D), lambda b, h, c: (layer, b, h, c, 0))]
                 + scale_specs,
        out_specs=pl.BlockSpec((None, None, gp, cb), lambda b, h, c: (b, h, 0, c)),
        interpret=_interpret(),
        name="msrnn_slot_scores",
        **_call_options(warps),
    )(_pad_rows(q, gp), data, *scales)
    return out[:, :, :G]


@functools.partial(jax.jit, static_argnames=("layer", "block", "mma", "warps"))
def slot_mix(w, values, layer: int, block: int | None = None, mma: bool | None = None,
             warps: int | None = None):
    """w [B,Hkv,G,C] . values[layer] [B,Hkv,C,D] -> [B,Hkv,G,D] float32 (w in any float
    dtype; f32 sums; values an array or `Quantized`; mma and warps as in slot_scores, w
    cast to the values' dtype with mma, or kept in its own for 8-bit values)."""
    B, H, G, C = w.shape
    D = values.shape[4]
    cb, warps = _tuned(values, C, block, warps)
    data, scales, scale_specs = _slots(values, cb, layer)
    gp, mma, warps = _choose(G, cb, mma, warps)
    if mma and not scales:
        w = w.astype(data.dtype)
    n = C // cb

    def kernel(w_ref, v_ref, *refs):
        s_ref, o_ref = _refs(refs)
        if mma:
            v = _load(v_ref, s_ref, w_ref.dtype)
            _store_rows(o_ref, _dot(w_ref[...], v, ((1,), (0,))), G)
            return
        v = v_ref[...].astype(F32)  # [Cb, D]; 8-bit: the codes, each slot's scale in its weight
        for g in range(gp):
            wg = w_ref[g, :].astype(F32) if s_ref is None else w_ref[g, :].astype(F32) * s_ref[...]
            o_ref[g, :] = jnp.sum(wg[:, None] * v, axis=0)

    part = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, H, n, gp, D), F32),
        grid=(B, H, n),
        in_specs=[pl.BlockSpec((None, None, gp, cb), lambda b, h, c: (b, h, 0, c)),
                  pl.BlockSpec((None, None, None, cb, D), lambda b, h, c: (layer, b, h, c, 0))]
                 + scale_specs,
        out_specs=pl.BlockSpec((None, None, None, gp, D), lambda b, h, c: (b, h, c, 0, 0)),
        interpret=_interpret(),
        name="msrnn_slot_mix",
        **_call_options(warps),
    )(_pad_rows(w, gp), data, *scales)
    return part.sum(2)[:, :, :G]
