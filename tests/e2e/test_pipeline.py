"""A message crosses MSA -> MTA -> qmgr -> MDA as four real processes, and the trace shows it."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from common.db import Database
from common.events import EventName, Hop
from common.models import ACTIVE, QUEUED, Event, Recipient
from tests.harness.users import add_user
from tests.support.admin import AdminClient, add_admin
from tests.support.ports import free_port
from tests.support.suite import PASSWORD, Installation, maildir_messages, mbox_messages, running

pytestmark = pytest.mark.timeout(120)
IMPLICIT = "implicit@example.org"  # the recipient of the test on 465, whose mailbox no other test fills


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    """One running suite for the tests that only send through it: starting and stopping
    the suite took longer than they do.  Each counts the messages in a mailbox of its own."""
    inst = Installation(tmp_path_factory.mktemp("pipeline") / "mailroom")
    add_user(inst, "alice@example.org", "maildir")
    add_user(inst, "bob@example.org", "mbox")
    add_user(inst, IMPLICIT, "maildir")
    yield from running(inst)


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
        "alice@example.org", [IMPLICIT], b"Subject: via 465\r\n\r\nhi\r\n", implicit_tls=True
    )
    assert code == 250, text
    box = suite.mailbox(IMPLICIT)
    suite.wait_for(lambda: len(maildir_messages(box)) == 1, what="delivery")


def test_status_shows_the_four_programs(suite: Installation) -> None:
    out = suite.cli("status").stdout
    for name in ("msa", "mta", "qmgr", "mda"):
        assert re.search(rf"^{name}\s+RUNNING", out, re.M), out


# Long enough for a first attempt on a busy machine, short enough to wait out.
# The waits are a minute each: on a loaded machine every trace lookup is a new, slow process.
LIFETIME = 6


def test_every_event_the_pipeline_records_is_named_by_the_enums(installation: Installation) -> None:
    """Drive the pipeline through every kind of event (delivered, refused and bounced
    with a DSN, resubmitted, deferred, held, released, expired, deleted, returned by
    the operator, a change on the admin page), then read the events table: each hop and event stored is a member
    of common.events' enums, and each member was stored at least once."""
    # remote.test goes to a port where nothing listens: its mail waits in the queue,
    # and a message older than LIFETIME seconds expires at its next attempt.
    text = installation.config_path.read_text()
    installation.config_path.write_text(
        text.replace("[mta.transport]\n", f'[mta.transport]\n"remote.test" = "127.0.0.1:{free_port()}"\n', 1)
    )
    installation.set("mta", "max_queue_lifetime", f'"{LIFETIME}s"')
    add_admin(installation)
    r = installation.cli("user", "add", "small@example.org", "--password-stdin", "--quota", "10",
                         stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    with contextlib.contextmanager(running)(installation) as suite:
        alice = suite.mailbox("alice@example.org")
        once = (b"Subject: twice\r\nMessage-ID: <twice@example.org>\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n"
                b"\r\nsent twice\r\n")
        for _ in range(2):  # the second is a resubmission of the first
            code, _ = suite.submit("alice@example.org", ["alice@example.org", "small@example.org"], once)
            assert code == 250
        waiting = {}
        for name in ("expires", "deleted", "returned"):
            body = f"Subject: {name}\r\n\r\n-\r\n".encode()
            code, reply = suite.submit("alice@example.org", [f"{name}@remote.test"], body)
            assert code == 250
            waiting[name] = reply.decode().rsplit(" ", 1)[1]
        queued = time.monotonic()  # each of them was queued before this

        def deferred(trace: str) -> bool:
            return any(e["event"] == "deferred" for e in suite.trace(trace)["events"])

        for trace in waiting.values():
            suite.wait_for(lambda t=trace: deferred(t), timeout=60, what=f"{trace} deferred")
        for action in ("hold", "release", "flush"):
            assert suite.cli("queue", action, waiting["expires"]).returncode == 0
        assert suite.cli("queue", "delete", waiting["deleted"]).returncode == 0
        admin = AdminClient(suite.ports["admin"])  # a change on the admin page: "changed"
        admin.login()
        admin.get("/admin/aliases")
        admin.post("/admin/aliases", {"action": "add", "source": "info@example.org", "targets": "alice@example.org"})
        assert suite.cli("queue", "bounce", waiting["returned"]).returncode == 0
        time.sleep(max(0.0, queued + LIFETIME + 0.5 - time.monotonic()))  # the next attempt expires it
        flushed = suite.cli("queue", "flush", waiting["expires"])
        # On a slow machine the attempt of the first flush may already have come after the
        # lifetime, and expired it: then it is no longer in the queue, and flush says so.
        assert flushed.returncode == 0 or "not in the queue" in flushed.stderr, flushed.stderr
        # alice's own copy, and three notices: small's bounce, the expiry, the operator's return.
        suite.wait_for(lambda: len(maildir_messages(alice)) == 4, timeout=60, what="alice's four messages")
        db = suite.db()
        try:
            suite.wait_for(lambda: _pending(db) == 0, timeout=60, what="an empty queue")
            with db.read() as s:
                stored = {(row.hop, row.event) for row in s.execute(select(Event.hop, Event.event).distinct())}
        finally:
            db.close()
    hops, names = {hop for hop, _ in stored}, {event for _, event in stored}
    assert hops <= set(Hop) and names <= set(EventName), (hops - set(Hop), names - set(EventName))
    # All but a user's Sieve filter at work, which tests/component/test_sieve_delivery.py drives.
    expected = set(EventName) - {EventName.FILTERED}
    assert hops == set(Hop) and names == expected, (set(Hop) - hops, expected - names)


def _pending(db: Database) -> int:
    with db.read() as s:
        return len(s.scalars(select(Recipient.id).where(Recipient.state.in_((QUEUED, ACTIVE)))).all())
