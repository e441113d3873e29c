"""After a quiet spell longer than the MDA's idle timeout, the next message is delivered at once.

The queue manager keeps its LMTP sessions to the MDA open between messages; the
MDA closes each one once it has been idle for `[smtp] idle_timeout`.  The first
message after that must not be deferred for a retry interval (5 minutes here).
"""

from __future__ import annotations

import smtplib
import time

import pytest

from tests.support.suite import Installation, maildir_messages

pytestmark = pytest.mark.timeout(120)


def _send(inst: Installation, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", inst.ports["smtp"], timeout=30) as client:
        refused = client.sendmail("someone@remote.test", ["alice@example.org"],
                                  f"Subject: {subject}\r\n\r\nhello\r\n".encode())
        assert refused == {}


def test_first_message_after_the_mda_closed_idle_sessions_is_not_deferred(installation: Installation) -> None:
    # Every daemon's listeners close idle clients after this, the MDA's LMTP listener among them.
    text = installation.config_path.read_text()
    assert "[smtp]" not in text
    installation.config_path.write_text(text + '\n[smtp]\nidle_timeout = "2s"\n')
    assert installation.config.smtp.idle_timeout == 2.0
    assert installation.config.mta.retry_schedule[0] >= 300
    installation.start()
    try:
        box = installation.mailbox("alice@example.org")
        _send(installation, "before the quiet spell")
        installation.wait_for(lambda: len(maildir_messages(box)) == 1, what="the first delivery")
        time.sleep(4)  # twice the idle timeout: the MDA has closed the pooled session
        _send(installation, "after the quiet spell")
        installation.wait_for(lambda: len(maildir_messages(box)) == 2, timeout=15, what="the second delivery")
    finally:
        installation.stop()
    assert "451 4.4.2" not in installation.cli("queue").stdout
