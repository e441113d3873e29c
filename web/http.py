"""HTTP/1.1 as the web program speaks it: the request, the response, and one exchange.

Deliberately tiny: GET and HEAD (and POST, with a small body, where a client
must: Outlook's Autodiscover), one request per connection, a size limit on the
request head and body and a timeout, so a slow or hostile client costs little.
Handlers are plain functions run in a thread (they query the database); one
that streams (Server-Sent Events) returns a `Response` with `stream` set.
The listeners that use it: web/server.py (plain HTTP, the live page), and
web/public.py (the Internet's port 80 and 443).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from common.config import Config

log = logging.getLogger("web")

MAX_HEAD = 8192  # bytes of request line and headers
TIMEOUT = 10.0  # seconds to send the request head


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    body: bytes = b""  # a POST's (POST_ROUTES only, at most MAX_BODY)


@dataclass(frozen=True)
class Response:
    status: HTTPStatus
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    # Set for a stream: the body is what it yields, sent as it comes, until it ends
    # or the client goes away (no Content-Length: the connection's end ends it).
    stream: Callable[[], AsyncGenerator[bytes, None]] | None = None


Handler = Callable[[Config, Request], Response]


# Paths that also take POST (with a body of at most MAX_BODY bytes): Outlook POSTs its request.
POST_ROUTES = frozenset({"/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml"})
MAX_BODY = 16 * 1024


def parse_head(head: bytes) -> Request:
    """Request line and headers (ValueError if they are not HTTP/1.x)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError("bad header line")
        headers[name.strip().lower()] = value.strip()
    url = urlsplit(parts[1])
    return Request(parts[0], url.path, parse_qs(url.query), headers)


def respond(cfg: Config, request: Request, routes: Mapping[str, Handler]) -> Response:
    handler = routes.get(request.path)
    if handler is None:
        return Response(HTTPStatus.NOT_FOUND, b"not found\n")
    allowed = ("GET", "HEAD", "POST") if request.path in POST_ROUTES else ("GET", "HEAD")
    if request.method not in allowed:
        return Response(HTTPStatus.METHOD_NOT_ALLOWED, f"{' or '.join(allowed)} only\n".encode(),
                        headers={"Allow": ", ".join(allowed)})
    return handler(cfg, request)


async def read_body(request: Request, reader: asyncio.StreamReader) -> Request | Response:
    """A POST's body (Content-Length, at most MAX_BODY), or the refusal to send instead."""
    if request.method != "POST" or request.path not in POST_ROUTES:
        return request
    length = request.headers.get("content-length", "")
    if not length.isascii() or not length.isdigit():
        return Response(HTTPStatus.LENGTH_REQUIRED, b"Content-Length required\n")
    if int(length) > MAX_BODY:
        return Response(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"request too large\n")
    body = await asyncio.wait_for(reader.readexactly(int(length)), TIMEOUT)
    return dataclasses.replace(request, body=body)


def encode(response: Response, *, head_only: bool = False) -> bytes:
    status = response.status
    length = [] if response.stream is not None else [f"Content-Length: {len(response.body)}"]
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {response.content_type}",
        *length,
        "Connection: close",
        *(f"{k}: {v}" for k, v in response.headers.items()),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


async def handle(
    cfg: Config, routes: Mapping[str, Handler], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    method = ""
    try:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            request = parse_head(head[:-4])
            method = request.method
            got = await read_body(request, reader)
            response = got if isinstance(got, Response) else await asyncio.to_thread(respond, cfg, got, routes)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, ValueError, TimeoutError):
            response = Response(HTTPStatus.BAD_REQUEST, b"bad request\n")
        except Exception:
            log.exception("error answering a request")
            response = Response(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n")
        writer.write(encode(response, head_only=method == "HEAD"))
        await writer.drain()
        if response.stream is not None and method != "HEAD":
            # aclosing: a client that leaves mid-stream still runs the stream's clean-up.
            async with contextlib.aclosing(response.stream()) as chunks:
                async for chunk in chunks:
                    writer.write(chunk)
                    await writer.drain()
        log.info("%s %s %d", method or "-", response.status.value, len(response.body))
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
