"""`msrnn serve`: an OpenAI-compatible HTTP server over the continuous-batching `Engine`.

Endpoints (docs/design.md §10, §15): GET /health (503 until the model is loaded and its
programs compiled), GET /metrics (Prometheus text), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (the model's chat template). `stream: true` answers with
server-sent events `data: {json}` in OpenAI's chunk shapes, then `data: [DONE]`. Every
error, whatever its status, has OpenAI's body `{"error": {"message", "type", "param",
"code"}}`; a request the server could not finish (a shutdown, a failure) ends with an
error, never with a finish: its status (503, 500), or in a stream a last event
`data: {"error": ...}` before `data: [DONE]` (the `openai` client raises on it).

    msrnn serve --policy tova --capacity 512 --port 8000
    # then, from Python:
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is")

At the boundary (docs/serving.md, "Limits and security"): bodies must be
`application/json` (415) of at most `max_body_bytes` (413), read within `body_timeout`
seconds (408); the request line and headers within `header_timeout` (else the connection
is closed); with an API key, /v1/ needs `Authorization: Bearer KEY` (401); bound to
loopback, the Host and Origin headers must name loopback (403). Every field is checked
against its type and the model; a field the server does not implement is a 400 naming it.
JSON parsing and tokenizing run on worker threads, never on the event loop.

The model loads and compiles on a thread after the socket is bound, so /health answers
(503) meanwhile. SIGINT/SIGTERM: the engine stops within one prompt piece or decode chunk,
every request in flight or waiting ends with a `shutting_down` error (streams with their
final events), and the process exits 0.

With several policies (`--policy tova,window`) a request picks one with the field
`policy` (the `openai` client: `extra_body={"policy": "window"}`); without it, the first.
/health lists them.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import ipaddress
import json
import logging
import math
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import InvalidArgument, MsrnnError, check_float, check_int
from ..run.sampling import check_temperature

log = logging.getLogger("msrnn.serve")

HEADER_TIMEOUT = 10.0  # seconds for a new connection's request line and headers
BODY_TIMEOUT = 30.0    # seconds to read a request's body
BYTES_PER_TOKEN = 16   # the default body limit: this many bytes per prompt token allowed...
BODY_SLACK = 1 << 20   # ...plus 1 MiB (JSON escapes, chat messages, token id lists fit)
POLL = 0.1             # seconds between checks that a non-streaming client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers


def error_body(status: int, message: str, param=None, type_=None, code=None) -> dict:
    type_ = type_ or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(e: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(e.status, e.message, e.param, e.type, e.code), status_code=e.status,
                        headers=e.headers)


class _Gone(Exception):
    """The client went away (nothing left to answer)."""


# -- request fields --------------------------------------------------------------------
def _field(body: dict, name: str, kinds, default=None):
    """body[name] if it has one of the JSON types `kinds` (None or absent: default)."""
    v = body.get(name)
    if v is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):  # JSON true is no number
        want = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                list: "an array", dict: "an object"}
        names = " or ".join(want[k] for k in kinds)
        raise ApiError(400, f"{name} must be {names}, got {_short(v)}", name, code="invalid_type")
    if isinstance(v, float) and not math.isfinite(v):
        raise ApiError(400, f"{name} must be a finite number", name)
    if float in kinds and isinstance(v, int) and abs(v) > 1e300:  # a 400-digit integer is no float
        raise ApiError(400, f"{name} is out of range, got an integer of {len(str(abs(v)))} digits", name)
    return v


def _short(v) -> str:
    try:
        return json.dumps(v)[:60]
    except (ValueError, TypeError):
        return type(v).__name__


def _checked(fn):
    """Run a library check; its InvalidArgument becomes a 400 naming the field."""
    try:
        return fn()
    except InvalidArgument as e:
        raise ApiError(400, str(e), e.param) from None
    except (OverflowError, ValueError) as e:
        raise ApiError(400, f"a value is out of range: {e}") from None


MAX_STOP = 4
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
          "n", "ignore_eos", "policy", "user"}
FIELDS = {False: COMMON | {"prompt", "logprobs", "echo"},
          True: COMMON | {"messages", "max_completion_tokens"}}
# fields the server does not implement: accepted at the value that changes nothing, else a 400
NEUTRAL = {"presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,),
           "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
           "response_format": ({"type": "text"},), "suffix": ("",), "best_of": (1,), "logprobs": (False,),
           "top_logprobs": (0,), "parallel_tool_calls": (False, True), "min_tokens": (0,),
           "store": (False,), "metadata": ({},), "service_tier": ("auto", "default")}


def _check_fields(body: dict, chat: bool):
    for k, v in body.items():
        if k in FIELDS[chat] or v is None:
            continue
        if k in NEUTRAL and any(v == n and type(v) is type(n) or (isinstance(n, (int, float)) and
                                not isinstance(v, bool) and isinstance(v, (int, float)) and v == n)
                                for n in NEUTRAL[k]):
            continue
        what = "is not implemented by this server" if k in NEUTRAL else "is not a field this server knows"
        raise ApiError(400, f"{k} {what}" + ("" if k not in NEUTRAL else f" (only {json.dumps(NEUTRAL[k][0])} "
                                                                       f"is accepted)"), k,
                       code="unsupported_field")


def _check_text(body) -> None:
    """Every string (and key) of the body must be valid Unicode (a lone surrogate such as
    "\\ud800" is valid JSON but no text): 400 otherwise. Iterative: no depth limit."""
    todo = [body]
    while todo:
        x = todo.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "the body has a string that is not valid Unicode (a lone surrogate)",
                               code="invalid_text") from None
        elif isinstance(x, dict):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, list):
            todo.extend(x)


def parse_json(raw: bytes):
    """The body as JSON, or ApiError(400) (malformed, too deep, not Unicode)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}", code="invalid_json") from None
    _check_text(body)
    return body


