"""Handlers get small frozen policies, not the whole config; the MSA's limits run on the Clock,
so a test moves time instead of sleeping."""

from __future__ import annotations

import dataclasses

import pytest

from common.clock import FakeClock
from common.endpoint import Endpoint
from msa.server import Limiters, SubmissionPolicy

pytestmark = pytest.mark.timeout(30)

POLICY = SubmissionPolicy(
    hostname="mail.test", next_hop=Endpoint("127.0.0.1", 10025), next_hop_timeout=30.0, recipient_delimiter="+",
    max_auth_failures=2, auth_failure_window=60.0, auth_lockout=600.0,
    max_messages_per_hour=2, max_recipients_per_hour=100,
)


def test_a_login_lockout_ends_when_the_clock_says_so() -> None:
    clock = FakeClock()
    limits = Limiters(POLICY, clock)
    ip = "192.0.2.7"
    limits.failures.failed(ip)
    clock.advance(61)  # the first failure has left the window
    limits.failures.failed(ip)
    assert not limits.failures.is_locked(ip)
    limits.failures.failed(ip)
    assert limits.failures.is_locked(ip)
    clock.advance(599)
    assert limits.failures.is_locked(ip)
    clock.advance(1)
    assert not limits.failures.is_locked(ip)


def test_the_hourly_message_limit_follows_the_clock() -> None:
    clock = FakeClock()
    limits = Limiters(POLICY, clock)
    assert limits.messages.allow("alice@example.org") and limits.messages.allow("alice@example.org")
    assert not limits.messages.allow("alice@example.org")
    clock.advance(3601)
    assert limits.messages.allow("alice@example.org")


def test_policies_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        POLICY.hostname = "other"  # type: ignore[misc]
