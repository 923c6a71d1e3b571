"""`ggforge serve`: the OpenAI-compatible server (runtime/server/) on a tiny Q8_0 model.

The server runs in this process (uvicorn in a thread, on a loopback socket of its own) and,
for the CLI and the API key, as `serve_cmd` in a subprocess. Oracles: ggforge.load(...)'s
generate() on the same file (greedy and seeded), llama.cpp's greedy continuation and its
tokenizer; the official `openai` client and raw HTTP as the clients. After every bad
request the server still answers /health.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import hypothesis as hyp
import hypothesis.strategies as st
import pytest

from require import require

import ggforge
import llama_oracle
from ggforge.convert.pipeline import convert

openai = require("openai")
uvicorn = require("uvicorn")

N_CTX = 256
PROMPT = "Once upon a time, there was a tiny model that 42 people liked."
MESSAGES = [{"role": "user", "content": "Hello there, tiny model"}]
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def gguf(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny.gguf"
    return convert(tiny_model("llama3"), "Q8_0", out).output


@pytest.fixture(scope="module")
def ref(gguf):
    with ggforge.load(gguf, n_ctx=N_CTX) as m:
        yield m


@contextlib.contextmanager
def _serving(app):
    """uvicorn serving ``app`` in a thread on a loopback socket of its own: the base URL."""
    from ggforge.runtime.server import uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
        app.state.api.engine.close()
        sock.close()


@pytest.fixture(scope="module")
def served(gguf):
    """(base URL, engine) of a server over its own LoadedModel (its KV cache is its own)."""
    from ggforge.runtime.server import ServerSettings, create_app

    with ggforge.load(gguf, n_ctx=N_CTX) as model:
        app = create_app(model, ServerSettings(model_name="tiny", max_body_bytes=MAX_BODY, max_waiting=8))
        with _serving(app) as base:
            yield base, app.state.api.engine


@pytest.fixture(scope="module")
def server(served):
    return served[0]


def _client(base: str, key: str = "none"):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def _http(base: str, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, parsed JSON or text) of one raw HTTP request."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


def _healthy(base: str) -> None:
    status, body = _http(base, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


def _greedy(ref, prompt, n, **kw) -> str:
    return "".join(ref.generate(prompt, max_tokens=n, temperature=0, **kw))


def _pieces(m, ids) -> str:
    return b"".join(m.tokenizer.token_to_piece(t, special=False) for t in ids).decode("utf-8", "replace")


def test_completion_is_generate_and_llama_cpps_greedy_continuation(server, ref, gguf):
    r = _client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    ids = ref.tokenize(PROMPT)
    want = llama_oracle.greedy(gguf, ids, 10, defaults=True)
    assert r.choices[0].text == _greedy(ref, PROMPT, 10) == _pieces(ref, want)
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    assert r.choices[0].finish_reason == ("length" if len(want) == 10 else "stop")


def test_chat_is_the_templates_greedy_reply(server, ref, gguf):
    c = _client(server)
    r = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    ids = ref.chat_prompt(MESSAGES)
    assert r.choices[0].message.content == _greedy(ref, ids, 8)
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(ids)
    assert _pieces(ref, llama_oracle.greedy(gguf, ids, 8, defaults=True)) == r.choices[0].message.content


def test_streaming_concatenates_to_the_whole_text(server):
    c = _client(server)
    whole = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)]
    assert "".join(pieces) == c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12,
                                                   temperature=0).choices[0].text
    # raw: server-sent events ending with [DONE]
    status, body = _http(server, "POST", "/v1/completions",
                         {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True})
    events = [e for e in body.split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


def test_stop_strings(server, ref):
    full = _greedy(ref, PROMPT, 16)
    stop = full[5:8]   # a stop string inside the greedy text: it ends there, not included
    want = _greedy(ref, PROMPT, 16, stop=[stop])
    assert want == full[:full.find(stop)]
    c = _client(server)
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True))
    assert streamed == want


def test_the_next_turn_reuses_the_cached_prefix(server):
    """A second chat turn evaluates only its new tokens (llama-server's timings: cache_n
    reused, prompt_n evaluated)."""
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    status, first = _http(server, "POST", "/v1/chat/completions", body)
    assert status == 200
    turn = MESSAGES + [first["choices"][0]["message"], {"role": "user", "content": "And then?"}]
    status, second = _http(server, "POST", "/v1/chat/completions", {**body, "messages": turn})
    t, n = second["timings"], second["usage"]["prompt_tokens"]
    assert status == 200 and t["cache_n"] + t["prompt_n"] == n
    assert t["cache_n"] >= first["usage"]["prompt_tokens"]   # the first turn is not evaluated again


def test_seed_repeats_and_matches_generate(server, ref):
    c = _client(server)

    def run(seed):
        return c.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0,
                                    seed=seed).choices[0].text
    a, b, other = run(7), run(7), run(8)
    assert a == b and a != other
    assert a == "".join(ref.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7))


def test_penalties_reach_the_sampler(server, ref):
    kw = dict(temperature=0, frequency_penalty=1.5, presence_penalty=0.5)
    r = _client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=12, **kw)
    assert r.choices[0].text == _greedy(ref, PROMPT, 12, frequency_penalty=1.5, presence_penalty=0.5)
    assert r.choices[0].text != _greedy(ref, PROMPT, 12)


def test_models_health_tokenize_detokenize(server, gguf):
    models = _client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    _healthy(server)
    llm = llama_oracle.load(gguf)
    try:
        for add_special in (False, True):
            status, tok = _http(server, "POST", "/tokenize", {"content": PROMPT, "add_special": add_special})
            assert status == 200
            assert tok["tokens"] == llm.tokenize(PROMPT.encode(), add_bos=add_special, special=True)
        status, detok = _http(server, "POST", "/detokenize", {"tokens": tok["tokens"]})
        assert status == 200
        assert detok["content"] == llm.detokenize(tok["tokens"], special=True).decode()
        assert detok["content"].endswith(PROMPT)
    finally:
        llm.close()


BAD = [  # (path, raw body, status, words in the message, param)
    ("/v1/completions", b'{"prompt": "hi", ', 400, "not valid JSON", None),
    ("/v1/completions", b'[1, 2]', 400, "JSON object", None),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "not valid JSON", None),
    ("/v1/completions", b'\xff\xfe', 400, "UTF-8", None),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": "5"}', 400, "must be an integer", "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": true}', 400, "must be a number", "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": 3}', 400, "between", "top_p"),
    ("/v1/completions", b'{"prompt": 5}', 400, "string or an array", "prompt"),
    ("/v1/completions", b'{"max_tokens": 5}', 400, "required", "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "bogus": 1}', 400, "unknown field", "bogus"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 100000}', 400, "context size", "max_tokens"),
    ("/v1/completions", b'{"prompt": [1, 99999]}', 400, "outside the vocabulary", "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "n": 2}', 400, "not supported", "n"),
    ("/v1/completions", b'{"prompt": "hi", "stop": [1]}', 400, "strings", "stop"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "non-empty", "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "role", "messages[0].role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": {"a": 1}}]}', 400, "string",
     "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
     b'"response_format": {"type": "json_schema", "json_schema": {}}}', 400, "not supported yet", "response_format"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
     b'"response_format": {"type": "json_object"}}', 400, "not supported yet", "response_format"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "tools": []}', 400,
     "not supported yet", "tools"),
    ("/tokenize", b'{"content": 3}', 400, "must be a string", "content"),
    ("/detokenize", b'{"tokens": ["a"]}', 400, "array of integers", "tokens"),
    ("/v1/completions", b'[' * 100000 + b']' * 100000, 413, "larger than", None),
]


@pytest.mark.parametrize("path,raw,status,words,param", BAD)
def test_bad_requests_are_answered_and_the_server_keeps_serving(server, path, raw, status, words, param):
    got, body = _http(server, "POST", path, raw=raw)
    assert got == status, body
    err = body["error"]
    assert words in err["message"] and err["param"] == param
    assert set(err) == {"message", "type", "param", "code"}
    _healthy(server)


def test_prompt_larger_than_the_context_and_other_errors(server):
    c = _client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="hello " * (2 * N_CTX), max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    _healthy(server)
    deep = b'{"prompt": ' + b'[' * 20000 + b']' * 20000 + b'}'   # under the body limit, deep
    assert _http(server, "POST", "/v1/completions", raw=deep)[0] == 400
    assert _http(server, "GET", "/v1/nothing")[0] == 404
    assert _http(server, "GET", "/v1/completions")[0] == 405
    # a body declared larger than the limit is refused before it is read
    status, body = _http(server, "POST", "/v1/completions", raw=b"x" * (MAX_BODY + 1))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    _healthy(server)


def _until(cond, seconds: float = 20.0) -> None:
    deadline = time.time() + seconds
    while not cond():
        assert time.time() < deadline
        time.sleep(0.02)


def test_a_client_leaving_mid_stream_frees_the_model(served):
    """The generation stops at the next token (the job ends 'cancelled', well short of its
    max_tokens) and the next request is served."""
    server, engine = served
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    n = N_CTX - 20
    body = {"prompt": PROMPT, "max_tokens": n, "temperature": 1.0, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    r.fp.readline()      # the first event arrives, then the client goes away
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    _until(lambda: not engine.busy and engine.last is not None)
    finish, n_done = engine.last
    assert finish == "cancelled" and n_done < n, engine.last
    r = _client(server).completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1
    _until(lambda: _http(server, "GET", "/health")[1] == {"status": "ok", "busy": False, "waiting": 0})


class _GatedModel:
    """A stand-in for LoadedModel whose generation waits on a gate: the queue's order, its
    limit and the event loop's freedom, with no timing luck."""

    n_ctx = 64

    def __init__(self, tokenizer, config):
        self.tokenizer, self.model = tokenizer, type("M", (), {"config": config})()
        self.gate, self.started = threading.Event(), []

    def tokenize(self, text):
        return self.tokenizer.encode(text)

    def generate_tokens(self, ids, *, max_tokens, settings):
        self.started.append(list(ids))
        assert self.gate.wait(30)
        yield from ids[1:1 + max_tokens]


