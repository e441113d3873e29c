"""The admin page's HTTP: requests over TLS only, GET and form POSTs, with firm limits.

The web program's other listener (web/server.py) serves GET alone; the admin
page needs forms, so it has this small server of its own on `[web] admin`:
TLS on every connection (a plain-text request gets no answer but the closed
connection), one request per connection, a request head of at most 8 KiB, a
form body of at most 64 KiB (a larger Content-Length gets 413 unread), a
timeout for the whole request, and forms that must be
`application/x-www-form-urlencoded` UTF-8 with each field once.  Handlers run
in a thread (they hash passwords, ask the database and DNS), so a slow one
holds no other request.  Every answer forbids caching and framing and loads
nothing from elsewhere (Content-Security-Policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("web.admin")

MAX_HEAD = 8192
MAX_BODY = 64 * 1024
MAX_DISCARD = 1024 * 1024  # a larger form than MAX_BODY, up to this, is read (and dropped) before the 413
MAX_FIELDS = 50
TIMEOUT = 15.0

SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("Strict-Transport-Security", "max-age=31536000"),
]


class BadRequest(Exception):
    """The request itself is wrong: answered with its status and text, nothing done."""

    def __init__(self, status: HTTPStatus, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    cookies: dict[str, str]
    form: dict[str, str]
    client: str

    def field(self, name: str, limit: int, *, required: bool = True) -> str:
        """A form field: BadRequest (400) when missing or longer than `limit` characters."""
        value = self.form.get(name)
        if value is None or (required and not value.strip()):
            if required:
                raise BadRequest(HTTPStatus.BAD_REQUEST, f"the form lacks {name}")
            return ""
        if len(value) > limit:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"{name} is too long (at most {limit} characters)")
        return value


@dataclass
class Response:
    status: HTTPStatus
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Response]


def redirect(location: str, *headers: tuple[str, str]) -> Response:
    return Response(HTTPStatus.SEE_OTHER, b"", headers=[("Location", location), *headers])


def _parse(head: bytes, body: bytes, client: str) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "bad header line")
        headers[name.strip().lower()] = value.strip()
    url = urlsplit(parts[1])
    query = {k: v[0] for k, v in parse_qs(url.query, max_num_fields=MAX_FIELDS).items()}
    cookies: dict[str, str] = {}
    for part in headers.get("cookie", "").split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k not in cookies:
            cookies[k] = v
    form: dict[str, str] = {}
    if parts[0] == "POST":
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
            raise BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "forms only (application/x-www-form-urlencoded)")
        try:
            text = body.decode("utf-8")
            fields = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=MAX_FIELDS,
                              errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the form is not valid UTF-8 form data") from None
        for k, values in fields.items():
            if len(values) != 1:
                raise BadRequest(HTTPStatus.BAD_REQUEST, f"{k[:40]} is given more than once")
            form[k] = values[0]
    return Request(parts[0], url.path, query, headers, cookies, form, client)


async def _read(reader: asyncio.StreamReader, client: str) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large") from None
    head = head[:-4]
    length_text = ""
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            length_text = line.split(b":", 1)[1].strip().decode("latin-1")
        if line.lower().startswith(b"transfer-encoding:"):
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "send the form with a Content-Length")
    body = b""
    if length_text:
        if not length_text.isascii() or not length_text.isdigit():
            raise BadRequest(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        length = int(length_text)
        if length > MAX_BODY:
            if length <= MAX_DISCARD:
                # Read and thrown away, so the client is reading when the answer comes (a close with
                # its bytes unread would reset the connection before it sees the 413).
                await reader.readexactly(length)
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the form is larger than {MAX_BODY} bytes")
        body = await reader.readexactly(length)
    return _parse(head, body, client)


def encode(response: Response, *, head_only: bool = False) -> bytes:
    status = response.status
    lines = [f"HTTP/1.1 {status.value} {status.phrase}", f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}", "Connection: close",
             *(f"{k}: {v}" for k, v in SECURITY_HEADERS + response.headers)]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


async def handle(respond: Callable[[Request], Response], error_page: Callable[[HTTPStatus, str], Response],
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    client = str(peer[0]) if isinstance(peer, tuple) else "local"
    method = ""
    try:
        try:
            request = await asyncio.wait_for(_read(reader, client), TIMEOUT)
            method = request.method
            response = await asyncio.to_thread(respond, request)
        except BadRequest as exc:
            response = error_page(exc.status, exc.text)
        except (asyncio.IncompleteReadError, TimeoutError, ValueError):
            response = error_page(HTTPStatus.BAD_REQUEST, "bad request")
        except Exception:
            log.exception("error answering a request")
            response = error_page(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        writer.write(encode(response, head_only=method == "HEAD"))
        await writer.drain()
        log.info("admin %s %s %d", method or "-", response.status.value, len(response.body))
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)


async def serve(sock: socket.socket, tls: ssl.SSLContext, respond: Callable[[Request], Response],
                error_page: Callable[[HTTPStatus, str], Response]) -> asyncio.Server:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle(respond, error_page, reader, writer)

    return await asyncio.start_server(client, sock=sock, limit=MAX_HEAD, ssl=tls, ssl_handshake_timeout=TIMEOUT)
