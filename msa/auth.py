"""Login checks for the MSA, and the limits that keep password guessers out.

Failed logins are counted per client address in a sliding window.  Each
failure makes the next answer slower; after `max_failures` in the window the
address is refused outright (421 4.7.0) until the lockout ends.  Unknown
users and wrong passwords get the same reply and take the same time, so the
MSA does not reveal which addresses exist (RFC 4954 asks for 535 5.7.8).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

SWEEP_EVERY = 1000  # failures between two sweeps of the tables


class FailureTracker:
    def __init__(
        self,
        *,
        max_failures: int,
        window: float,
        lockout: float,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.now = now
        self.failures: dict[str, collections.deque[float]] = {}
        self.locked_until: dict[str, float] = {}
        self._since_sweep = 0

    def is_locked(self, ip: str) -> bool:
        until = self.locked_until.get(ip)
        if until is None:
            return False
        if self.now() >= until:
            del self.locked_until[ip]
            return False
        return True

    def failed(self, ip: str) -> int:
        """Record a failure; returns how many are in the window now."""
        now = self.now()
        self._since_sweep += 1
        if self._since_sweep >= SWEEP_EVERY:
            self.sweep()
        q = self.failures.setdefault(ip, collections.deque())
        q.append(now)
        while q and q[0] < now - self.window:
            q.popleft()
        if len(q) >= self.max_failures:
            self.locked_until[ip] = now + self.lockout
            q.clear()
            return self.max_failures
        return len(q)

    def sweep(self) -> None:
        """Forget addresses with nothing left in the window and expired lockouts.

        Without it, every address that ever failed once (think of all the
        IPv6 addresses a guesser can use) would stay in memory for good.
        """
        self._since_sweep = 0
        now = self.now()
        for ip, q in list(self.failures.items()):
            while q and q[0] < now - self.window:
                q.popleft()
            if not q:
                del self.failures[ip]
        for ip, until in list(self.locked_until.items()):
            if until <= now:
                del self.locked_until[ip]

    def delay(self, count: int) -> float:
        """Seconds to wait before answering the `count`-th failure (0.5 s, 1 s, ... 3 s)."""
        return min(0.5 * count, 3.0)


class RateLimiter:
    """Counts per key over the last hour (messages and recipients per user)."""

    def __init__(self, per_hour: int, now: Callable[[], float] = time.monotonic) -> None:
        self.per_hour = per_hour
        self.now = now
        self.events: dict[str, collections.deque[float]] = {}

    def allow(self, key: str, count: int = 1) -> bool:
        now = self.now()
        q = self.events.setdefault(key, collections.deque())
        while q and q[0] < now - 3600:
            q.popleft()
        if len(q) + count > self.per_hour:
            return False
        q.extend([now] * count)
        return True
