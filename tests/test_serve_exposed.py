"""msrnn serve exposed to a network (issue #34): every case the issue reproduced, each
followed by a normal request whose greedy answer must equal offline `generate`; fair
admission under a long prompt (counted in prompt pieces, not seconds), cancels that free
a row mid-prompt, the API key, Host/Origin and content-type checks, /metrics, echo and
logprobs against `run_policy`'s per-token NLLs, EleutherAI's lm-evaluation-harness
against the server, 32 concurrent clients, and SIGTERM's drain. Servers are subprocesses
on 127.0.0.1 started and stopped here by their PID; every request loop is bounded."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import msrnn_jax as m
from msrnn_jax.serve.engine import Engine

from test_serve import C, TEXTS, Server, reference

try:
    import httpx
    import openai
except ImportError:
    httpx = openai = None

KEY = "sekret-key"
MAX_PROMPT = 2048   # the exposed server's --max-prompt-tokens
QUEUE = 28          # its --max-queue (4 rows + 28 waiting: 32 clients at once)
ROWS = 4            # its --max-batch
AUTH = {"Authorization": f"Bearer {KEY}"}




@pytest.fixture(scope="module")
def srv(tiny_dir, tmp_path_factory):
    """tova C=32, 4 rows, a queue of 2, an API key, a prompt limit; the last test stops it."""
    s = Server("--model", tiny_dir, "--policy", "tova", "--capacity", str(C), "--max-batch", str(ROWS),
               "--max-queue", str(QUEUE), "--steps-per-call", "4", "--api-key", KEY,
               "--max-prompt-tokens", str(MAX_PROMPT), "--max-new-tokens", "100000",
               log_path=tmp_path_factory.mktemp("log") / "exposed.log")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def post(srv, body, path="completions", headers=None, timeout=60, **kw):
    h = dict(AUTH)
    h.update(headers or {})
    if not isinstance(body, (dict, list)):  # raw bytes, or an iterator of them (sent chunked)
        h.setdefault("Content-Type", "application/json")
        return httpx.post(f"{srv.url}/v1/{path}", content=body, headers=h, timeout=timeout, **kw)
    return httpx.post(f"{srv.url}/v1/{path}", json=body, headers=h, timeout=timeout, **kw)


def check_error(r, status, param="-", code="-"):
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param != "-":
        assert err["param"] == param, err
    if code != "-":
        assert err["code"] == code, err
    return err


def normal_request(srv, tiny, i=0):
    """A greedy completion, which must equal `generate` of the prompt alone."""
    text = TEXTS[i % len(TEXTS)]
    r = post(srv, {"model": "tiny", "prompt": text, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tiny.decode(reference(tiny, tiny.encode(text), 6))


# -- Found 1, 7, 10: values checked against their type and the model -------------------
DEEP = b'{"prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
CASES = [  # (body, path, status, param)
    ({"prompt": "hi", "max_tokens": 4, "top_k": 2 ** 31}, "completions", 200, None),  # Found 1: clamped
    ({"prompt": "hi", "max_tokens": 4, "top_k": 10 ** 40, "temperature": 0}, "completions", 200, None),
    ({"prompt": "hi", "max_tokens": 2 ** 31 - 1}, "completions", 400, "max_tokens"),  # Found 4
    ({"prompt": "hi", "max_tokens": 4, "seed": 2 ** 64}, "completions", 400, "seed"),
    ({"prompt": "hi", "max_tokens": 4, "seed": -1}, "completions", 400, "seed"),
    ({"prompt": "hi", "max_tokens": -3}, "completions", 400, "max_tokens"),
    ({"prompt": [5, 10 ** 30]}, "completions", 400, "prompt"),
    ({"prompt": [5, -1]}, "completions", 400, "prompt"),
    (b'{"prompt": "a\\ud800b", "max_tokens": 2}', "completions", 400, None),  # Found 7: lone surrogate
    (b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}', "chat/completions", 400, None),
    (b'{"prompt": "hi", "temperature": 1' + b"0" * 400 + b"}", "completions", 400, "temperature"),
    (b'{"prompt": "hi", "top_p": 1e999}', "completions", 400, None),  # JSON's infinity
    (DEEP, "completions", 400, None),  # 100k levels deep
    ({"prompt": "hi", "tools": [{"type": "function"}]}, "completions", 400, "tools"),  # Found 10
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     "chat/completions", 400, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     "chat/completions", 400, "response_format"),
    ({"prompt": "hi", "logit_bias": {"5": 100}}, "completions", 400, "logit_bias"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "completions", 400, "presence_penalty"),
    ({"prompt": "hi", "frequency_penalty": 1}, "completions", 400, "frequency_penalty"),
    ({"prompt": "hi", "repetition_penalty": 1.2}, "completions", 400, "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "chat/completions", 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "chat/completions", 400, "top_logprobs"),
    ({"prompt": "hi", "suffix": "end"}, "completions", 400, "suffix"),
    ({"prompt": "hi", "frobnicate": 1}, "completions", 400, "frobnicate"),
    ({"prompt": "hi", "logprobs": 99}, "completions", 400, "logprobs"),
    ({"prompt": "hi", "logprobs": 1, "stream": True}, "completions", 400, "logprobs"),
    ({"prompt": "hi", "echo": True, "stream": True}, "completions", 400, "echo"),
    ({"prompt": "hi", "max_tokens": 0}, "completions", 400, "max_tokens"),  # 0 only with echo
    ({"prompt": "hi", "presence_penalty": 0, "logit_bias": {}, "user": "me"}, "completions", 200, None),  # neutral
    ({"prompt": list(range(3, 3 + MAX_PROMPT + 1)), "max_tokens": 2}, "completions", 400, "prompt"),  # Found 2
]


def test_found_cases_each_then_a_normal_request(tiny, srv):
    for i, (body, path, status, param) in enumerate(CASES):
        if isinstance(body, dict):
            body = {"model": "tiny", **body}
            if isinstance(body.get("prompt"), list):  # token ids past the vocabulary or the limit
                body["prompt"] = [t % tiny.cfg.vocab_size if t < 10 ** 6 and t >= 0 else t for t in body["prompt"]]
        r = post(srv, body, path)
        if status == 200:
            assert r.status_code == 200, (i, r.text)
        else:
            err = check_error(r, status)
            assert param is None or err["param"] == param, (i, err)
            if i == len(CASES) - 1:
                assert str(MAX_PROMPT) in err["message"], err  # the limit is named
        normal_request(srv, tiny, i)
    assert httpx.get(srv.url + "/health", timeout=10).json()["status"] == "ok"


def test_top_k_past_the_vocabulary_is_clamped(tiny, srv):
    """Found 1: top_k = 2**31 no longer kills the engine; past V it keeps every token, as V does."""
    body = {"model": "tiny", "prompt": TEXTS[2], "max_tokens": 8, "temperature": 0.9, "seed": 3}
    a = post(srv, {**body, "top_k": 2 ** 31}).json()["choices"][0]["text"]
    b = post(srv, {**body, "top_k": tiny.cfg.vocab_size}).json()["choices"][0]["text"]
    assert a == b
    normal_request(srv, tiny)


def test_error_shapes_for_every_status(tiny, srv):
    """Found 8 and 11: 404, 405, 401, 415, 413, 403 carry OpenAI's body; /health is open."""
    check_error(httpx.get(srv.url + "/nope", timeout=10), 404, code="not_found")
    check_error(httpx.get(srv.url + "/v1/completions", headers=AUTH, timeout=10), 405, code="method_not_allowed")
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi"}, timeout=10)  # no key
    check_error(r, 401, code="invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    check_error(post(srv, {"prompt": "hi"}, headers={"Authorization": "Bearer wrong"}), 401)
    check_error(httpx.get(srv.url + "/v1/models", timeout=10), 401)
    assert httpx.get(srv.url + "/v1/models", headers=AUTH, timeout=10).status_code == 200
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # open
    # a web page's "simple request": text/plain is not parsed
    check_error(post(srv, b'{"prompt": "hi"}', headers={"Content-Type": "text/plain"}), 415)
    import socket

    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:  # a huge declared body
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {20 << 20}\r\n\r\n".encode())
        head = b""
        for _ in range(100):  # the headers and the body may come in separate segments
            part = s.recv(65536)
            head += part
            if not part or b"body_too_large" in head:
                break
    # the status always; the body when it arrives: uvicorn closes a connection whose declared
    # body is never sent, and under load that close has overtaken the response's body (the
    # body's shape is checked on the streamed request below)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"\r\n\r\n" not in head or not head.split(b"\r\n\r\n", 1)[1] or b'"body_too_large"' in head, head
    parts = [b'{"prompt": "'] + [b"x" * (64 << 10)] * 32 + [b'"}']  # chunked, no Content-Length:
    check_error(post(srv, iter(parts)), 413, code="body_too_large")  # counted while it is read
    # DNS rebinding (a Host that is not loopback) and a foreign page's Origin
    check_error(post(srv, {"prompt": "hi"}, headers={"Host": "evil.example:8000"}), 403, code="forbidden_host")
    check_error(post(srv, {"prompt": "hi"}, headers={"Origin": "http://evil.example"}), 403, code="forbidden_origin")
    r = post(srv, {"model": "tiny", "prompt": "hi", "max_tokens": 2},
             headers={"Host": f"localhost:{srv.port}", "Origin": f"http://127.0.0.1:{srv.port}"})
    assert r.status_code == 200, r.text
    normal_request(srv, tiny)


def test_disconnect_during_the_body_logs_no_traceback(tiny, srv):
    """Found 8: a client that leaves mid-body, or sends its headers too slowly, costs no traceback."""
    import socket

    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"prompt\": ".encode())
        time.sleep(0.3)
    normal_request(srv, tiny)
    assert "Traceback" not in srv.text(), srv.text()[-3000:]


