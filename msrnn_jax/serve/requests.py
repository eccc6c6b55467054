"""A request's life in the serving engine: its settings, its tokens as they arrive, the
text streamed from them (held back while it could still become a stop string), its end
(EOS, a stop string, max_tokens or a cancel) and its `Result`."""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from typing import Callable, Sequence

from ..errors import MsrnnError

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR = "stop", "length", "abort", "error"

request_ids = itertools.count(1)  # req-1, req-2, ...


@dataclasses.dataclass
class Result:
    tokens: list[int]         # generated tokens (the EOS or the stop string's last included)
    text: str                 # their text, cut before a stop string ("" without a tokenizer)
    finish_reason: str        # "stop" (EOS or a stop string), "length", "abort" (a cancel) or "error"
    prompt_tokens: int
    time_to_first_token: float | None
    seconds: float
    error: dict | None = None  # "error": {"status", "code", "message"} (a shutdown, a failure)
    # with logprobs: per token (the prompt's first has none), its log-probability and the
    # top ones [(id, log-probability)], the prompt's (echo) and the generated tokens'
    prompt_logprobs: list | None = None
    logprobs: list | None = None


class Request:
    """One request's life in the engine. Events (dicts) reach `listener(event)` (called
    on the engine's thread) or, without one, `events()`:
    {"type": "delta", "text": str, "tokens": [int]} as tokens arrive (text held back
    while it could still turn into a stop string), then one {"type": "done",
    "finish_reason": str, "result": Result}."""

    def __init__(self, prompt: Sequence[int], max_tokens: int, temperature: float, top_k: int,
                 top_p: float, seed: int, stop: Sequence[str], listener, rid: str,
                 ignore_eos: bool = False, policy_index: int = 0, logprobs: int | None = None,
                 echo: bool = False):
        self.id = rid
        self.prompt = list(prompt)
        self.max_tokens, self.temperature, self.top_k, self.top_p = max_tokens, temperature, top_k, top_p
        self.seed, self.stop, self.ignore_eos = seed, tuple(stop), bool(ignore_eos)
        self.policy_index = policy_index  # which of the engine's policies its row follows
        self.logprobs = logprobs  # None: none; n: each token's log-probability and the top n
        self.echo = bool(echo)    # with logprobs: the prompt's tokens' too
        self.prompt_logprobs: list | None = [None] if (echo and logprobs is not None) else None
        self.token_logprobs: list | None = [] if logprobs is not None else None
        self.error: dict | None = None
        self.tokens: list[int] = []
        self.text_sent = 0        # characters of the decoded text already streamed
        self.final_text: str | None = None
        self.finish_reason: str | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_done: float | None = None
        self.row: int | None = None
        self.pieces_at_row = 0    # the engine's prompt pieces read when it took its row...
        self.pieces_waited: int | None = None  # ...and from then to its first token
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._listener = listener
        self._queue: queue.Queue | None = None if listener else queue.Queue()
        self._result: Result | None = None

    def cancel(self):
        """Give the row back (a client that disconnected); the engine ends it as "abort"."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Result:
        """Block until the request ends (TimeoutError after `timeout` seconds)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
        return self._result

    def events(self, timeout: float | None = None):
        """The request's events as they come (without a listener)."""
        if self._queue is None:
            raise MsrnnError("this request delivers its events to its listener")
        while True:
            ev = self._queue.get(timeout=timeout)
            yield ev
            if ev["type"] == "done":
                return

    def add_tokens(self, new: list[int], decode: Callable | None, eos_ids) -> tuple[str, str | None]:
        """Take the row's new tokens. Returns (the text to stream now, the finish reason or
        None): the request ends on an EOS (unless `ignore_eos`), a stop string (the text cut
        before it, the tokens after the one that completed it dropped) or `max_tokens`.
        Text that could still become a stop string, or an unfinished character, is held
        back. decode: token ids -> text (None: no tokenizer, no text)."""
        self.tokens.extend(new)
        reason = None
        if self.tokens[-1] in eos_ids and not self.ignore_eos:
            reason = FINISH_STOP
        elif len(self.tokens) >= self.max_tokens:
            reason = FINISH_LENGTH
        text, cut = "", None
        if decode is not None:
            text = decode(self.tokens)
            if self.stop:
                start = max(0, self.text_sent - max(map(len, self.stop)))
                hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
                if hits:
                    cut, reason = min(hits), FINISH_STOP
                    # the tokens end with the one that completed the stop string
                    n = len(self.tokens) - len(new) + 1
                    while n < len(self.tokens) and not any(
                            s in decode(self.tokens[:n])[start:] for s in self.stop):
                        n += 1
                    del self.tokens[n:]
        if reason is None:
            safe = len(text) - (max(map(len, self.stop)) - 1 if self.stop else 0)
            while safe > self.text_sent and text[safe - 1] == "\ufffd":
                safe -= 1
            return text[self.text_sent:max(safe, self.text_sent)], None
        end = len(text) if cut is None else cut
        self.final_text = text[:end]
        return text[self.text_sent:max(end, self.text_sent)], reason

    def send(self, delta: str, new: list[int]):
        """Stream a delta event (text and/or tokens)."""
        if delta or new:
            self.text_sent += len(delta)
            self._emit({"type": "delta", "text": delta, "tokens": list(new)})

    def _emit(self, ev):
        if self._listener is not None:
            try:
                self._listener(ev)
            except Exception:  # noqa: BLE001  a listener gone (e.g. a closed event loop) ends no engine
                self.cancel()
        else:
            self._queue.put(ev)
