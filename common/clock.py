"""Time as an interface, so tests can fast-forward retries, expiry and lockouts."""

from __future__ import annotations

import datetime as dt
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """Naive UTC, as stored in the database."""
        ...

    def monotonic(self) -> float:
        """Seconds that only ever go forward (for windows, lockouts, rates)."""
        ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC).replace(tzinfo=None)

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or SystemClock().now()
        self._monotonic = 0.0

    def now(self) -> dt.datetime:
        return self._now

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        self._now += dt.timedelta(seconds=seconds)
        self._monotonic += seconds


class WarpedClock:
    """Lab time: `speed` times faster than `base`, counted from the moment `since`.

    At 3600x a retry five minutes away comes after a twelfth of a second, the
    four-hour delay warning after four seconds and the five-day bounce after two
    minutes.  Every daemon of one installation must use the same `since` and
    `speed` ([lab] time_warp_since, time_warp): a message's age is the queue
    manager's now minus the time the MTA stamped at reception, so both must be
    lab times.  The monotonic clock is not warped: it times connections, rate
    windows and lockouts, which a learner watches in real seconds.
    """

    def __init__(self, base: Clock, speed: float, since: dt.datetime) -> None:
        if speed <= 0:
            raise ValueError("the speed must be positive")
        self.base = base
        self.speed = speed
        self.since = since

    def now(self) -> dt.datetime:
        return self.since + (self.base.now() - self.since) * self.speed

    def monotonic(self) -> float:
        return self.base.monotonic()


def rate(clock: Clock) -> float:
    """Clock seconds per real second: the lab's speed, 1 for any other clock.

    A span measured in real time but written in the clock's time (a queue
    lease: how long a frozen holder keeps its recipients) is `span * rate`.
    """
    return clock.speed if isinstance(clock, WarpedClock) else 1.0


def for_lab(speed: float, since: str) -> Clock:
    """The clock a daemon runs on: the system's, or lab time when `speed` is not 1."""
    if speed == 1.0:
        return SystemClock()
    # A fixed start shared by every daemon, never "when this process started":
    # lab times stored by one process must mean the same to the others, and to
    # the same process after a restart.
    start = dt.datetime.fromisoformat(since)
    if start.tzinfo is not None:
        start = start.astimezone(dt.UTC).replace(tzinfo=None)
    return WarpedClock(SystemClock(), speed, start)


# The clock of this process, for times nobody passes in (database column
# defaults, common/models.py); the daemon skeleton sets it to the daemon's own,
# so that in a lab every time a daemon writes is lab time.
_process_clock: Clock = SystemClock()


def use(clock: Clock) -> None:
    global _process_clock
    _process_clock = clock


def process_now() -> dt.datetime:
    return _process_clock.now()