def parse_request(body, chat: bool, served: set[str], name: str = "") -> dict:
    """The generation settings of one request body, or ApiError(400)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_fields(body, chat)
    model = _field(body, "model", str)
    if model is not None and model not in served:
        raise ApiError(400, f"unknown model {model!r} (this server serves "
                       f"{name or sorted(served)[0]!r})", "model", code="model_not_found")
    n = _field(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), got {n}", "n")
    max_tokens = _field(body, "max_tokens", int)
    if chat and max_tokens is None:
        max_tokens = _field(body, "max_completion_tokens", int)
    num = (int, float)
    logprobs = None if chat else _field(body, "logprobs", int)
    echo = False if chat else _field(body, "echo", bool, False)
    out = {
        "temperature": _checked(lambda: check_temperature(_field(body, "temperature", num, 1.0))),
        "top_p": _checked(lambda: check_float("top_p", _field(body, "top_p", num, 1.0), low=0.0, high=1.0,
                                              low_open=True)),
        "top_k": _field(body, "top_k", int, 0),
        "seed": _field(body, "seed", int),
        "stream": _field(body, "stream", bool, False),
        "ignore_eos": _field(body, "ignore_eos", bool, False),  # vLLM's extension: fixed lengths
        "policy": _field(body, "policy", str),  # ours: one of the served policies (`--policy a,b`)
        "logprobs": None if logprobs is None else _checked(lambda: check_int("logprobs", logprobs, minimum=0)),
        "echo": echo,
    }
    # max_tokens 0: only with echo (the prompt's log-probabilities, nothing generated)
    out["max_tokens"] = None if max_tokens is None else _checked(
        lambda: check_int("max_tokens", max_tokens, minimum=0 if echo else 1))
    if out["top_k"] == -1:  # vLLM's spelling of "off"
        out["top_k"] = 0
    _checked(lambda: check_int("top_k", out["top_k"], minimum=0))
    if out["seed"] is not None and not 0 <= out["seed"] < 2 ** 63:
        raise ApiError(400, f"seed must be in [0, 2**63), got {_short(out['seed'])}", "seed")
    if out["stream"] and (logprobs is not None or echo):
        raise ApiError(400, "logprobs and echo are not implemented for streams (ask without stream)",
                       "logprobs" if logprobs is not None else "echo", code="unsupported_field")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise ApiError(400, f"stop must be a non-empty string or an array of up to {MAX_STOP} of them", "stop")
    if any(len(s) > 1000 for s in stop):
        raise ApiError(400, "a stop string may have at most 1000 characters", "stop")
    out["stop"] = stop
    opts = _field(body, "stream_options", dict, {})
    out["include_usage"] = opts.get("include_usage", False) is True
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "messages must be a non-empty array of {role, content}", "messages")
        clean = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "each message needs a role and a content", "messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: the text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ApiError(400, "only text content parts are supported", "messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise ApiError(400, "a message's content must be a string", "messages")
            clean.append({"role": m["role"], "content": content})
        if not any(m["content"].strip() for m in clean):
            raise ApiError(400, "empty prompt: every message is empty", "messages")
        out["messages"] = clean
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "empty prompt", "prompt")
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in prompt):
            pass  # token ids (their range: against the model's vocabulary)
        elif isinstance(prompt, list) and not prompt:
            raise ApiError(400, "empty prompt", "prompt")
        elif isinstance(prompt, list):
            raise ApiError(400, "one prompt per request (a string or a list of token ids)", "prompt")
        else:
            raise ApiError(400, "prompt must be a string or a list of token ids", "prompt")
        out["prompt"] = prompt
    return out


# -- metrics ---------------------------------------------------------------------------
class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers in one
    process never share one)."""

    def __init__(self, svc: "Service"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("msrnn_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=r)
        self.prompt_tokens = Counter("msrnn_prompt_tokens", "prompt tokens read", registry=r)
        self.generated_tokens = Counter("msrnn_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("msrnn_request_finish", "requests ended in the engine, by finish reason",
                                ["reason"], registry=r)
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("msrnn_time_to_first_token_seconds", "time to first token", buckets=lat,
                              registry=r)
        self.itl = Histogram("msrnn_inter_token_seconds", "time between a request's tokens",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                             registry=r)

        def load(key):
            return lambda: svc.engine.load()[key] if svc.ready else 0

        Gauge("msrnn_queue_depth", "requests waiting for a row", registry=r).set_function(load("waiting"))
        Gauge("msrnn_rows_busy", "rows holding a request", registry=r).set_function(load("rows_busy"))
        Gauge("msrnn_rows", "rows of the state", registry=r).set_function(lambda: svc.engine.B if svc.ready else 0)

    def on_event(self, req_t_submit: float, ev: dict, last: list):
        """Called on the engine's thread with each of a request's events."""
        now = time.perf_counter()
        if ev["type"] == "delta" and ev["tokens"]:
            n = len(ev["tokens"])
            if last[0] is None:
                self.ttft.observe(now - req_t_submit)
                n -= 1
            else:
                for _ in range(n):
                    self.itl.observe((now - last[0]) / n)
            last[0] = now
        elif ev["type"] == "done":
            res = ev["result"]
            self.finished.labels(res.finish_reason if res.error is None else res.error["code"]).inc()
            if res.time_to_first_token is not None:
                self.prompt_tokens.inc(res.prompt_tokens)
            self.generated_tokens.inc(len(res.tokens))


# -- access ----------------------------------------------------------------------------
LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware, before anything else: Host and Origin (bound to loopback), the
    API key (on /v1/), the body's type (415) and declared size (413); records each
    response's status in the metrics."""

    def __init__(self, app, svc: "Service"):
        self.app, self.svc = app, svc

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status = []

        async def sending(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            self.check(scope, path)
        except ApiError as e:
            await _error_response(e)(scope, receive, sending)
        else:
            await self.app(scope, receive, sending)
        finally:
            if self.svc.metrics is not None:
                known = path if path in ("/health", "/metrics", "/v1/models", "/v1/completions",
                                         "/v1/chat/completions") else "other"
                self.svc.metrics.requests.labels(known, str(status[0]) if status else "none").inc()

    def check(self, scope, path):
        svc = self.svc
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if svc.loopback:
            host = headers.get("host", "")
            name = urlsplit("//" + host).hostname or ""
            if not is_loopback(name):
                raise ApiError(403, f"this server is bound to loopback and answers only requests to it; the "
                               f"Host header names {host[:100]!r}", type_="forbidden", code="forbidden_host")
            origin = headers.get("origin")
            if origin is not None and not is_loopback(urlsplit(origin).hostname or ""):
                raise ApiError(403, f"requests from a web page at {origin[:100]!r} are refused (Origin must "
                               f"name loopback)", type_="forbidden", code="forbidden_origin")
        if svc.api_key is not None and path.startswith("/v1/"):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), svc.api_key.encode()):
                raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY",
                               type_="authentication_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
        if scope.get("method") == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise ApiError(415, f"the body must be application/json, got {kind[:60] or 'no Content-Type'}",
                               code="unsupported_media_type")
            size = headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > svc.max_body_bytes):
                raise ApiError(413, f"the body is larger than this server's limit of {svc.max_body_bytes} bytes "
                               f"(--max-body-bytes)", code="body_too_large")


