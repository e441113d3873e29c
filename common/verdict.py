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

from common.message import fields, remove

# The fields the verdict is written in; a copy from outside never survives the MTA.
HEADERS = ("X-Spam-Flag", "X-Spam-Status", "X-Mailroom-Filter")
_NAMES = frozenset(n.lower() for n in HEADERS)


def strip(message: bytes) -> bytes:
    """`message` without any verdict field in its header (the body is never touched)."""
    return remove(message, lambda f: f.name.lower() in _NAMES)


def is_spam(message: bytes) -> bool:
    """Did our content filter call this message spam?  (`X-Spam-Flag: YES` in its header.)"""
    for f in fields(message):
        if f.name.lower() == "x-spam-flag":
            return f.text().upper() == "YES"
    return False
