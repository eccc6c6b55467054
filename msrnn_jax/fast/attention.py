"""How the decode step's query meets the kept slots, and how its layers are looped.

`core.step.step` states *what* a step computes (docs/design.md, "One step"). This module
holds *how*: the choices that change speed and memory, never results. They are bundled
in `StepImpl`, a static argument, so that every choice is its own compiled program, and
each is small and tested against the others (tests/test_step_impl.py).

* `attend(q, k, v, keys, values, visible, impl, layer)`: the query's attention over the
  C kept slots plus the new token, softmax in float32 (docs/design.md, step 3).
* `over_layers(layer, x, params_layers, state, impl)`: run `layer` over every layer's
  slice of the state, with `lax.scan` or unrolled.

The reasons for each choice were measured on an H200; docs/performance.md ("Why the
code is shaped this way") gives the figures:

- attention "einsum" (XLA dot_general, the default), "reduce" (multiply and sum), or
  "pallas" (`kernels`: custom kernels that read the layer's slots inside the whole keys
  and values buffers). With XLA's own kernels on GPU and one query head per KV head
  (Llama-2's MHA), XLA carried the keys or values through a decode loop in a transposed
  layout (a state-sized temporary) and its autotuner wanted a scratch copy of a whole
  buffer: at the largest batches neither fits, and neither happens to a custom call. At
  small batches XLA's einsum is a little faster.
- The softmax keeps the slots' scores and the new token's score apart: concatenating
  them to C + 1 made XLA GPU fuse the new token's q.k into a slow concatenate kernel.
- score_barrier: on GPU, the slot scores get their own kernel (XLA's kernels only).
  Without it XLA fused the product over D into the softmax, which re-read the keys with
  poor coalescing. On the CPU the barrier only costs.
- layer_loop "scan" (one compiled layer body over stacked layers: fast compiles, the
  CPU default) or "unroll" (static layer indices). Per-layer params (`split_layers`)
  are always unrolled: with stacked weights XLA GPU copied every layer's weights out of
  the stack in each step.
- unroll_barrier: unrolled layers get an optimization barrier on the hidden state
  between layers, so that XLA keeps each layer's work (and its state read) in order.
- Unrolled layers also make each row's written entries depend on that row's output
  (`0 * x`, no other effect): otherwise nothing orders the last layer's reads of the
  state before the in-place write, and XLA copied the whole keys and values each step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from ..core.state import Quantized, read
from ..errors import InvalidArgument, check_choice
from . import kernels

F32 = jnp.float32

LAYER_LOOPS = ("scan", "unroll")
ATTENTIONS = ("einsum", "reduce", "pallas")
REINDEX_SCORES = ("auto", "copy", "fused")


@dataclasses.dataclass(frozen=True)
class StepImpl:
    """How `core.step.step` computes (never what): see the module docstring for each field."""

    layer_loop: str = "scan"
    attention: str = "einsum"
    unroll_barrier: bool = True
    score_barrier: bool = True
    reindex_scores: str = "auto"

    def __post_init__(self):
        for name, choices in (("layer_loop", LAYER_LOOPS), ("attention", ATTENTIONS),
                              ("reindex_scores", REINDEX_SCORES)):
            if getattr(self, name) not in choices:
                raise InvalidArgument(f"unknown {name} {getattr(self, name)!r} "
                                      f"(choose from {', '.join(choices)})")


DEFAULT_IMPL = StepImpl()


def fused_reindex(impl: StepImpl) -> bool:
    """Whether `reindex` slot scores rotate the keys inside the product ("fused") rather
    than from a rotated copy ("copy"); "auto": fused off the CPU, never with Pallas."""
    if impl.attention == "pallas":
        return False
    if impl.reindex_scores == "auto":
        return jax.default_backend() != "cpu"
    return impl.reindex_scores == "fused"


SCORE_FORMS = ("auto", "sum", "query")


def rotated_scores(q, K, cos, sin, form: str = "auto"):
    """q [B,Hkv,G,D] . (K [B,Hkv,C,D] rotated by the angles cos, sin [B,Hkv,C,D], or
    [B,1,C,D] when every head keeps the same slots) -> [B,Hkv,G,C] f32, without the
    rotated keys ever being stored. With k' = k cos + rotate_half(k) sin and both halves of
    cos, sin equal, over the half j < D/2, two forms of one sum:
    "sum":   q . k' = sum_j (q1 k1 + q2 k2) c + (q2 k1 - q1 k2) s;
    "query": q . k' = sum_j (q1 c + q2 s) k1 + (q2 c - q1 s) k2 (the query rotated back by
    each slot's angle). "auto" takes the faster: "query" when the angles are shared by
    the heads, else "sum" (`benchmarks/rotated_scores.py`)."""
    form = check_choice("score form", form, SCORE_FORMS)
    if form == "auto":
        form = "query" if cos.shape[1] == 1 < K.shape[1] else "sum"
    h = q.shape[-1] // 2
    q1, q2 = q[..., None, :h].astype(F32), q[..., None, h:].astype(F32)  # [B,Hkv,G,1,h]
    k1, k2 = K[:, :, None, :, :h].astype(F32), K[:, :, None, :, h:].astype(F32)  # [B,Hkv,1,C,h]
    c, s = cos[:, :, None, :, :h], sin[:, :, None, :, :h]
    if form == "query":
        return jnp.sum((q1 * c + q2 * s) * k1 + (q2 * c - q1 * s) * k2, -1)
    return jnp.sum((q1 * k1 + q2 * k2) * c + (q2 * k1 - q1 * k2) * s, -1)


def _slot_scores(q, K, impl: StepImpl, layer, rot=None):
    """q [B,Hkv,G,D] . K -> [B,Hkv,G,C] float32 (f32 sums). K: [B,Hkv,C,D], or the
    whole keys [L,B,Hkv,C,D] with the layer index for Pallas. rot: (cos, sin) when K is
    stored unrotated and is to be rotated inside the product (`rotated_scores`)."""
    if impl.attention == "pallas":
        return kernels.slot_scores(q, K, layer)
    if rot is not None:
        s = rotated_scores(q, K, *rot)
    elif impl.attention == "reduce":
        s = jnp.sum(q[:, :, :, None, :].astype(F32) * K[:, :, None, :, :].astype(F32), -1)
    else:
        s = jnp.einsum("bhgd,bhcd->bhgc", q, K, preferred_element_type=F32)
    if impl.score_barrier and jax.default_backend() != "cpu":
        s = jax.lax.optimization_barrier(s)
    return s


def _slot_mix(w, V, impl: StepImpl, layer):
    """w [B,Hkv,G,C] (V's dtype) . V -> [B,Hkv,G,D] float32 (V as K in `_slot_scores`)."""
    if impl.attention == "pallas":
        return kernels.slot_mix(w, V, layer)
    if impl.attention == "reduce":
        return jnp.sum(w[..., None].astype(F32) * V[:, :, None, :, :].astype(F32), -2)
    return jnp.einsum("bhgc,bhcd->bhgd", w, V, preferred_element_type=F32)


def attend(q, k, v, keys, values, visible, impl: StepImpl = DEFAULT_IMPL, layer: int = 0, rot=None):
    """One query per row over its layer's C kept slots plus the new token.

    q: [B,Hkv,G,D] (G query heads per KV head); k, v: [B,Hkv,D], the new token's;
    keys, values: the layer's slots [B,Hkv,C,D] ([L,B,Hkv,C,D] and `layer` for Pallas);
    visible: bool [B,Hkv,C], the slots the query may see (the new token always can).
    rot: (cos, sin) [B,Hkv or 1,C,D] f32 when the keys are stored unrotated and are rotated
    inside the score product (reindex positions, `fused_reindex`).
    Returns (out [B,Hkv,G,D] f32, weights over the slots [B,Hkv,G,C] f32, weight of the
    new token [B,Hkv,G] f32): softmax over the C + 1 candidates, scores scaled 1/sqrt(D).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    s_old = _slot_scores(q, keys, impl, layer, rot) * scale
    s_old = jnp.where(visible[:, :, None, :], s_old, -jnp.inf)
    s_new = jnp.einsum("bhgd,bhd->bhg", q, k, preferred_element_type=F32) * scale
    m = jnp.maximum(s_old.max(-1), s_new)  # finite: the new token is always visible
    e_old, e_new = jnp.exp(s_old - m[..., None]), jnp.exp(s_new - m)
    den = e_old.sum(-1) + e_new
    w_old, w_new = e_old / den[..., None], e_new / den
    # the weights in the values' dtype as read: an 8-bit state is read in the query's
    out = _slot_mix(w_old.astype(q.dtype if isinstance(values, Quantized) else values.dtype), values, impl, layer)
    return out + w_new[..., None] * v[:, :, None, :].astype(F32), w_old, w_new


def layer_view(K, V, l, impl: StepImpl):
    """A layer's keys and values [B,Hkv,C,D] and the index the kernels then read them at:
    Pallas hands a layer the whole [L,...] buffers, the others the layer's slice."""
    return (K[l], V[l], 0) if impl.attention == "pallas" else (K, V, l)


def rotated_copy(K, V, l, impl: StepImpl, rotate: Callable, dtype=F32):
    """`reindex` keys as the attention reads them when they are not rotated inside the
    score product: a rotated copy of the layer's keys (`rotate(K [B,Hkv,C,D])`), handed to
    Pallas as a one-layer buffer (8-bit keys dequantized to `dtype` first: the rotation
    meets the scale there). Returns (K, V, l)."""
    K, V, l = layer_view(K, V, l, impl)
    K = rotate(read(K, dtype))
    K, V = (K[None], V[None]) if impl.attention == "pallas" else (K, V)
    return K, V, l


def over_layers(layer: Callable, x, layers, state, impl: StepImpl = DEFAULT_IMPL, extra=None):
    """Run `layer(x, lp, keys, values, pos, score, l, extra_l) -> (x, writes)` over every layer.

    layers: the stacked layer params (a dict of [L, ...] arrays) or a list of per-layer
    dicts (`split_layers`). `keys`/`values` are the layer's slice [B,Hkv,C,D] or, for
    Pallas, the whole buffers [L,B,Hkv,C,D] with the static index l. extra: a pytree of
    [L, ...] arrays (or None) handed to each layer sliced. Returns (x, writes stacked on
    a leading L axis)."""
    per_layer = isinstance(layers, (list, tuple))
    if not per_layer and impl.layer_loop == "scan":
        if impl.attention == "pallas":
            return jax.lax.scan(lambda x, xs: layer(x, xs[0], xs[1][None], xs[2][None], *xs[3:5], 0, xs[5]), x,
                                (layers, state.keys, state.values, state.pos, state.score, extra))
        return jax.lax.scan(lambda x, xs: layer(x, *xs[:5], 0, xs[5]), x,
                            (layers, state.keys, state.values, state.pos, state.score, extra))
    outs = []
    for l in range(state.keys.shape[0]):
        lp = layers[l] if per_layer else jax.tree.map(lambda a: a[l], layers)
        ex = jax.tree.map(lambda a: a[l], extra)
        if l and impl.unroll_barrier:
            x = jax.lax.optimization_barrier(x)
        if impl.attention == "pallas":  # the kernels read layer l inside the whole buffers
            x, o = layer(x, lp, state.keys, state.values, state.pos[l], state.score[l], l, ex)
        else:
            x, o = layer(x, lp, state.keys[l], state.values[l], state.pos[l], state.score[l], l, ex)
        outs.append(o)
    writes = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    # order the last layer's state reads before the in-place write (module docstring)
    k, v = writes[0], writes[1]
    dep = (0 * x[None, :, :1, None]).astype(k.dtype)
    return x, (k + dep, v + dep) + tuple(writes[2:])
