"""The run specification: built and validated once, normalised, frozen; the runs of a
sweep and how they are fused."""

from __future__ import annotations

import dataclasses

import pytest

from msrnn_jax.core.policies import PerRow, make_policy, policy_name
from msrnn_jax.errors import InvalidArgument
from msrnn_jax.run.sampling import GREEDY, Sampling
from msrnn_jax.run.spec import RunSpec, fused_runs, grid


def test_names_become_a_normalised_spec():
    spec = RunSpec.of("TOVA", 64, prefill=" Chunked", chunk=8, positions="Reindex")
    assert (policy_name(spec.policy), spec.capacity, spec.prefill, spec.chunk, spec.positions) == (
        "tova", 64, "chunked", 8, "reindex")
    assert spec.sampling is GREEDY
    assert RunSpec.of("full", 64).capacity is None  # full keeps every token: no capacity of its own
    assert RunSpec.of("sink", 8, sinks=2).policy.sinks == 2


@pytest.mark.parametrize("kwargs,param", [
    (dict(policy="lru", capacity=8), None),
    (dict(policy="tova"), "capacity"),
    (dict(policy="tova", capacity=0), "capacity"),
    (dict(policy="sink", capacity=4, sinks=4), None),
    (dict(policy="tova", capacity=8, prefill="lazy"), "prefill"),
    (dict(policy="tova", capacity=8, prefill="chunked"), "chunk"),
    (dict(policy="tova", capacity=8, chunk=4), "chunk"),
    (dict(policy="tova", capacity=8, prefill="chunked", chunk=0), None),
    (dict(policy="tova", capacity=8, prefill="oneshot", positions="reindex"), "positions"),
    (dict(policy="tova", capacity=8, positions="relative"), "positions"),
])
def test_every_bad_value_is_refused_when_the_spec_is_built(kwargs, param):
    with pytest.raises(InvalidArgument) as e:
        RunSpec.of(**kwargs)
    if param is not None:
        assert e.value.param == param


def test_fields_are_checked_when_built_directly_and_on_replace():
    with pytest.raises(InvalidArgument, match="Policy"):
        RunSpec("tova", 8)  # names go through RunSpec.of
    with pytest.raises(InvalidArgument, match="Sampling"):
        RunSpec(make_policy("tova"), 8, sampling={"temperature": 1.0})
    with pytest.raises(InvalidArgument):
        Sampling(temperature=2.5)
    spec = RunSpec.of("tova", 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.capacity = 9
    with pytest.raises(InvalidArgument):
        spec.replace(capacity=-1)
    assert spec.replace(prefill="chunked", chunk=4).chunk == 4


def test_state_size():
    assert RunSpec.of("tova", 48).state_size(1000, 64) == 48  # a bounded policy keeps its C
    assert RunSpec.of("full").state_size(70, 64) == 128        # full: every token, bucketed


def test_require_prefill_names_the_supported_modes():
    spec = RunSpec.of("tova", 8, prefill="oneshot")
    with pytest.raises(InvalidArgument, match="exact, chunked"):
        spec.require_prefill(("exact", "chunked"))
    assert RunSpec.of("tova", 8).require_prefill(("exact",)).prefill == "exact"


def test_grid_runs_full_once_and_every_other_policy_at_every_capacity():
    specs = grid("full,tova,window", [16, 32])
    assert [(policy_name(s.policy), s.capacity) for s in specs] == [
        ("full", None), ("tova", 16), ("tova", 32), ("window", 16), ("window", 32)]
    assert [policy_name(s.policy) for s in grid(["full"], [])] == ["full"]
    with pytest.raises(InvalidArgument, match="capacity"):
        grid("tova", [])
    with pytest.raises(InvalidArgument, match="exact, chunked"):
        grid("tova", [8], prefill="oneshot", modes=("exact", "chunked"))
    with pytest.raises(InvalidArgument):
        grid("sink", [4], sinks=4)  # sinks must leave room in every capacity


def test_fused_runs_share_a_run_per_capacity_and_way_of_reading():
    specs = grid("tova,full,window,h2o", [16, 32])
    runs = list(fused_runs(specs))
    assert [(type(s.policy).__name__, s.capacity, [policy_name(p) for p in m]) for s, m in runs] == [
        ("Full", None, ["full"]),
        ("PerRow", 16, ["tova", "window", "h2o"]),
        ("PerRow", 32, ["tova", "window", "h2o"])]
    assert all(isinstance(s.policy, PerRow) for s, _ in runs[1:])
    # unfused, or chunked (whose pieces cannot mix the policies' rows): one run per policy
    alone = list(fused_runs(specs, fuse=False))
    assert [(policy_name(s.policy), s.capacity) for s, _ in alone] == [
        ("full", None), ("tova", 16), ("window", 16), ("h2o", 16), ("tova", 32), ("window", 32), ("h2o", 32)]
    chunked = grid("tova,window", [16], prefill="chunked", chunk=4)
    assert [len(m) for _, m in fused_runs(chunked)] == [1, 1]
    # runs that read differently never share a state
    mixed = grid("tova", [16]) + grid("window", [16], positions="reindex")
    assert [(policy_name(s.policy), s.positions) for s, _ in fused_runs(mixed)] == [
        ("tova", "absolute"), ("window", "reindex")]


def test_a_number_beyond_any_float_is_bad_input():
    with pytest.raises(InvalidArgument, match="too large"):
        Sampling(temperature=10 ** 400)
