"""The MSA keeps no queue: with the MTA process stopped the client hears 451 4.4.1 and keeps its
message; once the MTA is back, the same submission is accepted and delivered."""

from __future__ import annotations

import re
import smtplib

import pytest

from tests.support.suite import PASSWORD, Installation, maildir_messages, tls_client_context, wait_port

pytestmark = pytest.mark.timeout(120)

ALICE = "alice@example.org"


def _try(suite: Installation) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", suite.ports["submission"], timeout=30) as s:
        s.starttls(context=tls_client_context())
        s.login(ALICE, PASSWORD)
        assert s.mail(ALICE)[0] == 250
        code, text = s.rcpt(ALICE)
        if code != 250:
            return code, text
        return s.data(b"From: alice@example.org\r\nSubject: retried\r\n\r\nhi\r\n")


def test_mta_down_gives_451_then_the_retry_is_delivered(suite: Installation) -> None:
    r = suite.cli("stop", "mta")
    assert r.returncode == 0, r.stdout + r.stderr
    code, text = _try(suite)
    assert code == 451 and text.startswith(b"4.4.1 "), text

    r = suite.cli("start", "mta")
    assert r.returncode == 0, r.stdout + r.stderr
    # supervisord calls the MTA started after a second; on a busy machine it may
    # bind later still.  A real client retries later: so do we, once it listens.
    wait_port(suite.internal_socket)
    code, text = _try(suite)
    assert code == 250 and re.fullmatch(rb"2\.0\.0 Ok: queued as [0-9A-F]{18}", text), text
    box = suite.mailbox(ALICE)
    suite.wait_for(lambda: len(maildir_messages(box)) == 1, what="delivery after the MTA came back")
