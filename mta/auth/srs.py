"""The Sender Rewriting Scheme, for mail an alias forwards to an outside address.

A forwarded message keeps its author's envelope sender, so the receiver's SPF
check would see our address send for someone else's domain and fail.  SRS
gives it a sender in our domain that encodes the original one, signed so
that nobody else can make us relay by forging such an address:

    alice@example.net  ->  SRS0=HHHH=TT=example.net=alice@forwarder.example

HHHH is an HMAC over the rest (with a secret in the run directory), TT the day
(base32, modulo 1024) so an old address stops working.  An address that is
already SRS0 of another forwarder becomes SRS1 (RFC-less but universal, the
scheme of libsrs2), naming the first forwarder, so the chain does not grow.
A bounce to such an address goes back to the original sender; a bad hash or
an old day is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from common.reply import Reply

# RFC 3463 X.7.1: a bounce address we did not sign (or signed too long ago) is not ours to relay.
FORGED = Reply(550, "5.7.1", "Invalid or expired SRS address")
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_DAYS = 1024


class SRSError(Exception):
    """Not an address we made, or too old."""


def is_srs(local: str) -> bool:
    return local[:5].upper() in ("SRS0=", "SRS1=", "SRS0+", "SRS0-", "SRS1+", "SRS1-")


def load_secret(run_dir: Path) -> bytes:
    """The installation's SRS secret, made (owner-only) on first use."""
    path = run_dir / "srs.secret"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_hex(32).encode())
        f.flush()
        os.fsync(f.fileno())
    return path.read_bytes().strip()


class SRS:
    def __init__(self, secret: bytes, domain: str, *, max_age_days: int = 21, clock: object = None) -> None:
        self.secret = secret
        self.domain = domain.lower()
        self.max_age = max_age_days
        self._now = time.time if clock is None else clock  # seconds since the epoch

    def _hash(self, *parts: str) -> str:
        mac = hmac.new(self.secret, "".join(parts).lower().encode(), hashlib.sha1).digest()
        return base64.b64encode(mac).decode()[:4]

    def _day(self) -> int:
        return int(float(self._now()) // 86400) % _DAYS  # type: ignore[operator]

    def _stamp(self) -> str:
        d = self._day()
        return _B32[d >> 5] + _B32[d & 31]

    def forward(self, sender: str) -> str:
        """The envelope sender to use when forwarding mail from `sender`."""
        local, _, domain = sender.rpartition("@")
        if not local or not domain:
            return sender
        if domain.lower() == self.domain and is_srs(local):
            return sender  # ours already
        tag = local[:4].upper()
        if tag == "SRS0" and len(local) > 5:
            # SRS0 of another forwarder: name it and keep its part as it is.
            rest = local[5:]
            return f"SRS1={self._hash(domain, rest)}={domain}=={rest}@{self.domain}"
        if tag == "SRS1" and len(local) > 5:
            h_first, _, tail = local[5:].partition("=")
            first, sep, rest = tail.partition("==")
            if sep:
                return f"SRS1={self._hash(first, rest)}={first}=={rest}@{self.domain}"
        stamp = self._stamp()
        return f"SRS0={self._hash(stamp, domain, local)}={stamp}={domain}={local}@{self.domain}"

    def reverse(self, address: str) -> str:
        """Where a bounce to `address` (one of our SRS addresses) goes; SRSError if forged or old.

        The hash is compared without case, as libsrs2 does: some MTAs fold local parts.
        """
        local, _, domain = address.rpartition("@")
        if domain.lower() != self.domain:
            raise SRSError("not our domain")
        tag, body = local[:4].upper(), local[5:]
        if tag == "SRS0":
            parts = body.split("=", 3)
            if len(parts) != 4:
                raise SRSError("malformed SRS0 address")
            h, stamp, odomain, olocal = parts
            if not hmac.compare_digest(h.lower().encode(), self._hash(stamp, odomain, olocal).lower().encode()):
                raise SRSError("bad hash")
            if not self._fresh(stamp):
                raise SRSError("expired")
            return f"{olocal}@{odomain}"
        if tag == "SRS1":
            h, _, tail = body.partition("=")
            first, sep, rest = tail.partition("==")
            if not sep or not first:
                raise SRSError("malformed SRS1 address")
            if not hmac.compare_digest(h.lower().encode(), self._hash(first, rest).lower().encode()):
                raise SRSError("bad hash")
            return f"SRS0={rest}@{first}"
        raise SRSError("not an SRS address")

    def _fresh(self, stamp: str) -> bool:
        if len(stamp) != 2 or any(c not in _B32 for c in stamp.upper()):
            return False
        then = (_B32.index(stamp[0].upper()) << 5) | _B32.index(stamp[1].upper())
        age = (self._day() - then) % _DAYS
        return age <= self.max_age
