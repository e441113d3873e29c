"""An HTTPS front for pebble that answers chosen requests itself: the ACME server's errors and 429s.

Pebble does not rate-limit and does not fail on purpose, so a test that needs
an ACME server saying "429, come back in 3 seconds" or "500" puts this in
front of it: every request goes on to the real pebble unchanged (Host
included, so pebble writes this front's address into every URL it hands out
and the client keeps talking through it), except those a `Fault` matches,
which get the fault's answer instead.  `requests` records every request (time,
method, path, status) so a test can see when the client came back.

Its certificate is signed by the same test CA as pebble's HTTPS, so the
client trusts both through one `[acme] directory_ca_file`.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self

from tests.support.pebble import Pebble, issue
from tests.support.ports import free_port


@dataclass
class Fault:
    """Answer requests whose path contains `path` (and of `method`, if given) with `status`,
    `times` times (then pass them on).  `problem`: an RFC 7807 problem type name
    (rateLimited, serverInternal...) sent as application/problem+json; None: an HTML page,
    as a proxy in front of a broken server would send."""

    path: str
    status: int
    times: int = 1
    method: str = ""
    problem: str | None = None
    retry_after: str | None = None
    detail: str = "injected by the test"
    used: int = 0


@dataclass
class Seen:
    time: float
    method: str
    path: str
    status: int
    faulty: bool


@dataclass
class _State:
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultyACME:
    def __init__(self, pebble: Pebble, faults: list[Fault]) -> None:
        self.pebble = pebble
        self.state = _State(faults=faults)
        cert, key = issue(pebble.dir, "front", (pebble.ca_file, pebble.ca_key), ["127.0.0.1", "localhost"])
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        upstream = ssl.create_default_context(cafile=str(pebble.ca_file))
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(self.state, pebble.port, upstream))
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def requests(self) -> list[Seen]:
        with self.state.lock:
            return list(self.state.seen)

    def start(self) -> Self:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _handler(state: _State, pebble_port: int, upstream: ssl.SSLContext) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            fault = self._fault()
            if fault is not None:
                self._answer_fault(fault)
                return
            conn = http.client.HTTPSConnection("127.0.0.1", pebble_port, context=upstream, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                self._note(r.status, False)
            finally:
                conn.close()

        def _fault(self) -> Fault | None:
            with state.lock:
                for f in state.faults:
                    if f.path in self.path and (not f.method or f.method == self.command) and f.used < f.times:
                        f.used += 1
                        return f
            return None

        def _answer_fault(self, f: Fault) -> None:
            if f.problem is not None:
                body = json.dumps({"type": f"urn:ietf:params:acme:error:{f.problem}", "detail": f.detail,
                                   "status": f.status}).encode()
                kind = "application/problem+json"
            else:
                body = b"<html><body><h1>Service Unavailable</h1></body></html>"
                kind = "text/html"
            self.send_response(f.status)
            self.send_header("Content-Type", kind)
            if f.retry_after is not None:
                self.send_header("Retry-After", f.retry_after)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self._note(f.status, True)

        def _note(self, status: int, faulty: bool) -> None:
            with state.lock:
                state.seen.append(Seen(time.monotonic(), self.command, self.path, status, faulty))

        do_GET = do_POST = do_HEAD = _any

    return Handler
