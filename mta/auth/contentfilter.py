"""The content filter on the public listener: rspamd before the 250, DNS blocklists at connect.

rspamd is asked over its HTTP protocol (`POST /checkv2` on its normal worker)
with the message and the envelope; its action becomes our reply:

    reject                      -> 550 5.7.1 (refused, the sender gets a bounce from its own MTA)
    soft reject, greylist       -> 451 4.7.1 (the sender retries)
    add header, rewrite subject -> delivered with X-Spam-Flag: YES and X-Spam-Status: Yes
    no action                   -> delivered with X-Spam-Status: No

When rspamd cannot be asked (down, timeout, nonsense), `[filter] when_down`
decides: `accept_unscanned` delivers with a header saying it was not scanned,
`defer` answers 451 4.7.1.  DNS blocklists (`[filter] dnsbl_zones`) are asked
at connect; a listed client gets 554 5.7.1 before the greeting.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import Any

from common import verdict
from common.config import parse_hostport
from common.dns import DNSTempError, Resolver
from common.reply import Reply

log = logging.getLogger("filter")

# RFC 3463 X.7.1: delivery not authorized, message refused (4.7.1: for now).
SPAM_REJECT = Reply(550, "5.7.1", "Message rejected as spam")
SPAM_SOFT_REJECT = Reply(451, "4.7.1", "Message deferred by the content filter, try again later")
FILTER_DOWN = Reply(451, "4.7.1", "Content filter unavailable, try again later")
# Said instead of the greeting, with 554 as RFC 5321 3.1 allows.
DNSBL_LISTED = Reply(554, "5.7.1", "Client address {ip} is listed at {zone}")
# Headers the filter's verdict is written in: a copy from outside must not survive.
VERDICT_HEADERS = verdict.HEADERS


@dataclass(frozen=True)
class Scan:
    action: str  # rspamd's action, or "" when the filter failed
    score: float = 0.0
    required: float = 0.0
    message: str = ""  # rspamd's smtp_message, for the reply
    error: str = ""


class Rspamd:
    """A client of rspamd's normal worker (HTTP, one request per message)."""

    def __init__(self, where: str, *, timeout: float) -> None:
        self.host, self.port = parse_hostport(where, 11333)
        self.timeout = timeout

    async def scan(
        self, message: bytes, *, client_ip: str, helo: str, mail_from: str,
        recipients: list[str], queue_id: str, hostname: str,
    ) -> Scan:
        headers = [
            ("IP", client_ip), ("Helo", helo), ("From", mail_from or "<>"), ("Queue-Id", queue_id),
            ("MTA-Name", hostname), *[("Rcpt", r) for r in recipients],
        ]
        try:
            status, body = await asyncio.wait_for(self._post("/checkv2", headers, message), self.timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            log.warning("rspamd at %s:%d failed: %s", self.host, self.port, exc or type(exc).__name__)
            return Scan("", error=str(exc) or type(exc).__name__)
        if status != 200:
            return Scan("", error=f"HTTP {status}")
        try:
            data: dict[str, Any] = json.loads(body)
            action = str(data["action"])
        except (ValueError, KeyError, TypeError):
            return Scan("", error="unreadable answer")
        messages = data.get("messages") or {}
        return Scan(
            action, float(data.get("score", 0.0)), float(data.get("required_score", 0.0)),
            str(messages.get("smtp_message", "")) if isinstance(messages, dict) else "",
        )

    async def _post(self, path: str, headers: list[tuple[str, str]], body: bytes) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n"
            for k, v in headers:
                clean = "".join(ch for ch in v if ch not in "\r\n")
                head += f"{k}: {clean}\r\n"
            head += f"Content-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode("utf-8", "replace") + body)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        status_line, _, rest = raw.partition(b"\r\n")
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError("not an HTTP answer")
        _, _, payload = rest.partition(b"\r\n\r\n")
        return int(parts[1]), payload


def decide(scan: Scan, *, when_down: str) -> tuple[Reply | None, bytes]:
    """(a refusal or None, headers to add) for a scan."""
    if not scan.action:
        if when_down == "defer":
            return FILTER_DOWN, b""
        return None, f"X-Mailroom-Filter: unscanned ({_clean(scan.error)})\r\n".encode()
    score = f"score={scan.score:.1f} required={scan.required:.1f}"
    if scan.action == "reject":
        return (SPAM_REJECT.with_text(_clean(scan.message)) if scan.message else SPAM_REJECT), b""
    if scan.action in ("soft reject", "greylist"):
        return (SPAM_SOFT_REJECT.with_text(_clean(scan.message)) if scan.message else SPAM_SOFT_REJECT), b""
    if scan.action in ("add header", "rewrite subject"):
        return None, f"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, {score} action={scan.action}\r\n".encode()
    return None, f"X-Spam-Status: No, {score}\r\n".encode()


def _clean(text: str) -> str:
    return " ".join(text.split())[:200]


def dnsbl_names(ip: str, zones: list[str]) -> list[str]:
    """The names to ask for `ip` in each zone (RFC 5782 2.1, 2.4)."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        rev = ".".join(reversed(str(addr).split(".")))
    else:
        rev = ".".join(reversed(addr.exploded.replace(":", "")))
    return [f"{rev}.{zone.rstrip('.')}" for zone in zones]


async def dnsbl_check(ip: str, zones: list[str], resolver: Resolver, *, timeout: float = 10.0) -> Reply | None:
    """A refusal when a zone lists `ip` (an A record in 127.0.0.0/8); a failed or slow lookup lists
    nobody.  The zones are asked at once, each for at most `timeout` seconds."""
    try:
        names = dnsbl_names(ip, zones)
    except ValueError:
        return None

    async def listed(zone: str, name: str) -> bool:
        try:
            async with asyncio.timeout(timeout):
                answer = await resolver.lookup(name, "A")
        except (DNSTempError, TimeoutError) as exc:
            log.warning("DNSBL %s not answering: %s", zone, exc or "timeout")
            return False
        return any(a.startswith("127.") for a in answer.addresses())

    found = await asyncio.gather(*(listed(z, n) for z, n in zip(zones, names, strict=True)))
    for zone, hit in zip(zones, found, strict=True):
        if hit:
            log.info("client %s listed at %s", ip, zone)
            return DNSBL_LISTED.with_text(DNSBL_LISTED.text.format(ip=ip, zone=zone))
    return None
