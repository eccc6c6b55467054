"""Perplexity runs: one policy, or a sweep of policies and capacities, over token rows.

Every function takes a loaded model (`msrnn_jax.Model`, or anything with `params` and
`cfg`) and feeds the text through the exact step (docs/design.md, "Perplexity") or in
chunks, one compiled scan call at a time, keeping only each next-token loss.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..core.layers import token_nll
from ..core.parallel import chunk_step
from ..core.policies import Policy
from ..core.state import State, init_state
from ..core.step import scan
from ..errors import InvalidArgument, check_int
from ..fast import sharding
from ..fast.layer_major import layer_scan
from ..fast.precision import scope as precision_scope
from .decoding import check_context
from .spec import RunSpec, fused_runs, grid

if TYPE_CHECKING:
    from .api import Model

STEPS_PER_CALL = 256  # tokens per compiled scan call in perplexity runs (progress, memory)
PPL_PREFILL_MODES = ("exact", "chunked")


class NLLSummary:
    """Mean NLL and perplexity of an `nll` array of next-token losses."""

    nll: np.ndarray

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    def curve(self, every: int) -> list[dict]:
        """Mean NLL per bucket of `every` predictions, over all rows: [{"start", "end",
        "mean_nll"}], where prediction t (of token t+1, made at position t) falls in
        bucket t // every; the last bucket may be shorter."""
        return nll_curve(self.nll, every)


def nll_curve(nll, every: int) -> list[dict]:
    """nll [B, T-1] -> mean NLL per bucket of `every` positions (see `NLLSummary.curve`)."""
    every = check_int("curve_every", every)
    nll = np.atleast_2d(np.asarray(nll))
    n = nll.shape[1]
    return [{"start": s, "end": min(s + every, n), "mean_nll": float(nll[:, s:s + every].mean())}
            for s in range(0, n, every)]


@dataclasses.dataclass
class PolicyRun(NLLSummary):
    nll: np.ndarray          # [B, T-1] NLL of each next-token prediction
    state: State
    seconds: float           # steady state: compilation excluded
    compile_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.nll.size / self.seconds if self.seconds > 0 else float("nan")


def run_policy(model: Model, policy: str | Policy, capacity: int | None, tokens,
               sinks: int = 4, prefill: str = "exact", chunk: int | None = None,
               steps_per_call: int = STEPS_PER_CALL,
               progress: Callable[[int], None] | None = None,
               positions: str = "absolute", layer_major: bool = True,
               state_dtype: str | None = None) -> PolicyRun:
    """Run one policy over token rows [B, T] (or one list) and return every next-token NLL.

    The text is fed in calls of `steps_per_call` tokens (`exact`) or `chunk` tokens
    (`chunked`), each compiled once; the last call is padded with inactive steps, which
    never touch the state. `progress(n)` is told how many tokens each call consumed.
    Only the [B, T-1] losses grow with T: a stream of any length runs in the memory of
    one call. positions: "absolute" or "reindex" (docs/design.md §8); past the model's
    trained context `full` is refused and absolute warns (`decoding.check_context`).
    layer_major (exact): each call computes the exact step layer by layer
    (`fast.layer_major`: the same kept positions, NLLs equal up to float rounding;
    several times faster on a CPU); False runs the token-by-token scan.
    state_dtype: how the state stores keys and values ("int8", "fp8": 8 bits and a scale
    per slot, docs/design.md §13); None: as the weights.
    """
    spec = RunSpec.of(policy, capacity, sinks=sinks, prefill=prefill, chunk=chunk, positions=positions,
                      state_dtype=state_dtype)
    return run_spec(model, spec.require_prefill(PPL_PREFILL_MODES), token_rows(tokens), steps_per_call, progress,
                    layer_major)


def token_rows(tokens) -> np.ndarray:
    tokens = np.atleast_2d(np.asarray(tokens, np.int32))
    if tokens.shape[1] < 2:
        raise InvalidArgument(f"need at least 2 tokens, got {tokens.shape[1]}")
    return tokens


