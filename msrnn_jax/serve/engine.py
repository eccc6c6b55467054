"""Continuous batching over one fixed-shape state: the engine behind `msrnn serve`.

B batch rows of one `State` are B requests. A loop on its own thread alternates

1. admission: the oldest waiting request takes a free row; its prompt is read into a
   1-row state in fixed-size pieces (exact: `layer_scan` over P tokens; chunked:
   `chunk_step` over S tokens); once read, the row is written into the B-row state
   (`insert_row`, jitted, the row index traced) and its first token sampled. While other
   rows decode, a turn reads pieces for as long as `prefill_share` allows (below), so
   they keep decoding while long prompts are read;
2. one decode chunk: `decode_rows`, a `lax.scan` of n steps over all B rows, with
   per-row sampling settings and PRNG keys as arrays (greedy and sampled rows share a
   batch); the chunk's tokens go to their requests as soon as it returns;
3. bookkeeping on the host: a row is freed on EOS, a stop string, max_tokens or a
   cancel (a client that went away).

How much of a turn goes to prompts: a decode chunk costs the same whatever the number
of busy rows (the state has B rows), so a free row wastes its share of every chunk, while
each prompt piece read delays the busy rows' next tokens. With `prefill_share` s the
pieces of a turn stop once their time (timed piece by piece) reaches s / (1 - s) of the
last decode chunk's: at most a fraction s of the loop's time goes to prompts while rows
decode and prompts wait, so a token's latency stays within 1 / (1 - s) of the decode
chunk's alone (1.67x at the default 0.4); s = 1 reads every waiting prompt that has a free
row before the next chunk (throughput first). With no row decoding, prompts are read
without limit.

Every compiled program has one shape: [B] rows, C slots, a prompt piece of P (or S)
tokens, n steps per chunk. No shape depends on a request, so nothing recompiles while
serving (`Engine.compiled()` counts the programs; the tests check it).

On a model loaded with a mesh (`load_model(mesh="data=D,model=M")`, docs/design.md §9)
the B rows are split over `data` (B a multiple of D) and the KV heads over `model`. A
prompt is then read into a state of D rows, one per data shard, whose first row is the
request's and the others inactive: each device reads its shard's row at the cost of one,
and the rows stay split like the big state's. Every array is put back in its sharding
after each call, so every call sees the same shardings and nothing recompiles either.

    import msrnn_jax as m
    from msrnn_jax.serve.engine import Engine
    eng = Engine(m.load_model(), policy="tova", capacity=256, max_batch=4).start()
    req = eng.submit(m.load_model().encode("The capital of France is"), max_tokens=16, temperature=0)
    print(req.result().text)
    eng.stop()
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..core.policies import PerRow, Policy, make_policy, policy_name
from ..core.state import State
from ..errors import InvalidArgument, MsrnnError, check_float, check_int
from ..fast import sharding
from ..fast.attention import DEFAULT_IMPL, StepImpl
from ..run.api import Model
from ..run.sampling import check_settings, row_keys
from ..run.spec import RunSpec
from .programs import chunk_piece, decode_rows, exact_piece, first_rows, insert_row
from .requests import FINISH_ABORT, Request, Result, request_ids

log = logging.getLogger("msrnn.serve")
SERVE_PREFILL_MODES = ("exact", "chunked")  # a row's prompt is read piece by piece


class QueueFull(MsrnnError):
    """Every row is busy and the waiting queue is full (HTTP 503)."""


class EngineStopped(MsrnnError):
    """The engine is not running (stopped, or not started)."""


def check_batch(max_batch: int, mesh, policies: int = 1) -> None:
    """Under a mesh the rows are split over data: B must be a multiple of D. With n
    policies side by side every one needs a row: B >= n."""
    D = 1 if mesh is None else sharding.mesh_size(mesh, "data")
    if max_batch % D:
        raise InvalidArgument(f"max_batch {max_batch} does not split over mesh data={D} (the rows are "
                              f"split over data): choose a multiple of {D}", "max_batch")
    if max_batch < policies:
        raise InvalidArgument(f"max_batch {max_batch} gives no row to some of the {policies} policies (row "
                              f"b follows policy b mod {policies}): choose at least {policies}", "max_batch")


def served_policies(policy, sinks: int = 4) -> tuple[Policy, ...]:
    """The engine's policies: one (a name or a Policy), or a list of several of one
    capacity, side by side as batch rows (`PerRow`); `full` only alone, none twice."""
    names = list(policy) if isinstance(policy, (list, tuple)) else [policy]
    if not names:
        raise InvalidArgument("no policy given", "policy")
    pols = tuple(make_policy(p, sinks) for p in names)
    if len(pols) > 1:
        if any(not p.bounded for p in pols):
            raise InvalidArgument("full cannot share the state with other policies (its rows need the "
                                  "whole context, theirs C slots): serve it alone", "policy")
        seen = [policy_name(p) for p in pols]
        if len(set(seen)) < len(seen):
            raise InvalidArgument(f"a policy is listed twice: {','.join(seen)}", "policy")
    return pols


def prefill_seconds(share: float, chunk_seconds: float | None) -> float:
    """How long a turn may read prompts while rows decode: share / (1 - share) of the last
    decode chunk's time (inf at share 1; 0, i.e. one piece, before any chunk was timed)."""
    if share >= 1.0:
        return float("inf")
    return 0.0 if chunk_seconds is None else share / (1.0 - share) * chunk_seconds


