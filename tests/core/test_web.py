"""core/web.py: the chat API over HTTP against uvicorn on 127.0.0.1 (free port), with a real tiny GPT.

SSE format and content (equal to the engine's own output for the same seed), the reference's
limits (422), the bounded queue (503), disconnects freeing the worker, and an event loop that
keeps answering while generation runs.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch.nn as nn

from core.engine import Engine, TextStreamer, render_chat
from core.web import MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_TOTAL_CHARS, create_app
from core.web_server import make_server
from tests._tok import small_tokenizer
from tests.core.test_engine import tiny_gpt

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)

MODEL_NAME = "tiny <d2> & co"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app, **bounds):
    """The app served as `nanorun serve` serves it (core.web_server), on a free loopback port."""
    server = make_server(app, "127.0.0.1", free_port(), log_level="warning", **bounds)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture(scope="module")
def tok(shared_data):
    return small_tokenizer(str(shared_data / "corpus"), 1024)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_gpt(tok.vocab_size, seed=2, sequence_len=4096)   # room for an 8,000-character message


@pytest.fixture(scope="module")
def url(tok, model):
    app = create_app([(Engine(model, tok), tok)], model_name=MODEL_NAME, max_queue=4)
    with running(app) as base:
        yield base


def sse_events(response) -> list[dict]:
    events = []
    for block in response.text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        events.append(json.loads(block[len("data: "):]))
    return events


def user(text):
    return {"role": "user", "content": text}


def test_page_static_and_health(url):
    r = httpx.get(url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "tiny &lt;d2&gt; &amp; co" in r.text and "<d2>" not in r.text     # the name is escaped
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in r.text
        assert httpx.get(url + asset).status_code == 200
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["ready"] is True and h["model"] == MODEL_NAME
    # the real device: one worker on the CPU is no GPU
    assert h["num_gpus"] == 0 and h["workers"] == 1 and h["devices"] == ["cpu"] and h["available_workers"] == 1
    s = httpx.get(url + "/stats").json()
    assert s["total_workers"] == 1 and s["workers"][0]["device"] == "cpu"


def test_sse_stream_is_the_reference_format_and_the_engine_output(url, tok, model):
    messages = [user("Tell me about the whale."), {"role": "assistant", "content": "It is big."}, user("How big?")]
    body = {"messages": messages, "temperature": 0.9, "top_k": 40, "max_tokens": 30, "seed": 11}
    r = httpx.post(url + "/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == {"done": True}
    assert all(set(e) == {"token", "gpu"} and e["gpu"] is None and e["token"] for e in events[:-1])
    text = "".join(e["token"] for e in events[:-1])
    # the same generation straight from the engine
    engine, streamer, expected = Engine(model, tok), TextStreamer(tok), []
    for column, _ in engine.generate(render_chat(tok, messages), max_tokens=30, temperature=0.9, top_k=40, seed=11):
        if column[0] in engine.stop_tokens:
            break
        expected.append(streamer.put(column[0]))
    assert text == "".join(expected) + streamer.flush().rstrip("\ufffd")
    assert r.text.endswith('data: {"done": true}\n\n')


def test_non_ascii_is_sent_as_utf8_json(url):
    r = httpx.post(url + "/chat/completions", json={"messages": [user("Café 🐋")], "max_tokens": 5, "seed": 1},
                   timeout=30)
    assert r.status_code == 200 and sse_events(r)[-1] == {"done": True}


@pytest.mark.parametrize("body, fragment", [
    ({"messages": []}, "at least one message"),
    ({"messages": [user("x")] * (MAX_MESSAGES + 1)}, "too many messages"),
    ({"messages": [user("x" * (MAX_MESSAGE_CHARS + 1))]}, "message 0 is too long"),
    ({"messages": [user("x" * MAX_MESSAGE_CHARS)] * (MAX_TOTAL_CHARS // MAX_MESSAGE_CHARS) + [user("y")]},
     "conversation is too long"),
    ({"messages": [user("")]}, "empty content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
    ({"messages": [user("x")], "temperature": 2.01}, "temperature must be between 0.0 and 2.0"),
    ({"messages": [user("x")], "temperature": -0.1}, "temperature"),
    ({"messages": [user("x")], "top_k": 201}, "top_k must be between 0 and 200"),
    ({"messages": [user("x")], "top_k": -1}, "top_k"),
    ({"messages": [user("x")], "max_tokens": 0}, "max_tokens must be between 1 and 4096"),
    ({"messages": [user("x")], "max_tokens": 4097}, "max_tokens"),
])
def test_limits_answer_422_with_a_clear_message(url, body, fragment):
    r = httpx.post(url + "/chat/completions", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"]


def test_limits_are_inclusive_and_malformed_bodies_are_422(url):
    ok = {"messages": [user(("the whale " * 800)[:MAX_MESSAGE_CHARS])], "temperature": 2.0, "top_k": 0, "max_tokens": 1, "seed": 0}
    r = httpx.post(url + "/chat/completions", json=ok, timeout=30)
    assert r.status_code == 200 and sse_events(r)[-1] == {"done": True}
    assert httpx.post(url + "/chat/completions", json={"messages": "hi"}).status_code == 422
    assert httpx.post(url + "/chat/completions", content=b"not json",
                      headers={"content-type": "application/json"}).status_code == 422


def test_conversation_longer_than_the_context_is_422(tok):
    small = tiny_gpt(tok.vocab_size, sequence_len=64)
    with running(create_app([(Engine(small, tok), tok)], model_name="small")) as base:
        r = httpx.post(base + "/chat/completions", json={"messages": [user("the whale " * 60)]}, timeout=30)
        assert r.status_code == 422 and "start a new chat" in r.json()["detail"]
        # max_tokens is clamped to the room left in the context: still a complete answer
        r = httpx.post(base + "/chat/completions", json={"messages": [user("hi")], "max_tokens": 4096, "seed": 0},
                       timeout=30)
        assert r.status_code == 200 and sse_events(r)[-1] == {"done": True}


class Gated(nn.Module):
    """The real GPT, but every prefill waits for `gate`: holds a worker busy on demand."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt, self.config = gpt, gpt.config
        self.gate, self.entered, self.decode_steps = threading.Event(), threading.Event(), 0

    def forward(self, idx, kv_cache=None):
        if idx.size(1) > 1:
            self.entered.set()
            assert self.gate.wait(30), "test never opened the gate"
        else:
            self.decode_steps += 1
        return self.gpt(idx, kv_cache=kv_cache)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_full_queue_is_503_and_the_event_loop_stays_free(tok, model):
    gated = Gated(model)
    app = create_app([(Engine(gated, tok), tok)], model_name="gated", max_queue=1)
    body = {"messages": [user("hello")], "max_tokens": 5, "seed": 0}
    results = {}

    def post(name):
        results[name] = httpx.post(base + "/chat/completions", json=body, timeout=60)

    with running(app) as base:
        first = threading.Thread(target=post, args=("first",))
        first.start()
        assert gated.entered.wait(10)                            # the only worker is now busy
        second = threading.Thread(target=post, args=("second",))
        second.start()
        wait_for(lambda: httpx.get(base + "/stats").json()["queued"] == 1)
        t0 = time.perf_counter()
        h = httpx.get(base + "/health", timeout=5).json()       # generation never blocks the loop
        assert time.perf_counter() - t0 < 1.0 and h["available_workers"] == 0 and h["queued"] == 1
        third = httpx.post(base + "/chat/completions", json=body, timeout=10)
        assert third.status_code == 503 and "server busy" in third.json()["detail"]
        assert third.headers["retry-after"]
        gated.gate.set()
        first.join(30)
        second.join(30)
        assert results["first"].status_code == results["second"].status_code == 200
        assert sse_events(results["second"])[-1] == {"done": True}
        stats = httpx.get(base + "/stats").json()
        assert stats["rejected"] == 1 and stats["queued"] == 0 and stats["busy_workers"] == 0