def run_spec(model: Model, spec: RunSpec, tokens: np.ndarray, steps_per_call: int = STEPS_PER_CALL,
             progress: Callable[[int], None] | None = None, layer_major: bool = True) -> PolicyRun:
    """`run_policy` of a validated `RunSpec` (exact or chunked) over int32 rows [B, T >= 2]."""
    pol, prefill, chunk, positions = spec.policy, spec.prefill, spec.chunk, spec.positions
    B, T = tokens.shape
    cap = spec.state_size(T)
    check_context(model.cfg, pol, T, positions, cap)
    mesh = getattr(model, "mesh", None)
    Bp = sharding.padded_rows(B, mesh)  # rows beyond B are inactive: they never touch the state
    width = chunk if prefill == "chunked" else min(steps_per_call, T)
    n_calls = -(-(T - 1) // width)
    inputs = np.zeros((Bp, n_calls * width), np.int32)
    targets = np.zeros_like(inputs)
    active = np.zeros(inputs.shape, bool)
    inputs[:B, : T - 1], targets[:B, : T - 1], active[:B, : T - 1] = tokens[:, :-1], tokens[:, 1:], True
    put = jnp.asarray if mesh is None else (lambda v: sharding.put_rows(v, mesh))

    def call(state, c):
        sl = slice(c * width, (c + 1) * width)
        x, y, a = (put(v[:, sl]) for v in (inputs, targets, active))
        if prefill == "exact":
            run = layer_scan if layer_major else scan
            return run(model.params, model.cfg, pol, state, x, a, emit="nll", targets=y, positions=positions)
        logits, state = chunk_step(model.params, model.cfg, pol, state, x, a, positions=positions)
        return jnp.where(a, token_nll(logits, y), 0.0), state

    dtype = spec.state_dtype or model.params["embed"].dtype

    def new_state():
        if mesh is None:
            return init_state(model.cfg, Bp, cap, dtype)
        return sharding.init_state(model.cfg, Bp, cap, dtype, mesh)

    with precision_scope(getattr(model, "precision", None)), sharding.use(mesh):
        # compile (and warm up) on a throwaway state so the timing below is steady state
        t0 = time.perf_counter()
        jax.block_until_ready(call(new_state(), 0))
        compile_s = time.perf_counter() - t0
        state = new_state()
        nlls = []
        t0 = time.perf_counter()
        for c in range(n_calls):
            nll, state = call(state, c)
            nlls.append(sharding.to_host(nll)[:B])
            if progress is not None:
                progress(int(active[:, c * width:(c + 1) * width].sum()))
        seconds = time.perf_counter() - t0
    nll = np.concatenate(nlls, 1)[:, : T - 1]
    if Bp > B:
        state = state.take_rows(np.arange(B))
    return PolicyRun(nll, state, seconds, compile_s)


@dataclasses.dataclass
class SweepResult:
    policy: Policy
    capacity: int
    run: PolicyRun
    shared_with: int = 1  # policies that ran side by side as batch rows of one run


def sweep(model: Model, policies: Sequence[str | Policy], capacities: Sequence[int], tokens,
          sinks: int = 4, prefill: str = "exact", chunk: int | None = None, fuse: bool = True,
          progress: Callable[[int], None] | None = None,
          positions: str = "absolute", state_dtype: str | None = None) -> Iterator[SweepResult]:
    """Every policy at every capacity (`full` once, at the text's length) over rows [B, T].

    With `fuse` (exact prefill), the bounded policies of one capacity run side by side as
    batch rows of a single run (`PerRow`): the rows never interact, so every policy keeps
    exactly the positions it keeps alone, and its NLLs differ only by the float rounding
    of batched matmuls (~1e-5); the weights are read once per step for all of them.
    Their `tokens_per_s` is then each policy's own rate while sharing the run. Results are
    yielded as soon as each run ends. `positions` applies to every run (`run_policy`)."""
    specs = grid(policies, capacities, sinks, prefill, chunk, positions, PPL_PREFILL_MODES, state_dtype)
    return run_grid(model, specs, tokens, fuse, progress)


def run_grid(model: Model, specs: Sequence[RunSpec], tokens, fuse: bool = True,
             progress: Callable[[int], None] | None = None) -> Iterator[SweepResult]:
    """`sweep` over validated specs (`spec.grid`), fused as `spec.fused_runs` says."""
    tokens = token_rows(tokens)
    for spec, members in fused_runs(specs, fuse):
        run = run_spec(model, spec, spec.policy.spread(tokens), progress=progress)
        cap = spec.capacity if spec.policy.bounded else tokens.shape[1]
        for i, member in enumerate(members):
            rows = spec.policy.rows_of(i, run.nll.shape[0])
            part = run if len(members) == 1 else PolicyRun(run.nll[rows], run.state.take_rows(rows),
                                                           run.seconds, run.compile_seconds)
            yield SweepResult(member, cap, part, shared_with=len(members))