def test_fifo_queue_limit_429_and_a_free_event_loop(ref):
    """One request runs (held at a gate), max_waiting wait, the next is answered 429 with
    Retry-After; /health answers meanwhile; opened, they are served in arrival order."""
    from ggforge.runtime.server import ServerSettings, create_app

    fake = _GatedModel(ref.tokenizer, ref.model.config)
    app = create_app(fake, ServerSettings(model_name="gated", max_waiting=2))
    engine = app.state.api.engine
    with _serving(app) as base, ThreadPoolExecutor(3) as pool:
        c = _client(base)
        prompts = [f"request {i}" for i in range(3)]
        futures = []
        for i, p in enumerate(prompts):
            futures.append(pool.submit(c.completions.create, model="gated", prompt=p, max_tokens=8))
            _until(lambda: engine._pending == i + 1)
        _healthy(base)
        status, body = _http(base, "POST", "/v1/completions", {"prompt": "one too many"})
        assert status == 429 and body["error"]["code"] == "queue_full"
        assert _http(base, "GET", "/health")[1] == {"status": "ok", "busy": True, "waiting": 2}
        fake.gate.set()
        texts = [f.result().choices[0].text for f in futures]
    assert fake.started == [ref.tokenize(p) for p in prompts]
    assert texts == [_pieces(ref, ref.tokenize(p)[1:]) for p in prompts]