def test_disconnect_stops_generation_and_frees_the_worker(tok, model):
    gated = Gated(model)
    gated.gate.set()
    slow = tiny_gpt(tok.vocab_size, seed=2, sequence_len=4096)   # room for a 4096-token answer

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt, self.config, self.steps = slow, slow.config, 0

        def forward(self, idx, kv_cache=None):
            self.steps += 1
            time.sleep(0.005)                                     # ~200 tok/s: 4096 tokens would take 20 s
            out = slow(idx, kv_cache=kv_cache)
            out[..., tok.encode_special("<|assistant_end|>")] = -1e4   # never stops by itself
            out[..., tok.bos_token_id] = -1e4
            return out

    model_ = Slow()
    app = create_app([(Engine(model_, tok), tok)], model_name="slow", max_queue=0)
    with running(app) as base:
        body = {"messages": [user("go on forever")], "max_tokens": 4096, "seed": 0}
        with httpx.stream("POST", base + "/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert "token" in json.loads(first[6:])
        # the client is gone: the worker must stop within a few tokens and take new work
        wait_for(lambda: httpx.get(base + "/stats").json()["busy_workers"] == 0, timeout=10)
        assert model_.steps < 1000
        r = httpx.post(base + "/chat/completions", json={**body, "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and sse_events(r)[-1] == {"done": True}


def test_generation_error_is_reported_in_the_stream(tok, model):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt, self.config = model, model.config

        def forward(self, idx, kv_cache=None):
            raise RuntimeError("kaboom")

    with running(create_app([(Engine(Broken(), tok), tok)], model_name="broken")) as base:
        r = httpx.post(base + "/chat/completions", json={"messages": [user("hi")]}, timeout=30)
        events = sse_events(r)
        assert "kaboom" in events[0]["error"] and events[-1] == {"done": True}
        assert httpx.get(base + "/health").json()["ready"] is True       # the worker survived


def test_loader_runs_in_background_and_its_failure_is_reported(tok, model):
    release = threading.Event()

    def load():
        assert release.wait(30)
        return Engine(model, tok), tok

    with running(create_app(load, model_name="lazy", num_workers=1)) as base:
        assert httpx.get(base + "/health").json()["ready"] is False
        r = httpx.post(base + "/chat/completions", json={"messages": [user("hi")]}, timeout=10)
        assert r.status_code == 503 and "loading" in r.json()["detail"]
        release.set()
        wait_for(lambda: httpx.get(base + "/health").json()["ready"])

    def broken_load():
        raise FileNotFoundError("no checkpoint at /nowhere")

    with running(create_app(broken_load, model_name="broken")) as base:
        wait_for(lambda: httpx.get(base + "/health").json()["status"] == "error")
        r = httpx.post(base + "/chat/completions", json={"messages": [user("hi")]}, timeout=10)
        assert r.status_code == 503 and "no checkpoint at /nowhere" in r.json()["detail"]


def test_create_app_checks_its_arguments(tok, model):
    with pytest.raises(ValueError, match="empty"):
        create_app([], model_name="x")
    with pytest.raises(ValueError, match="num_workers"):
        create_app(lambda: None, model_name="x", num_workers=0)
    with pytest.raises(ValueError, match="max_queue"):
        create_app([(Engine(model, tok), tok)], model_name="x", max_queue=-1)
    with pytest.raises(ValueError, match="body_timeout"):
        create_app([(Engine(model, tok), tok)], model_name="x", body_timeout=0)
    with pytest.raises(ValueError, match="header_timeout"):
        make_server(create_app([(Engine(model, tok), tok)], model_name="x"), header_timeout=0)


# ---- guards: body limit, Host allow-list, token, /docs, seed ----------------------
def test_body_over_the_limit_is_413_before_parsing_announced_or_chunked(url, tok, model):
    big = json.dumps({"messages": [user("x" * 100)] * 12000}).encode()          # ~1.4 MB > 1 MiB
    r = httpx.post(url + "/chat/completions", content=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "over 1048576 bytes" in r.json()["detail"]

    def chunks():                            # no Content-Length: streamed with chunked encoding
        for _ in range(40):
            yield b"x" * 65536
    r = httpx.post(url + "/chat/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413
    # a body just under the limit whose message list is over MAX_MESSAGES: refused before pydantic
    # walks it, and /health answers promptly meanwhile
    many = json.dumps({"messages": [user("x")] * 30000}).encode()
    assert len(many) < 1 << 20
    t0 = time.perf_counter()
    r = httpx.post(url + "/chat/completions", content=many, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "too many messages: 30000" in r.json()["detail"]
    assert time.perf_counter() - t0 < 2.0
    with running(create_app([(Engine(model, tok), tok)], model_name="small-body", max_body=200)) as base:
        ok = {"messages": [user("hi")], "max_tokens": 1, "seed": 0}
        assert httpx.post(base + "/chat/completions", json=ok, timeout=30).status_code == 200
        r = httpx.post(base + "/chat/completions", json={**ok, "messages": [user("x" * 300)]}, timeout=30)
        assert r.status_code == 413 and "over 200 bytes" in r.json()["detail"]
        assert httpx.get(base + "/health").status_code == 200          # the connection-level refusal did no harm


def test_host_header_must_name_this_server(url, tok, model):
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example"):
        r = httpx.get(url + "/health", headers={"host": host})
        assert r.status_code == 400 and "--allow-host" in r.json()["detail"], host
        assert httpx.post(url + "/chat/completions", json={"messages": [user("hi")]},
                          headers={"host": host}).status_code == 400
    for host in (f"localhost:{port}", "LOCALHOST", f"127.0.0.1:{port}", f"[::1]:{port}", "10.1.2.3:8000"):
        assert httpx.get(url + "/health", headers={"host": host}).status_code == 200, host
    with running(create_app([(Engine(model, tok), tok)], model_name="named", allowed_hosts=["Chat.Example"])) as base:
        assert httpx.get(base + "/health", headers={"host": "chat.example:80"}).status_code == 200
        assert httpx.get(base + "/health", headers={"host": "other.example"}).status_code == 400
    with running(create_app([(Engine(model, tok), tok)], model_name="any", allowed_hosts=["*"])) as base:
        assert httpx.get(base + "/health", headers={"host": "anything.example"}).status_code == 200


def test_token_guards_everything_but_health_and_the_page_trades_it_for_a_cookie(tok, model):
    app = create_app([(Engine(model, tok), tok)], model_name="locked", token="s3cret-t0ken")
    body = {"messages": [user("hi")], "max_tokens": 2, "seed": 0}
    with running(app) as base:
        assert httpx.get(base + "/health").json()["ready"] is True
        for path in ("/", "/stats", "/static/app.js"):
            r = httpx.get(base + path)
            assert r.status_code == 401 and "/?token=" in r.json()["detail"], path
        assert httpx.post(base + "/chat/completions", json=body).status_code == 401
        assert httpx.post(base + "/chat/completions", json=body,
                          headers={"authorization": "Bearer wrong"}).status_code == 401
        r = httpx.post(base + "/chat/completions", json=body, headers={"authorization": "Bearer s3cret-t0ken"},
                       timeout=30)
        assert r.status_code == 200 and sse_events(r)[-1] == {"done": True}
        assert httpx.get(base + "/?token=wrong").status_code == 401
        with httpx.Client(base_url=base, timeout=30) as browser:     # keeps cookies, like the page
            r = browser.get("/?token=s3cret-t0ken")
            assert r.status_code == 303 and r.headers["location"] == "/"
            assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
            assert browser.get("/").status_code == 200
            assert browser.get("/static/app.js").status_code == 200
            r = browser.post("/chat/completions", json=body)
            assert r.status_code == 200 and sse_events(r)[-1] == {"done": True}
    with pytest.raises(ValueError, match="token is empty"):
        create_app([(Engine(model, tok), tok)], model_name="x", token=" ")


def test_docs_only_when_asked_for(url, tok, model):
    assert httpx.get(url + "/docs").status_code == 404
    assert httpx.get(url + "/openapi.json").status_code == 404
    with running(create_app([(Engine(model, tok), tok)], model_name="docs", docs=True)) as base:
        assert httpx.get(base + "/docs").status_code == 200
        spec = httpx.get(base + "/openapi.json").json()
        schema = spec["paths"]["/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["properties"]["messages"]["items"]["properties"]["role"]


@pytest.mark.parametrize("seed", [-1, 2**64, 10**30])
def test_out_of_range_seed_is_422_not_an_error_event(url, seed):
    r = httpx.post(url + "/chat/completions", json={"messages": [user("hi")], "seed": seed}, timeout=30)
    assert r.status_code == 422 and "seed must be between 0 and" in r.json()["detail"]
    r = httpx.post(url + "/chat/completions", json={"messages": [user("hi")], "seed": 2**64 - 1, "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 200 and sse_events(r)[-1] == {"done": True}
