"""Continuous batching over one fixed-shape state: the engine behind `msrnn serve`.

B batch rows of one `State` are B requests (a model with layer groups, Gemma 3: one
`Groups`, every group holding the same B rows; docs/design.md §12). A loop on its own
thread alternates

1. admission: every waiting request that finds a free row takes it (oldest first); its
   prompt is read into a 1-row state of its own in fixed-size pieces (exact: `layer_scan`
   over P tokens; chunked: `chunk_step` over S tokens), the prompts being read taking one
   piece each in turn (round robin), so a short prompt is never read behind a long one:
   a prompt of L tokens is in after at most ceil(L/P) rounds of at most B pieces, whatever
   the others' lengths. Once read, the row is written into the B-row state (`insert_row`,
   jitted, the row index traced) and its first token sampled. While other rows decode, a
   turn reads pieces for as long as `prefill_share` allows (below); with none decoding, one
   round per turn;
2. one decode chunk: `decode_rows`, a `lax.scan` of n steps over all B rows, with
   per-row sampling settings and PRNG keys as arrays (greedy and sampled rows share a
   batch); the chunk's tokens go to their requests as soon as it returns;
3. bookkeeping on the host: a row is freed on EOS, a stop string, max_tokens or a
   cancel (a client that went away), which is seen between any two pieces or chunks.

A request that fails (an exception while its prompt is read or its tokens are handled)
ends alone with finish_reason "error" and `Result.error`; a failed decode chunk ends the
rows it held and the state starts again empty; the loop goes on serving. `stop()` ends
every request in flight or waiting the same way (error code "shutting_down"), the loop
seeing it within one piece or chunk.

How much of a turn goes to prompts: a decode chunk costs the same whatever the number
of busy rows (the state has B rows), so a free row wastes its share of every chunk, while
each prompt piece read delays the busy rows' next tokens. With `prefill_share` s the
pieces of a turn stop once their time (timed piece by piece) reaches s / (1 - s) of the
last decode chunk's: at most a fraction s of the loop's time goes to prompts while rows
decode and prompts wait, so a token's latency stays within 1 / (1 - s) of the decode
chunk's alone (1.67x at the default 0.4); s = 1 reads every waiting prompt that has a free
row before the next chunk (throughput first). With no row decoding, a turn reads one round
(one piece of each prompt) and then admits newcomers and sees cancels before the next.

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
from ..core.state import Groups, State, init_state
from ..errors import InvalidArgument, MsrnnError, check_float, check_int
from ..fast import sharding
from ..fast.attention import DEFAULT_IMPL, StepImpl
from ..run.api import Model
from ..run.sampling import check_settings, row_keys
from ..run.spec import RunSpec
from .programs import (chunk_piece, chunk_piece_logprobs, decode_rows, decode_rows_logprobs, exact_piece,
                       exact_piece_logprobs, first_rows, insert_row)
from .requests import FINISH_ABORT, FINISH_ERROR, Request, Result, request_ids

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


LIMIT_CONTEXTS = 8  # a bounded row's default limits: this many of the model's trained contexts


def default_limit(engine) -> int:
    """The default longest prompt (and most new tokens) of one request: `full` holds its
    C slots at most; a bounded row reads any length in constant memory, but each token
    costs a step, so one request may cost at most LIMIT_CONTEXTS trained contexts."""
    if not engine.policy.bounded:
        return engine.capacity
    return LIMIT_CONTEXTS * int(engine.cfg.max_position_embeddings)


@dataclasses.dataclass
class _Prefill:
    """A request whose prompt is being read into a 1-row state, piece by piece."""
    req: Request
    row: int
    prompt: list[int]
    state: State
    logits: jax.Array
    next_piece: int = 0
    echo: bool = False  # keep every token's log-probability (`exact_piece_logprobs`)


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
                 log_requests: bool = True, positions: str = "absolute", max_prompt_tokens: int | None = None,
                 max_new_tokens: int | None = None, echo_top: int = 5):
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
        # the longest prompt and the most new tokens of one request (default_limit)
        self.max_prompt_tokens = default_limit(self) if max_prompt_tokens is None else check_int(
            "max_prompt_tokens", max_prompt_tokens)
        self.max_new_tokens = default_limit(self) if max_new_tokens is None else check_int(
            "max_new_tokens", max_new_tokens)
        self.echo_top = check_int("echo_top", echo_top)  # the most top log-probabilities per token
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
        self.prefills: list[_Prefill] = []  # prompts being read, one piece each in turn
        self._next_pf = 0  # whose piece is next (round robin over `prefills`)
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
        V = self.cfg.vocab_size
        if any(not 0 <= t < V for t in prompt):
            raise InvalidArgument(f"token ids must be in [0, {V})", "prompt")
        if len(prompt) > self.max_prompt_tokens:
            raise InvalidArgument(f"the prompt has {len(prompt)} tokens, beyond this server's limit of "
                                  f"{self.max_prompt_tokens} (max_prompt_tokens)", "prompt")
        check_int("max_tokens", max_tokens, minimum=0)  # 0: echo only (the server checks that)
        if max_tokens > self.max_new_tokens:
            raise InvalidArgument(f"max_tokens must be at most {self.max_new_tokens} (this server's "
                                  f"max_new_tokens), got {max_tokens}", "max_tokens")
        if not self.policy.bounded and len(prompt) + max_tokens > self.capacity:
            raise InvalidArgument(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) is beyond the "
                f"{self.capacity} slots of the full policy's state", "max_tokens")

    def submit(self, prompt: Sequence[int], max_tokens: int = 16, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] = (), listener: Callable[[dict], None] | None = None,
               rid: str | None = None, ignore_eos: bool = False, policy: str | None = None,
               logprobs: int | None = None, echo: bool = False) -> Request:
        """Queue a request (token ids). Raises InvalidArgument for a bad one, QueueFull
        when B rows are busy and max_queue requests already wait. ignore_eos: run to
        max_tokens (benchmarks' fixed lengths). policy: one of the served policies (None:
        the first). logprobs n: each token's log-probability and the top n (at most
        `echo_top`); echo: the prompt's tokens' too (`Result.prompt_logprobs`)."""
        prompt = [int(t) for t in prompt]
        self.check_request(prompt, max_tokens)
        which = self.policy_index(policy)
        temperature, top_k, top_p = check_settings(temperature, top_k, top_p)
        top_k = min(top_k, self.cfg.vocab_size)  # past the vocabulary: every token, as at V
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
        if logprobs is not None:
            logprobs = check_int("logprobs", logprobs, minimum=0)
            if logprobs > self.echo_top:
                raise InvalidArgument(f"logprobs must be at most {self.echo_top}, got {logprobs}", "logprobs")
        req = Request(prompt, max_tokens, temperature, top_k, top_p, seed, stop, listener,
                      rid or f"req-{next(request_ids)}", ignore_eos, which, logprobs, echo)
        with self._lock:
            if not self._running:
                raise EngineStopped("the engine is not running")
            busy = sum(r is not None for r in self.rows)
            # B rows plus max_queue waiting, counted together: requests the loop has not yet
            # moved into a free row count as waiting, however far behind the loop is
            if busy + len(self.waiting) >= self.B + self.max_queue:
                raise QueueFull(f"{busy} of {self.B} rows are busy and {len(self.waiting)} requests wait "
                                f"(at most {self.max_queue} may)")
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
        """End every request still in flight and waiting (finish_reason "error", error
        code "shutting_down": each gets its final event) and the loop thread, which sees
        the stop between any two prompt pieces or decode chunks."""
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def compiled(self) -> dict[str, int]:
        """Compiled variants of each program the engine calls (constant while serving)."""
        chunked = self.prefill_mode == "chunked"
        progs = {"decode_rows": decode_rows, "decode_rows_logprobs": decode_rows_logprobs,
                 "insert_row": insert_row, "first_rows": first_rows,
                 "prefill_piece": chunk_piece if chunked else exact_piece,
                 "prefill_piece_logprobs": chunk_piece_logprobs if chunked else exact_piece_logprobs}
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
                reqs += [pf.req for pf in self.prefills if pf.req not in reqs]
                self.waiting.clear()
                self.prefills = []
                self.rows = [None] * self.B
            for r in reqs:  # each gets its final event: an error, not a finish
                self._fail(r, 503, "shutting_down", "the server is shutting down; retry elsewhere or later")

    def _warm(self):
        """Run every program once on row 0 (free: whatever it leaves there is overwritten
        when a request takes the row), so the first request finds them compiled; with
        several policies, each one's prefill on a row of its own (and its echo variant)."""
        t0 = time.perf_counter()
        for b in range(len(self.policies)):
            for echo in (False, True):
                pf = self._new_prefill(None, b, [0], echo)
                while not self._advance(pf):
                    pass
            self._insert(pf, b)
        R = self.R
        first_rows(*sharding.place_rows(self.mesh, pf.logits, self.keys[:R], self.temperature[:R],
                                        self.top_k[:R], self.top_p[:R]))[0].block_until_ready()
        self._decode_chunk()
        self._decode_chunk(logprobs=True)
        self.stats.clear()
        self._chunk_seconds = None  # that chunk included its compile
        log.info("compiled in %.1f s: policy %s, C=%d, B=%d, %s prefill in pieces of %d, %d steps per chunk",
                 time.perf_counter() - t0, self.name, self.capacity, self.B, self.prefill_mode,
                 self.piece, self.steps)

    def _empty_state(self, rows: int) -> State | Groups:
        if self.mesh is None:  # layer groups: `Groups`, the global layers at C, the sliding at their window
            return init_state(self.cfg, rows, self.capacity, self.dtype)
        return sharding.init_state(self.cfg, rows, self.capacity, self.dtype, self.mesh)

    def _placed(self, state: State) -> State:
        """state in the mesh's state shardings (as it is without a mesh). Every program's
        state and rows (`sharding.place_rows`) are placed so before each call: the same
        input shardings at every call, one compile."""
        return state if self.mesh is None else sharding.place_state(state, self.mesh)

    def _new_prefill(self, req, row, prompt, echo: bool | None = None) -> _Prefill:
        if echo is None:
            echo = req is not None and req.prompt_logprobs is not None
        return _Prefill(req, row, prompt, self._empty_state(self.R),
                        jnp.zeros((self.R, self.cfg.vocab_size), jnp.float32), echo=echo)

    def _insert(self, pf: _Prefill, b: int):
        """pf's first row into row b of the state."""
        self.state = insert_row(self._placed(self.state), self._placed(pf.state), b)

    def _advance(self, pf: _Prefill) -> bool:
        """Read the next piece of pf's prompt; True once the whole prompt is in. An echo
        prefill keeps every token's log-probability (and the top ones) on its request."""
        P, prompt = self.piece, pf.prompt
        toks = np.zeros((self.R, P), np.int32)  # rows after the first (a mesh's padding) inactive
        act = np.zeros((self.R, P), bool)
        start = pf.next_piece * P
        part = prompt[start:start + P]
        toks[0, :len(part)] = part
        act[0, :len(part)] = True
        chunked = self.prefill_mode == "chunked"
        toks, act, logits = sharding.place_rows(self.mesh, toks, act, pf.logits)
        policy = self.policies[pf.row % len(self.policies)]  # the row's own (one program per policy)
        if pf.echo:
            piece = chunk_piece_logprobs if chunked else exact_piece_logprobs
            pf.logits, pf.state, lp, top_v, top_i = piece(
                self.model.params, self.cfg, policy, self._placed(pf.state), toks, act, logits, self.positions,
                top=self.echo_top)
            if pf.req is not None:
                lp, top_v, top_i = np.asarray(lp)[0], np.asarray(top_v)[0], np.asarray(top_i)[0]
                out = pf.req.prompt_logprobs
                for j in range(len(part)):
                    if start + j == 0:
                        continue  # the first token has nothing before it (None, kept at [0])
                    out.append((float(lp[j]), [(int(i), float(v)) for i, v in zip(top_i[j], top_v[j])]))
        else:
            piece = chunk_piece if chunked else exact_piece
            pf.logits, pf.state = piece(self.model.params, self.cfg, policy, self._placed(pf.state), toks,
                                        act, logits, self.positions)
        pf.next_piece += 1
        self.stats["pieces"] += 1
        return pf.next_piece * P >= len(prompt)

    def _decode_chunk(self, logprobs: bool = False):
        """One decode chunk over all B rows; with `logprobs` (a row asked for them) the
        variant that also returns each token's log-probability and the top ones."""
        t0 = time.perf_counter()
        tok, keys, pending, finished, budget, temperature, top_k, top_p, ignore_eos = sharding.place_rows(
            self.mesh, self.tok, self.keys, self.pending, self.finished, self.budget, self.temperature,
            self.top_k, self.top_p, self.ignore_eos)
        args = (self.model.params, self.cfg, self.policy, self.steps, self._placed(self.state), tok, keys, pending,
                finished, budget, temperature, top_k, top_p, self.eos, ignore_eos, self.impl, self.positions)
        lps = None
        if logprobs:
            *out, chosen, top_v, top_i = decode_rows_logprobs(*args, top=self.echo_top)
            lps = (np.asarray(chosen), np.asarray(top_v), np.asarray(top_i))
        else:
            out = decode_rows(*args)
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
        return toks, emitted, lps

    def _loop(self):
        """Turns until stopped: admit, read prompt pieces (one per prompt in turn), decode
        one chunk, free what ended. `_running` is read between any two pieces or chunks,
        so a stop ends the loop within one piece or one chunk."""
        while True:
            with self._lock:
                if not self._running:
                    return
                self._drop_cancelled_waiting()
                self._admit()
                decoding = self._decoding()
                if not self.prefills and not decoding:
                    self._lock.wait(0.5)
                    continue
            # while rows decode, prompts are read for as long as the turn's budget allows
            # (prefill_share); with none decoding, one round: one piece of each prompt
            deadline = None if not decoding else time.perf_counter() + prefill_seconds(
                self.prefill_share, self._chunk_seconds)
            self._read_prompts(deadline)
            with self._lock:
                decoding = self._decoding() and self._running
            if decoding:
                reading = {id(pf.req) for pf in self.prefills}
                want = any(r is not None and id(r) not in reading and r.token_logprobs is not None
                           for r in self.rows)
                try:
                    toks, emitted, lps = self._decode_chunk(logprobs=want)
                except Exception as e:  # noqa: BLE001  every decoding row ends; the engine goes on
                    self._decode_failed(e)
                else:
                    self._deliver(toks, emitted, lps)
            self._free_cancelled_rows()
            self.stats["turns"] += 1

    def _decoding(self) -> bool:
        """Whether a row holds a request that is past its prefill (caller holds the lock)."""
        reading = {id(pf.req) for pf in self.prefills}
        return any(r is not None and id(r) not in reading for r in self.rows)

    def _admit(self):
        """Every waiting request, oldest first, that finds a free row of its policy takes
        it and starts its prefill (caller holds the lock)."""
        n = len(self.policies)
        while self.waiting and None in self.rows:
            free = [b for b, r in enumerate(self.rows) if r is None]
            pick = next(((req, b) for req in self.waiting for b in free if b % n == req.policy_index), None)
            if pick is None:
                return
            req, b = pick
            self.waiting.remove(req)
            self.rows[b] = req
            req.row = b
            req.pieces_at_row = self.stats["pieces"]  # the TTFT bound counts pieces from here
            self.prefills.append(self._new_prefill(req, b, req.prompt))

    def _drop_cancelled_waiting(self):
        for r in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(r)
            self._finish(r, FINISH_ABORT)

    def _read_prompts(self, deadline: float | None):
        """Pieces of the prompts being read, one piece per prompt in turn (round robin,
        carried over between turns), so a short prompt is never read behind a long one:
        at least one piece; while rows decode, until the clock passes `deadline`; with
        none decoding, one round (then the loop admits newcomers and sees cancels). A
        prompt read to its end gets its row and its first token; a cancelled one frees
        its row before its next piece; one that fails ends alone."""
        rounds = len(self.prefills)
        read = 0
        while self.prefills and self._running:
            if self._next_pf >= len(self.prefills):
                self._next_pf = 0
            pf = self.prefills[self._next_pf]
            if pf.req.cancelled:
                self._end_prefill(pf)
                self._release(pf.row)
                self._finish(pf.req, FINISH_ABORT)
                continue
            try:
                if self._advance(pf):
                    self._end_prefill(pf)
                    self._first_token(pf)
                else:
                    self._next_pf += 1
                if deadline is not None:
                    pf.logits.block_until_ready()  # the piece's own time counts, not its dispatch
            except Exception as e:  # noqa: BLE001  this request ends, the engine goes on
                if pf in self.prefills:
                    self._end_prefill(pf)
                if self.rows[pf.row] is pf.req:
                    self._release(pf.row)
                self._fail_exc(pf.req, e)
            read += 1
            if (read >= rounds) if deadline is None else (time.perf_counter() >= deadline):
                return

    def _end_prefill(self, pf: _Prefill):
        """pf leaves the prompts being read (its row stays its request's until released)."""
        with self._lock:
            i = self.prefills.index(pf)
            self.prefills.pop(i)
            if i < self._next_pf:
                self._next_pf -= 1

    def _first_token(self, pf: _Prefill):
        """A prompt read to its end: write its row into the state and sample its first
        token (with max_tokens 0, an echo: none; the request ends here)."""
        req, b = pf.req, pf.row
        # pieces read (this prompt's and the others') from taking the row to the first
        # token: at most ceil(L/P) rounds of at most B pieces (module docstring)
        req.pieces_waited = self.stats["pieces"] - req.pieces_at_row
        if req.max_tokens == 0:
            self._release(b)
            req.t_first = time.perf_counter()
            self._finish(req, "length")
            return
        self._insert(pf, b)
        R = self.R  # the first of R rows is the request's
        key = np.repeat(row_keys(req.seed, 1), R, 0)
        temp = np.full(R, req.temperature, np.float32)
        tk, tp = np.full(R, req.top_k, np.int32), np.full(R, req.top_p, np.float32)
        first, key = first_rows(*sharding.place_rows(self.mesh, pf.logits, key, temp, tk, tp))
        first = int(np.asarray(first)[0])
        if req.token_logprobs is not None:  # the first generated token's, from the prompt's logits
            x = np.asarray(pf.logits, np.float64)[0]
            lp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
            top = np.argsort(-lp)[:req.logprobs] if req.logprobs else []
            req.token_logprobs.append((float(lp[first]), [(int(i), float(lp[i])) for i in top]))
        with self._lock:
            self.tok[b], self.keys[b] = first, np.asarray(key)[0]
            self.temperature[b], self.top_k[b], self.top_p[b] = temp[0], tk[0], tp[0]
            self.budget[b] = req.max_tokens - 1
            self.pending[b] = True
            self.ignore_eos[b] = req.ignore_eos
            self.finished[b] = (first in self._eos_set and not req.ignore_eos) or req.max_tokens <= 1
        req.t_first = time.perf_counter()
        self._add_tokens(req, [first])

    def _deliver(self, toks, emitted, lps=None):
        for b, req in enumerate(self.rows):
            if req is None or req.row is None or not emitted[b].any() or req.t_first is None:
                continue
            try:
                if req.token_logprobs is not None and lps is not None:
                    chosen, top_v, top_i = lps
                    for j in np.flatnonzero(emitted[b]):
                        req.token_logprobs.append((float(chosen[b, j]), [
                            (int(i), float(v)) for i, v in zip(top_i[b, j, :req.logprobs], top_v[b, j, :req.logprobs])]))
                self._add_tokens(req, [int(t) for t in toks[b][emitted[b]]])
            except Exception as e:  # noqa: BLE001  this request ends, the others go on
                self._release(b)
                self._fail_exc(req, e)

    def _decode_failed(self, e: BaseException):
        """A decode chunk failed: every row it held ends with the error; the state and the
        host rows start again empty (the failed call may have consumed the donated state)."""
        log.error("a decode chunk failed: %s: %s", type(e).__name__, e)
        reading = {id(pf.req) for pf in self.prefills}
        for b, req in enumerate(self.rows):
            if req is not None and id(req) not in reading:
                self._release(b)
                self._fail_exc(req, e)
        self.state = self._empty_state(self.B)

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
        reading = {id(pf.req) for pf in self.prefills}
        for b, req in enumerate(self.rows):
            if req is not None and req.cancelled and id(req) not in reading:
                self._release(b)
                self._finish(req, FINISH_ABORT)

    def _fail_exc(self, req: Request, e: BaseException):
        log.error("%s failed: %s: %s", req.id, type(e).__name__, e)
        self._fail(req, 500, "internal_error", f"the request failed in the engine: {type(e).__name__}")

    def _fail(self, req: Request, status: int, code: str, message: str):
        """End req with an error (a shutdown, a failure): its final event says so."""
        if not req.done:
            req.error = {"status": status, "code": code, "message": message}
            self._finish(req, FINISH_ERROR)

    def _finish(self, req: Request, reason: str):
        if req.done:
            return
        req.t_done = time.perf_counter()
        req.finish_reason = reason
        if req.final_text is None:
            try:
                req.final_text = self.model.decode(req.tokens) if (
                    self.model.tokenizer is not None and req.tokens) else ""
            except Exception:  # noqa: BLE001
                req.final_text = ""
            if reason == FINISH_ABORT and req.text_sent < len(req.final_text):
                req.send(req.final_text[req.text_sent:], [])
        ttft = None if req.t_first is None else req.t_first - req.t_submit
        lps = None if req.token_logprobs is None else req.token_logprobs[:len(req.tokens)]
        req._result = Result(list(req.tokens), req.final_text, reason, len(req.prompt), ttft,
                             req.t_done - req.t_submit, req.error, req.prompt_logprobs, lps)
        if self.log_requests:
            gen = len(req.tokens)
            dt = req.t_done - (req.t_first or req.t_done)
            rate = (gen - 1) / dt if gen > 1 and dt > 0 else float("nan")
            log.info("%s prompt_tokens=%d generated_tokens=%d ttft=%s pieces=%s tokens_per_s=%.1f finish=%s%s",
                     req.id, len(req.prompt), gen, "-" if ttft is None else f"{ttft:.3f}s",
                     "-" if req.pieces_waited is None else req.pieces_waited, rate,
                     reason if req.error is None else f"error:{req.error['code']}",
                     f" policy={self.policy_names[req.policy_index]}" if len(self.policies) > 1 else "")
        req._done.set()
        req._emit({"type": "done", "finish_reason": reason, "result": req._result})
