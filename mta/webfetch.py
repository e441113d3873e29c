"""One HTTPS request with hard limits: MTA-STS policies (GET) and TLS-RPT reports (POST).

Small on purpose, because what it talks to is chosen by whoever controls a
recipient domain's DNS:

- HTTPS only, the certificate verified for the host name (system CAs, or the
  file given); nothing in clear;
- the address comes from our resolver (the one the queue manager uses for
  everything else), the name goes in SNI and Host;
- one deadline for the whole exchange (connect, TLS, request, every byte of
  the answer), so a server that dribbles a byte a second costs no more than
  a silent one;
- at most `max_size` octets of body (a larger one is refused, not cut), and
  a bounded header;
- no redirects (RFC 8461 3.3: "HTTP 3xx redirects MUST NOT be followed"), no
  cookies, no caching.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

MAX_HEADER = 16 * 1024


class FetchError(Exception):
    """The request failed; the message says why, in words for the log."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; a repeated one keeps the last
    body: bytes = b""

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def request(
    address: str, port: int, host: str, path: str, *, context: ssl.SSLContext, timeout: float, max_size: int,
    method: str = "GET", body: bytes = b"", content_type: str = "",
) -> Response:
    """`method` https://host/path at address:port; raises FetchError."""
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(address, port, host, path, context, max_size, method, body, content_type)
    except TimeoutError:
        raise FetchError(f"no complete answer from https://{host}{path} within {timeout:g} s") from None


async def _exchange(
    address: str, port: int, host: str, path: str, context: ssl.SSLContext, max_size: int,
    method: str, body: bytes, content_type: str,
) -> Response:
    where = f"https://{host}{path} ({address}:{port})"
    try:
        reader, writer = await asyncio.open_connection(address, port, ssl=context, server_hostname=host,
                                                       limit=MAX_HEADER)
    except ssl.SSLCertVerificationError as exc:
        raise CertificateError(f"{where}: certificate not valid: {exc.verify_message}", exc) from exc
    except ssl.SSLError as exc:
        raise FetchError(f"{where}: TLS failed (is it HTTPS at all?): {exc.reason or exc}") from exc
    except OSError as exc:
        raise FetchError(f"{where}: cannot connect: {exc}") from exc
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "User-Agent: Mailroom", "Connection: close"]
        if method == "POST":
            head += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body)
        await writer.drain()
        status, headers = await _read_head(reader, where)
        if 300 <= status < 400:
            raise FetchError(f"{where}: answered {status}, a redirect (not followed, RFC 8461 3.3)")
        return Response(status, headers, await _read_body(reader, headers, max_size, where))
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise FetchError(f"{where}: {type(exc).__name__}: {exc}") from exc
    finally:
        writer.close()


class CertificateError(FetchError):
    """The server's certificate was not valid for its name (for TLS-RPT: sts-webpki-invalid)."""

    def __init__(self, text: str, cause: ssl.SSLCertVerificationError) -> None:
        super().__init__(text)
        self.verify_code = cause.verify_code


async def _read_head(reader: asyncio.StreamReader, where: str) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("iso-8859-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise FetchError(f"{where}: not an HTTP answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], max_size: int, where: str) -> bytes:
    too_big = FetchError(f"{where}: the body is larger than {max_size} octets")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                return bytes(chunks)
            if len(chunks) + size > max_size:
                raise too_big
            chunks += await reader.readexactly(size)
            await reader.readexactly(2)  # the CRLF after the chunk
    if "content-length" in headers:
        length = int(headers["content-length"])
        if length > max_size:
            raise too_big
        return await reader.readexactly(length)
    body = await reader.read(max_size + 1)  # to the end of the connection
    while len(body) <= max_size:
        more = await reader.read(max_size + 1 - len(body))
        if not more:
            return body
        body += more
    raise too_big
