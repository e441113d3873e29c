"""A restarted MDA costs seconds, not a retry interval.

While the MDA cannot take mail (killed, restarting, deployed), the queue
manager's LMTP hand-off fails with a 4xx.  That mail waits on the short
`[mta] local_retry_schedule`, not on the minutes remote hosts are given, and
the first hand-off that succeeds again brings all waiting local mail forward.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from tests.support.suite import Installation, maildir_messages, running, wait_port

pytestmark = pytest.mark.timeout(120)

ALICE = "alice@example.org"


def _message(subject: str) -> bytes:
    return f"From: alice@example.org\r\nTo: alice@example.org\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()


def _deferred(suite: Installation, text: bytes) -> bool:
    trace = text.decode().rsplit(" ", 1)[-1]
    return any(e["event"] == "deferred" for e in suite.trace(trace)["events"])


def test_mail_waiting_for_a_restarting_mda_is_delivered_within_seconds(suite: Installation) -> None:
    # The remote schedule stays at its minutes: only the local one may apply.
    assert suite.config.mta.retry_schedule[0] >= 300
    assert suite.cli("stop", "mda").returncode == 0
    code, text = suite.submit(ALICE, [ALICE], _message("while the MDA is away"))
    assert code == 250
    suite.wait_for(lambda: _deferred(suite, text), what="the hand-off to fail")
    time.sleep(2)  # a few local retries fail as well
    assert suite.cli("start", "mda").returncode == 0
    wait_port(suite.ports["lmtp"])
    back = time.monotonic()
    box = suite.mailbox(ALICE)
    suite.wait_for(lambda: len(maildir_messages(box)) == 1, timeout=90, what="delivery after the MDA came back")
    # The short schedule's steps are 1, 2, 5, 10, 30, 60 s: well under a remote retry.
    assert time.monotonic() - back < 70


def test_the_first_hand_off_that_succeeds_brings_waiting_local_mail_forward(installation: Installation) -> None:
    # Set before the suite starts: stopping a running suite to change it cost seconds.
    installation.set("mta", "local_retry_schedule", '["10m"]')  # so only the bring-forward can deliver it soon
    with contextlib.contextmanager(running)(installation) as suite:
        assert suite.cli("stop", "mda").returncode == 0
        code, text = suite.submit(ALICE, [ALICE], _message("waited"))
        assert code == 250
        suite.wait_for(lambda: _deferred(suite, text), what="the hand-off to fail")
        assert suite.cli("start", "mda").returncode == 0
        wait_port(suite.ports["lmtp"])
        box = suite.mailbox(ALICE)
        assert len(maildir_messages(box)) == 0
        # New mail goes through at once, and the waiting message comes with it.
        code, _ = suite.submit(ALICE, [ALICE], _message("fresh"))
        assert code == 250
        suite.wait_for(lambda: len(maildir_messages(box)) == 2, timeout=30, what="both messages")
