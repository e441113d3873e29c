"""A small HTTPS server for tests: MTA-STS policy hosts and TLS-RPT report endpoints.

Python's http.server in a thread, with TLS from a certificate the test made
(tests/support/pki.py), on a loopback address and port of the test's
choosing.  One server can stand for many host names: it answers by the Host
header.  `pages[(host, path)]` is a `Page`: status, media type, body, and how
to misbehave (answer slowly, one byte at a time; redirect).  `tls=False` makes
it speak plain HTTP where HTTPS is expected.  Every request is kept in
`requests` (method, host, path, body), so a test sees what was fetched or
POSTed.
"""

from __future__ import annotations

import http.server
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


@dataclass
class Page:
    body: bytes = b""
    status: int = 200
    media_type: str = "text/plain"
    dribble: float = 0.0  # seconds between bytes of the body (a slow host)
    location: str = ""  # for a redirect


class HTTPSHost:
    def __init__(self, address: str, port: int, cert: Path | None, key: Path | None, *, tls: bool = True) -> None:
        self.address = address
        self.port = port
        self.pages: dict[tuple[str, str], Page] = {}
        self.requests: list[tuple[str, str, str, bytes]] = []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass

            def _answer(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                name = (self.headers.get("Host") or "").split(":")[0]
                host.requests.append((method, name, self.path, body))
                page = host.pages.get((name, self.path))
                if page is None:
                    page = Page(b"not here\n", 404) if method == "GET" else Page(b"", 204)
                self.send_response(page.status)
                self.send_header("Content-Type", page.media_type)
                self.send_header("Content-Length", str(len(page.body)))
                self.send_header("Connection", "close")
                if page.location:
                    self.send_header("Location", page.location)
                self.end_headers()
                if page.dribble:
                    try:
                        for i in range(len(page.body)):
                            self.wfile.write(page.body[i:i + 1])
                            self.wfile.flush()
                            time.sleep(page.dribble)
                    except OSError:
                        return  # the client gave up on the slow page, as it should: no traceback
                else:
                    self.wfile.write(page.body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._answer("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._answer("POST")

        self.server = http.server.ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True
        if tls:
            assert cert is not None and key is not None
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(cert), str(key))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HTTPSHost:
        self.thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def fetched(self, host: str) -> int:
        """How many GETs of the policy file of `host` (mta-sts.DOMAIN) arrived."""
        return sum(1 for m, h, p, _ in self.requests if m == "GET" and h == host)
