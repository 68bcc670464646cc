"""core/web.py + core/web_server.py under hostile clients, on 127.0.0.1 only.

Slow headers are closed, connections beyond the cap get 503 at once (one log line, not one per
connection), the cap stays below RLIMIT_NOFILE, a lone surrogate is 422, cross-origin and
non-JSON POSTs are refused, a ?token= access-log line is masked without a logging error, and a
bounded load test: 2,000 slow connections and 50 real streams at once against a server process
whose descriptors and memory are sampled from /proc.
"""
from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn.logging

from core.engine import Engine
from core.web import create_app
from core.web_server import ACCEPT_SLACK, FD_HEADROOM, MAX_CONNECTIONS, Notices, connection_cap, make_server
from tests.core.test_web import free_port, model, running, sse_events, tok, url, user, wait_for  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
CHAT = "/chat/completions"


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing the connection, or None if it is still open after `seconds`."""
    sock.settimeout(0.1)
    got, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except (socket.timeout, BlockingIOError):
            continue
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    return None


def test_slow_headers_are_closed_at_connect_and_on_keep_alive(tok, model):
    app = create_app([(Engine(model, tok), tok)], model_name="slow")
    with running(app, header_timeout=0.5, keep_alive=30) as base:
        idle, partial = _connect(base), _connect(base)
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert _closed_within(idle, 3) == b"" and _closed_within(partial, 3) == b""
        # a keep-alive connection: the first request is answered, a second one dribbling its
        # headers is closed like a new connection would be (the keep-alive timer alone does not)
        alive = _connect(base)
        alive.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert alive.recv(4096).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        try:
            alive.sendall(b"GET /health HTTP/1.1\r\n")
            while time.monotonic() - t0 < 5:
                alive.sendall(b"X")     # one byte at a time: each resets nothing
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert 0.4 < time.monotonic() - t0 < 3
        # a prompt client on a fresh connection is unaffected
        assert httpx.get(base + "/health").status_code == 200


def test_a_body_sent_a_byte_at_a_time_is_408(tok, model):
    app = create_app([(Engine(model, tok), tok)], model_name="slow body", body_timeout=0.5)
    with running(app) as base:
        sock = _connect(base)
        sock.sendall(b"POST /chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        t0 = time.monotonic()
        answer = _closed_within(sock, 5)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408") and b"within 0.5 s" in answer
        assert time.monotonic() - t0 < 2


def test_connections_beyond_the_cap_get_503_and_one_log_line(tok, model, caplog, monkeypatch):
    monkeypatch.setattr("core.web_server.connection_cap", lambda wanted: wanted)
    app = create_app([(Engine(model, tok), tok)], model_name="cap")
    with caplog.at_level(logging.WARNING, "nanorun.web"), running(app, max_connections=4, header_timeout=30) as base:
        held = [_connect(base) for _ in range(4)]
        time.sleep(0.3)
        refused = [_connect(base) for _ in range(10)]
        answers = [_closed_within(s, 3) for s in refused]
        assert all(a is not None and a.startswith(b"HTTP/1.1 503") and b"too many connections" in a for a in answers)
        for s in held:
            s.close()
        time.sleep(0.3)
        assert httpx.get(base + "/health").status_code == 200     # slots come back
    lines = [r.getMessage() for r in caplog.records if "refusing more" in r.getMessage()]
    assert len(lines) == 1, lines


def test_garbage_requests_are_400_and_one_log_line(url, caplog):
    uvicorn_log = logging.getLogger("uvicorn.error")   # where uvicorn itself logs them (it does not propagate)
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(5):
                sock = _connect(url)
                sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")    # e.g. TLS to a plain-HTTP port
                assert (_closed_within(sock, 3) or b"").startswith(b"HTTP/1.1 400")
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if "Invalid HTTP request" in r.getMessage()]
    assert len(lines) == 1, lines


def test_accept_out_of_descriptors_is_one_line_not_a_traceback_per_try(tok, model, caplog):
    app = create_app([(Engine(model, tok), tok)], model_name="emfile")
    server = make_server(app, "127.0.0.1", free_port(), log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    with caplog.at_level(logging.WARNING):
        thread.start()
        wait_for(lambda: server.started, timeout=20)
        emfile = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
        for _ in range(5):     # asyncio retries accept() once a second while it lasts
            server.loop.call_soon_threadsafe(server.loop.call_exception_handler, emfile)
        server.loop.call_soon_threadsafe(server.loop.call_exception_handler, {"message": "something else"})
        time.sleep(0.3)
        server.should_exit = True
        thread.join(20)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("accept() failed: [Errno 24] Too many open files" in line for line in lines) == 1, lines
    assert any("something else" in line for line in lines)     # other loop errors still reach asyncio's handler


def test_the_cap_stays_below_the_descriptor_limit(monkeypatch):
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(10**9) < soft - ACCEPT_SLACK - FD_HEADROOM
    monkeypatch.setattr(resource, "getrlimit", lambda which: (len(os.listdir("/proc/self/fd")) + 50, 10**6))
    with pytest.raises(ValueError, match="ulimit -n"):
        connection_cap(1000)


def test_notices_log_once_then_count(caplog, monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 61.0])
    monkeypatch.setattr("core.web_server.time.monotonic", lambda: next(clock))
    notices = Notices(every=60)
    with caplog.at_level(logging.WARNING, "nanorun.web"):
        for _ in range(4):
            notices.note("slow", "closed a slow one")
    assert [r.getMessage() for r in caplog.records] == [
        "closed a slow one (more of these: one line per 60 s)", "closed a slow one (3 time(s) since the last such line)"]


@pytest.mark.parametrize("body", [
    b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}',
    b'{"messages": [{"role": "user", "content": "\\udcff"}]}',
    b'{"messages": "\\ud800"}',                           # refused by pydantic: its error must not echo it
    b'{"messages": [{"role": "\\ud800", "content": "x"}]}',
])
def test_lone_surrogates_are_422_not_500(url, body):
    r = httpx.post(url + CHAT, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    assert "surrogate" in r.text or "messages" in r.text or "role" in r.text


def test_post_must_be_json_and_same_site(url):
    ok = {"messages": [user("hi")], "max_tokens": 2}
    # the "simple" request another site's page can send without a preflight
    r = httpx.post(url + CHAT, content=b'{"messages": [{"role": "user", "content": "hi"}]}',
                   headers={"content-type": "text/plain", "origin": "http://evil.example"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    assert httpx.post(url + CHAT, content=b"{}").status_code == 415      # no content type at all
    for origin in ("http://evil.example", "null", "http://10.1.2.3:8000", "http://127.0.0.1.evil.example"):
        r = httpx.post(url + CHAT, json=ok, headers={"origin": origin})
        assert r.status_code == 403 and "--allow-host" in r.json()["detail"], origin
    port = url.rsplit(":", 1)[1]
    for origin in (url, f"http://localhost:{port}", "http://localhost:3000", None):
        headers = {"content-type": "application/json; charset=utf-8", **({"origin": origin} if origin else {})}
        r = httpx.post(url + CHAT, json=ok, headers=headers, timeout=30)
        assert r.status_code == 200 and sse_events(r)[-1] == {"done": True}, origin


def test_token_in_the_url_is_masked_in_the_access_log_without_a_logging_error(tok, model, capfd):
    from artifacts.redact import install_log_redaction

    install_log_redaction()   # what importing `artifacts` does in every nanorun process
    app = create_app([(Engine(model, tok), tok)], model_name="locked", token="s3cret-t0ken")
    access = logging.getLogger("uvicorn.access")
    buffer, level = io.StringIO(), access.level
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(uvicorn.logging.AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s'))
    with running(app) as base:
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        try:
            assert httpx.get(base + "/?token=s3cret-t0ken").status_code == 303
        finally:
            access.removeHandler(handler)
            access.setLevel(level)
    assert "s3cret" not in buffer.getvalue() and '"GET /?token=*** HTTP/1.1" 303' in buffer.getvalue()
    assert "Logging error" not in capfd.readouterr().err


def test_health_reports_the_real_device(url):
    h = httpx.get(url + "/health").json()
    assert h["devices"] == ["cpu"] and h["num_gpus"] == 0


# ---- the bounded load test: a server process, 2,000 slow connections and 50 real streams at once


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


async def _slow_client(port: int) -> str:
    """Send half a request and wait: 'closed' (the header deadline), '503' or 'reset' (over the cap: the
    kernel resets a connection closed with the client's bytes unread, and the 503 may be lost), or
    'refused' (connect failed)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "refused"
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    try:
        got = await reader.read()
    except ConnectionError:
        got = None
    writer.close()
    return "reset" if got is None else "503" if got.startswith(b"HTTP/1.1 503") else "closed"


async def _stream(client: httpx.AsyncClient, base: str, i: int) -> bool:
    """One real chat stream; retries while the server says 503 (the cap or the queue), as a client should."""
    body = {"messages": [user(f"Tell me about the number {i}.")], "max_tokens": 12, "seed": i}
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        try:
            r = await client.post(base + CHAT, json=body)
        except httpx.TransportError:
            r = None
        if r is not None and r.status_code == 200:
            return sse_events(r)[-1] == {"done": True}
        await asyncio.sleep(0.2)
    return False


async def _attack(port: int, slow: int, streams: int) -> tuple[list[str], list[bool]]:
    base = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(max_connections=streams)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        slow_tasks = [asyncio.create_task(_slow_client(port)) for _ in range(slow)]
        await asyncio.sleep(0.5)   # the slow ones first: the streams arrive at a full server
        stream_results = await asyncio.gather(*(_stream(client, base, i) for i in range(streams)))
        return await asyncio.gather(*slow_tasks), stream_results


def test_load_2000_slow_connections_and_50_streams(shared_data):
    slow, streams = 2000, 50
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * slow + 500:   # this process holds the client ends; the server inherits the limit
        if hard != resource.RLIM_INFINITY and hard < 2 * slow + 500:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {slow} client sockets")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2 * slow + 500, hard))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "tests.core._web_load_server", str(port), str(shared_data), "2"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["ready"]:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        fds0, rss0 = _fds(server.pid), _rss_mb(server.pid)
        peak = {"fds": fds0, "rss": rss0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                try:
                    peak["fds"], peak["rss"] = max(peak["fds"], _fds(server.pid)), max(peak["rss"], _rss_mb(server.pid))
                except (OSError, AttributeError):
                    pass
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        outcomes, finished = asyncio.run(asyncio.wait_for(_attack(port, slow, streams), 40))
        elapsed = time.monotonic() - t0
        done.set()
        sampler.join()
        time.sleep(0.5)
        fds_after = _fds(server.pid)
    finally:
        server.kill()
        log = server.communicate(timeout=20)[0]
    counts = {k: outcomes.count(k) for k in ("closed", "503", "reset", "refused")}
    print(f"load: {elapsed:.1f} s, slow {counts}, streams finished {sum(finished)}/{streams}, server fds "
          f"{fds0} -> peak {peak['fds']} -> {fds_after}, RSS {rss0:.0f} -> peak {peak['rss']:.0f} MB")
    assert all(finished), f"{streams - sum(finished)} of {streams} streams did not finish"
    assert counts["refused"] == 0 and counts["503"] + counts["reset"] > 0   # every slow one ended; the cap held
    assert peak["fds"] <= fds0 + MAX_CONNECTIONS + ACCEPT_SLACK, peak
    assert fds_after <= fds0 + 5
    assert peak["rss"] - rss0 < 200, peak
    assert "Traceback" not in log and len(log.splitlines()) <= 10, log[-3000:]