def test_concurrent_streaming_clients_are_all_answered(server, ref):
    """N=4 streaming clients at once: the FIFO queue serves each one in full, each text
    equal to the same request alone; /health answers meanwhile."""
    n_clients, n_tok = 4, 32
    prompts = [f"{PROMPT} Client {i} says" for i in range(n_clients)]
    want = [_greedy(ref, p, n_tok) for p in prompts]
    t0 = time.perf_counter()
    n_alone = sum(len(list(ref.generate_tokens(ref.tokenize(p) + [0], max_tokens=n_tok, temperature=0)))
                  for p in prompts)   # + [0]: a prompt the cache has not seen, as the server's
    alone = n_alone / (time.perf_counter() - t0)
    c = _client(server)

    def one(p):
        chunks = c.completions.create(model="tiny", prompt=p, max_tokens=n_tok, temperature=0,
                                      stream=True, stream_options={"include_usage": True})
        text, n = [], 0
        for ch in chunks:
            if ch.choices:
                text.append(ch.choices[0].text)
            if ch.usage:
                n = ch.usage.completion_tokens
        return "".join(text), n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        time.sleep(0.05)
        _healthy(server)
        got = [f.result() for f in futures]
    dt = time.perf_counter() - t0
    assert [t for t, _ in got] == want
    total = sum(n for _, n in got)
    print(f"\nload test: {n_clients} streaming clients, {total} tokens in {dt:.2f} s: "
          f"{total / dt:.1f} tokens/s through the server (prompts included); generate() "
          f"alone on the same prompts, one after another: about {alone:.1f} tokens/s")
    _healthy(server)