def test_a_connection_that_sends_no_headers_is_closed(tiny, srv):
    """Found 8: no read timeout for headers. A connection that sends nothing is closed
    after HEADER_TIMEOUT (10 s), one that sends half a request line too."""
    import socket

    from msrnn_jax.serve.server import HEADER_TIMEOUT

    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=HEADER_TIMEOUT + 20) as a, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=HEADER_TIMEOUT + 20) as b:
        b.sendall(b"POST /v1/comp")
        assert a.recv(100) == b"" and b.recv(100) == b""  # closed by the server, not timed out here
    assert HEADER_TIMEOUT - 1 < time.perf_counter() - t0 < HEADER_TIMEOUT + 15
    normal_request(srv, tiny)


def test_full_queue_503_has_retry_after_and_counts_rows(tiny, srv):
    """Found 10: 4 rows busy and 2 waiting: the 7th gets 503 with Retry-After, the text counts right."""
    held = []
    try:
        for t in (TEXTS * 2)[:ROWS + QUEUE]:
            ctx = httpx.stream("POST", srv.url + "/v1/completions", headers=AUTH, timeout=60,
                               json={"model": "tiny", "prompt": t, "max_tokens": 100000, "stream": True,
                                     "ignore_eos": True, "seed": 1})
            r = ctx.__enter__()
            held.append((ctx, r.iter_lines()))
        for _, lines in held[:ROWS]:
            assert next(lines).startswith("data: ")
        r = post(srv, {"model": "tiny", "prompt": "y"})
        err = check_error(r, 503, code="queue_full")
        assert r.headers["retry-after"] == "1"
        assert f"{ROWS} of {ROWS} rows are busy and {QUEUE} requests wait" in err["message"], err
    finally:
        for ctx, _ in held:
            ctx.__exit__(None, None, None)
    wait_idle(srv)
    normal_request(srv, tiny)