# -- the app ---------------------------------------------------------------------------
class Service:
    """The model, its engine and the HTTP app; `load()` runs on a thread at startup."""

    def __init__(self, engine_factory, served_name: str, aliases=(), url: str = "", api_key: str | None = None,
                 loopback: bool = True, max_body_bytes: int | None = None, body_timeout: float = BODY_TIMEOUT,
                 metrics: bool = True):
        self.engine_factory = engine_factory
        self.url = url
        self.engine = None
        self.model = None
        self.name = served_name
        self.served = {served_name, *aliases}
        self.failed: str | None = None
        self.created = int(time.time())
        self.api_key = api_key or None
        self.loopback = loopback
        self._max_body = max_body_bytes
        self.body_timeout = body_timeout
        self.metrics = Metrics(self) if metrics else None

    @property
    def max_body_bytes(self) -> int:
        if self._max_body is not None:
            return self._max_body
        if self.engine is None:
            return BODY_SLACK
        return BYTES_PER_TOKEN * self.engine.max_prompt_tokens + BODY_SLACK

    def load(self):
        try:
            self.model, self.engine = self.engine_factory()
            self.engine.start()
            self.engine.ready.wait()
            if self.engine.error is not None:
                raise self.engine.error
            log.info("ready: %s at %s (OpenAI API under %s/v1)", self.name, self.url, self.url)
        except BaseException as e:  # noqa: BLE001  /health says so; the process goes on answering
            self.failed = f"{type(e).__name__}: {e}"
            log.error("loading failed: %s", self.failed)

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.ready.is_set() and self.engine.error is None

    def shutdown(self):
        if self.engine is not None:
            self.engine.stop()

    # -- handlers
    async def health(self, request):
        from starlette.responses import JSONResponse

        if self.ready:
            eng = self.engine
            return JSONResponse({"status": "ok", "policies": eng.policy_names, "capacity": eng.capacity,
                                 "max_batch": eng.B, **eng.load()})
        return JSONResponse({"status": "failed" if self.failed else "loading", "error": self.failed},
                            status_code=503, headers={"Retry-After": "5"})

    async def metrics_text(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "msrnn-jax"}]})

    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request):
        return await self._generate(request, chat=True)

    async def _read_body(self, request) -> bytes:
        """The body, at most max_body_bytes (413) within body_timeout seconds (408)."""
        from starlette.requests import ClientDisconnect

        limit, parts, size = self.max_body_bytes, [], 0

        async def read():
            nonlocal size
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise ApiError(413, f"the body is larger than this server's limit of {limit} bytes "
                                   f"(--max-body-bytes)", code="body_too_large")
                parts.append(part)

        try:
            await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the body was not read within {self.body_timeout:g} s",
                           code="body_timeout") from None
        except ClientDisconnect:
            raise _Gone() from None
        return b"".join(parts)

    def _tokens(self, p: dict, chat: bool) -> list[int]:
        """The prompt's token ids (on a worker thread: tokenizing a long text takes time)."""
        model = self.model
        try:
            if chat:
                return model.chat_ids(p["messages"])
            if isinstance(p["prompt"], str):
                return model.encode(p["prompt"])
            return list(p["prompt"])
        except MsrnnError as e:
            raise ApiError(400, str(e), "messages" if chat else "prompt") from None
        except (ValueError, TypeError, UnicodeError, OverflowError) as e:  # a tokenizer's refusal
            raise ApiError(400, f"the prompt cannot be tokenized: {type(e).__name__}",
                           "messages" if chat else "prompt") from None

    async def _generate(self, request, chat: bool):
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse, Response, StreamingResponse

        from .engine import EngineStopped, QueueFull

        try:
            if not self.ready:
                raise ApiError(503, "the model is still loading" if not self.failed else self.failed,
                               type_="server_error", code="not_ready", headers={"Retry-After": "5"})
            raw = await self._read_body(request)
            body = await run_in_threadpool(parse_json, raw)
            p = parse_request(body, chat, self.served, self.name)
            model, eng = self.model, self.engine
            ids = await run_in_threadpool(self._tokens, p, chat)
            if not ids:
                raise ApiError(400, "the prompt encodes to no tokens", "prompt")
            V = model.cfg.vocab_size
            if max(ids) >= V or min(ids) < 0:
                raise ApiError(400, f"token ids must be in [0, {V})", "prompt")
            if len(ids) > eng.max_prompt_tokens:
                raise ApiError(400, f"the prompt has {len(ids)} tokens, beyond this server's limit of "
                               f"{eng.max_prompt_tokens} (--max-prompt-tokens)", "prompt",
                               code="prompt_too_long")
            max_tokens = p["max_tokens"]
            if max_tokens is None:  # OpenAI: 16 for completions, "as many as fit" for chat
                fit = (eng.capacity if not eng.policy.bounded else model.cfg.max_position_embeddings) - len(ids)
                max_tokens = 16 if not chat else max(1, min(fit, 4096))
                max_tokens = min(max_tokens, eng.max_new_tokens)
            if max_tokens > eng.max_new_tokens:
                raise ApiError(400, f"max_tokens must be at most {eng.max_new_tokens} (--max-new-tokens), got "
                               f"{max_tokens}", "max_tokens")
            if p["logprobs"] is not None and p["logprobs"] > eng.echo_top:
                raise ApiError(400, f"logprobs must be at most {eng.echo_top}, got {p['logprobs']}", "logprobs")
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            metrics, last, t0 = self.metrics, [None], time.perf_counter()

            def listener(ev):
                if metrics is not None:
                    metrics.on_event(t0, ev, last)
                loop.call_soon_threadsafe(events.put_nowait, ev)

            try:
                req = eng.submit(ids, max_tokens, temperature=p["temperature"], top_k=p["top_k"],
                                 top_p=p["top_p"], seed=p["seed"], stop=p["stop"], listener=listener, rid=rid,
                                 ignore_eos=p["ignore_eos"], policy=p["policy"],
                                 logprobs=p["logprobs"], echo=p["echo"] and p["logprobs"] is not None)
            except QueueFull as e:
                raise ApiError(503, str(e), type_="server_error", code="queue_full",
                               headers={"Retry-After": "1"}) from None
            except EngineStopped as e:
                raise ApiError(503, str(e), type_="server_error", code="shutting_down",
                               headers={"Retry-After": "1"}) from None
            except InvalidArgument as e:
                raise ApiError(400, str(e), e.param) from None
        except ApiError as e:
            return _error_response(e)
        except _Gone:
            return Response(status_code=499)  # nobody is there to read it

        created = int(time.time())
        head = {"id": rid, "created": created, "model": self.name}

        def usage(res):
            return {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.tokens),
                    "total_tokens": res.prompt_tokens + len(res.tokens)}

        def failed(res):
            err = res.error
            return ApiError(err["status"], err["message"], type_="server_error", code=err["code"],
                            headers={"Retry-After": "1"} if err["status"] == 503 else None)

        if not p["stream"]:
            try:
                check = loop.time() + POLL
                while True:
                    try:
                        ev = await asyncio.wait_for(events.get(), POLL)
                        if ev["type"] == "done":
                            break
                    except asyncio.TimeoutError:
                        pass
                    if loop.time() >= check:  # every POLL seconds, whatever arrives meanwhile
                        if await request.is_disconnected():  # the client left: its row is freed
                            return Response(status_code=499)
                        check = loop.time() + POLL
            finally:
                req.cancel()  # a no-op once done; frees the row if the client went away
            res = ev["result"]
            if res.error is not None:
                return _error_response(failed(res))
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                          "logprobs": None, "finish_reason": res.finish_reason}
                return JSONResponse({**head, "object": "chat.completion", "choices": [choice],
                                     "usage": usage(res)})
            text, lps = res.text, None
            if p["echo"]:
                prompt_text = p["prompt"] if isinstance(p["prompt"], str) else await run_in_threadpool(
                    model.decode, ids)
                text = prompt_text + text
            if p["logprobs"] is not None:
                lps = await run_in_threadpool(self._logprobs, ids, res, p["echo"], p["logprobs"])
            choice = {"index": 0, "text": text, "logprobs": lps, "finish_reason": res.finish_reason}
            return JSONResponse({**head, "object": "text_completion", "choices": [choice], "usage": usage(res)})

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text=None, finish=None, first=False):
            if chat:
                delta = {} if text is None else {"content": text}
                if first:
                    delta = {"role": "assistant", "content": ""}
                c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({**head, "object": obj, "choices": [c]}) + "\n\n"

        async def stream():
            # Starlette ends this generator when the client leaves (it listens for the
            # disconnect beside the stream), and `finally` frees the row
            try:
                if chat:
                    yield chunk(first=True)
                while True:
                    ev = await events.get()
                    if ev["type"] == "delta":
                        if ev["text"]:
                            yield chunk(ev["text"])
                        continue
                    res = ev["result"]
                    if res.error is not None:
                        e = failed(res)
                        yield "data: " + json.dumps(error_body(e.status, e.message, None, e.type, e.code)) + "\n\n"
                    else:
                        yield chunk(None, res.finish_reason)
                        if p["include_usage"]:
                            yield "data: " + json.dumps({**head, "object": obj, "choices": [],
                                                         "usage": usage(res)}) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
            finally:
                req.cancel()  # the client went away (or we are done): give the row back

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})

    def _logprobs(self, prompt_ids, res, echo: bool, top: int) -> dict:
        """OpenAI's (and vLLM's) completions `logprobs`: tokens (their text), token_logprobs,
        top_logprobs ({text: log-probability} of the top `top`) and text_offset, the
        prompt's first (echo) with None, as it has nothing before it."""
        model, names = self.model, {}

        def name(t):
            if t not in names:
                names[t] = model.decode([t]) if model.tokenizer is not None else str(t)
            return names[t]

        ids, lps = ([], [])
        if echo:
            ids += list(prompt_ids)
            lps += list(res.prompt_logprobs)
        ids += list(res.tokens)
        lps += list(res.logprobs or [])
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for t, lp in zip(ids, lps):
            s = name(t)
            out["tokens"].append(s)
            out["text_offset"].append(offset)
            offset += len(s)
            if lp is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            value, tops = lp
            out["token_logprobs"].append(value)
            d = {}
            for i, v in tops[:top]:
                d.setdefault(name(i), v)
            out["top_logprobs"].append(d)
        return out

    def app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        async def http_error(request, exc):
            codes = {404: "not_found", 405: "method_not_allowed"}
            return _error_response(ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                                            code=codes.get(exc.status_code)))

        async def server_error(request, exc):
            log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
            return _error_response(ApiError(500, "internal server error", type_="server_error",
                                            code="internal_error"))

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]
        if self.metrics is not None:
            routes.append(Route("/metrics", self.metrics_text, methods=["GET"]))
        app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
        return Guard(app, self)