class _FailingModel(_GatedModel):
    def generate_tokens(self, ids, *, max_tokens, settings):
        yield ids[1]
        raise RuntimeError("the device fell over")


def test_a_failing_generation_is_an_error_not_a_dead_server(ref):
    """A generation that raises: 500 with an error body, or an error event in the stream
    followed by [DONE]; the worker lives on and serves the next request."""
    from ggforge.runtime.server import ServerSettings, create_app

    app = create_app(_FailingModel(ref.tokenizer, ref.model.config), ServerSettings(model_name="f"))
    with _serving(app) as base:
        for _ in range(2):
            status, body = _http(base, "POST", "/v1/completions", {"prompt": PROMPT})
            assert status == 500 and "the device fell over" in body["error"]["message"]
        status, body = _http(base, "POST", "/v1/completions", {"prompt": PROMPT, "stream": True})
        events = [e for e in body.split("\n\n") if e]
        assert status == 200 and events[-1] == "data: [DONE]"
        assert "the device fell over" in json.loads(events[-2].removeprefix("data: "))["error"]["message"]
        _healthy(base)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=8), lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)
FIELDS = sorted(["messages", "temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "seed",
                 "stream", "stream_options", "presence_penalty", "frequency_penalty", "n", "logprobs",
                 "response_format", "repeat_last_n", "user", "model", "tools", "bogus"])


@hyp.settings(max_examples=150, deadline=None, suppress_health_check=list(hyp.HealthCheck))
@hyp.given(field=st.sampled_from(FIELDS), value=JSON)
def test_any_json_in_any_field_is_answered_200_or_400(server, field, value):
    body = {"messages": MESSAGES, "max_tokens": 2, field: value}
    if field == "max_tokens" and isinstance(value, int) and value > 8:
        body[field] = 8 + value % 8   # keep the run short; the range checks are above
    status, resp = _http(server, "POST", "/v1/chat/completions", body)
    assert status in (200, 400), (status, resp)
    if status == 400:
        assert resp["error"]["type"] == "invalid_request_error" and resp["error"]["message"]


@hyp.settings(max_examples=80, deadline=None, suppress_health_check=list(hyp.HealthCheck))
@hyp.given(prompt=JSON | st.lists(st.integers(-5, 800), max_size=5) | st.text(max_size=40),
           path=st.sampled_from(["/v1/completions", "/tokenize", "/detokenize"]))
def test_any_prompt_or_tokens_are_answered_200_or_400(server, prompt, path):
    key = {"/v1/completions": "prompt", "/tokenize": "content", "/detokenize": "tokens"}[path]
    body = {key: prompt, **({"max_tokens": 2} if key == "prompt" else {})}
    status, resp = _http(server, "POST", path, body)
    assert status in (200, 400), (status, resp)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_with_an_api_key(gguf, tmp_path):
    """`serve_cmd` in a subprocess: without `Authorization: Bearer KEY` (or with a wrong
    key) 401; with it the model answers; /health stays open for probes."""
    port, key = _free_port(), "s3cret-key"
    keyfile = tmp_path / "key"
    keyfile.write_text(key + "\n")
    cmd = [sys.executable, "-c", "from ggforge.tools.serve_cli import serve_cmd; serve_cmd()",
           str(gguf), "--port", str(port), "-c", "128", "--api-key-file", str(keyfile),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 45
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if _http(base, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "serve did not start"
            time.sleep(0.2)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            status, body = _http(base, "GET", "/v1/models", headers=headers)
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
            _healthy(base)
        with pytest.raises(openai.AuthenticationError):
            _client(base, "wrong").models.list()
        r = _client(base, key).completions.create(model="x", prompt=PROMPT, max_tokens=4, temperature=0)
        assert r.choices[0].text and r.model == "tiny.gguf"
    finally:
        proc.terminate()
        proc.wait(15)