def wait_idle(srv, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        h = httpx.get(srv.url + "/health", timeout=10).json()
        if h["rows_busy"] == 0 and h["waiting"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"rows not freed in {timeout} s: {h}")


# -- Found 1 generalized: a failure inside the engine ends one request ------------------
def test_engine_failure_ends_one_request_and_the_engine_goes_on(tiny, monkeypatch):
    eng = Engine(tiny, "tova", C, max_batch=2, steps_per_call=4, log_requests=False).start()
    try:
        assert eng.ready.wait(120)
        bad = tiny.encode(TEXTS[4])
        real_advance, real_chunk = eng._advance, eng._decode_chunk

        def advance(pf):
            if pf.req is not None and pf.req.prompt == bad:
                raise RuntimeError("a failure in this request's prefill")
            return real_advance(pf)

        monkeypatch.setattr(eng, "_advance", advance)
        good = tiny.encode(TEXTS[0])
        reqs = [eng.submit(bad, 4, temperature=0), eng.submit(good, 6, temperature=0)]
        res = [r.result(60) for r in reqs]
        assert res[0].finish_reason == "error" and res[0].error["status"] == 500, res[0]
        assert res[1].tokens == reference(tiny, good, 6)
        # a decode chunk that fails ends the rows it held; the next request runs from a fresh state
        fails = [1]

        def chunk(logprobs=False):
            if fails:
                fails.pop()
                raise RuntimeError("a failed decode chunk")
            return real_chunk(logprobs)

        monkeypatch.setattr(eng, "_decode_chunk", chunk)
        r = eng.submit(good, 6, temperature=0, ignore_eos=True).result(60)  # its tokens after the first
        assert r.finish_reason == "error" and r.error["code"] == "internal_error", r
        assert eng.submit(good, 6, temperature=0).result(60).tokens == reference(tiny, good, 6)
        assert eng.error is None and eng.load() == {"rows_busy": 0, "waiting": 0}
    finally:
        eng.stop()


# -- Found 2, 3: fair admission and cancels, counted in prompt pieces --------------------
def test_short_prompt_is_read_beside_a_long_one_and_a_cancel_stops_the_reading(tiny):
    """A 5-token prompt sent right behind a 64-piece prompt gets its first token after at
    most B pieces (one of each prompt being read), not after the long one's 64; then a
    cancel of the long one stops its reading within one piece."""
    P, B = 32, 2
    eng = Engine(tiny, "tova", C, max_batch=B, steps_per_call=4, piece=P, log_requests=False).start()
    try:
        assert eng.ready.wait(120)
        rng = np.random.default_rng(0)
        long_ids = rng.integers(3, tiny.cfg.vocab_size, size=64 * P).tolist()
        short_ids = tiny.encode(TEXTS[0])[:5]
        seen, reqs = {}, {}

        def on(name):
            def f(ev):
                if ev["type"] == "delta" and name not in seen:
                    seen[name] = eng.stats["pieces"]
                    if name == "short":  # the long one's client leaves now, mid-prompt
                        reqs["long"].cancel()
            return f

        with eng._lock:  # the loop sees both at once
            start = eng.stats["pieces"]
            reqs["long"] = eng.submit(long_ids, 4, temperature=0, listener=on("long"))
            short = eng.submit(short_ids, 6, temperature=0, listener=on("short"))
        assert short.result(60).tokens == reference(tiny, short_ids, 6)
        assert seen["short"] - start <= B, (start, seen)  # the bound: ceil(5/P) rounds of at most B pieces
        assert reqs["long"].result(60).finish_reason == "abort" and "long" not in seen
        # the cancel is seen before the long prompt's next piece: of its 64, at most 2 were read
        assert eng.stats["pieces"] - start <= B + 1, (start, eng.stats["pieces"])
        assert eng.load() == {"rows_busy": 0, "waiting": 0}
    finally:
        eng.stop()


def test_stop_during_a_long_prompt_ends_everything_within_a_piece(tiny, monkeypatch):
    """Found 5 in the engine: a stop while a 64-piece prompt is read takes effect before its
    next piece (the old engine read it to its end, and an exit during the read died in
    C++); the request being read and the one waiting both end with a `shutting_down`
    error, not a finish."""
    eng = Engine(tiny, "tova", C, max_batch=1, steps_per_call=4, piece=32, log_requests=False).start()
    assert eng.ready.wait(120)
    rng = np.random.default_rng(7)
    long_ids = rng.integers(3, tiny.cfg.vocab_size, size=64 * 32).tolist()
    real_advance = eng._advance

    def advance(pf):
        if pf.req is not None and pf.next_piece == 2:
            eng.stop()  # from the engine's thread: no join, the loop sees it at once
        return real_advance(pf)

    monkeypatch.setattr(eng, "_advance", advance)
    with eng._lock:
        start = eng.stats["pieces"]
        reading = eng.submit(long_ids, 4, temperature=0)
        waiting = eng.submit(tiny.encode(TEXTS[0]), 4, temperature=0)
    for r in (reading, waiting):
        res = r.result(60)
        assert res.finish_reason == "error" and res.error["code"] == "shutting_down", res
    assert eng.stats["pieces"] - start == 3  # pieces 0, 1 and the one under way when stopped
    eng.stop()


def test_non_streaming_client_that_leaves_frees_its_row(tiny, srv):
    """Found 4: a non-streaming client that times out frees its row at once, not at max_tokens.
    (Mid-prompt the same cancel is seen between two pieces: the engine test above counts
    them; the tiny model reads a whole prompt faster than a client can leave.)"""
    with pytest.raises(httpx.TimeoutException):
        post(srv, {"model": "tiny", "prompt": "hi there", "max_tokens": 100000, "ignore_eos": True},
             timeout=httpx.Timeout(10, read=0.5))
    wait_idle(srv, 3)  # polled every 0.1 s: freed within a turn of the engine after that
    normal_request(srv, tiny)
    n = len(tiny.encode("hi there"))
    lines = [l for l in srv.text().splitlines() if f"prompt_tokens={n} " in l and "finish=abort" in l]
    assert lines and "generated_tokens=100000 " not in lines[-1], lines


# -- /metrics ---------------------------------------------------------------------------
def test_metrics(tiny, srv):
    normal_request(srv, tiny)
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(text)}
    ok = [s for s in fams["msrnn_requests"].samples
          if s.labels.get("path") == "/v1/completions" and s.labels.get("status") == "200"]
    assert ok and ok[0].value >= 1
    assert any(s.labels.get("status") == "401" for s in fams["msrnn_requests"].samples)
    for name in ("msrnn_queue_depth", "msrnn_rows_busy", "msrnn_prompt_tokens", "msrnn_generation_tokens",
                 "msrnn_time_to_first_token_seconds", "msrnn_inter_token_seconds"):
        assert name in fams, name
    count = [s.value for s in fams["msrnn_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert count[0] >= 1
    assert [s.value for s in fams["msrnn_rows"].samples] == [ROWS]


# -- echo and logprobs -------------------------------------------------------------------
def test_echo_logprobs_equal_run_policy_nll(tiny, srv):
    """echo + logprobs + max_tokens 0 (and 1, as lm-eval asks): the prompt's log-probabilities
    are those of the bounded state, exact per step: -`run_policy`'s per-token NLLs."""
    rng = np.random.default_rng(3)
    ids = rng.integers(3, tiny.cfg.vocab_size, size=100).tolist()  # past C=32: tova evicts
    want = -m.run_policy(tiny, "tova", C, ids).nll[0]
    for max_tokens in (0, 1):
        r = post(srv, {"model": "tiny", "prompt": ids, "max_tokens": max_tokens, "logprobs": 2, "echo": True,
                       "temperature": 0})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], want, atol=2e-4)
        assert all(len(t) <= 2 for t in lp["top_logprobs"][1:])
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
        if max_tokens:
            gen = reference(tiny, ids, 1)
            assert lp["tokens"][-1] == tiny.decode(gen)
            top = lp["top_logprobs"][-1]
            assert max(top.values()) == pytest.approx(lp["token_logprobs"][-1])  # greedy: its own is the top
    # generated tokens (no echo): each one's log-probability given the prompt and those before it
    gen = reference(tiny, ids, 6)
    r = post(srv, {"model": "tiny", "prompt": ids, "max_tokens": 6, "logprobs": 3, "temperature": 0})
    lp = r.json()["choices"][0]["logprobs"]
    assert r.json()["choices"][0]["text"] == tiny.decode(gen) and len(lp["tokens"]) == len(gen)
    want = -m.run_policy(tiny, "tova", C, ids + gen).nll[0][len(ids) - 1:]
    np.testing.assert_allclose(lp["token_logprobs"], want, atol=1e-3)
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(value)  # greedy: the most likely
    normal_request(srv, tiny)


