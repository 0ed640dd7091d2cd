"""A misbehaving web server on 127.0.0.1 for the fetch tests: what a real crawl of CC3M/LAION URLs meets.

Paths: ``/img/NAME`` (a good image, keep-alive), ``/early-close/NAME`` (promises more bytes than it sends,
then closes: ``IncompleteRead``), ``/banner/NAME`` (answers with an SSH banner: ``BadStatusLine``),
``/drip/NAME`` (one byte every ``drip_interval`` s), ``/huge/NAME`` (``huge_bytes`` of body, no
Content-Length, streamed), ``/huge-declared/NAME`` (Content-Length of 1 GB), ``/noai/NAME`` (a good image
with ``X-Robots-Tag: noai``), ``/flaky/NAME`` (503 on the first request for NAME, then the image);
anything else is a 404. ``WebServer.log`` records what each request did (for assertions).
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class WebServer:
    url: str
    files: dict[str, bytes]
    drip_interval: float = 0.4
    huge_bytes: int = 600 * 1024 * 1024
    log: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    flaky_seen: set[str] = field(default_factory=set)

    def record(self, **kw: object) -> None:
        with self.lock:
            self.log.append(kw)

    def requests(self, kind: str) -> list[dict]:
        with self.lock:
            return [r for r in self.log if r["kind"] == kind]


def _handler(state: WebServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: lets the client reuse connections

        def log_message(self, *args: object) -> None:
            pass

        def handle(self) -> None:
            try:
                super().handle()
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass  # the client gave up (deadlines, size caps)

        def _image(self, name: str, extra: dict[str, str] | None = None) -> None:
            body = state.files[name]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            _, kind, name = (self.path.split("/", 2) + ["", ""])[:3]
            t0 = time.monotonic()
            port = self.client_address[1]
            if kind == "img" and name in state.files:
                state.record(kind=kind, name=name, port=port)
                self._image(name)
            elif kind == "noai" and name in state.files:
                state.record(kind=kind, name=name, port=port)
                self._image(name, {"X-Robots-Tag": "noai"})
            elif kind == "flaky" and name in state.files:
                first = name not in state.flaky_seen
                state.flaky_seen.add(name)
                state.record(kind=kind, name=name, port=port, status=503 if first else 200)
                if first:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._image(name)
            elif kind == "early-close":
                state.record(kind=kind, name=name, port=port)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "5000")
                self.end_headers()
                self.wfile.write(b"\xff\xd8\xff\xe0" + b"\0" * 96)
                self.wfile.flush()
                self.close_connection = True
            elif kind == "banner":
                state.record(kind=kind, name=name, port=port)
                self.wfile.write(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n")
                self.wfile.flush()
                self.close_connection = True
            elif kind == "drip":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.close_connection = True
                sent = 0
                try:
                    while sent < 100000 and time.monotonic() - t0 < 60:
                        self.wfile.write(b"\xff")
                        self.wfile.flush()
                        sent += 1
                        time.sleep(state.drip_interval)
                except OSError:
                    pass
                state.record(kind=kind, name=name, port=port, seconds=time.monotonic() - t0, sent=sent)
            elif kind == "huge":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Connection", "close")  # no Content-Length: the body ends when we close
                self.end_headers()
                self.close_connection = True
                block = b"\xab" * (1 << 20)
                sent = 0
                try:
                    while sent < state.huge_bytes:
                        self.wfile.write(block)
                        sent += len(block)
                except OSError:
                    pass
                state.record(kind=kind, name=name, port=port, sent=sent)
            elif kind == "huge-declared":
                state.record(kind=kind, name=name, port=port)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
                self.close_connection = True
                try:
                    self.wfile.write(b"\0" * 65536)
                except OSError:
                    pass
            else:
                state.record(kind="404", name=self.path, port=port)
                self.send_error(404)

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 64  # http.server's 5 drops SYNs under a burst of connects (1 s retransmits)
    daemon_threads = True


@contextmanager
def web_server(files: dict[str, bytes], **kw: object) -> Iterator[WebServer]:
    """A threaded server on 127.0.0.1 (a free port) serving ``files`` under the paths above."""
    srv = _Server(("127.0.0.1", 0), None)  # type: ignore[arg-type]
    state = WebServer(f"http://127.0.0.1:{srv.server_address[1]}", files, **kw)  # type: ignore[arg-type]
    srv.RequestHandlerClass = _handler(state)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield state
    finally:
        srv.shutdown()
        srv.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/x.jpg"
