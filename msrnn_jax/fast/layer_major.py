"""The exact step ordered layer by layer: the same state and outputs as `core.step.scan`,
several times faster wherever matrix products beat one token at a time (a CPU, a long
prompt on a GPU). How, never what: tests/test_layer_major.py holds it to the token scan."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..core.layers import F32, embed, finish_layer, logits_from_hidden, norm, project, token_nll
from ..core.policies import Policy
from ..core.positions import positions_of
from ..core.groups import layer_params
from ..core.state import Groups, State, check_single
from ..core.step import attend_and_choose, write_slots
from .attention import DEFAULT_IMPL, StepImpl
from .layouts import scan_layers
from .precision import exact_for_f32


def layer_major(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active,
                impl: StepImpl = DEFAULT_IMPL, positions: str = "absolute"):
    """What `core.step.step` computes token after token over tokens [B, T] (active bool [B, T]),
    ordered layer by layer. Returns (the last layer's output [B, T, E] before the final
    norm, the state): the state and every token's output are the scan's.

    A layer's slots depend only on that layer's inputs, and those are known for every
    token once the layer below has run. So each layer's projections and MLP run over all
    T tokens at once (matrix products, which a CPU runs near its peak), and only
    `core.step.attend_and_choose` and the write run token by token. The weights are read once per
    call instead of once per token. Results equal the scan's up to the float rounding of
    the larger products (tests/test_layer_major.py)."""
    B, T = tokens.shape
    act = active.astype(jnp.int32)
    pos = state.length[:, None] + jnp.cumsum(act, 1) - act  # [B, T] each token's position
    where = positions_of(positions)
    if isinstance(state, Groups):  # layer groups: unrolled, each layer with its group's config and policy
        pols = state.policies(policy)
        fns = [_layer(cfg.group_config(g), pols[g], st.capacity, B, T, pos, active, where, impl)
               for g, st in enumerate(state.states)]
        x, outs = embed(cfg, params, tokens), [[] for _ in state.states]
        for l, (g, i) in enumerate(cfg.layer_slots):
            st = state.states[g]
            x, out = fns[g](x, (layer_params(params["layers"], l), st.keys[i], st.values[i], st.pos[i], st.score[i]))
            outs[g].append(out)
        states = []
        for g, st in enumerate(state.states):
            K, V, P, S = jax.tree.map(lambda *a: jnp.stack(a), *outs[g])
            states.append(State(K, V, P, S if pols[g].uses_score else st.score, st.length + act.sum(1)))
        return x, Groups(tuple(states), state.windows)
    check_single(cfg, state)
    layer = _layer(cfg, policy, state.capacity, B, T, pos, active, where, impl)
    x, (K, V, P, S) = scan_layers(layer, embed(cfg, params, tokens), params,
                                  state.keys, state.values, state.pos, state.score)
    return x, State(K, V, P, S if policy.uses_score else state.score, state.length + act.sum(1))


def _layer(cfg: ModelConfig, policy: Policy, C: int, B: int, T: int, pos, active, where, impl: StepImpl):
    """`layer_major`'s layer: (x [B, T, E], (lp, K, V, P, S) of one layer) -> (x, its slots)."""
    Hkv, G, D = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    table = where.shared(cfg, C)
    view = (lambda a: a[None]) if impl.attention == "pallas" else (lambda a: a)  # kernels read [L,...]

    def layer(x, xs):
        lp, K, V, P, S = xs  # this layer's slots
        q, k, v = project(cfg, lp, norm(cfg, x, lp["attn_norm"]))  # [B, T, ...]

        def token(slots, t_in):
            K, V, P, S, ranks = slots
            q_t, k_t, v_t, p_t, a_t = t_in
            out, (k_w, v_w, slot, S) = attend_and_choose(cfg, policy, q_t.reshape(B, Hkv, G, D), k_t, v_t,
                                                         view(K), view(V), P, S, p_t, a_t, impl, 0, where, table, ranks)
            ranks = where.advance(ranks, P, slot)  # reindex: the ranks follow the write
            # the write depends on the attention output (0 * out, no other effect), so the
            # reads of K and V are ordered before it and it updates them in place (without,
            # XLA copied the layer's K and V at every token; docs/performance.md)
            dep = (0 * out[:, :, :1, :1]).astype(k_w.dtype)[..., 0, :]  # [B, Hkv, 1]
            K, V, P = write_slots(K, V, P, slot, k_w + dep, v_w + dep, p_t[:, None])
            return (K, V, P, S, ranks), out

        t_major = tuple(jnp.swapaxes(a, 0, 1) for a in (q, k, v, pos, active))
        ranks = where.start(policy, P)  # reindex: one sort per layer and call
        (K, V, P, S, _), out = jax.lax.scan(token, (K, V, P, S, ranks), t_major)
        return finish_layer(cfg, lp, x, jnp.swapaxes(out, 0, 1).reshape(B, T, -1)), (K, V, P, S)

    return layer


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "emit", "positions", "impl"),
                   donate_argnames=("state",))
@exact_for_f32
def layer_scan(params, cfg: ModelConfig, policy: Policy, state: State, tokens, active=None, *, emit: str,
               targets=None, last_logits=None, positions: str = "absolute", impl: StepImpl = DEFAULT_IMPL):
    """`core.step.scan` computed by `layer_major`, for the two emits that need no [T, V]
    buffer: "nll" (the NLL of `targets` [B, T], f32, 0 where inactive; the logits are made
    32 tokens at a time) or "last" (each row's logits after its last active token [B, V]
    f32, rows with none keeping `last_logits`: the exact prefill). Returns (that, state)."""
    if emit not in ("nll", "last"):
        raise ValueError(f"layer_scan emits nll or last, not {emit!r}")
    B = tokens.shape[0]
    if active is None:
        active = jnp.ones(tokens.shape, bool)
    if emit == "nll":
        x, state = layer_major(params, cfg, policy, state, tokens, active, impl, positions)
        nll = jax.lax.map(lambda xt: token_nll(logits_from_hidden(cfg, params, xt[0]), xt[1]),
                          (jnp.swapaxes(x, 0, 1), targets.T), batch_size=min(tokens.shape[1], 32)).T
        return jnp.where(active, nll, 0.0), state
    if last_logits is None:
        last_logits = jnp.zeros((B, cfg.vocab_size), F32)
    x, state = layer_major(params, cfg, policy, state, tokens, active, impl, positions)
    n = active.sum(1)
    x_last = jnp.take_along_axis(x, jnp.maximum(n - 1, 0)[:, None, None], 1)[:, 0]
    return jnp.where((n > 0)[:, None], logits_from_hidden(cfg, params, x_last), last_logits), state
