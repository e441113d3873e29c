"""Who is logged in to the admin page: sessions, form tokens, and the lockout after failed logins.

- A session is a random token (32 bytes) in a cookie that is HttpOnly (no
  script reads it), Secure (sent over TLS only), SameSite=Strict (never sent
  with a request another site starts) and named `__Host-...` (the browser
  refuses it unless it was set over TLS for this host, with Path=/ and no
  Domain).  The sessions live in this process's memory only: a restart of the
  web program logs everyone out, and a cookie from another installation, or
  one made up, is simply unknown.  A session ends after an hour without a
  request or eight hours in all, at logout, and when its account's password
  changes or the account is removed (each request checks the account).
- Every form carries the session's own token (`csrf`), compared in constant
  time; a form from an older session, or none, is refused.  The login form,
  before there is a session, is tied to a cookie of its own (double submit).
- Failed logins are counted per client address and per account name, in
  memory (an attacker's cheapest move must not cost a database write): after
  `MAX_FAILURES` within `WINDOW` the address (or name) is refused for
  `LOCKOUT`, whatever the password.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

COOKIE = "__Host-mailroom-session"
LOGIN_COOKIE = "__Host-mailroom-login"
IDLE = 3600.0
LIFETIME = 8 * 3600.0
MAX_FAILURES = 5
WINDOW = 600.0
LOCKOUT = 600.0


@dataclass
class Session:
    who: str  # an admin's name, or a mail user's address
    kind: str  # "admin" or "user"
    fingerprint: str  # of the password hash at login: a changed password ends the session
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    started: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)
    flash: list[str] = field(default_factory=list)  # what the last change said, shown once


def fingerprint(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


class Sessions:
    def __init__(self) -> None:
        self._by_token: dict[str, Session] = {}
        self._lock = threading.Lock()

    def start(self, who: str, kind: str, password_hash: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(who, kind, fingerprint(password_hash))
        with self._lock:
            self._forget_old()
            self._by_token[token] = session
        return token, session

    def get(self, token: str) -> Session | None:
        now = time.monotonic()
        with self._lock:
            session = self._by_token.get(token)
            if session is None:
                return None
            if now - session.seen > IDLE or now - session.started > LIFETIME:
                del self._by_token[token]
                return None
            session.seen = now
            return session

    def end(self, token: str) -> None:
        with self._lock:
            self._by_token.pop(token, None)

    def _forget_old(self) -> None:
        now = time.monotonic()
        for token in [t for t, s in self._by_token.items() if now - s.seen > IDLE or now - s.started > LIFETIME]:
            del self._by_token[token]


def same(a: str, b: str) -> bool:
    """Constant-time comparison of two tokens (an empty one never matches)."""
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


class Lockout:
    """Failed logins per client address and per name; `locked` says for how much longer."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = WINDOW, lockout: float = LOCKOUT) -> None:
        self.max_failures, self.window, self.lockout = max_failures, window, lockout
        self._failures: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def locked(self, *keys: str) -> float:
        now = time.monotonic()
        with self._lock:
            return max((self._until.get(k, 0.0) - now for k in keys), default=0.0)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 100_000:  # many addresses at once: forget the oldest rather than grow
                self._failures.clear()
            for k in keys:
                q = self._failures.setdefault(k, deque())
                q.append(now)
                while q and now - q[0] > self.window:
                    q.popleft()
                if len(q) >= self.max_failures:
                    self._until[k] = now + self.lockout
                    q.clear()

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)
