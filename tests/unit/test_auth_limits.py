"""msa.auth with a fake clock: the failed-login window, the lockout, the delays, the hourly limits."""

from __future__ import annotations

import pytest

from msa.auth import FailureTracker, RateLimiter

pytestmark = pytest.mark.timeout(5)


class Now:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_lockout_after_max_failures_in_the_window_and_release_after_lockout() -> None:
    now = Now()
    t = FailureTracker(max_failures=3, window=600, lockout=300, now=now)
    assert [t.failed("192.0.2.1"), t.failed("192.0.2.1")] == [1, 2]
    assert not t.is_locked("192.0.2.1")
    assert t.failed("192.0.2.1") == 3
    assert t.is_locked("192.0.2.1")
    assert not t.is_locked("192.0.2.2")  # per address
    now.t += 299
    assert t.is_locked("192.0.2.1")
    now.t += 2
    assert not t.is_locked("192.0.2.1")
    assert t.failed("192.0.2.1") == 1  # a fresh count after the lockout


def test_failures_older_than_the_window_are_forgotten() -> None:
    now = Now()
    t = FailureTracker(max_failures=3, window=600, lockout=300, now=now)
    t.failed("192.0.2.1")
    now.t += 400
    t.failed("192.0.2.1")
    now.t += 201  # the first is now 601 s old
    assert t.failed("192.0.2.1") == 2
    assert not t.is_locked("192.0.2.1")


def test_delay_grows_and_is_capped() -> None:
    t = FailureTracker(max_failures=5, window=600, lockout=600)
    assert [t.delay(n) for n in (1, 2, 3, 4, 10)] == [0.5, 1.0, 1.5, 2.0, 3.0]


def test_rate_limiter_counts_per_key_over_an_hour() -> None:
    now = Now()
    r = RateLimiter(3, now=now)
    assert r.allow("alice", 2)
    assert not r.allow("alice", 2)  # would make 4
    assert r.allow("alice")
    assert not r.allow("alice")
    assert r.allow("bob", 3)
    now.t += 3601
    assert r.allow("alice", 3)


def test_old_entries_are_swept_so_memory_stays_bounded() -> None:
    now = Now()
    t = FailureTracker(max_failures=2, window=60, lockout=60, now=now)
    for i in range(1500):  # a guesser rotating through addresses, one failure each
        t.failed(f"2001:db8::{i:x}")
    t.failed("192.0.2.9")
    t.failed("192.0.2.9")  # locked
    now.t += 61
    for i in range(1000):  # the next automatic sweep comes within SWEEP_EVERY failures
        t.failed(f"2001:db8:1::{i:x}")
    assert not any(ip.startswith("2001:db8::") for ip in t.failures)
    assert "192.0.2.9" not in t.locked_until
    assert len(t.failures) <= 1000