@dataclasses.dataclass
class _Prefill:
    """A request whose prompt is being read into a 1-row state, piece by piece."""
    req: Request
    row: int
    prompt: list[int]
    state: State
    logits: jax.Array
    next_piece: int = 0


# -- the engine ------------------------------------------------------------------------
class Engine:
    """B rows of one fixed-shape state, served by a loop on its own thread.

    model: a loaded `Model` (a tokenizer is needed for text and stop strings only).
    policy, capacity, sinks: the state's policy and size C; for `full`, C defaults to
    the model's trained context (`max_position_embeddings`) and a request must fit in it.
    `policy` may also be a list of policies of that one C (not `full`): the rows are dealt
    to them in turn (row b follows the (b mod n)-th, `policies.PerRow`), a request picks
    one with `submit(policy=...)`, the first by default, and waits for a row of its own.
    max_batch B: rows; max_queue: requests that may wait beyond B (then `QueueFull`).
    prefill: "exact" (pieces of `piece` tokens through the step, the result equal to
    reading the prompt at once) or "chunked" (pieces of `chunk` tokens, `chunk_step`).
    prefill_share: in (0, 1], the most of the loop's time that reading prompts may take
    while other rows decode (module docstring); 1: read them all first.
    steps_per_call: decode steps per chunk (the streaming granularity).
    positions: "absolute" or "reindex" (docs/design.md §8): with reindex a bounded row
    may run past the model's trained context.
    The model's mesh, if it has one, splits the rows over data (max_batch must be a
    multiple of D) and the KV heads over model; the step then uses einsum.
    """

    def __init__(self, model: Model, policy: str | Policy | Sequence = "tova", capacity: int | None = None,
                 sinks: int = 4, max_batch: int = 8, max_queue: int = 64, prefill: str = "exact",
                 chunk: int | None = None, steps_per_call: int = 8, piece: int = 32,
                 prefill_share: float = 0.4, impl: StepImpl = DEFAULT_IMPL, dtype=None,
                 log_requests: bool = True, positions: str = "absolute"):
        self.model, self.cfg = model, model.cfg
        self.sinks = sinks
        self.policies = served_policies(policy, sinks)
        # one policy, or several side by side as batch rows: row b follows policies[b % n]
        self.policy = self.policies[0] if len(self.policies) == 1 else PerRow(policies=self.policies)
        self.policy_names = [policy_name(p) for p in self.policies]
        spec = RunSpec(self.policy, capacity, prefill, chunk, positions).require_prefill(SERVE_PREFILL_MODES)
        # `full` has no capacity of its own: a server sizes its state once for every request
        self.capacity = spec.capacity if self.policy.bounded else (
            check_int("capacity", capacity) if capacity is not None else int(self.cfg.max_position_embeddings))
        self.B = check_int("max_batch", max_batch)
        self.max_queue = check_int("max_queue", max_queue, minimum=0)
        self.prefill_mode, self.positions = spec.prefill, spec.positions
        self.piece = spec.chunk if self.prefill_mode == "chunked" else check_int("piece", piece)
        self.prefill_share = check_float("prefill_share", prefill_share, low=0.0, high=1.0, low_open=True)
        self._chunk_seconds: float | None = None  # the last decode chunk's time (None: none yet)
        self.steps = check_int("steps_per_call", steps_per_call)
        self.impl = impl
        self.mesh = model.mesh
        sharding.check_impl(impl, self.mesh)
        # a prompt is read into R rows: 1, or one per data shard under a mesh (module docstring)
        self.R = 1 if self.mesh is None else sharding.mesh_size(self.mesh, "data")
        check_batch(self.B, self.mesh, len(self.policies))
        self.log_requests = log_requests
        self.dtype = dtype or jax.tree.leaves(model.params)[0].dtype
        self.eos = jnp.asarray(list(model.eos_ids) or [-1], jnp.int32)
        if self.mesh is not None:
            self.eos = sharding.replicate(self.mesh, self.eos)
        self._eos_set = set(model.eos_ids)
        B = self.B
        self.state = self._empty_state(B)
        # per-row bookkeeping, on the host (a few [B] arrays travel with each chunk)
        self.tok = np.zeros(B, np.int32)
        self.keys = np.zeros((B, 2), np.uint32)
        self.pending = np.zeros(B, bool)
        self.finished = np.ones(B, bool)
        self.budget = np.zeros(B, np.int32)
        self.temperature = np.zeros(B, np.float32)
        self.top_k = np.zeros(B, np.int32)
        self.top_p = np.ones(B, np.float32)
        self.ignore_eos = np.zeros(B, bool)
        self.rows: list[Request | None] = [None] * B
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: _Prefill | None = None
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.ready = threading.Event()  # set when the loop runs, or when it failed (then `error`)
        self.error: BaseException | None = None
        self.stats = collections.Counter()  # chunks, decode_tokens, decode_seconds, ...

    @property
    def name(self) -> str:
        return ",".join(self.policy_names)

    def policy_index(self, policy: str | Policy | None) -> int:
        """Which of the served policies a request asked for (None: the first)."""
        if policy is None:
            return 0
        try:
            name = policy_name(make_policy(policy, self.sinks))
        except InvalidArgument as e:
            raise InvalidArgument(str(e), "policy") from None
        if name not in self.policy_names:
            raise InvalidArgument(f"policy {name!r} is not served here (choose from "
                                  f"{', '.join(self.policy_names)})", "policy")
        return self.policy_names.index(name)

    # -- the public side (any thread) --------------------------------------------------
    def check_request(self, prompt: Sequence[int], max_tokens: int) -> None:
        """InvalidArgument if the state cannot hold this request (empty prompt; `full`:
        prompt + max_tokens beyond its C slots)."""
        if not prompt:
            raise InvalidArgument("empty prompt", "prompt")
        check_int("max_tokens", max_tokens)
        if max_tokens >= 2 ** 31:
            raise InvalidArgument(f"max_tokens must be < 2**31, got {max_tokens}", "max_tokens")
        if not self.policy.bounded and len(prompt) + max_tokens > self.capacity:
            raise InvalidArgument(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) is beyond the "
                f"{self.capacity} slots of the full policy's state", "max_tokens")

    def submit(self, prompt: Sequence[int], max_tokens: int = 16, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] = (), listener: Callable[[dict], None] | None = None,
               rid: str | None = None, ignore_eos: bool = False, policy: str | None = None) -> Request:
        """Queue a request (token ids). Raises InvalidArgument for a bad one, QueueFull
        when B rows are busy and max_queue requests already wait. ignore_eos: run to
        max_tokens (benchmarks' fixed lengths). policy: one of the served policies (None:
        the first)."""
        prompt = [int(t) for t in prompt]
        self.check_request(prompt, max_tokens)
        which = self.policy_index(policy)
        temperature, top_k, top_p = check_settings(temperature, top_k, top_p)
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        seed = check_int("seed", seed, minimum=0)
        if seed >= 2 ** 63:
            raise InvalidArgument(f"seed must be < 2**63, got {seed}", "seed")
        stop = tuple(stop)
        if stop and self.model.tokenizer is None:
            raise InvalidArgument("stop strings need a model with a tokenizer", "stop")
        if any(not isinstance(s, str) or not s for s in stop):
            raise InvalidArgument("stop must be non-empty strings", "stop")
        req = Request(prompt, max_tokens, temperature, top_k, top_p, seed, stop, listener,
                      rid or f"req-{next(request_ids)}", ignore_eos, which)
        with self._lock:
            if not self._running:
                raise EngineStopped("the engine is not running")
            busy = sum(r is not None for r in self.rows)
            # B rows plus max_queue waiting, counted together: requests the loop has not yet
            # moved into a free row count as waiting, however far behind the loop is
            if busy + len(self.waiting) >= self.B + self.max_queue:
                raise QueueFull(f"all {self.B} rows are busy and {len(self.waiting)} requests wait")
            self.waiting.append(req)
            self._lock.notify_all()
        return req

    def generate(self, prompt: Sequence[int], max_tokens: int = 16, **kw) -> Result:
        """submit, then wait for the result."""
        return self.submit(prompt, max_tokens, **kw).result()

    def load(self) -> dict:
        """{"rows_busy", "waiting"}: how full the engine is now."""
        with self._lock:
            return {"rows_busy": sum(r is not None for r in self.rows), "waiting": len(self.waiting)}

    def start(self, warm: bool = True) -> "Engine":
        """Start the loop thread; `warm` compiles every program first (then `ready`)."""
        with self._lock:
            self._running = True
        self._thread = threading.Thread(target=self._main, args=(warm,), name="msrnn-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0):
        """End every request still in flight (finish_reason "abort": each gets its final
        event) and the loop thread."""
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def compiled(self) -> dict[str, int]:
        """Compiled variants of each program the engine calls (constant while serving)."""
        progs = {"decode_rows": decode_rows, "insert_row": insert_row, "first_rows": first_rows,
                 "prefill_piece": chunk_piece if self.prefill_mode == "chunked" else exact_piece}
        return {k: f._cache_size() for k, f in progs.items()}

    # -- the loop (its own thread) -----------------------------------------------------
    def _main(self, warm):
        try:
            with sharding.use(self.mesh):  # the thread traces under the model's mesh (`whole`)
                if warm:
                    self._warm()
                self.ready.set()
                self._loop()
        except BaseException as e:  # noqa: BLE001  reported to every waiting request
            self.error = e
            self.ready.set()  # whoever waits for the engine (a server's /health) learns it failed
            log.exception("engine failed")
        finally:
            with self._lock:
                self._running = False
                reqs = [r for r in self.rows if r is not None] + list(self.waiting)
                if self.prefilling is not None and self.prefilling.req not in reqs:
                    reqs.append(self.prefilling.req)
                self.waiting.clear()
                self.prefilling = None
                self.rows = [None] * self.B
            for r in reqs:
                self._finish(r, FINISH_ABORT)

    def _warm(self):
        """Run every program once on row 0 (free: whatever it leaves there is overwritten
        when a request takes the row), so the first request finds them compiled; with
        several policies, each one's prefill on a row of its own."""
        t0 = time.perf_counter()
        for b in range(len(self.policies)):
            pf = self._new_prefill(None, b, [0])
            while not self._advance(pf):
                pass
            self._insert(pf, b)
        R = self.R
        first_rows(*sharding.place_rows(self.mesh, pf.logits, self.keys[:R], self.temperature[:R],
                                        self.top_k[:R], self.top_p[:R]))[0].block_until_ready()
        self._decode_chunk()
        self.stats.clear()
        self._chunk_seconds = None  # that chunk included its compile
        log.info("compiled in %.1f s: policy %s, C=%d, B=%d, %s prefill in pieces of %d, %d steps per chunk",
                 time.perf_counter() - t0, self.name, self.capacity, self.B, self.prefill_mode,
                 self.piece, self.steps)

    def _empty_state(self, rows: int) -> State:
        if self.mesh is None:
            return State.init(self.cfg, rows, self.capacity, self.dtype)
        return sharding.init_state(self.cfg, rows, self.capacity, self.dtype, self.mesh)

    def _placed(self, state: State) -> State:
        """state in the mesh's state shardings (as it is without a mesh). Every program's
        state and rows (`sharding.place_rows`) are placed so before each call: the same
        input shardings at every call, one compile."""
        return state if self.mesh is None else sharding.place_state(state, self.mesh)

    def _new_prefill(self, req, row, prompt) -> _Prefill:
        return _Prefill(req, row, prompt, self._empty_state(self.R),
                        jnp.zeros((self.R, self.cfg.vocab_size), jnp.float32))

    def _insert(self, pf: _Prefill, b: int):
        """pf's first row into row b of the state."""
        self.state = insert_row(self._placed(self.state), self._placed(pf.state), b)

    def _advance(self, pf: _Prefill) -> bool:
        """Read the next piece of pf's prompt; True once the whole prompt is in."""
        P, prompt = self.piece, pf.prompt
        toks = np.zeros((self.R, P), np.int32)  # rows after the first (a mesh's padding) inactive
        act = np.zeros((self.R, P), bool)
        part = prompt[pf.next_piece * P:(pf.next_piece + 1) * P]
        toks[0, :len(part)] = part
        act[0, :len(part)] = True
        piece = chunk_piece if self.prefill_mode == "chunked" else exact_piece
        toks, act, logits = sharding.place_rows(self.mesh, toks, act, pf.logits)
        policy = self.policies[pf.row % len(self.policies)]  # the row's own (one program per policy)
        pf.logits, pf.state = piece(self.model.params, self.cfg, policy, self._placed(pf.state), toks,
                                    act, logits, self.positions)
        pf.next_piece += 1
        return pf.next_piece * P >= len(prompt)

    def _decode_chunk(self):
        t0 = time.perf_counter()
        tok, keys, pending, finished, budget, temperature, top_k, top_p, ignore_eos = sharding.place_rows(
            self.mesh, self.tok, self.keys, self.pending, self.finished, self.budget, self.temperature,
            self.top_k, self.top_p, self.ignore_eos)
        out = decode_rows(self.model.params, self.cfg, self.policy, self.steps, self._placed(self.state),
                          tok, keys, pending, finished, budget, temperature, top_k, top_p, self.eos,
                          ignore_eos, self.impl, self.positions)
        toks, emitted, self.state, tok, keys, pending, finished, budget = out
        toks, emitted = np.asarray(toks), np.asarray(emitted)
        # np.array: writable host copies (the host edits rows between chunks)
        self.tok, self.keys, self.pending = np.array(tok), np.array(keys), np.array(pending)
        self.finished, self.budget = np.array(finished), np.array(budget)
        self._chunk_seconds = time.perf_counter() - t0
        self.stats["chunks"] += 1
        self.stats["decode_tokens"] += int(emitted.sum())
        self.stats["decode_seconds"] += self._chunk_seconds
        if emitted.all():  # every row emitted every step: the engine's full-batch rate
            self.stats["full_tokens"] += int(emitted.size)
            self.stats["full_seconds"] += time.perf_counter() - t0
        return toks, emitted

    def _loop(self):
        while True:
            with self._lock:
                if not self._running:
                    return
                self._drop_cancelled_waiting()
                decoding = self._decoding()
                self._admit()
                if self.prefilling is None and not decoding:
                    self._lock.wait(0.5)
                    continue
            # prompts are read for as long as the turn's budget allows (no limit while no
            # row decodes), as many requests as that covers: one row's prompt ending early
            # lets the next waiting request start in the same turn
            deadline = None if not decoding else time.perf_counter() + prefill_seconds(
                self.prefill_share, self._chunk_seconds)
            while self.prefilling is not None:
                if not self._prefill_turn(deadline):
                    break
                with self._lock:
                    self._admit()
                if deadline is not None and time.perf_counter() >= deadline:
                    break
            with self._lock:
                decoding = self._decoding()
            if decoding:
                toks, emitted = self._decode_chunk()
                self._deliver(toks, emitted)
            self._free_cancelled_rows()

    def _decoding(self) -> bool:
        """Whether a row holds a request that is past its prefill (caller holds the lock)."""
        reading = self.prefilling.req if self.prefilling else None
        return any(r is not None and r is not reading for r in self.rows)

    def _admit(self) -> bool:
        """The oldest waiting request with a free row of its policy takes it, if no prompt
        is being read (caller holds the lock). True if a prefill is now under way."""
        if self.prefilling is None and self.waiting and None in self.rows:
            n = len(self.policies)
            free = [b for b, r in enumerate(self.rows) if r is None]
            pick = next(((req, b) for req in self.waiting for b in free if b % n == req.policy_index), None)
            if pick is None:
                return False
            req, b = pick
            self.waiting.remove(req)
            self.rows[b] = req
            req.row = b
            self.prefilling = self._new_prefill(req, b, req.prompt)
        return self.prefilling is not None

    def _drop_cancelled_waiting(self):
        for r in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(r)
            self._finish(r, FINISH_ABORT)

    def _prefill_turn(self, deadline: float | None) -> bool:
        """Read pieces of the current prompt, at least one, until it is all in or the
        clock passes `deadline` (None: no limit); once it is all in, write its row into the
        state and emit its first token. Returns whether the prefill ended (done or
        cancelled)."""
        pf = self.prefilling
        if pf.req.cancelled:
            self._release(pf.row)
            self.prefilling = None
            self._finish(pf.req, FINISH_ABORT)
            return True
        while True:
            last = self._advance(pf)
            if last:
                break
            if deadline is not None:
                pf.logits.block_until_ready()  # the piece's own time counts, not its dispatch
                if time.perf_counter() >= deadline:
                    return False  # more pieces next turn: the decoding rows go on meanwhile
        req, b = pf.req, pf.row
        self._insert(pf, b)
        R = self.R  # the first of R rows is the request's
        key = np.repeat(row_keys(req.seed, 1), R, 0)
        temp = np.full(R, req.temperature, np.float32)
        tk, tp = np.full(R, req.top_k, np.int32), np.full(R, req.top_p, np.float32)
        first, key = first_rows(*sharding.place_rows(self.mesh, pf.logits, key, temp, tk, tp))
        first = int(np.asarray(first)[0])
        with self._lock:
            self.prefilling = None
            self.tok[b], self.keys[b] = first, np.asarray(key)[0]
            self.temperature[b], self.top_k[b], self.top_p[b] = temp[0], tk[0], tp[0]
            self.budget[b] = req.max_tokens - 1
            self.pending[b] = True
            self.ignore_eos[b] = req.ignore_eos
            self.finished[b] = (first in self._eos_set and not req.ignore_eos) or req.max_tokens <= 1
        req.t_first = time.perf_counter()
        self._add_tokens(req, [first])
        return True

    def _deliver(self, toks, emitted):
        for b, req in enumerate(self.rows):
            if req is None or req.row is None or not emitted[b].any() or req.t_first is None:
                continue
            self._add_tokens(req, [int(t) for t in toks[b][emitted[b]]])

    def _add_tokens(self, req: Request, new: list[int]):
        """New tokens of a decoding request: stream their text, end it on EOS, a stop
        string or max_tokens (`Request.add_tokens`)."""
        decode = self.model.decode if self.model.tokenizer is not None else None
        delta, reason = req.add_tokens(new, decode, self._eos_set)
        req.send(delta, new)
        if reason is not None:
            if req.row is not None:
                self._release(req.row)
            self._finish(req, reason)

    def _release(self, b):
        with self._lock:
            req = self.rows[b]
            self.rows[b] = None
            self.pending[b], self.finished[b], self.budget[b] = False, True, 0
            self.temperature[b] = 0.0
            if req is not None:
                req.row = None
            self._lock.notify_all()

    def _free_cancelled_rows(self):
        for b, req in enumerate(self.rows):
            if req is not None and req.cancelled and (self.prefilling is None or self.prefilling.req is not req):
                self._release(b)
                self._finish(req, FINISH_ABORT)

    def _finish(self, req: Request, reason: str):
        if req.done:
            return
        req.t_done = time.perf_counter()
        req.finish_reason = reason
        if req.final_text is None:
            req.final_text = self.model.decode(req.tokens) if (self.model.tokenizer is not None and req.tokens) else ""
            if reason == FINISH_ABORT and req.text_sent < len(req.final_text):
                req.send(req.final_text[req.text_sent:], [])
        ttft = None if req.t_first is None else req.t_first - req.t_submit
        req._result = Result(list(req.tokens), req.final_text, reason, len(req.prompt), ttft,
                             req.t_done - req.t_submit)
        if self.log_requests:
            gen = len(req.tokens)
            dt = req.t_done - (req.t_first or req.t_done)
            rate = (gen - 1) / dt if gen > 1 and dt > 0 else float("nan")
            log.info("%s prompt_tokens=%d generated_tokens=%d ttft=%s tokens_per_s=%.1f finish=%s%s",
                     req.id, len(req.prompt), gen, "-" if ttft is None else f"{ttft:.3f}s", rate, reason,
                     f" policy={self.policy_names[req.policy_index]}" if len(self.policies) > 1 else "")
        req._done.set()
        req._emit({"type": "done", "finish_reason": reason, "result": req._result})
