"""Layer groups (docs/design.md §12): the step of a model whose layers differ in how far
they attend (Gemma 3: five sliding-window layers per global one).

The state is `state.Groups`: one fixed-shape `State` per group of layers, each with its
own capacity and policy. A sliding group keeps its window (policy `window`, W - 1 slots:
a token sees itself and the W - 1 before it), so it equals the model; the user's policy
and capacity bound the global group. The step below is `core.step.step` with the layer
loop unrolled over the model's layers in order, each layer reading and writing its
group's slice: the same `layer_step`, with the group's config (its window and RoPE) and
policy. Models of one group never come here (a plain `State`, unchanged programs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..fast.attention import DEFAULT_IMPL, StepImpl
from .layers import embed, logits_from_hidden
from .policies import Policy
from .positions import positions_of
from .state import Groups, State


def layer_params(layers, l: int):
    """Layer l's params from stacked ([L, ...]) or per-layer (a list) layers."""
    return layers[l] if isinstance(layers, (list, tuple)) else jax.tree.map(lambda a: a[l], layers)


def grouped_step(params, cfg: ModelConfig, policy: Policy, rnn, tokens, active=None,
                 impl: StepImpl = DEFAULT_IMPL, positions: str = "absolute"):
    """`core.step.step` over `Groups`: rnn a `core.step.Recurrence` whose state is Groups
    and whose carry is one per group. Returns (logits [B, V] f32, the new Recurrence)."""
    from .step import Recurrence, layer_step, write_slots

    st: Groups = rnn.state
    where = positions_of(positions)
    pols = st.policies(policy)
    cfgs = [cfg.group_config(g) for g in range(len(st.states))]
    active = jnp.ones((st.batch,), bool) if active is None else active
    p = st.length
    shared = [where.shared(c, s.capacity) for c, s in zip(cfgs, st.states)]
    carry = rnn.carry
    if carry is None:
        carry = tuple(where.start(pol, s.pos) for pol, s in zip(pols, st.states))
    x = embed(cfg, params, tokens)
    writes = [[] for _ in st.states]
    for l, (g, i) in enumerate(cfg.layer_slots):
        s = st.states[g]
        if l and impl.unroll_barrier:
            x = jax.lax.optimization_barrier(x)
        # Pallas: the kernels read the group's layer i inside its whole buffers
        K, V, li = (s.keys, s.values, i) if impl.attention == "pallas" else (s.keys[i], s.values[i], 0)
        x, w = layer_step(cfgs[g], pols[g], layer_params(params["layers"], l), x, K, V, s.pos[i], s.score[i], p,
                          active, impl, li, where, shared[g], jax.tree.map(lambda a: a[i], carry[g]))
        writes[g].append(w)
    states, carries = [], []
    for g, s in enumerate(st.states):
        k, v, slot, score, c = jax.tree.map(lambda *a: jnp.stack(a), *writes[g])
        keys, values, pos = write_slots(s.keys, s.values, s.pos, slot, k, v, p[None, :, None])
        states.append(State(keys, values, pos, score if pols[g].uses_score else s.score,
                            s.length + active.astype(jnp.int32)))
        carries.append(c)
    logits = logits_from_hidden(cfg, params, x)
    return logits, Recurrence(Groups(tuple(states), st.windows), tuple(carries))
