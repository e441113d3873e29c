"""What RFC 6409 lets a submission server check and fix in a message.

- 8.2/8.3: add Date and Message-ID when the client left them out;
- a Received header saying the message came in authenticated (ESMTPSA,
  RFC 3848) and carrying the trace id;
- the From: and Sender: addresses, and Resent-From: and Resent-Sender: of a
  message the user resends (RFC 5322 3.6.6), must belong to the authenticated
  user (6.1 lets us refuse mail the user may not send).  Reading those fields is
  deliberately strict: a field we cannot parse cleanly, or a display name
  that itself looks like someone else's address, is refused rather than
  guessed at, because the recipient's reader may show it differently.

Header work is done on the raw bytes: the body is passed on untouched.
"""

from __future__ import annotations

import datetime as dt
import email.errors
import email.header
import email.utils
import re
import secrets

from common import headers

_HEADER_END = re.compile(rb"\r\n\r\n|\A\r\n")


def split_message(content: bytes) -> tuple[bytes, bytes]:
    """(header including its last CRLF, the rest)."""
    m = _HEADER_END.search(content)
    if not m:
        return content, b""
    return content[: m.start() + 2], content[m.start() + 2 :]


def header_values(header: bytes, name: str) -> list[str]:
    """Unfolded values of every `name:` field (also `name :`, RFC 5322 4.5's obsolete form)."""
    return headers.values(header, name)


# Anything a reader could take for an address, wherever it stands in the field.  The
# look-behind starts a match only where a word starts: without it a long word with
# no "@" was scanned again from each of its characters (quadratic).
_ADDRESS_LIKE = re.compile(r"(?<![^\s<>()\[\],;:\"'@])[^\s<>()\[\],;:\"'@]+@[^\s<>()\[\],;:\"'@]+")


class UnreadableHeader(ValueError):
    """A From:/Sender: field whose addresses cannot be told for sure."""


# The fields that name who sends: the author and sender, and who resent it.
SENDER_FIELDS = ("From", "Sender", "Resent-From", "Resent-Sender")


def from_addresses(header: bytes, names: tuple[str, ...] = SENDER_FIELDS) -> list[str]:
    """Every address the fields `names` (default every sender field) show, lower-cased.

    Raises UnreadableHeader when a field is empty or does not parse into
    plain addresses, so the caller refuses it instead of letting it through.
    The caller passes the header through `common.headers.check` first.
    """
    found: list[str] = []
    for name in names:
        for value in header_values(header, name):
            parsed = headers.addresses(value)  # None: over the limits the caller checked first
            if not parsed or any(not a or a.startswith("@") or "@" not in a for a in parsed):
                raise UnreadableHeader(f"{name}: {value[:80]!r}")
            try:
                # What a reader displays: encoded words decoded (RFC 2047).
                shown = str(email.header.make_header(email.header.decode_header(value)))
            except (ValueError, LookupError, email.errors.HeaderParseError) as exc:
                raise UnreadableHeader(f"{name}: {value[:80]!r}") from exc
            for a in [*parsed, *_ADDRESS_LIKE.findall(shown)]:
                a = a.lower().rstrip(".")
                if a not in found:
                    found.append(a)
    return found


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
