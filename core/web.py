"""Web chat: a FastAPI app (one page + a streaming API) over a pool of model replicas.

    from core.web import create_app
    from core.web_server import serve
    app = create_app(load_engine, model_name="d20 sft", num_workers=1, max_queue=8)
    serve(app, host="127.0.0.1", port=8000)          # then open http://127.0.0.1:8000/

`load_engine() -> (Engine, Tokenizer)` is called once per worker, in a background thread at
start-up (so /health answers while a large model loads); or pass the replicas ready-made as a
list of (Engine, Tokenizer), one per device. The `nanorun serve` CLI builds these from an artifact.

Endpoints (the reference's API, so its clients work unchanged):
  GET  /                   the chat page (core/static/)
  POST /chat/completions   {messages: [{role, content}], temperature?, top_k?, max_tokens?, seed?}
                           -> text/event-stream: `data: {"token": "...", "gpu": N}` ... (N: the CUDA
                              device generating it; null on CPU or MPS)
                              `data: {"done": true}`  (an `{"error": ...}` event precedes done
                              if generation fails)
  GET  /health             {"status", "ready", "model", "num_gpus", "devices", "available_workers", ...}
  GET  /stats              per-worker counters, queue length, rejected requests

Guards (one ASGI middleware, before anything is parsed; see _Guard; connection-level bounds such
as slow headers and the connection cap are core/web_server.py's):
  - the Host header must name this server (DNS rebinding): loopback names, IP literals, and the
    names given in allowed_hosts ("*" turns the check off and the Origin check below); else 400.
  - a POST must say `Content-Type: application/json` (else 415) and, if it carries an Origin
    header, come from this server's own origin or a loopback / allowed_hosts name (else 403): a
    page on another site can send a cross-origin "simple" request (text/plain, no preflight) to a
    loopback server, and would otherwise start a generation.
  - an optional bearer token: `Authorization: Bearer T`, or the cookie set by opening
    /?token=T once (the browser page then works unchanged); else 401. /health stays open.
  - request bodies over max_body bytes are 413, announced (Content-Length) or streamed (chunked),
    and one still arriving after body_timeout seconds is 408, before any parsing; JSON parsing and validation of what passes are bounded (a message count
    over the limit is refused before pydantic walks the list), so /health stays responsive.
  - /docs and /openapi.json exist only with docs=True.

Concurrency: generation runs on one thread per replica, never on the event loop. Requests wait in
a bounded queue (max_queue beyond the requests being served); when it is full the answer is 503
at once, so a busy server says so instead of piling up work. A client that disconnects (the
page's stop button aborts the fetch) cancels its job: the worker stops at the next token and
takes the next request. Limits as the reference, but answered 422 (not 400) with a message that
says which limit was hit.
"""
from __future__ import annotations

import asyncio
import hmac
import html
import ipaddress
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError

from core.chat_cli import check_text
from core.engine import Engine, TextStreamer, render_chat

log = logging.getLogger("nanorun.web")
STATIC = Path(__file__).parent / "static"

# The reference's abuse limits.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)          # 0 = no top-k filtering
MAX_TOKENS_RANGE = (1, 4096)
SEED_RANGE = (0, 2**64 - 1)     # what torch.Generator.manual_seed takes
ROLES = ("user", "assistant", "system")
MAX_BODY = 1 << 20              # bytes of a request body; a full conversation at the limits is ~0.2 MB
BODY_TIMEOUT = 30.0             # seconds to receive it (1 MiB at 35 KB/s)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
TOKEN_COOKIE = "nanorun_token"


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    messages: list[ChatMessage]
    temperature: float | None = None
    max_tokens: int | None = None
    top_k: int | None = None
    seed: int | None = None     # ours: fixes the sampling seed (the reference draws a random one)


def validate_request(req: ChatRequest) -> None:
    """Raise 422 naming the limit that was broken (same limits as the reference)."""
    def bad(msg: str):
        raise HTTPException(status_code=422, detail=msg)

    if not req.messages:
        bad("at least one message is required")
    if len(req.messages) > MAX_MESSAGES:
        bad(f"too many messages: {len(req.messages)}, at most {MAX_MESSAGES} per request")
    total = 0
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            bad(f"message {i} has role {m.role!r}: use 'user', 'assistant' or 'system'")
        if not m.content:
            bad(f"message {i} has empty content")
        try:
            check_text(m.content, f"message {i}")
        except ValueError as e:
            bad(str(e))
        if len(m.content) > MAX_MESSAGE_CHARS:
            bad(f"message {i} is too long: {len(m.content)} characters, at most {MAX_MESSAGE_CHARS}")
        total += len(m.content)
    if total > MAX_TOTAL_CHARS:
        bad(f"conversation is too long: {total} characters, at most {MAX_TOTAL_CHARS} in total")
    for name, value, (lo, hi) in (("temperature", req.temperature, TEMPERATURE_RANGE),
                                  ("top_k", req.top_k, TOP_K_RANGE),
                                  ("max_tokens", req.max_tokens, MAX_TOKENS_RANGE),
                                  ("seed", req.seed, SEED_RANGE)):
        if value is not None and not lo <= value <= hi:
            bad(f"{name} must be between {lo} and {hi}, got {value}")


