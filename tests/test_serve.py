"""msrnn serve: the engine (continuous batching, no HTTP) and the OpenAI-compatible server
(real HTTP on 127.0.0.1, the official `openai` client, the server a subprocess started
and stopped here by its PID)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import msrnn_jax as m
from msrnn_jax.run.sampling import sample_rows
from msrnn_jax.serve.engine import Engine, QueueFull
from msrnn_jax.serve.programs import chunk_piece, exact_piece
from msrnn_jax.errors import InvalidArgument


try:  # the HTTP tests need the official client; the engine tests run without it
    import httpx
    import openai
except ImportError as e:
    httpx = openai = None
    NO_CLIENT = f"the HTTP tests need the test dependency {e.name} (pip install -e '.[test]')"

ROOT = Path(__file__).resolve().parents[1]
C = 32
TEXTS = ["The quick brown fox", "Paris is the capital of", "A bounded state forgets",
         "0123456789", "an unbounded one remembers everything.", "quotes", "The lazy dog",
         "Paris", "fox jumps over", "capital of France", "A bounded", "remembers",
         "everything. Paris is", "The quick", "dog. A", "\"quotes\"\n"]




@pytest.fixture(scope="module")
def engine(tiny):
    eng = Engine(tiny, "tova", C, max_batch=3, max_queue=64, steps_per_call=4, log_requests=False).start()
    assert eng.ready.wait(120)
    yield eng
    eng.stop()


def reference(model, ids, n, policy="tova", capacity=C, **kw):
    return m.generate(model, [ids], n, policy=policy, capacity=capacity, **kw).tokens[0]


# -- the per-row sampler --------------------------------------------------------------
def _support(logits, t, k, p):
    """The tokens `Sampling(t, k, p)` may draw, in numpy."""
    x = logits / t
    order = np.argsort(-x)
    keep = np.zeros(len(x), bool)
    kk = k if k else len(x)
    probs = np.exp(x[order[:kk]] - x[order[0]])
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    keep[order[:kk][before < p]] = True
    return keep, x


def test_sample_rows_filters_and_frequencies():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    V, n = 8, 4000
    logits = rng.normal(size=(4, V)).astype(np.float32) * 2
    settings = [(0.0, 0, 1.0), (1.0, 3, 1.0), (0.7, 0, 0.6), (1.3, 5, 0.8)]
    t = np.asarray([s[0] for s in settings], np.float32)
    k = np.asarray([s[1] for s in settings], np.int32)
    p = np.asarray([s[2] for s in settings], np.float32)
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(i))) for i in range(n)]).astype(np.uint32)
    draw = jax.jit(jax.vmap(lambda key: sample_rows(jnp.asarray(logits), jnp.broadcast_to(key, (4, 2)), t, k, p)))
    toks = np.asarray(draw(keys))  # [n, 4]
    assert (toks[:, 0] == logits[0].argmax()).all()  # temperature 0: greedy
    for row in range(1, 4):
        keep, x = _support(logits[row], *settings[row])
        assert keep[toks[:, row]].all(), f"row {row} drew outside its filter"
        want = np.where(keep, np.exp(x - x.max()), 0)
        want /= want.sum()
        got = np.bincount(toks[:, row], minlength=V) / n
        np.testing.assert_allclose(got, want, atol=0.03)


# -- the engine, without HTTP --------------------------------------------------------
def test_engine_greedy_equals_generate_alone(tiny, engine):
    prompts = [tiny.encode(t) for t in TEXTS[:8]]
    before = engine.compiled()
    reqs = [engine.submit(p, max_tokens=12, temperature=0) for p in prompts]  # 8 requests, 3 rows
    for p, r in zip(prompts, reqs):
        res = r.result(120)
        assert res.tokens == reference(tiny, p, 12)
        assert res.prompt_tokens == len(p)
        assert res.finish_reason == ("stop" if res.tokens[-1] in tiny.eos_ids else "length")
    assert engine.load() == {"rows_busy": 0, "waiting": 0}
    assert engine.compiled() == before


def test_engine_admits_every_waiting_request_in_one_turn(tiny):
    """Requests that wait together all start before the first decode chunk (a turn's
    prefill budget covers as many prompts as it can: here, with no row decoding yet, all
    of them), so every chunk decodes the full batch of 3. (The shapes of the module's
    `engine`: no program is compiled twice, which test_engine_nothing_recompiles counts.)"""
    eng = Engine(tiny, "tova", C, max_batch=3, steps_per_call=4, log_requests=False).start()
    try:
        assert eng.ready.wait(120)
        prompts = [tiny.encode(t) for t in TEXTS[:3]]
        with eng._lock:  # the loop sees all three at once
            eng.stats.clear()
            reqs = [eng.submit(p, max_tokens=9, temperature=0, ignore_eos=True) for p in prompts]
        for p, r in zip(prompts, reqs):
            got, want = r.result(120).tokens, reference(tiny, p, 9)  # generate stops at EOS
            assert len(got) == 9 and got[:len(want)] == want
        assert eng.stats["chunks"] == 2 and eng.stats["full_tokens"] == 3 * 8, dict(eng.stats)
    finally:
        eng.stop()


@pytest.mark.parametrize("share", [1.0, 1e-9])
def test_engine_prefill_share_paces_prompts_against_decoding(tiny, share):
    """While a row decodes, `prefill_share` decides how much of a turn goes to prompts:
    at 1 both waiting prompts are read (three pieces each) before the next decode chunk;
    at a vanishing share each turn reads one piece, the two prompts' pieces in turn (round
    robin), so a decode chunk runs between any two pieces and the second prompt ends one
    turn after the first. The chunk count is read when each request's first token arrives. Outputs are
    the same either way. (The shapes of the module's `engine`, pieces of 32 tokens: no
    program is compiled twice, which test_engine_nothing_recompiles counts.)"""
    eng = Engine(tiny, "tova", C, max_batch=3, steps_per_call=4, prefill_share=share,
                 log_requests=False).start()
    try:
        assert eng.ready.wait(120)
        first = eng.submit(tiny.encode(TEXTS[0]), max_tokens=64, temperature=0, ignore_eos=True)
        events = first.events(120)
        next(events), next(events)  # its first token, then a decode chunk's: every turn from
        # now on starts with a row decoding (a turn that began without one reads all prompts)
        rng = np.random.default_rng(7)
        prompts = [rng.integers(3, tiny.cfg.vocab_size, size=96).tolist() for _ in range(2)]  # 3 pieces each
        seen = {}  # request -> decode chunks run when its first token came

        def listener(i):
            def on(ev):
                if ev["type"] == "delta":
                    seen.setdefault(i, eng.stats["chunks"])
            return on

        with eng._lock:  # the loop sees both at once
            start = eng.stats["chunks"]
            reqs = [eng.submit(p, max_tokens=6, temperature=0, listener=listener(i)) for i, p in enumerate(prompts)]
        for p, r in zip(prompts, reqs):
            assert r.result(120).tokens == reference(tiny, p, 6)
        first.result(120)
        if share == 1.0:  # both prompts in one turn, before the next chunk
            assert seen[0] == seen[1] <= start + 1, (start, seen)
        else:  # one piece per turn, alternating: the first ends at the 5th piece, the second at the 6th
            assert seen[0] >= start + 4 and seen[1] == seen[0] + 1, (start, seen)
        assert len(first.result().tokens) == 64
    finally:
        eng.stop()


def test_prefill_seconds(tiny):
    from msrnn_jax.serve.engine import prefill_seconds
    assert prefill_seconds(0.5, 0.2) == pytest.approx(0.2)
    assert prefill_seconds(0.25, 0.3) == pytest.approx(0.1)
    assert prefill_seconds(1.0, 0.2) == float("inf")
    assert prefill_seconds(0.5, None) == 0.0  # before the first timed chunk: one piece
    with pytest.raises(InvalidArgument, match="prefill_share"):
        Engine(tiny, "tova", C, prefill_share=0)


def test_engine_that_fails_to_warm_up_says_so(tiny, monkeypatch):
    """An engine whose programs fail while warming up (e.g. out of memory at a large
    --max-batch) sets `ready` with its `error`: who waits for it (a server's /health, a
    benchmark) learns of the failure instead of waiting for ever."""
    def fail(self):
        raise MemoryError("out of memory at this batch")

    monkeypatch.setattr(Engine, "_warm", fail)
    eng = Engine(tiny, "tova", C, max_batch=2, steps_per_call=4, log_requests=False).start()
    try:
        assert eng.ready.wait(60)
        assert isinstance(eng.error, MemoryError)
    finally:
        eng.stop()


def test_engine_nothing_recompiles(tiny, engine):
    """Requests of every length (up to several prefill pieces), greedy and sampled rows
    mixed, stop strings and max_tokens of 1: the programs compiled at start serve them all."""
    before = engine.compiled()
    rng = np.random.default_rng(1)
    reqs = []
    for i in range(12):
        ids = [int(x) for x in rng.integers(3, tiny.cfg.vocab_size, size=int(rng.integers(1, 100)))]
        kw = dict(temperature=0.0) if i % 2 else dict(temperature=0.9, top_k=int(i % 5), top_p=0.9, seed=i)
        reqs.append(engine.submit(ids, max_tokens=int(rng.integers(1, 20)), stop=["e"] if i % 3 == 0 else (), **kw))
    for r in reqs:
        r.result(120)
    assert engine.compiled() == before
    assert all(v == 1 for v in before.values() if v), before


def test_engine_seeded_sampling_depends_only_on_the_request(tiny, engine):
    ids = tiny.encode(TEXTS[0])
    alone = engine.generate(ids, 16, temperature=1.0, top_p=0.95, seed=7).tokens
    crowd = [engine.submit(tiny.encode(t), 16, temperature=1.0, seed=i) for i, t in enumerate(TEXTS[1:5])]
    again = engine.submit(ids, 16, temperature=1.0, top_p=0.95, seed=7)
    [r.result(120) for r in crowd]
    assert again.result(120).tokens == alone
    other = engine.generate(ids, 16, temperature=1.0, top_p=0.95, seed=8).tokens
    assert other != alone  # the seed is used (16 tokens drawn from a random model's wide distributions)


def test_engine_stop_string(tiny, engine):
    ids = tiny.encode(TEXTS[1])
    full = engine.generate(ids, 30, temperature=0)
    text = full.text
    pairs = [text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isprintable()]
    assert pairs, f"no printable pair to stop at in {text!r}"
    stop = pairs[0]
    res = engine.generate(ids, 30, temperature=0, stop=[stop])
    assert res.finish_reason == "stop"
    assert res.text == text[:text.find(stop)]
    # the tokens end with the one that completed the stop string
    n = len(res.tokens)
    assert res.tokens == full.tokens[:n]
    assert stop in tiny.decode(res.tokens) and stop not in tiny.decode(res.tokens[:-1])


def test_engine_cancel_frees_the_row_and_queue_full(tiny):
    eng = Engine(tiny, "tova", C, max_batch=1, max_queue=1, steps_per_call=2, log_requests=False).start()
    try:
        assert eng.ready.wait(120)
        long = eng.submit(tiny.encode(TEXTS[0]), 4000, temperature=1.0, seed=0, ignore_eos=True)
        waiting = eng.submit(tiny.encode(TEXTS[1]), 3, temperature=0)
        with pytest.raises(QueueFull):
            eng.submit(tiny.encode(TEXTS[2]), 3)
        ev = next(long.events(timeout=60))
        assert ev["type"] == "delta" and not waiting.done
        long.cancel()
        assert long.result(60).finish_reason == "abort"
        assert waiting.result(60).tokens == reference(tiny, tiny.encode(TEXTS[1]), 3)
        with pytest.raises(InvalidArgument):
            eng.submit([], 3)
    finally:
        eng.stop()
    assert eng.load() == {"rows_busy": 0, "waiting": 0}


@pytest.mark.parametrize("policy,capacity,prefill,chunk,positions", [
    ("full", 160, "exact", None, "absolute"), ("h2o", 24, "chunked", 16, "absolute"),
    ("tova", 24, "exact", None, "reindex")])
def test_engine_other_policies_and_chunked_prefill(tiny, policy, capacity, prefill, chunk, positions):
    eng = Engine(tiny, policy, capacity, max_batch=2, prefill=prefill, chunk=chunk, steps_per_call=4,
                 log_requests=False, positions=positions).start()
    try:
        prompts = [tiny.encode(t * 3) for t in TEXTS[:3]]
        reqs = [eng.submit(p, max_tokens=10, temperature=0) for p in prompts]
        for p, r in zip(prompts, reqs):
            assert r.result(120).tokens == reference(tiny, p, 10, policy, capacity, prefill=prefill, chunk=chunk,
                                                     positions=positions)
        if policy == "full":
            with pytest.raises(InvalidArgument, match="full"):
                eng.submit(prompts[0], capacity)
    finally:
        eng.stop()


@pytest.mark.parametrize("prefill,chunk", [("exact", None), ("chunked", 8)])
def test_engine_several_policies_side_by_side(tiny, prefill, chunk):
    """Policies of one capacity share the state (row b follows the (b mod 3)-th): each
    request's greedy tokens equal `generate` of its prompt alone under the policy it
    picked (the first by default), more requests than rows wait for a row of their own
    policy, nothing compiles while serving, and a policy not served is refused."""
    cap, names = 12, ["tova", "window", "h2o-head"]
    prompts = [tiny.encode(t * 3) for t in TEXTS[:7]]
    picks = [None, "window", "h2o-head", "WINDOW", "tova", "window", "h2o-head"]
    want = [reference(tiny, p, 12, (k or "tova").lower(), cap, prefill=prefill, chunk=chunk)
            for p, k in zip(prompts, picks)]
    # the policies keep different things here, so a row that ignored its pick would show it
    assert any(reference(tiny, p, 12, "window", cap, prefill=prefill, chunk=chunk) != w
               for p, w, k in zip(prompts, want, picks) if k in (None, "tova"))
    programs = (chunk_piece if prefill == "chunked" else exact_piece)._cache_size()  # shared by all engines
    eng = Engine(tiny, names, cap, max_batch=4, prefill=prefill, chunk=chunk, steps_per_call=4,
                 log_requests=False).start()
    try:
        assert eng.ready.wait(120) and eng.error is None
        before = eng.compiled()
        assert before["prefill_piece"] - programs == len(names)  # one per policy, all at startup
        reqs = [eng.submit(p, max_tokens=12, temperature=0, policy=k) for p, k in zip(prompts, picks)]
        assert [r.result(120).tokens for r in reqs] == want
        assert eng.compiled() == before
        assert eng.load() == {"rows_busy": 0, "waiting": 0}
        with pytest.raises(InvalidArgument, match="not served here") as e:
            eng.submit(prompts[0], 4, policy="sink")
        assert e.value.param == "policy"
    finally:
        eng.stop()
    for bad, match in ((["tova", "full"], "serve it alone"), (["tova", "TOVA"], "twice")):
        with pytest.raises(InvalidArgument, match=match):
            Engine(tiny, bad, cap)
    with pytest.raises(InvalidArgument, match="choose at least 3") as e:
        Engine(tiny, names, cap, max_batch=2)
    assert e.value.param == "max_batch"


# -- the HTTP server ------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, log_path):
        if openai is None:
            pytest.skip(NO_CLIENT)
        self.port = _free_port()
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "msrnn_jax.cli", "serve", "--port", str(self.port),
                                      *args], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.statuses = []

    def wait_ready(self, timeout=180):
        end = time.time() + timeout
        while time.time() < end:
            assert self.proc.poll() is None, self.text()
            try:
                code = httpx.get(self.url + "/health", timeout=5).status_code
                self.statuses.append(code)
                if code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"not ready in {timeout} s:\n{self.text()}")

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", timeout=120, max_retries=0)

    def text(self):
        self.log.flush()
        return Path(self.log_path).read_text()

    def stop(self):
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self.log.close()


SERVED = {"policies": ["tova"], "capacity": C, "max_batch": 4}  # what /health says of `server`


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    srv = Server("--model", tiny_dir, "--policy", "tova", "--capacity", str(C), "--max-batch", "4",
                 "--max-queue", "16", "--steps-per-call", "4", "--max-new-tokens", str(10 ** 6),
                 log_path=tmp_path_factory.mktemp("log") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()  # the shutdown test has already stopped it, unless it failed


def test_health_is_503_until_ready(server):
    assert server.statuses[0] == 503, server.statuses  # the model compiles after the socket is bound
    assert server.statuses[-1] == 200
    ready = f"ready: tiny at {server.url} (OpenAI API under {server.url}/v1)"  # the URL, once ready
    end = time.time() + 30  # /health may answer 200 a moment before the line is logged
    while ready not in server.text() and time.time() < end:
        time.sleep(0.1)
    assert ready in server.text(), server.text()


def test_completion_and_chat_equal_generate(tiny, server):
    client = server.client()
    [model] = client.models.list().data
    ids = tiny.encode(TEXTS[0])
    want = reference(tiny, ids, 10)
    r = client.completions.create(model=model.id, prompt=TEXTS[0], max_tokens=10, temperature=0)
    assert r.choices[0].text == tiny.decode(want)
    assert r.choices[0].finish_reason == ("stop" if want[-1] in tiny.eos_ids else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), len(want), len(ids) + len(want))
    parts = list(client.completions.create(model=model.id, prompt=TEXTS[0], max_tokens=10, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == tiny.decode(want)
    assert parts[-1].choices[0].finish_reason == r.choices[0].finish_reason

    msgs = [{"role": "user", "content": TEXTS[1]}]
    cids = tiny.chat_ids(msgs)
    want = reference(tiny, cids, 10)
    r = client.chat.completions.create(model=model.id, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == tiny.decode(want)
    assert r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(cids), len(want))
    parts = list(client.chat.completions.create(model=model.id, messages=msgs, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == tiny.decode(want)
    assert parts[-1].usage.completion_tokens == len(want) and not parts[-1].choices
    assert parts[-2].choices[0].finish_reason == r.choices[0].finish_reason


def test_16_concurrent_streams_against_4_rows(tiny, server):
    client = server.client()
    want = {t: tiny.decode(reference(tiny, tiny.encode(t), 16)) for t in TEXTS}

    def one(text):
        s = client.completions.create(model="tiny", prompt=text, max_tokens=16, temperature=0, stream=True)
        chunks = list(s)
        return chunks[0].id, "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, TEXTS, timeout=240))
    assert len({g[0] for g in got}) == 16  # none lost or duplicated
    assert [g[1] for g in got] == [want[t] for t in TEXTS]
    assert all(g[2] in ("stop", "length") for g in got)
    assert httpx.get(server.url + "/health", timeout=10).json()["waiting"] == 0


def _hold_streams(url, prompts, read_first=None, **extra):
    """Open one streaming request per prompt (running to no end), read the first event of
    the first `read_first` (default all: those that have a row), and keep every stream open. Returns [(context, line iterator, request id)]."""
    held = []
    for t in prompts:
        ctx = httpx.stream("POST", url + "/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": t, "max_tokens": 10 ** 6, "temperature": 1.0,
                                 "seed": 1, "stream": True, "ignore_eos": True, **extra})
        r = ctx.__enter__()
        assert r.status_code == 200, r.read()
        held.append((ctx, r.iter_lines(), r.headers["x-request-id"]))  # the iterator keeps it open
    for _, lines, _ in held[:read_first]:
        assert next(lines).startswith("data: ")
    return held


def _close(held):
    for ctx, _, _ in held:
        ctx.__exit__(None, None, None)


def test_disconnect_frees_the_row(tiny, server):
    """4 endless streams fill the 4 rows; a 5th request waits. Closing the 4 streams
    must end them (logged as abort) and let the 5th run."""
    held = _hold_streams(server.url, TEXTS[:4])
    client = server.client()
    with cf.ThreadPoolExecutor(1) as pool:
        fifth = pool.submit(client.completions.create, model="tiny", prompt=TEXTS[5], max_tokens=4, temperature=0)
        time.sleep(1.0)
        assert not fifth.done()  # every row is busy
        assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok", "rows_busy": 4, "waiting": 1,
                                                                        **SERVED}
        _close(held)
        r = fifth.result(timeout=60)
    assert r.choices[0].text == tiny.decode(reference(tiny, tiny.encode(TEXTS[5]), 4))
    end = time.time() + 30
    while time.time() < end and not all(f"{rid} " in server.text() for _, _, rid in held):
        time.sleep(0.2)
    log = server.text()
    for _, _, rid in held:
        line = next(l for l in log.splitlines() if f"{rid} " in l)
        assert "finish=abort" in line, line


def test_full_queue_gets_503(server):
    held = _hold_streams(server.url, TEXTS[:4] + TEXTS[:16], read_first=4)  # 4 rows, a queue of 16
    try:
        busy = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "y"}, timeout=30)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_full", busy.text
    finally:
        _close(held)
    end = time.time() + 30
    while time.time() < end and httpx.get(server.url + "/health", timeout=10).json()["rows_busy"]:
        time.sleep(0.2)
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok", "rows_busy": 0, "waiting": 0,
                                                                    **SERVED}


BAD = [
    ("completions", b"{not json", None),
    ("completions", {"model": "tiny", "prompt": "hi", "n": 2}, "n"),
    ("completions", {"model": "tiny", "prompt": ""}, "prompt"),
    ("completions", {"model": "tiny", "prompt": []}, "prompt"),
    ("completions", {"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
    ("completions", {"model": "tiny", "prompt": 3}, "prompt"),
    ("completions", {"model": "nope", "prompt": "hi"}, "model"),
    ("completions", {"model": "tiny", "prompt": "hi", "max_tokens": "8"}, "max_tokens"),
    ("completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"model": "tiny", "prompt": "hi", "temperature": "hot"}, "temperature"),
    ("completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p"),
    ("completions", {"model": "tiny", "prompt": "hi", "top_k": 1.5}, "top_k"),
    ("completions", {"model": "tiny", "prompt": "hi", "stream": "yes"}, "stream"),
    ("completions", {"model": "tiny", "prompt": "hi", "stop": [1]}, "stop"),
    ("chat/completions", {"model": "tiny", "messages": []}, "messages"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": ""}]}, "messages"),
    ("chat/completions", {"model": "tiny", "messages": "hi"}, "messages"),
    ("chat/completions", [1, 2], None),
]


def test_bad_requests_get_400_and_the_server_goes_on(tiny, server):
    for path, body, param in BAD:
        kw = ({"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes)
              else {"json": body})
        r = httpx.post(f"{server.url}/v1/{path}", timeout=30, **kw)
        assert r.status_code == 400, (body, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert err["param"] == param, (body, err)
    r = server.client().completions.create(model="tiny", prompt=TEXTS[3], max_tokens=4, temperature=0)
    assert r.choices[0].text == tiny.decode(reference(tiny, tiny.encode(TEXTS[3]), 4))


def test_shutdown_during_a_stream_ends_it_and_exits_0(server):
    """The last test of the tiny server: SIGTERM while a chat streams."""
    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 10 ** 6, "temperature": 1.0, "seed": 0, "stream": True,
                            "ignore_eos": True}) as r:
        lines = r.iter_lines()
        events.append(next(lines))
        server.proc.send_signal(signal.SIGTERM)
        events += [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])  # an error, not a finish: clients tell them apart
    assert last["error"]["code"] == "shutting_down" and last["error"]["type"] == "server_error", last
    assert server.proc.wait(60) == 0


@pytest.fixture(scope="module")
def default_model():
    try:
        return m.load_model()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the embedded model is not installed: {e}")


def test_pallas_attention_serves_the_same_tokens(tiny, tiny_dir, tmp_path):
    """`msrnn serve --attention pallas` (the kernels that read the state in place): a greedy
    completion equals `generate` of the prompt alone."""
    srv = Server("--model", tiny_dir, "--policy", "tova", "--capacity", str(C), "--max-batch", "2",
                 "--attention", "pallas", log_path=tmp_path / "pallas.log")
    try:
        srv.wait_ready()
        client = srv.client()
        [model] = client.models.list().data
        want = reference(tiny, tiny.encode(TEXTS[0]), 10)
        r = client.completions.create(model=model.id, prompt=TEXTS[0], max_tokens=10, temperature=0)
        assert r.choices[0].text == tiny.decode(want)
    finally:
        assert srv.stop() == 0


def test_server_with_several_policies(tiny, tiny_dir, tmp_path):
    """`msrnn serve --policy tova,window`: /health lists both, a request picks one with the
    field `policy` (the openai client's extra_body), the first without it, and a policy
    not served gets 400 naming the field."""
    cap = 12
    srv = Server("--model", tiny_dir, "--policy", "tova,window", "--capacity", str(cap), "--max-batch", "2",
                 log_path=tmp_path / "policies.log")
    try:
        srv.wait_ready()
        health = httpx.get(srv.url + "/health", timeout=10).json()
        assert health["policies"] == ["tova", "window"] and health["capacity"] == cap, health
        client = srv.client()
        ids = tiny.encode(TEXTS[1] * 3)
        assert reference(tiny, ids, 10, "window", cap) != reference(tiny, ids, 10, "tova", cap)  # it can tell
        for pick in (None, "window", "tova"):
            extra = {} if pick is None else {"extra_body": {"policy": pick}}
            r = client.completions.create(model="tiny", prompt=TEXTS[1] * 3, max_tokens=10, temperature=0, **extra)
            assert r.choices[0].text == tiny.decode(reference(tiny, ids, 10, pick or "tova", cap)), pick
        r = httpx.post(srv.url + "/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "policy": "h2o"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "policy", r.text
        assert "policy=window" in srv.text()  # the request log names the row's policy
    finally:
        assert srv.stop() == 0


def test_embedded_model_out_of_the_box(default_model, tmp_path):
    srv = Server("--capacity", "64", "--max-batch", "2", log_path=tmp_path / "default.log")
    try:
        srv.wait_ready(300)
        client = srv.client()
        [model] = client.models.list().data
        assert model.id == "SmolLM2-135M-Instruct"
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        ids = default_model.chat_ids(msgs)
        want = reference(default_model, ids, 8, capacity=64)
        r = client.chat.completions.create(model=model.id, messages=msgs, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == default_model.decode(want)
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
        prompt = "The capital of France is"
        want = reference(default_model, default_model.encode(prompt), 8, capacity=64)
        parts = list(client.completions.create(model=model.id, prompt=prompt, max_tokens=8, temperature=0, stream=True))
        assert "".join(p.choices[0].text for p in parts) == default_model.decode(want)
    finally:
        assert srv.stop() == 0


def test_benchmark_quick_runs(tmp_path):
    """benchmarks/serve.py --quick, as the subprocess its command starts."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads((tmp_path / "serve.json").read_text())
    for name, rec in out["systems"].items():
        assert "error" not in rec, (name, rec)
        o = rec["offline"]
        assert o["generated_tokens"] == out["requests"] * out["generated_tokens_each"]  # ignore_eos: fixed lengths
    tova = next(r for r in out["systems"].values() if r["policy"] == "tova")
    assert tova["overhead"]["engine_tokens_per_s"] > 0 and tova["online"]
    assert "| system |" in (tmp_path / "serve.md").read_text()


def test_engine_takes_the_one_temperature_rule(tiny, engine):
    """The engine refuses what `Sampling` refuses (`sampling.check_settings`), before queueing."""
    ids = tiny.encode(TEXTS[0])
    for bad in (2.5, -1.0, float("nan")):
        with pytest.raises(InvalidArgument, match="temperature must be"):
            engine.submit(ids, 4, temperature=bad)
    assert engine.generate(ids, 2, temperature=2.0, seed=1).finish_reason in ("length", "stop")