def served_name(spec: str | None, source: str) -> str:
    """The model id clients pass: the folder or file name (SmolLM2-135M-Instruct for the default)."""
    if spec in (None, "", "default"):
        return "SmolLM2-135M-Instruct"
    return Path(str(spec).rstrip("/")).name or str(spec)


def listen(host: str, port: int):
    """A socket bound to host:port, or one clear error naming them (a busy port, a
    host that is not this machine's) before anything is loaded."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise MsrnnError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        why = "the port is already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise MsrnnError(f"cannot listen on {host}:{port}: {why}") from None
    return sock


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _protocol(header_timeout: float):
    """uvicorn's h11 protocol with a deadline for a connection's first request line and
    headers (uvicorn has none): a connection that has not sent them in time is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _headers_late(self):
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc):
            self._header_timer.cancel()
            super().connection_lost(exc)

    return Protocol


def run(engine_factory, name: str, aliases=(), host: str = "127.0.0.1", port: int = 8000,
        api_key: str | None = None, max_body_bytes: int | None = None, header_timeout: float = HEADER_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT) -> int:
    """Serve until SIGINT/SIGTERM; returns 0 after a clean shutdown. A port that cannot be
    bound is an `MsrnnError` before the model loads; the URL is logged once it is ready."""
    import uvicorn

    sock = listen(host, port)
    port = sock.getsockname()[1]  # --port 0: the one the system chose
    handler = logging.StreamHandler(sys.stderr)  # our lines only, not every library's
    handler.setFormatter(logging.Formatter("msrnn serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    svc = Service(engine_factory, name, aliases, url=url_of(host, port), api_key=api_key,
                  loopback=is_loopback(host), max_body_bytes=max_body_bytes, body_timeout=body_timeout)

    class _Server(uvicorn.Server):
        # uvicorn re-raises a captured signal after its shutdown (exit status 130/143);
        # the contract is exit 0, so signals are handled here instead
        from contextlib import contextmanager

        @contextmanager
        def capture_signals(self):
            def handle(sig, frame):
                log.info("signal %d: ending %s", sig, "the requests in flight" if svc.engine else "startup")
                threading.Thread(target=svc.shutdown, daemon=True).start()  # final events first
                self.should_exit = True
            old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    config = uvicorn.Config(svc.app(), log_level="warning", access_log=False, http=_protocol(header_timeout),
                            timeout_graceful_shutdown=10, lifespan="off", h11_max_incomplete_event_size=64 * 1024)
    server = _Server(config)
    log.info("loading %s; %s/health answers 503 until it is ready", name, svc.url)
    threading.Thread(target=svc.load, name="msrnn-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    svc.shutdown()
    if not server.started:
        raise MsrnnError(f"could not serve on {host}:{port}")
    return 0
