"""The MTA's verdicts on their way to the MDA: header fields only we write.

The MTA asks rspamd and writes the answer on top of the message
(`X-Spam-Flag: YES`, `X-Spam-Status: Yes, score=...`, mta/auth/contentfilter.py);
the MDA reads it to file spam into the user's Junk folder.  A header is
something any sender can write, so the MTA removes every copy of these fields
from every message it receives, on both listeners, before it adds its own: what
reaches the MDA (only our queue manager speaks LMTP to it) is then the MTA's
word, or nothing.

The same holds for our Authentication-Results (RFC 8601): the MTA removes every
field that claims our host name before it writes its own, so the one the MDA
finds under our name says what the MTA found of the envelope sender
(`sender_verified`).
"""

from __future__ import annotations

from common import headers
from common.address import domain_of
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


def sender_verified(message: bytes, sender: str, hostname: str) -> bool:
    """Did our MTA find that `sender`'s domain sent this message: SPF passed for that
    domain, or a DKIM signature of it (or of a parent or child domain) verified?

    Read from the first Authentication-Results field under our name (`hostname`):
    a message without one (the checks were off) is not verified.
    """
    domain = domain_of(sender)
    if not domain:
        return False
    host = hostname.lower().encode()
    for f in fields(message):
        if f.name.lower() != "authentication-results":
            continue
        read = headers.authserv_id(f.value)
        if read is None or read[0] != host:
            continue
        results = read[1]
        for result in results.split(b";"):
            words = result.decode("ascii", "replace").lower().split()
            if not words:
                continue
            method, _, outcome = words[0].partition("=")
            props = {k: v.strip('"') for k, _, v in (w.partition("=") for w in words[1:])}
            if method == "spf" and outcome == "pass" and domain_of(props.get("smtp.mailfrom", "")) == domain:
                return True
            signer = props.get("header.d", "")
            if method == "dkim" and outcome == "pass" and signer and (
                signer == domain or domain.endswith("." + signer) or signer.endswith("." + domain)
            ):
                return True
        return False  # only the field our MTA wrote counts
    return False
