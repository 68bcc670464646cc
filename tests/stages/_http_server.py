"""A threaded HTTP file server on 127.0.0.1 with Range support and fault injection, for fetch tests.

    with FileServer({"/a.parquet": data}) as srv:
        srv.drop["/a.parquet"] = [1000]        # next GET: send 1000 body bytes, then cut the connection
        srv.corrupt["/a.parquet"] = 2          # next 2 GETs: same length, garbage bytes
        srv.status["/a.parquet"] = [503]       # next GET: 503
        fetch(srv.url("/a.parquet"), dest)
        srv.requests                           # [(method, path, Range header or None), ...]
"""
from __future__ import annotations

import http.server
import re
import threading


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        srv: FileServer = self.server.owner
        path = self.path
        rng = self.headers.get("Range")
        with srv.lock:
            srv.requests.append((self.command, path, rng))
            data = srv.files.get(path)
            status = srv.status.get(path, []).pop(0) if srv.status.get(path) else None
            drop = srv.drop.get(path, []).pop(0) if body and srv.drop.get(path) else None
            corrupt = body and srv.corrupt.get(path, 0) > 0
            if corrupt:
                srv.corrupt[path] -= 1
            extra = dict(srv.headers.get(path, {}))
        if status is not None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if corrupt:
            data = bytes((b * 7 + 13) % 256 for b in data[:4096]) + data[4096:][::-1]
        start, end = 0, len(data) - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else end
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        chunk = data[start:end + 1]
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Accept-Ranges", "bytes")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if not body:
            return
        if drop is not None:
            self.wfile.write(chunk[:drop])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the client sees the body end early
            return
        self.wfile.write(chunk)


class FileServer:
    def __init__(self, files: dict[str, bytes] | None = None):
        self.files = dict(files or {})
        self.requests: list[tuple[str, str, str | None]] = []
        self.status: dict[str, list[int]] = {}
        self.drop: dict[str, list[int]] = {}
        self.corrupt: dict[str, int] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def gets(self, path: str | None = None) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and (path is None or r[1] == path)]

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
