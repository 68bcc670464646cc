"""Web chat: a FastAPI app (one page + a streaming API) over a pool of model replicas.

    from core.web import create_app, serve
    app = create_app(load_engine, model_name="d20 sft", num_workers=1, max_queue=8)
    serve(app, host="127.0.0.1", port=8000)          # then open http://127.0.0.1:8000/

`load_engine() -> (Engine, Tokenizer)` is called once per worker, in a background thread at
start-up (so /health answers while a large model loads); or pass the replicas ready-made as a
list of (Engine, Tokenizer), one per device. The `nanorun serve` CLI builds these from an artifact.

Endpoints (the reference's API, so its clients work unchanged):
  GET  /                   the chat page (core/static/)
  POST /chat/completions   {messages: [{role, content}], temperature?, top_k?, max_tokens?, seed?}
                           -> text/event-stream: `data: {"token": "...", "gpu": worker}` ...
                              `data: {"done": true}`  (an `{"error": ...}` event precedes done
                              if generation fails)
  GET  /health             {"status", "ready", "model", "num_gpus", "available_workers", ...}
  GET  /stats              per-worker counters, queue length, rejected requests

Concurrency: generation runs on one thread per replica, never on the event loop. Requests wait in
a bounded queue (max_queue beyond the requests being served); when it is full the answer is 503
at once, so a busy server says so instead of piling up work. A client that disconnects (the
page's stop button aborts the fetch) cancels its job: the worker stops at the next token and
takes the next request. Limits as the reference, but answered 422 (not 400) with a message that
says which limit was hit.
"""
from __future__ import annotations

import asyncio
import html
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

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
ROLES = ("user", "assistant", "system")


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
        if len(m.content) > MAX_MESSAGE_CHARS:
            bad(f"message {i} is too long: {len(m.content)} characters, at most {MAX_MESSAGE_CHARS}")
        total += len(m.content)
    if total > MAX_TOTAL_CHARS:
        bad(f"conversation is too long: {total} characters, at most {MAX_TOTAL_CHARS} in total")
    for name, value, (lo, hi) in (("temperature", req.temperature, TEMPERATURE_RANGE),
                                  ("top_k", req.top_k, TOP_K_RANGE),
                                  ("max_tokens", req.max_tokens, MAX_TOKENS_RANGE)):
        if value is not None and not lo <= value <= hi:
            bad(f"{name} must be between {lo} and {hi}, got {value}")


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
    worker: int = -1            # the replica serving it (the reference's "gpu" field)


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
                    job.worker = replica.index
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
               temperature: float = 0.8, top_k: int = 50, max_tokens: int = 512) -> FastAPI:
    """The chat app. temperature/top_k/max_tokens are the defaults when a request omits them."""
    if not callable(load_engine):
        replicas = list(load_engine)
        if not replicas:
            raise ValueError("create_app: the list of replicas is empty: pass at least one (engine, tokenizer)")
        num_workers = len(replicas)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
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

    app = FastAPI(title=f"nanorun chat: {model_name}", lifespan=lifespan)
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
        return {"status": "ok" if pool.load_error is None else "error", "ready": pool.ready,
                "model": model_name, "num_gpus": len(pool.replicas), "available_workers": s["available"],
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

    @app.post("/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        validate_request(req)
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
                        yield _sse({"token": value, "gpu": job.worker})
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


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn (blocking). Binds loopback unless a host is given explicitly."""
    import uvicorn

    print(f"nanorun chat on http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
