"""What a bounded multi-state RNN keeps: recordings of the state and statistics over them.

The notebooks (and anyone studying a policy) use these to reproduce the analysis of the
paper's §7.3 for a model of their choice:

* `record_run` feeds token rows through the exact step (docs/design.md §3) and keeps, besides
  the NLL of every next-token prediction, the *kept positions after every step*
  (`pos` [T, L, B, Hkv, C], the `pos` field of the state at each step; -1 = empty slot).
  `record_policies` records several policies at once, side by side as batch rows.
* `kept_map` turns one (layer, row, head) of that record into a picture: step against
  position, True where the position is in the state.
* `retention`, `recent_share`, `kept_ages`, `first_token_kept`: how long tokens stay, how
  much of the state is recent, whether the first token is ever dropped.
* `token_kind` / `token_kinds` / `retention_by_kind`: average retention by token kind
  (punctuation, newline, quote marks, capitalised words, digits, other).
* `first_token_attention`: how much attention the first token soaks up (attention sinks).

Shapes follow `state.py`: T steps (tokens read), L layers, B rows, Hkv KV heads, C slots.
Everything here returns NumPy arrays; nothing is jitted except the model run itself.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from ..core.layers import token_nll
from ..core.policies import Policy, make_policy, policy_name, side_by_side
from ..core.state import init_state
from ..core.step import scan
from ..errors import InvalidArgument
from .evaluate import NLLSummary, token_rows
from .spec import RunSpec

TOKEN_KINDS = ("punctuation", "newline", "quote", "capitalised", "digit", "other")
QUOTE_CHARS = "\"'`\u2018\u2019\u201c\u201d\u00ab\u00bb"  # " ' ` ‘ ’ “ ” « »


# -- token kinds -----------------------------------------------------------------------
def token_kind(text: str) -> str:
    """The kind of one token, from its decoded text (first matching rule wins):

    newline     the token contains a line break
    quote       only punctuation, at least one quote mark (" ' ‘ ’ “ ” ...)
    punctuation only punctuation
    digit       contains a digit
    capitalised starts (after spaces) with an upper-case letter
    other       everything else (lower-case words and word pieces, spaces, pieces of
                multi-byte characters, ...)
    """
    if "\n" in text or "\r" in text:
        return "newline"
    s = text.strip()
    if "\ufffd" in s:  # a piece of a multi-byte character: no kind of its own
        return "other"
    if s and all(not c.isalnum() for c in s):
        return "quote" if any(c in QUOTE_CHARS for c in s) else "punctuation"
    if any(c.isdigit() for c in s):
        return "digit"
    if s[:1].isupper():
        return "capitalised"
    return "other"


def token_kinds(decode: Callable[[Sequence[int]], str], ids) -> np.ndarray:
    """Kinds of token ids (any shape) as a str array of the same shape. `decode` maps a list
    of ids to text, e.g. `model.decode`; each distinct id is decoded once, on its own."""
    ids = np.asarray(ids)
    kinds = {int(i): token_kind(decode([int(i)])) for i in np.unique(ids)}
    flat = [kinds[int(i)] for i in ids.ravel()]
    return np.asarray(flat, dtype=object).reshape(ids.shape).astype(str)


# -- recording a run -------------------------------------------------------------------
@dataclasses.dataclass
class Recording(NLLSummary):
    """One policy run over token rows, with the state's kept positions after every step."""

    policy: str
    capacity: int
    tokens: np.ndarray  # [B, T] int32
    nll: np.ndarray     # [B, T-1] NLL of each next-token prediction
    pos: np.ndarray     # [T, L, B, Hkv, C] int32 kept positions after step t; -1 = empty
    # (layer groups: every layer in the model's order, each group's slots padded with -1 to the largest)


def record_run(model, policy: str | Policy, capacity: int | None, tokens,
               sinks: int = 4, steps_per_call: int = 32) -> Recording:
    """Feed token rows [B, T] (or one list) through the exact step and record everything.

    `capacity` is ignored by `full` (which gets one slot per token). The tokens go through
    `scan(..., emit="logits+pos")` in calls of at most `steps_per_call` steps (one
    compile per policy and capacity; the last call is padded with inactive steps, which
    never touch the state), and only the NLL is kept from each call, so long texts need
    no [B, T, V] logits buffer: [B, steps_per_call, V] at a time.
    The NLL equals `evaluate.run_policy`'s for the same inputs. `model`: a loaded
    `Model` (or anything with `params` and `cfg`).
    """
    params, cfg = model.params, model.cfg
    tokens = token_rows(tokens)
    spec = RunSpec.of(policy, capacity, sinks=sinks)
    pol, (B, T) = spec.policy, tokens.shape
    capacity = spec.state_size(T)
    n_calls = -(-T // steps_per_call)
    width = -(-T // n_calls)  # as even as possible: little padding in the last call
    inputs = np.zeros((B, n_calls * width), np.int32)
    active = np.zeros(inputs.shape, bool)
    inputs[:, :T], active[:, :T] = tokens, True

    targets = np.zeros_like(inputs)
    targets[:, : T - 1] = tokens[:, 1:]  # step t predicts token t + 1

    state = init_state(cfg, B, capacity, params["embed"].dtype)
    nll, pos = [], []
    for c in range(n_calls):
        sl = slice(c * width, (c + 1) * width)
        logits, state, p = scan(params, cfg, pol, state, jnp.asarray(inputs[:, sl]),
                                       jnp.asarray(active[:, sl]), emit="logits+pos")
        nll.append(np.asarray(token_nll(logits, jnp.asarray(targets[:, sl]))))
        pos.append(layer_positions(cfg, p))
    nll = np.concatenate(nll, 1)[:, : T - 1]
    pos = np.concatenate(pos, 0)[:T]
    return Recording(policy_name(pol), int(capacity), tokens, nll, pos)


def layer_positions(cfg, pos) -> np.ndarray:
    """Kept positions [T, L, B, Hkv, C] from a scan's `emit="logits+pos"`: as they are, or
    (layer groups: one [T, Lg, B, Hkv, Cg] per group) every layer in the model's order, a
    group's slots padded with -1 to the largest group's."""
    if not isinstance(pos, tuple):
        return np.asarray(pos)
    pos = [np.asarray(p) for p in pos]
    C = max(p.shape[-1] for p in pos)
    return np.stack([np.pad(pos[g][:, i], [(0, 0)] * 3 + [(0, C - pos[g].shape[-1])], constant_values=-1)
                     for g, i in cfg.layer_slots], 1)


def record_policies(model, policies: Sequence[str | Policy], capacity: int,
                    tokens, sinks: int = 4, steps_per_call: int = 32) -> dict[str, Recording]:
    """Several bounded policies at one capacity, recorded in a single run: {name: Recording}.

    The policies run side by side as batch rows (`PerRow`: row b follows policy b % n, as in
    `evaluate.sweep`). Rows never interact, so each recording is exactly what `record_run` gives
    for that policy alone; what they share is the reading of the weights at every step,
    which is most of a step's cost on a CPU. `full` is not a bounded policy: record it with
    `record_run` (or use the parallel forward pass)."""
    tokens = np.atleast_2d(np.asarray(tokens, np.int32))
    pols = [make_policy(p, sinks) for p in policies]
    names = [policy_name(p) for p in pols]
    if not pols or any(not p.bounded for p in pols) or len(set(names)) < len(names):
        raise InvalidArgument(f"record_policies needs distinct bounded policies, got {names}")
    [(pol, members)] = side_by_side(pols)
    if len(members) == 1:
        return {names[0]: record_run(model, pol, capacity, tokens, sinks, steps_per_call)}
    both = record_run(model, pol, capacity, pol.spread(tokens), sinks, steps_per_call)
    rows = [pol.rows_of(i, both.nll.shape[0]) for i in range(len(members))]
    return {name: Recording(name, both.capacity, tokens, both.nll[r], both.pos[:, :, r])
            for name, r in zip(names, rows)}


# -- pictures and statistics -----------------------------------------------------------
def _kept(pos: np.ndarray, n_positions: int | None = None) -> np.ndarray:
    """One-hot of kept positions: [T, ..., C] -> bool [T, ..., P] (P = n_positions or T)."""
    pos = np.asarray(pos)
    P = pos.shape[0] if n_positions is None else n_positions
    out = np.zeros(pos.shape[:-1] + (P + 1,), bool)
    np.put_along_axis(out, np.where((pos >= 0) & (pos < P), pos, P), True, -1)
    return out[..., :P]


def kept_map(pos, layer: int, row: int = 0, head: int = 0) -> np.ndarray:
    """bool [T steps, T positions]: True where `position` is in the state after `step`
    (for one layer, batch row and KV head). Row t has at most C True entries; a window
    is a diagonal band, a token kept for long a vertical line."""
    pos = np.asarray(pos)
    return _kept(pos[:, layer, row, head])


def retention(pos) -> tuple[np.ndarray, np.ndarray]:
    """How long each token stays. Returns (steps [L, B, Hkv, T], kept_to_end [L, B, Hkv, T]):
    `steps[..., p]` is the number of steps after which position p was in the state (its
    own step included; 0 if dropped on arrival); `kept_to_end` marks tokens still in the
    state after the last step (their retention is censored by the end of the text)."""
    kept = _kept(np.asarray(pos))  # [T, L, B, Hkv, T]
    return kept.sum(0).astype(np.int32), kept[-1]


def recent_share(pos, recent: int) -> np.ndarray:
    """[T, L]: the share of occupied slots (over rows and heads) holding one of the
    `recent` most recent tokens (position > t - recent) after step t. A window of
    capacity C <= recent scores 1 everywhere."""
    pos = np.asarray(pos)
    t = np.arange(pos.shape[0]).reshape((-1,) + (1,) * (pos.ndim - 1))
    occupied = pos >= 0
    is_recent = occupied & (pos > t - recent)
    return is_recent.sum((2, 3, 4)) / np.maximum(occupied.sum((2, 3, 4)), 1)


def kept_ages(pos, layer: int | None = None, start: int = 0) -> np.ndarray:
    """Ages (t - position) of every occupied slot after steps t >= start, flattened (one
    layer, or all layers). A window's ages are 0..C-1; a long tail means old tokens kept."""
    pos = np.asarray(pos)
    if layer is not None:
        pos = pos[:, layer:layer + 1]
    t = np.arange(pos.shape[0]).reshape((-1,) + (1,) * (pos.ndim - 1))
    ages = np.broadcast_to(t, pos.shape) - pos
    keep = (pos >= 0) & (np.broadcast_to(t, pos.shape) >= start)
    return ages[keep]


def first_token_kept(pos) -> np.ndarray:
    """bool [L]: True where position 0 is in the state after every step, in every row and
    KV head — i.e. the layer never dropped the first token."""
    pos = np.asarray(pos)
    return (pos == 0).any(-1).all((0, 2, 3))


def retention_by_kind(pos, kinds, upto: int | None = None, skip_first: bool = True) -> dict:
    """Average retention (steps kept, averaged over layers and KV heads) by token kind.

    kinds: str [B, T] (see `token_kinds`). Only positions < `upto` count (default T // 2:
    tokens near the end of the text have had no time to be dropped, and their retention
    is cut short by the end); the first token is left out with `skip_first` (it behaves
    as an attention sink, not as a token of its kind). Returns {kind: (mean steps, count)}
    for every kind in TOKEN_KINDS, mean NaN where count is 0.
    """
    steps, _ = retention(pos)  # [L, B, Hkv, T]
    per_token = steps.mean((0, 2))  # [B, T]
    kinds = np.asarray(kinds)
    T = per_token.shape[1]
    upto = T // 2 if upto is None else upto
    mask = np.zeros((T,), bool)
    mask[int(skip_first):upto] = True
    out = {}
    for kind in TOKEN_KINDS:
        sel = (kinds == kind) & mask[None, :]
        n = int(sel.sum())
        out[kind] = (float(per_token[sel].mean()) if n else float("nan"), n)
    return out


def first_token_attention(attn_last) -> dict[str, np.ndarray]:
    """How much of the last token's attention goes to the first token, per layer.

    attn_last: [L, B, Hkv, T] head-averaged attention of the last token per KV head (as
    `forward_parallel` returns it); averaged over KV heads here, which is exactly what
    layer-wise TOVA ranks by. Returns arrays [L] (averaged over rows): `first` (weight on
    position 0), `median_other` and `min_other` (over positions 1..T-1), `uniform`
    (1 / T, the weight every token would get if attention were spread evenly)."""
    a = np.asarray(attn_last).mean(2)  # [L, B, T]
    T = a.shape[-1]
    return {
        "first": a[..., 0].mean(1),
        "median_other": np.median(a[..., 1:], -1).mean(1),
        "min_other": a[..., 1:].min(-1).mean(1),
        "uniform": np.full(a.shape[0], 1.0 / T),
    }
