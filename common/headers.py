"""A message's header read safely: bounded, in linear time, before any parser sees it.

Python's email package is not safe on what a stranger writes: decoding RFC 2047
encoded words joins them one at a time (quadratic: a From: of 120,000 folded
`=?utf-8?q?a?=` words, 1.9 MB, took 50 s), and its address parser recurses
once per nested comment or group (RecursionError after a thousand).  So the
MSA, the MTA and the sender checks hand it a field only after `check` has
passed the header, in one pass over its octets:

- the header section as a whole: at most MAX_HEADER octets (256 KiB: an
  ordinary header is a few KiB, a long one with many Received and DKIM fields
  some tens, and a Cc: of 7,000 addresses still fits; Postfix keeps 100 KB)
  and MAX_FIELDS fields (1,000: a mailing list's message has about a hundred),
  so that the passes the sender checks make over every field stay short;
- each originator field we parse (From, Sender, Resent-From, Resent-Sender,
  RFC 5322 3.6.2 and 3.6.6): at most MAX_ADDRESS_FIELD octets unfolded
  (16 KiB: a hundred mailboxes with display names fit easily), and at most
  MAX_ENCODED_WORDS encoded words (128: a long name in any script is a dozen).

Within those bounds the slowest field we know of parses in tens of
milliseconds; the MSA still parses in a worker thread, so not even that holds
its event loop.  Other fields (To:, Subject:, ...) are never parsed here and
have no limit but the header's.

Nothing here knows about sessions or the config.
"""

from __future__ import annotations

import email.utils
import re

from common.message import header_of, values
from common.reply import MESSAGE_TOO_BIG, Reply

MAX_HEADER = 256 * 1024
MAX_FIELDS = 1000
MAX_ADDRESS_FIELD = 16 * 1024
MAX_ENCODED_WORDS = 128
# The fields whose addresses Mailroom reads (sender binding, DMARC, DKIM signing).
ORIGINATOR_FIELDS = ("From", "Sender", "Resent-From", "Resent-Sender")

# RFC 3463 X.3.4: a size limit; 552 as for a message over the SIZE limit (RFC 5321 4.2.2).
HEADER_TOO_BIG = MESSAGE_TOO_BIG.with_text(f"Message header too big (over {MAX_HEADER} octets)")
TOO_MANY_FIELDS = MESSAGE_TOO_BIG.with_text(f"Message header has too many fields (over {MAX_FIELDS})")
FIELD_TOO_LONG = MESSAGE_TOO_BIG.with_text("{name}: field too long (over {limit} octets)")
TOO_MANY_ENCODED_WORDS = MESSAGE_TOO_BIG.with_text("{name}: too many encoded words (over {limit})")

_ORIGINATOR = re.compile(rb"(from|sender|resent-from|resent-sender)[ \t]*:", re.I)
_NAMES = {n.lower(): n for n in ORIGINATOR_FIELDS}
_FIRST = frozenset(b"FfSsRr")  # the first octets of their names


def check(header: bytes) -> Reply | None:
    """The limit `header` breaks (a reply that says which), or None when it may be parsed."""
    if len(header) > MAX_HEADER:
        return HEADER_TOO_BIG
    # Unfolded, counted and split in C, as the wire writes them (CRLF): no Python loop
    # over a stranger's fields before their number is known.
    unfolded = header.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t")
    if unfolded.count(b"\r\n") > MAX_FIELDS:
        return TOO_MANY_FIELDS
    # Only lines that could start an originator field are looked at (a few in a usual header).
    for line in unfolded.split(b"\r\n"):
        if not line or line[0] not in _FIRST:
            continue
        m = _ORIGINATOR.match(line)
        if m is None:
            continue
        value = line[m.end() :]
        name = _NAMES[m.group(1).decode().lower()]
        if len(value) > MAX_ADDRESS_FIELD:
            return FIELD_TOO_LONG.with_text(FIELD_TOO_LONG.text.format(name=name, limit=MAX_ADDRESS_FIELD))
        if value.count(b"=?") > MAX_ENCODED_WORDS:
            return TOO_MANY_ENCODED_WORDS.with_text(
                TOO_MANY_ENCODED_WORDS.text.format(name=name, limit=MAX_ENCODED_WORDS)
            )
    return None


_COMMENT = re.compile(rb"\([^()]*\)")
# Comments nested deeper than this are no one's honest header.
MAX_COMMENT_DEPTH = 8


def without_comments(value: bytes) -> bytes | None:
    """`value` with its comments (RFC 5322 3.2.2, nested too) removed, in linear time; None
    when they nest deeper than MAX_COMMENT_DEPTH (the caller must not trust what it cannot read)."""
    for _ in range(MAX_COMMENT_DEPTH):
        value, found = _COMMENT.subn(b"", value)  # innermost first: each pass is one scan
        if not found:
            return value
    return None if _COMMENT.search(value) else value


def authserv_id(value: bytes) -> tuple[bytes, bytes] | None:
    """An Authentication-Results value (RFC 8601 2.2) as (its authserv-id, lower-case and
    without a final dot; the results after it), comments removed; None when unreadable."""
    plain = without_comments(value)
    if plain is None:
        return None
    ident, _, results = plain.partition(b";")
    words = ident.split()  # the id, then perhaps a version
    return (words[0].lower().rstrip(b".") if words else b""), results


def addresses(value: str) -> list[str] | None:
    """The addresses in one address-list value, or None when it cannot be read within
    the limits (too long, too many encoded words, nested too deep for the parser)."""
    if len(value) > MAX_ADDRESS_FIELD or value.count("=?") > MAX_ENCODED_WORDS:
        return None
    try:
        return [a for _, a in email.utils.getaddresses([value])]
    except RecursionError:  # comments or groups nested a thousand deep
        return None


def from_domain(message: bytes) -> str | None:
    """The domain of the single From: address, or None (none, several, unreadable,
    or a header over the limits)."""
    header = header_of(message)
    if len(header) > MAX_HEADER:
        return None
    found = values(header, "From")
    if len(found) != 1:
        return None
    addrs = [a for a in addresses(found[0]) or [] if a]
    if len(addrs) != 1 or "@" not in addrs[0]:
        return None
    return addrs[0].rsplit("@", 1)[1].lower().rstrip(".") or None
