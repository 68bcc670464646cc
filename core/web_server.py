"""Serving the chat app (core/web.py) with uvicorn, bounded against hostile clients.

    from core.web_server import serve, make_server
    serve(app, host="127.0.0.1", port=8000)                 # blocking; what `nanorun serve` runs
    server = make_server(app, host="127.0.0.1", port=8000)  # a uvicorn.Server: server.run() / server.serve()

uvicorn (h11 protocol) on its own leaves three doors open (docs/serving.md has the measurements):
  - A connection that never finishes its request headers is never closed: its keep-alive timeout
    only runs between requests (slowloris). Here a connection whose request headers are not complete
    header_timeout seconds after it began waiting for them (at connect, and after each response) is
    closed.
  - Connections are not capped. At RLIMIT_NOFILE, accept() fails with EMFILE and asyncio logs a
    traceback for every failed accept. Here a connection beyond max_connections is answered 503 at
    once and closed (a client that already sent its request may see a reset instead: the kernel
    resets a connection closed with bytes unread), and the cap is kept below the soft descriptor
    limit, with room for the files the process already holds and for the sockets asyncio accepts
    before the protocol sees them (up to `backlog` per loop iteration, and a socket reaches the
    protocol two iterations after its accept: 2,000 connects at once peaked at cap + 256 with a
    backlog of 128), so the listen backlog is kept small as well.
    uvicorn's limit_concurrency is not used: it answers 503 only after reading a request's headers,
    so it does not bound connections that send none, and it logs once per request.
  - Logs: each of these conditions (and an accept() that still runs out of descriptors, and
    uvicorn's own per-connection warnings such as "Invalid HTTP request received.") is one warning
    when it first happens, then at most one line per NOTICE_EVERY seconds with a count.
Request headers are capped by h11 at MAX_HEADER_BYTES (larger is 400); bodies and everything after
the headers are the app's business (core/web.py's _Guard).
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("nanorun.web")

MAX_CONNECTIONS = 1000      # open client connections; more are 503 at connect
HEADER_TIMEOUT = 10.0       # seconds a client has to send a request's complete headers
KEEP_ALIVE = 5              # seconds an idle keep-alive connection stays open (uvicorn's default)
BACKLOG = 128               # listen backlog, and so the most sockets one accept burst can open
ACCEPT_SLACK = 4 * BACKLOG  # descriptors kept for accepted sockets not yet counted (measured: 2 bursts)
MAX_HEADER_BYTES = 16 << 10  # h11's buffer for an incomplete request line + headers
FD_HEADROOM = 64            # descriptors kept free beyond those open at start (logs, store, model files)
NOTICE_EVERY = 60.0         # seconds between two log lines about the same condition
_BUSY_BODY = b'{"detail": "too many connections: retry in a moment"}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
         b"retry-after: 5\r\nconnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class Notices:
    """One log line per condition: the first event of a kind is logged at once, later ones are
    counted and reported at most once per `every` seconds (the count since the previous line)."""

    def __init__(self, every: float = NOTICE_EVERY):
        self.every = every
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def note(self, kind: str, message: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = time.monotonic()
        if kind in self.last and now - self.last[kind] < self.every:
            return
        first = kind not in self.last
        self.last[kind] = now
        count, self.counts[kind] = self.counts[kind], 0
        if first:
            log.warning("%s (more of these: one line per %.0f s)", message, self.every)
        else:
            log.warning("%s (%d time(s) since the last such line)", message, count)


def connection_cap(wanted: int) -> int:
    """`wanted`, lowered so that the connections, the accepts in flight and the descriptors this
    process already holds stay below the soft RLIMIT_NOFILE (accept() never sees EMFILE)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:     # not Linux: assume a process's usual few dozen
        open_now = 64
    reserved = open_now + FD_HEADROOM + ACCEPT_SLACK
    room = (reserved + wanted if soft == resource.RLIM_INFINITY else soft) - reserved
    if room < 1:
        raise ValueError(f"the descriptor limit (ulimit -n {soft}) leaves no room for client connections: "
                         f"raise it above {reserved}")
    return min(wanted, room)


class _CountedWarnings(logging.LoggerAdapter):
    """uvicorn's per-connection logger with its warnings ("Invalid HTTP request received.", one per
    garbage-sending connection) turned into notices; errors and tracing pass through."""

    def __init__(self, logger: logging.Logger, notices: Notices):
        super().__init__(logger, {})
        self.notices, self.level = notices, logger.level   # uvicorn reads .level to decide on tracing

    def warning(self, msg, *args, **kwargs) -> None:
        text = msg % args if args else str(msg)
        self.notices.note(text, f"uvicorn: {text}")


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a connection cap and a deadline for request headers.

    The class attributes are set per server by make_server (uvicorn instantiates the class itself)."""

    max_connections: int
    header_timeout: float
    notices: Notices
    _header_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logger = _CountedWarnings(self.logger, self.notices)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:   # self included
            self.notices.note("cap", f"{self.max_connections} connections open: refusing more with 503")
            transport.write(_BUSY)
            transport.close()
            return
        self._await_headers()

    def _await_headers(self) -> None:
        self._stop_waiting()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _stop_waiting(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.notices.note("slow", f"closed a connection that sent no complete request headers within "
                                      f"{self.header_timeout:g} s")
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:   # a request's headers are in (or the connection is done)
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_headers()   # the next request on this keep-alive connection gets the same deadline

    def connection_lost(self, exc) -> None:
        self._stop_waiting()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    """uvicorn.Server whose event loop reports an accept() out of descriptors as one line, not a
    traceback per attempt (asyncio retries every second while it lasts)."""

    notices: Notices
    loop: asyncio.AbstractEventLoop | None = None   # the loop it serves on, once started

    async def startup(self, sockets=None) -> None:
        self.loop = loop = asyncio.get_running_loop()
        default = loop.get_exception_handler()

        def handler(loop, context) -> None:
            if context.get("message", "").startswith("socket.accept() out of system resource"):
                self.notices.note("accept", f"accept() failed: {context.get('exception')} (out of descriptors)")
            elif default is not None:
                default(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        await super().startup(sockets)


def make_server(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
                max_connections: int = MAX_CONNECTIONS, header_timeout: float = HEADER_TIMEOUT,
                keep_alive: int = KEEP_ALIVE) -> uvicorn.Server:
    """A uvicorn.Server for `app` with the bounds above (max_connections is lowered by connection_cap)."""
    if max_connections < 1 or header_timeout <= 0 or keep_alive < 1:
        raise ValueError(f"max_connections {max_connections} (>= 1), header_timeout {header_timeout} (> 0) and "
                         f"keep_alive {keep_alive} (>= 1): one of them is out of range")
    notices = Notices()
    protocol = type("BoundedH11Protocol", (_Protocol,), {
        "max_connections": connection_cap(max_connections), "header_timeout": header_timeout, "notices": notices})
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol, backlog=BACKLOG,
                            timeout_keep_alive=keep_alive, h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    server = _Server(config)
    server.notices = notices
    return server


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", token: bool = False,
          max_connections: int = MAX_CONNECTIONS) -> None:
    """Run the app (blocking). Binds loopback unless a host is given explicitly."""
    server = make_server(app, host, port, log_level=log_level, max_connections=max_connections)
    where = f"[{host}]" if ":" in host else host
    print(f"nanorun chat on http://{where}:{port}/{'?token=TOKEN' if token else ''}  (Ctrl-C to stop)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:   # uvicorn shuts down gracefully, then re-raises the Ctrl-C it caught
        pass
