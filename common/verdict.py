"""The content filter's verdict on its way from the MTA to the MDA: header fields only we write.

The MTA asks rspamd and writes the answer on top of the message
(`X-Spam-Flag: YES`, `X-Spam-Status: Yes, score=...`, mta/auth/contentfilter.py);
the MDA reads it to file spam into the user's Junk folder.  A header is
something any sender can write, so the MTA removes every copy of these fields
from every message it receives, on both listeners, before it adds its own: what
reaches the MDA (only our queue manager speaks LMTP to it) is then the MTA's
word, or nothing.
"""

from __future__ import annotations

import re

# The fields the verdict is written in; a copy from outside never survives the MTA.
HEADERS = ("X-Spam-Flag", "X-Spam-Status", "X-Mailroom-Filter")

# One header field with its folded continuation lines (CRLF, as on the wire, or LF, as stored).
_FIELD = re.compile(rb"(?m)^([!-9;-~]+)[ \t]*:.*(?:\r?\n[ \t].*)*(?:\r?\n)?")
_HEAD_END = re.compile(rb"\r?\n\r?\n|\A\r?\n")


def _head_length(message: bytes) -> int:
    m = _HEAD_END.search(message)
    return m.start() + 1 if m else len(message)


def strip(message: bytes) -> bytes:
    """`message` without any verdict field in its header (the body is never touched)."""
    end = _head_length(message)
    names = {n.lower().encode() for n in HEADERS}
    out, pos = [], 0
    for m in _FIELD.finditer(message, 0, end):
        if m.group(1).lower() in names:
            out.append(message[pos : m.start()])
            pos = m.end()
    if pos == 0:
        return message
    out.append(message[pos:])
    return b"".join(out)


def is_spam(message: bytes) -> bool:
    """Did our content filter call this message spam?  (`X-Spam-Flag: YES` in its header.)"""
    end = _head_length(message)
    for m in _FIELD.finditer(message, 0, end):
        if m.group(1).lower() == b"x-spam-flag":
            return m.group(0).split(b":", 1)[1].strip().upper() == b"YES"
    return False