def parse_request(body: bytes) -> ChatRequest:
    """The request from raw JSON, bounded: json.loads of at most MAX_BODY bytes takes ~10 ms, and
    a message list over the limit is refused before pydantic validates it item by item (30,000
    one-letter messages in 1 MB took 0.2 s of event loop otherwise). 422 like FastAPI's own."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise HTTPException(status_code=422, detail=f"the body is not JSON: {str(e)[:100]}") from None
    messages = data.get("messages") if isinstance(data, dict) else None
    if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
        raise HTTPException(status_code=422, detail=f"too many messages: {len(messages)}, at most "
                                                    f"{MAX_MESSAGES} per request")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        # without the offending input: it may hold a lone surrogate, which no JSON answer can encode
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None
    validate_request(req)
    return req


def is_loopback(host: str) -> bool:
    """True for a name or address that only this machine can reach."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name part of a Host header: example.com:8000 -> example.com, [::1]:8000 -> ::1."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class _Guard:
    """ASGI middleware: Host allow-list, bearer token, body limit; all before the app parses a byte.

    DNS rebinding makes a page on evil.example talk to this server with `Host: evil.example`; an IP
    literal in Host means the browser's origin *is* that address, so those pass, as do the names
    in `hosts`. The body is read here (at most max_body bytes, whatever Content-Length claims,
    chunked too, within body_timeout seconds) and replayed to the app; later receive() calls
    (disconnects) go straight through."""

    def __init__(self, app, *, max_body: int, body_timeout: float, hosts: frozenset[str] | None, token: str | None):
        self.app, self.max_body, self.body_timeout, self.hosts, self.token = app, max_body, body_timeout, hosts, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_name(headers.get(b"host", ""))
        if self.hosts is not None and host not in self.hosts and not _is_ip(host):
            return await _reply(send, 400, f"Host {host!r} is not served here: start the server with "
                                           f"--allow-host {host or 'NAME'} if that name is this machine's")
        if self.token is not None and scope["path"] != "/health":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if scope["path"] == "/" and query.get("token"):
                if not self._valid(query["token"][0]):
                    return await _reply(send, 401, "wrong token")
                # trade the token in the address bar for a cookie the page's requests carry
                cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                return await _reply(send, 303, "see /", [(b"location", b"/"), (b"set-cookie", cookie.encode())])
            if not self._authorized(headers):
                return await _reply(send, 401, "a token is required: send 'Authorization: Bearer TOKEN', or "
                                               "open /?token=TOKEN in the browser", [(b"www-authenticate", b"Bearer")])
        if scope["method"] == "POST":
            refusal = self._post_refusal(headers)
            if refusal is not None:
                return await _reply(send, *refusal)
        announced = headers.get(b"content-length")
        if announced is not None and (not announced.strip().isdigit() or int(announced) > self.max_body):
            return await _reply(send, 413, f"request body over {self.max_body} bytes", [(b"connection", b"close")])
        body, more = bytearray(), True
        try:
            async with asyncio.timeout(self.body_timeout):  # a body sent a byte at a time holds a connection too
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.max_body:
                        return await _reply(send, 413, f"request body over {self.max_body} bytes",
                                            [(b"connection", b"close")])
        except TimeoutError:
            return await _reply(send, 408, f"the request body did not arrive within {self.body_timeout:g} s",
                                [(b"connection", b"close")])
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _post_refusal(self, headers: dict[bytes, str]) -> tuple[int, str] | None:
        """(status, why) for a POST a browser on another site may have sent, else None."""
        media = headers.get(b"content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            return 415, f"send the body as JSON with 'Content-Type: application/json' (got {media or 'none'!r})"
        origin = headers.get(b"origin")
        if origin is None or self.hosts is None:    # not a browser, or every host allowed
            return None
        _, _, site = origin.strip().lower().partition("://")
        if site and (site == headers.get(b"host", "").strip().lower() or _host_name(site) in self.hosts):
            return None
        return 403, (f"requests from the page at {origin[:100]!r} are not accepted: open the chat from this server, "
                     "or start it with --allow-host NAME for that page's host")

    def _valid(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self.token.encode())

    def _authorized(self, headers: dict[bytes, str]) -> bool:
        scheme, _, value = headers.get(b"authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._valid(value.strip()):
            return True
        for part in headers.get(b"cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == TOKEN_COOKIE and self._valid(value):
                return True
        return False


async def _reply(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------
# Worker pool


@dataclass
class Replica:
    index: int
    engine: Engine
    tokenizer: object
    busy: bool = False
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class Job:
    tokens: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    seed: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    gpu: int | None = None      # the CUDA device serving it (the reference's "gpu" field); None off CUDA


class QueueFull(Exception):
    pass


class WorkerPool:
    """One thread per replica, all pulling from one job queue; admission bounded by max_queue."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.replicas: list[Replica] = []
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.admitted = 0           # being served + waiting
        self.rejected = 0
        self.completed = 0
        self.load_error: str | None = None

    @property
    def ready(self) -> bool:
        return bool(self.replicas) and self.load_error is None

    def add(self, engine: Engine, tokenizer) -> None:
        replica = Replica(index=len(self.replicas), engine=engine, tokenizer=tokenizer)
        thread = threading.Thread(target=self._work, args=(replica,), daemon=True,
                                  name=f"nanorun-web-worker-{replica.index}")
        self.replicas.append(replica)
        self.threads.append(thread)
        thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.admitted >= len(self.replicas) + self.max_queue:
                self.rejected += 1
                raise QueueFull
            self.admitted += 1
        self.jobs.put(job)

    def stats(self) -> dict:
        with self.lock:
            busy = sum(r.busy for r in self.replicas)
            waiting = self.admitted - busy
        return {"busy": busy, "available": len(self.replicas) - busy, "waiting": max(0, waiting)}

    def close(self, timeout: float = 10.0) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join(timeout)

    def _work(self, replica: Replica) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                if not job.cancelled.is_set():
                    with self.lock:
                        replica.busy = True
                    device = replica.engine.device
                    job.gpu = (device.index or 0) if device.type == "cuda" else None
                    self._generate(replica, job)
            finally:
                with self.lock:
                    replica.busy = False
                    self.admitted -= 1
                    self.completed += 1

    def _generate(self, replica: Replica, job: Job) -> None:
        def emit(kind: str, value=None) -> bool:
            try:
                job.loop.call_soon_threadsafe(job.events.put_nowait, (kind, value))
                return True
            except RuntimeError:    # the event loop is gone (server shutting down)
                job.cancelled.set()
                return False

        engine, t0, n = replica.engine, time.perf_counter(), 0
        streamer = TextStreamer(replica.tokenizer)
        try:
            for column, _ in engine.generate(job.tokens, num_samples=1, max_tokens=job.max_tokens,
                                             temperature=job.temperature, top_k=job.top_k, seed=job.seed):
                if job.cancelled.is_set():
                    break
                token = column[0]
                if token in engine.stop_tokens:
                    break
                n += 1
                text = streamer.put(token)
                if text and not emit("token", text):
                    break
            # Like the reference, an incomplete character at the very end is dropped.
            tail = streamer.flush().rstrip("\ufffd")
            if tail and not job.cancelled.is_set():
                emit("token", tail)
        except Exception as e:  # report it to the client, keep the worker alive
            log.exception("generation failed")
            emit("error", f"generation failed: {type(e).__name__}: {e}")
        finally:
            with self.lock:
                replica.requests += 1
                replica.tokens += n
                replica.seconds += time.perf_counter() - t0
            emit("done")


# --------------------------------------------------------------------------------------------
# The app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(load_engine: Callable[[], tuple[Engine, object]] | list[tuple[Engine, object]], *,
               model_name: str, num_workers: int = 1, max_queue: int = 8,
               temperature: float = 0.8, top_k: int = 50, max_tokens: int = 512, max_body: int = MAX_BODY,
               body_timeout: float = BODY_TIMEOUT,
               allowed_hosts: Iterable[str] = (), token: str | None = None, docs: bool = False) -> FastAPI:
    """The chat app. temperature/top_k/max_tokens are the defaults when a request omits them.

    allowed_hosts: Host names served besides loopback names and IP literals ("*": any). token: if
    set, every request but /health must carry it. docs: serve /docs and /openapi.json."""
    if not callable(load_engine):
        replicas = list(load_engine)
        if not replicas:
            raise ValueError("create_app: the list of replicas is empty: pass at least one (engine, tokenizer)")
        num_workers = len(replicas)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    if max_body < 1:
        raise ValueError(f"max_body must be >= 1 byte, got {max_body}")
    if not body_timeout > 0:
        raise ValueError(f"body_timeout must be > 0 seconds, got {body_timeout}")
    if token is not None and not token.strip():
        raise ValueError("token is empty: pass None for no token")
    hosts = {_host_name(h) if h.startswith("[") else h.lower() for h in allowed_hosts}
    pool = WorkerPool(max_queue)

    def load_all() -> None:
        try:
            if callable(load_engine):
                for _ in range(num_workers):
                    pool.add(*load_engine())
            else:
                for engine, tokenizer in replicas:
                    pool.add(engine, tokenizer)
            log.info("%s: %d worker(s) ready", model_name, len(pool.replicas))
        except Exception as e:
            log.exception("loading the model failed")
            pool.load_error = f"{type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=load_all, name="nanorun-web-loader", daemon=True)
        loader.start()
        if not callable(load_engine):
            loader.join()
        try:
            yield
        finally:
            loader.join(timeout=60)
            await asyncio.to_thread(pool.close)

    app = FastAPI(title=f"nanorun chat: {model_name}", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if docs else None)
    app.add_middleware(_Guard, max_body=max_body, body_timeout=body_timeout, token=token,
                       hosts=None if "*" in hosts else frozenset({*LOOPBACK_NAMES, *hosts}))
    app.state.pool = pool
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    page = page.replace("{{MODEL_NAME}}", html.escape(model_name))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        s = pool.stats()
        with pool.lock:
            devices = [str(r.engine.device) for r in pool.replicas]
        return {"status": "ok" if pool.load_error is None else "error", "ready": pool.ready, "model": model_name,
                "num_gpus": len({d for d in devices if d.startswith("cuda")}), "workers": len(devices),
                "devices": devices, "available_workers": s["available"],
                "queued": s["waiting"], "max_queue": max_queue, "error": pool.load_error}

    @app.get("/stats")
    async def stats():
        s = pool.stats()
        with pool.lock:
            workers = [{"gpu_id": r.index, "device": str(r.engine.device), "busy": r.busy,
                        "requests": r.requests, "tokens": r.tokens,
                        "tokens_per_second": round(r.tokens / r.seconds, 2) if r.seconds else 0.0}
                       for r in pool.replicas]
        return {"model": model_name, "total_workers": len(pool.replicas), "available_workers": s["available"],
                "busy_workers": s["busy"], "queued": s["waiting"], "max_queue": max_queue,
                "completed": pool.completed, "rejected": pool.rejected, "workers": workers}

    # The body is parsed by parse_request (bounded) rather than by FastAPI; /docs shows its schema.
    schema = ChatRequest.model_json_schema()
    schema["properties"]["messages"]["items"] = schema.pop("$defs")["ChatMessage"]  # inline: one small model

    @app.post("/chat/completions", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema}}}})
    async def chat_completions(request: Request):
        req = parse_request(await request.body())
        if not pool.ready:
            why = pool.load_error or "the model is still loading, retry in a moment"
            return JSONResponse({"detail": f"not ready: {why}"}, status_code=503, headers={"Retry-After": "5"})
        replica = pool.replicas[0]
        try:
            tokens = render_chat(replica.tokenizer, [m.model_dump() for m in req.messages])
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        context = replica.engine.max_context
        if len(tokens) >= context:
            raise HTTPException(status_code=422, detail=(
                f"the conversation is {len(tokens)} tokens but the model attends over at most {context}: "
                "start a new chat or shorten it"))
        wanted = req.max_tokens if req.max_tokens is not None else max_tokens
        job = Job(tokens=tokens, max_tokens=min(wanted, context - len(tokens)),
                  temperature=req.temperature if req.temperature is not None else temperature,
                  top_k=req.top_k if req.top_k is not None else top_k,
                  seed=req.seed if req.seed is not None else random.randint(0, 2**31 - 1),
                  loop=asyncio.get_running_loop())
        try:
            pool.submit(job)
        except QueueFull:
            return JSONResponse({"detail": f"server busy: {len(pool.replicas)} worker(s) generating and "
                                           f"{max_queue} request(s) waiting; retry shortly"},
                                status_code=503, headers={"Retry-After": "2"})

        async def stream():
            try:
                while True:
                    kind, value = await job.events.get()
                    if kind == "token":
                        yield _sse({"token": value, "gpu": job.gpu})
                    elif kind == "error":
                        yield _sse({"error": value})
                    else:
                        break
                yield _sse({"done": True})
            finally:
                job.cancelled.set()     # a disconnect lands here too: the worker stops at the next token

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app

