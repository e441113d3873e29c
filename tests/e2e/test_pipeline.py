"""A message crosses MSA -> MTA -> qmgr -> MDA as four real processes, and the trace shows it."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from tests.support.suite import Installation, maildir_messages, mbox_messages

pytestmark = pytest.mark.timeout(120)


def test_submission_reaches_maildir_and_mbox_with_a_full_trace(suite: Installation) -> None:
    body = (
        b"Subject: first light\r\nFrom: alice@example.org\r\nTo: bob@example.org\r\n\r\n"
        b"From here on.\r\n.hidden dot\r\n"
    )
    code, text = suite.submit("alice@example.org", ["alice@example.org", "bob@example.org"], body)
    assert code == 250
    m = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-F]{18})", text)
    assert m, text
    trace_id = m.group(1).decode()

    alice_box = suite.mailbox("alice@example.org")
    bob_box = suite.mailbox("bob@example.org")
    suite.wait_for(lambda: len(maildir_messages(alice_box)) == 1, what="Maildir delivery")
    suite.wait_for(lambda: len(mbox_messages(bob_box)) == 1, what="mbox delivery")

    stored = maildir_messages(alice_box)[0].read_bytes()
    assert stored.startswith(b"Return-Path: <alice@example.org>\nDelivered-To: alice@example.org\n")
    assert f"with ESMTPSA id {trace_id}".encode() in stored
    assert b"\r\n" not in stored  # stored with LF, as Dovecot and Postfix's agents do
    assert stored.endswith(b"\n\nFrom here on.\n.hidden dot\n")  # dot-stuffing undone
    assert b"\nMessage-ID: <" in stored and b"\nDate: " in stored  # RFC 6409 fixes
    mbox_raw = bob_box.read_bytes()
    assert mbox_raw.startswith(b"From alice@example.org ")
    assert b"\n>From here on.\n" in mbox_raw  # mboxrd quoting

    # The trace names every hop, in time order, with paths for the deliveries.
    suite.wait_for(lambda: len([e for e in suite.trace(trace_id)["events"] if e["hop"] == "qmgr"]) == 2,
                   what="qmgr events")
    trace = suite.trace(trace_id)
    assert trace["id"] == trace_id and trace["sender"] == "alice@example.org"
    assert trace["message_id"].startswith("<")
    events = trace["events"]
    hops = {e["hop"] for e in events}
    assert {"msa", "mta", "qmgr", "mda"} <= hops
    times = [dt.datetime.fromisoformat(e["time"]) for e in events]
    assert times == sorted(times)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}", e["time"]) for e in events)
    delivered = {e["recipient"]: e["path"] for e in events if e["hop"] == "mda" and e["event"] == "delivered"}
    assert delivered == {
        "alice@example.org": str(maildir_messages(alice_box)[0]),
        "bob@example.org": str(bob_box),
    }
    # The same id is found by Message-ID, and the log lines carry it in every process.
    assert suite.trace(trace["message_id"])["id"] == trace_id
    for process in ("msa", "mta", "qmgr", "mda"):
        assert re.search(rf"{process}\[\d+\] {trace_id}: ", suite.log_text()), process

    # The readable timeline shows each hop.
    text_out = suite.cli("trace", trace_id).stdout
    for word in ("msa", "mta", "qmgr", "mda", "delivered"):
        assert word in text_out


def test_submission_on_the_implicit_tls_port(suite: Installation) -> None:
    code, text = suite.submit(
        "alice@example.org", ["alice@example.org"], b"Subject: via 465\r\n\r\nhi\r\n", implicit_tls=True
    )
    assert code == 250, text
    box = suite.mailbox("alice@example.org")
    suite.wait_for(lambda: len(maildir_messages(box)) == 1, what="delivery")


def test_status_shows_the_four_programs(suite: Installation) -> None:
    out = suite.cli("status").stdout
    for name in ("msa", "mta", "qmgr", "mda"):
        assert re.search(rf"^{name}\s+RUNNING", out, re.M), out