# -- lm-evaluation-harness -----------------------------------------------------------------
TASK = """task: msrnn_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


GEN_TASK = """task: msrnn_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""

LM_EVAL = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

out = {}
tasks = TaskManager(include_path=sys.argv[2], include_defaults=False)  # the local task alone: no indexing
for name, url, key in json.loads(sys.argv[1]):
    import os
    os.environ["OPENAI_API_KEY"] = key
    res = lm_eval.simple_evaluate(
        model="local-completions", tasks=["msrnn_local", "msrnn_gen"], task_manager=tasks,
        model_args=f"base_url={url}/v1/completions,model=tiny,tokenizer={sys.argv[3]},max_retries=1",
        log_samples=True)
    out[name] = {"acc": res["results"]["msrnn_local"]["acc,none"],
                 "samples": [(s["doc"], [float(r[0]) for r in s["filtered_resps"]])
                             for s in res["samples"]["msrnn_local"]],
                 "generated": [(s["doc"], s["filtered_resps"][0]) for s in res["samples"]["msrnn_gen"]]}
print("RESULT " + json.dumps(out))
"""


def test_lm_eval_harness_against_the_server(tiny, tiny_dir, srv, tmp_path, monkeypatch):
    """lm-evaluation-harness's `local-completions` scores a local multiple-choice task (and
    a generation task: greedy answers equal offline `generate`) against `msrnn serve --policy full` and the tova C=32 server (contexts longer than C:
    tova evicts); every log-likelihood equals `run_policy`'s per-token NLLs of the
    continuation given its context under that policy (as `msrnn ppl` computes them)."""
    pytest.importorskip("lm_eval", reason="the test dependency lm-eval (pip install -e '.[test]')")
    long = " ".join(TEXTS[:8])
    docs = [{"question": long + " The quick brown", "choices": [" fox", " dog", " cat"], "answer": 0},
            {"question": long + " Paris is the capital of", "choices": [" France", " Spain"], "answer": 0}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "msrnn_local.yaml").write_text(TASK.format(data=data))
    (tasks / "msrnn_gen.yaml").write_text(GEN_TASK.format(data=data))
    assert len(tiny.encode(docs[0]["question"])) > C  # tova C=32 evicts while reading it
    monkeypatch.setenv("MSRNN_API_KEY", "key-from-the-environment")  # --api-key's default
    full = Server("--model", tiny_dir, "--policy", "full", "--capacity", "256", "--max-batch", "2",
                  log_path=tmp_path / "full.log")
    try:
        full.wait_ready()
        check_error(httpx.post(full.url + "/v1/completions", json={"prompt": "hi"}, timeout=10), 401)
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        servers = [("full", full.url, "key-from-the-environment"), ("tova", srv.url, KEY)]
        p = subprocess.run([sys.executable, "-c", LM_EVAL, json.dumps(servers), str(tasks), tiny_dir], env=env,
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        out = json.loads(p.stdout.split("RESULT ", 1)[1])
        assert "Traceback" not in full.text()
    finally:
        assert full.stop() == 0
    for policy, capacity in (("full", None), ("tova", C)):
        seen = 0
        for doc, lls in out[policy]["samples"]:
            n_ctx = len(tiny.encode(doc["question"]))  # lm-eval: the context's tokens, then the rest
            for choice, got in zip(doc["choices"], lls):
                whole = tiny.encode(doc["question"] + choice)
                want = -float(m.run_policy(tiny, policy, capacity, whole).nll[0][n_ctx - 1:].sum())
                assert got == pytest.approx(want, abs=1e-3), (policy, doc["question"][-20:], choice, got, want)
                seen += 1
        assert seen == 5, policy
        # the generation task: greedy, cut at its stop string, as offline `generate` gives it
        assert len(out[policy]["generated"]) == 2
        for doc, text in out[policy]["generated"]:
            ids = tiny.encode(doc["question"])
            want = tiny.decode(reference(tiny, ids, 8, policy, capacity or 256))
            assert text == want.split("\n")[0], (policy, text, want)
    # the bounded state answers otherwise than the full one here: the test can tell them apart
    assert out["full"]["samples"] != out["tova"]["samples"]


# -- 32 concurrent clients ---------------------------------------------------------------
def test_32_concurrent_clients_with_a_long_prompt_and_10_leaving(tiny, srv):
    """22 greedy requests through the openai client (one with a 1,500-token prompt) and 10
    clients that leave (5 streams closed after their first event, 5 non-streaming that time
    out): nothing lost, every greedy answer equal to offline, every row freed."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, timeout=180, max_retries=0)
    rng = np.random.default_rng(4)
    long_ids = rng.integers(3, tiny.cfg.vocab_size, size=1500).tolist()
    prompts = [long_ids] + [TEXTS[i % len(TEXTS)] for i in range(21)]
    want = [tiny.decode(reference(tiny, p if isinstance(p, list) else tiny.encode(p), 8)) for p in prompts]

    def greedy(i):
        p = prompts[i]
        for attempt in range(60):  # a full queue (503) is retried after its Retry-After, boundedly
            try:
                r = client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
                return r.choices[0].text
            except openai.APIStatusError as e:
                assert e.status_code == 503, e
                time.sleep(1)
        raise AssertionError("never admitted")

    def leave(i):
        body = {"model": "tiny", "prompt": TEXTS[i], "max_tokens": 100000, "ignore_eos": True}
        try:
            if i % 2:
                with httpx.stream("POST", srv.url + "/v1/completions", headers=AUTH, timeout=60,
                                  json={**body, "stream": True}) as r:
                    if r.status_code == 200:
                        next(r.iter_lines())
            else:
                post(srv, body, timeout=httpx.Timeout(10, read=0.3))
        except httpx.TimeoutException:
            pass

    log_before = len(srv.text())
    jobs = [("greedy", i) for i in range(len(prompts))] + [("leave", i) for i in range(10)]
    order = np.random.default_rng(5).permutation(len(jobs))
    with cf.ThreadPoolExecutor(32) as pool:
        futs = [(jobs[k], pool.submit(greedy if jobs[k][0] == "greedy" else leave, jobs[k][1])) for k in order]
        got = {}
        for (kind, arg), f in futs:
            res = f.result(timeout=300)
            if kind == "greedy":
                got[arg] = res
    assert [got[i] for i in range(len(prompts))] == want
    wait_idle(srv, 30)
    # the stated bound, in pieces: from taking its row to its first token, a prompt of L
    # tokens waits at most ceil(L/P) rounds of at most B pieces, the long prompt beside it or not
    import re
    lines = [l for l in srv.text()[log_before:].splitlines() if " finish=length" in l or " finish=stop" in l]
    assert len(lines) == len(prompts), lines
    for line in lines:
        L, pieces = (int(re.search(rf" {k}=(\d+)", line).group(1)) for k in ("prompt_tokens", "pieces"))
        assert pieces <= -(-L // 32) * ROWS, line


# -- Found 5, 9: SIGTERM drains ------------------------------------------------------------
DRAIN_BOUND = 15.0  # seconds from SIGTERM to exit 0 (docs/serving.md)


def test_sigterm_drains_streams_errors_the_queued_and_exits_0(tiny, srv):
    """The last test of `srv`: SIGTERM while long-prompt requests hold rows, a stream decodes and
    requests wait: the stream ends with an error event and [DONE], every other request
    gets a 503 `shutting_down` error (not a 200 "abort"), and the process exits 0 in time."""
    rng = np.random.default_rng(6)
    long_ids = rng.integers(3, tiny.cfg.vocab_size, size=MAX_PROMPT).tolist()
    results = {}

    def call(name, body):
        try:
            r = post(srv, {"model": "tiny", **body}, timeout=60)
            results[name] = (r.status_code, r.json())
        except httpx.TransportError as e:
            results[name] = ("transport", repr(e))

    threads = [threading.Thread(target=call, args=(f"long{i}", {"prompt": long_ids, "max_tokens": 100000,
                                                                "ignore_eos": True})) for i in range(6)]
    events = []
    with httpx.stream("POST", srv.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 100000, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        events.append(next(lines))
        for t in threads:
            t.start()
        end = time.time() + 30
        while time.time() < end:  # all 7 in: 4 rows, 3 waiting
            h = httpx.get(srv.url + "/health", timeout=10).json()
            if h["rows_busy"] + h["waiting"] == 7:
                break
            time.sleep(0.02)
        t0 = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)
        events += [line for line in lines if line]
    code = srv.proc.wait(DRAIN_BOUND + 30)
    took = time.perf_counter() - t0
    for t in threads:
        t.join(30)
    assert code == 0, srv.text()[-3000:]
    assert took < DRAIN_BOUND, took
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == "shutting_down", events[-3:]
    assert len(results) == 6
    for name, (status, body) in results.items():
        assert status == 503 and body["error"]["code"] == "shutting_down", (name, status, body)
    assert "Traceback" not in srv.text() and "terminate" not in srv.text(), srv.text()[-3000:]
