"""The run specification: how a run reads and keeps its tokens, checked once.

A `RunSpec` says which policy bounds the state and at what capacity, how the prompt is
read (exact, chunked or oneshot prefill, and the chunk size), how positions are counted
(absolute or reindex, docs/design.md §8) and how tokens are chosen (`Sampling`). It is
frozen and validated when it is built: the command line, the HTTP server and the Python
API each build one where a request enters, so every bad value is refused there, before
any work, and everything below (`decoding.generate_tokens`, `evaluate`, `longcontext`,
the serving engine) takes it as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from ..core.policies import Policy, capacity_for, make_policies, make_policy, side_by_side
from ..core.positions import check_positions
from ..core.state import check_state_dtype
from ..errors import InvalidArgument, check_choice, check_int
from .sampling import GREEDY, Sampling

PREFILL_MODES = ("exact", "oneshot", "chunked")


def check_prefill(mode: str, chunk: int | None, modes=PREFILL_MODES) -> tuple[str, int | None]:
    """(mode, chunk) checked: a known mode, and a chunk size S >= 1 exactly when the mode
    is chunked."""
    mode = check_choice("prefill mode", mode, modes, "prefill")
    if mode == "chunked":
        if chunk is None:
            raise InvalidArgument("chunked prefill needs chunk (the chunk size S)", "chunk")
        return mode, check_int("chunk", chunk)
    if chunk is not None:
        raise InvalidArgument(f"chunk applies to chunked prefill only, not {mode}", "chunk")
    return mode, None


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """policy: a `Policy`; capacity: its C slots (None for `full`, which keeps every token
    and sizes its state to the run); prefill: "exact", "chunked" (with `chunk`) or
    "oneshot"; positions: "absolute" or "reindex" (not with oneshot); sampling: greedy
    unless said otherwise; state_dtype: "float32", "bfloat16", "int8" or "fp8" (8 bits and
    a scale per slot, docs/design.md §13), None for the weights' dtype. Built with
    `RunSpec.of(...)` from names, or directly."""

    policy: Policy
    capacity: int | None = None
    prefill: str = "exact"
    chunk: int | None = None
    positions: str = "absolute"
    sampling: Sampling = GREEDY
    state_dtype: str | None = None  # how keys and values are stored; None: as the weights

    def __post_init__(self):
        if not isinstance(self.policy, Policy):
            raise InvalidArgument(f"policy must be a Policy (RunSpec.of takes names), got {self.policy!r}",
                                  "policy")
        if not isinstance(self.sampling, Sampling):
            raise InvalidArgument(f"sampling must be a Sampling, got {self.sampling!r}", "sampling")
        mode, chunk = check_prefill(self.prefill, self.chunk)
        capacity = capacity_for(self.policy, self.capacity, 1) if self.policy.bounded else None
        fields = {"prefill": mode, "chunk": chunk, "capacity": capacity,
                  "positions": check_positions(self.positions, mode),
                  "state_dtype": None if self.state_dtype is None else check_state_dtype(self.state_dtype)}
        for name, value in fields.items():  # normalised: "Exact " -> "exact", full -> no capacity
            object.__setattr__(self, name, value)

    @classmethod
    def of(cls, policy: str | Policy = "full", capacity: int | None = None, *, sinks: int = 4,
           prefill: str = "exact", chunk: int | None = None, positions: str = "absolute",
           sampling: Sampling | None = None, state_dtype: str | None = None) -> "RunSpec":
        """A spec from names, as the command line and the API take them: `policy` by name
        (`make_policy`, with `sinks` for sink), the rest as in the class."""
        return cls(make_policy(policy, sinks), capacity, prefill, chunk, positions,
                   GREEDY if sampling is None else sampling, state_dtype)

    def replace(self, **changes) -> "RunSpec":
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def require_prefill(self, modes) -> "RunSpec":
        """This spec, if its prefill mode is one of `modes` (what a caller supports)."""
        check_choice("prefill mode", self.prefill, modes, "prefill")
        return self

    def state_size(self, needed: int, bucket: int = 1) -> int:
        """The slots a run of `needed` tokens uses: the capacity, or for `full` every
        token, rounded up to a multiple of `bucket`."""
        return capacity_for(self.policy, self.capacity, needed, bucket)


def grid(policies: Sequence[str | Policy] | str, capacities: Sequence[int], sinks: int = 4, prefill: str = "exact",
         chunk: int | None = None, positions: str = "absolute", modes=PREFILL_MODES,
         state_dtype: str | None = None) -> list[RunSpec]:
    """The runs of a sweep, each validated before any work: an unbounded policy once
    (its state sized to the run), every other policy at every capacity; `modes` are the
    prefill modes the caller supports."""
    specs = []
    for pol in make_policies(policies, sinks):
        caps = list(capacities) if pol.bounded else [None]
        if not caps:
            raise InvalidArgument("every policy but full needs a capacity C[,C...]", "capacity")
        specs += [RunSpec(pol, cap, prefill, chunk, positions, state_dtype=state_dtype).require_prefill(modes)
                  for cap in caps]
    return specs


def fused_runs(specs: Sequence[RunSpec], fuse: bool = True) -> Iterator[tuple[RunSpec, tuple[Policy, ...]]]:
    """The runs that cover `specs`, as (spec of the run, the policies it holds): each
    unbounded spec alone, first; then, with `fuse` and exact prefill, the bounded policies
    that share a capacity and a way of reading side by side as batch rows of one run
    (`policies.side_by_side`: a `PerRow` policy; row b follows member b % n)."""
    for spec in specs:
        if not spec.policy.bounded:
            yield spec, (spec.policy,)
    groups: dict[tuple, list[Policy]] = {}  # every field but the policy -> the policies
    for spec in specs:
        if spec.policy.bounded:
            rest = tuple(getattr(spec, f.name) for f in dataclasses.fields(spec)[1:])
            groups.setdefault(rest, []).append(spec.policy)
    for rest, bounded in groups.items():
        for pol, members in side_by_side(bounded, fuse and rest[1] == "exact"):
            yield RunSpec(pol, *rest), members
