"""The end of the MTA issue, with the real processes: mail to an unreachable domain.

A real DNS server on a loopback port says the domain's MX is 127.0.0.7, where
nothing listens.  The message shows in `mailroom queue` with its last reply,
is retried on the configured schedule, the sender gets one delay warning, and
after max_queue_lifetime it comes back to the sender's Maildir as an RFC 3464
bounce that Python's `email` package (as a mail client) reads.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import re
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.support.dns_server import DNSServer
from tests.support.suite import Installation, free_port, maildir_messages, running

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def unreachable(installation: Installation) -> Iterator[Installation]:
    records = {"unreachable.test": {"MX": [(10, "mx.unreachable.test")]}, "mx.unreachable.test": {"A": ["127.0.0.7"]}}
    with DNSServer(records) as dns_server:
        installation.set("dns", "nameservers", json.dumps([dns_server.address]))
        installation.set("dns", "timeout", '"2s"')
        installation.set("mta", "remote_port", str(free_port()))
        installation.set("mta", "connect_timeout", '"2s"')
        installation.set("mta", "retry_schedule", '["2s", "4s"]')
        # Tries at about 0, 2 and 6 s (each up to a poll late): the third is past the
        # delay warning (3 s) and well before expiry, whatever the lateness.
        installation.set("mta", "max_queue_lifetime", '"9s"')
        installation.set("mta", "delay_warning", '"3s"')
        yield from running(installation)


def _queue(inst: Installation) -> list[dict[str, Any]]:
    r = inst.cli("queue", "--json")
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout))


def test_unreachable_domain_is_queued_retried_and_bounced(unreachable: Installation) -> None:
    inst = unreachable
    body = (b"From: alice@example.org\r\nTo: bob@unreachable.test\r\nSubject: are you there?\r\n"
            b"Message-ID: <ping@example.org>\r\n\r\nHello?\r\n")
    code, text = inst.submit("alice@example.org", ["bob@unreachable.test"], body)
    assert code == 250
    m = re.search(rb"queued as ([0-9A-F]{18})", text)
    assert m, text
    trace = m.group(1).decode()

    # Visible in the queue, with the reason.
    def listed() -> dict[str, Any] | None:
        for item in _queue(inst):
            if item["id"] == trace and item["recipients"] and item["recipients"][0]["attempts"] >= 1:
                return item
        return None

    inst.wait_for(lambda: listed() is not None, what="the message in `mailroom queue` after a try")
    item = listed()
    assert item is not None and item["sender"] == "alice@example.org"
    [r] = item["recipients"]
    assert r["address"] == "bob@unreachable.test" and r["state"] in ("queued", "active")
    assert r["last_reply"].startswith("451 4.4.1 Cannot connect to 127.0.0.7"), r
    assert "bob@unreachable.test" in inst.cli("queue").stdout

    # Back to the sender: one delay warning, then the bounce.
    box = inst.mailbox("alice@example.org")
    inst.wait_for(lambda: len(maildir_messages(box)) == 2, timeout=60, what="warning and bounce in alice's Maildir")
    assert all(i["id"] != trace for i in _queue(inst))  # no longer queued

    # Tried on schedule: waits of 2s, then 4s (the last wait repeats), until older than 9s;
    # and once when the message is 3s old (delay_warning), with the warning, if no try
    # on the schedule came then: the sender hears when the setting says.
    events = inst.trace(trace)["events"]
    tries = [dt.datetime.fromisoformat(e["time"]) for e in events if e["event"] in ("deferred", "expired")]
    assert [e["event"] for e in events if e["event"] in ("deferred", "expired")][-1] == "expired"
    assert len(tries) >= 3, events
    queued_at = next(dt.datetime.fromisoformat(e["time"]) for e in events if e["event"] == "queued")
    [warned_at] = [dt.datetime.fromisoformat(e["time"]) for e in events
                   if e["event"] == "dsn" and e["detail"].startswith("delay warning")]
    assert warned_at in tries and 3 <= (warned_at - queued_at).total_seconds() < 4.5, (queued_at, warned_at, tries)
    for i, (a, b) in enumerate(zip(tries, tries[1:], strict=False)):
        wait = (b - a).total_seconds()
        low, high = (2, 4) if i == 0 else (4, 6.5)  # poll_interval is 1s: a try comes at most ~1s late
        if b == warned_at and wait < low:
            continue  # brought forward for the warning
        assert low <= wait < high, (i, wait, tries)

    mails: list[EmailMessage] = []
    for p in maildir_messages(box):
        msg = email.message_from_bytes(Path(p).read_bytes(), policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        mails.append(msg)
    mails.sort(key=lambda msg: "Delayed" not in str(msg["Subject"]))
    warning, bounce = mails
    for msg, action in ((warning, "delayed"), (bounce, "failed")):
        assert msg["Return-Path"] == "<>"  # sent with the null sender
        assert msg["From"].addresses[0].username.upper() == "MAILER-DAEMON"
        assert msg.get_content_type() == "multipart/report"
        human, status, headers = msg.iter_parts()
        assert "bob@unreachable.test" in human.get_content()
        per_message, per_rcpt = status.get_payload()
        assert per_message["Reporting-MTA"] == "dns; mail.test"
        assert per_rcpt["Final-Recipient"] == "rfc822; bob@unreachable.test"
        assert per_rcpt["Action"] == action and per_rcpt["Status"] == "4.4.1"
        assert per_rcpt["Diagnostic-Code"].startswith("smtp; 451 4.4.1 Cannot connect to 127.0.0.7")
        assert "Subject: are you there?" in headers.get_content()
    assert "Undelivered" in bounce["Subject"]
