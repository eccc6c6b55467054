"""`msrnn serve`: an OpenAI-compatible HTTP server over the continuous-batching `Engine`.

Endpoints (docs/design.md §10): GET /health (503 until the model is loaded and its
programs compiled), GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(the model's chat template). `stream: true` answers with server-sent events
`data: {json}` in OpenAI's chunk shapes, then `data: [DONE]`. A bad request gets 400
with `{"error": {"message", "type", "param", "code"}}`, a full queue 503.

    msrnn serve --policy tova --capacity 512 --port 8000
    # then, from Python:
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is")

The model loads and compiles on a thread after the socket is bound, so /health answers
(503) meanwhile. SIGINT/SIGTERM end every stream in flight with a final event
(finish_reason "abort") and the process exits 0.

With several policies (`--policy tova,window`) a request picks one with the field
`policy` (the `openai` client: `extra_body={"policy": "window"}`); without it, the first.
/health lists them.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from ..errors import InvalidArgument, MsrnnError, check_float, check_int
from ..run.sampling import check_temperature

log = logging.getLogger("msrnn.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code


def _error_response(e: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param,
                                   "code": e.code}}, status_code=e.status)


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
        raise ApiError(400, f"{name} must be {names}, got {json.dumps(v)[:60]}", name, code="invalid_type")
    return v


def _checked(fn):
    """Run a library check; its InvalidArgument becomes a 400 naming the field."""
    try:
        return fn()
    except InvalidArgument as e:
        raise ApiError(400, str(e), e.param) from None


def parse_request(body, chat: bool, served: set[str], name: str = "") -> dict:
    """The generation settings of one request body, or ApiError(400)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
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
    out = {
        "max_tokens": None if max_tokens is None else _checked(lambda: check_int("max_tokens", max_tokens)),
        "temperature": _checked(lambda: check_temperature(_field(body, "temperature", num, 1.0))),
        "top_p": _checked(lambda: check_float("top_p", _field(body, "top_p", num, 1.0), low=0.0, high=1.0,
                                              low_open=True)),
        "top_k": _field(body, "top_k", int, 0),
        "seed": _field(body, "seed", int),
        "stream": _field(body, "stream", bool, False),
        "ignore_eos": _field(body, "ignore_eos", bool, False),  # vLLM's extension: fixed lengths
        "policy": _field(body, "policy", str),  # ours: one of the served policies (`--policy a,b`)
    }
    if out["top_k"] == -1:  # vLLM's spelling of "off"
        out["top_k"] = 0
    _checked(lambda: check_int("top_k", out["top_k"], minimum=0))
    if out["seed"] is not None and not 0 <= out["seed"] < 2 ** 63:
        raise ApiError(400, f"seed must be in [0, 2**63), got {out['seed']}", "seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a non-empty string or an array of up to 4 of them", "stop")
    out["stop"] = stop
    opts = _field(body, "stream_options", dict, {})
    out["include_usage"] = bool(opts.get("include_usage", False))
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
            pass  # token ids
        elif isinstance(prompt, list) and not prompt:
            raise ApiError(400, "empty prompt", "prompt")
        elif isinstance(prompt, list):
            raise ApiError(400, "one prompt per request (a string or a list of token ids)", "prompt")
        else:
            raise ApiError(400, "prompt must be a string or a list of token ids", "prompt")
        out["prompt"] = prompt
    return out


# -- the app ---------------------------------------------------------------------------
class Service:
    """The model, its engine and the HTTP app; `load()` runs on a thread at startup."""

    def __init__(self, engine_factory, served_name: str, aliases=(), url: str = ""):
        self.engine_factory = engine_factory
        self.url = url
        self.engine = None
        self.model = None
        self.name = served_name
        self.served = {served_name, *aliases}
        self.failed: str | None = None
        self.created = int(time.time())

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
                            status_code=503)

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "msrnn-jax"}]})

    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request):
        return await self._generate(request, chat=True)

    async def _generate(self, request, chat: bool):
        from starlette.responses import JSONResponse, StreamingResponse

        from .engine import EngineStopped, QueueFull

        try:
            if not self.ready:
                raise ApiError(503, "the model is still loading" if not self.failed else self.failed,
                               type_="server_error", code="not_ready")
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, f"malformed JSON: {e}", code="invalid_json") from None
            p = parse_request(body, chat, self.served, self.name)
            model, eng = self.model, self.engine
            try:
                if chat:
                    ids = model.chat_ids(p["messages"])
                elif isinstance(p["prompt"], str):
                    ids = model.encode(p["prompt"])
                else:
                    ids = list(p["prompt"])
                    if max(ids) >= model.cfg.vocab_size or min(ids) < 0:
                        raise ApiError(400, f"token ids must be in [0, {model.cfg.vocab_size})", "prompt")
            except MsrnnError as e:
                raise ApiError(400, str(e), "messages" if chat else "prompt") from None
            if not ids:
                raise ApiError(400, "the prompt encodes to no tokens", "prompt")
            max_tokens = p["max_tokens"]
            if max_tokens is None:  # OpenAI: 16 for completions, "as many as fit" for chat
                fit = (eng.capacity if not eng.policy.bounded else model.cfg.max_position_embeddings) - len(ids)
                max_tokens = 16 if not chat else max(1, min(fit, 4096))
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def listener(ev):
                loop.call_soon_threadsafe(events.put_nowait, ev)

            try:
                req = eng.submit(ids, max_tokens, temperature=p["temperature"], top_k=p["top_k"],
                                 top_p=p["top_p"], seed=p["seed"], stop=p["stop"], listener=listener, rid=rid,
                                 ignore_eos=p["ignore_eos"], policy=p["policy"])
            except QueueFull as e:
                raise ApiError(503, str(e), type_="server_error", code="queue_full") from None
            except EngineStopped as e:
                raise ApiError(503, str(e), type_="server_error", code="shutting_down") from None
            except InvalidArgument as e:
                raise ApiError(400, str(e), e.param) from None
        except ApiError as e:
            return _error_response(e)

        created = int(time.time())
        head = {"id": rid, "created": created, "model": self.name}

        def usage(res):
            return {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.tokens),
                    "total_tokens": res.prompt_tokens + len(res.tokens)}

        if not p["stream"]:
            try:
                while True:
                    ev = await events.get()
                    if ev["type"] == "done":
                        break
            finally:
                req.cancel()  # a no-op once done; frees the row if the client went away
            res = ev["result"]
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                          "logprobs": None, "finish_reason": res.finish_reason}
                return JSONResponse({**head, "object": "chat.completion", "choices": [choice],
                                     "usage": usage(res)})
            choice = {"index": 0, "text": res.text, "logprobs": None, "finish_reason": res.finish_reason}
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

    def app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ])


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


def run(engine_factory, name: str, aliases=(), host: str = "127.0.0.1", port: int = 8000) -> int:
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
    svc = Service(engine_factory, name, aliases, url=url_of(host, port))

    class _Server(uvicorn.Server):
        # uvicorn re-raises a captured signal after its shutdown (exit status 130/143);
        # the contract is exit 0, so signals are handled here instead
        from contextlib import contextmanager

        @contextmanager
        def capture_signals(self):
            def handle(sig, frame):
                log.info("signal %d: ending %s", sig, "the streams in flight" if svc.engine else "startup")
                threading.Thread(target=svc.shutdown, daemon=True).start()  # final events first
                self.should_exit = True
            old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    config = uvicorn.Config(svc.app(), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10, lifespan="off")
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
