"""What RFC 6409 lets a submission server check and fix in a message.

- 8.1/8.2: add Date and Message-ID when the client left them out;
- a Received header saying the message came in authenticated (ESMTPSA,
  RFC 3848) and carrying the trace id;
- the From: addresses must belong to the authenticated user (6.1 lets us
  refuse mail the user may not send).

Header work is done on the raw bytes: the body is passed on untouched.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
import secrets

_HEADER_END = re.compile(rb"\r\n\r\n|\A\r\n")


def split_message(content: bytes) -> tuple[bytes, bytes]:
    """(header including its last CRLF, the rest)."""
    m = _HEADER_END.search(content)
    if not m:
        return content, b""
    return content[: m.start() + 2], content[m.start() + 2 :]


def header_values(header: bytes, name: str) -> list[str]:
    """Unfolded values of every `name:` field."""
    text = header.decode("utf-8", "surrogateescape")
    unfolded = re.sub(r"\r\n(?=[ \t])", "", text)
    prefix = name.lower() + ":"
    return [
        line[len(prefix) :].strip()
        for line in unfolded.split("\r\n")
        if line.lower().startswith(prefix)
    ]


def from_addresses(header: bytes) -> list[str]:
    values = header_values(header, "From")
    return [a.lower() for _, a in email.utils.getaddresses(values) if a]


def fix(content: bytes, *, hostname: str, received: str, now: dt.datetime) -> bytes:
    header, rest = split_message(content)
    added = received
    if not header_values(header, "Date"):
        added += f"Date: {email.utils.format_datetime(now.replace(tzinfo=dt.UTC))}\r\n"
    if not header_values(header, "Message-ID"):
        added += f"Message-ID: <{now:%Y%m%d%H%M%S}.{secrets.token_hex(8)}@{hostname}>\r\n"
    return added.encode("utf-8") + header + rest


def received_header(
    *, helo: str, client_ip: str, hostname: str, user: str, trace: str, now: dt.datetime
) -> str:
    date = email.utils.format_datetime(now.replace(tzinfo=dt.UTC))
    return (
        f"Received: from {helo} ([{client_ip}])\r\n"
        f"\t(authenticated sender {user})\r\n"
        f"\tby {hostname} (Mailroom) with ESMTPSA id {trace};\r\n\t{date}\r\n"
    )
