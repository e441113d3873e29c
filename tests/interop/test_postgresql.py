"""Mailroom on PostgreSQL: the shared database for several hosts (docs/operations.md).

A throwaway PostgreSQL cluster (tests/support/postgres.py) takes the place of
the SQLite file: the four real daemons carry a message end to end on it,
several queue managers share its queue without delivering a recipient twice
(SELECT ... FOR UPDATE SKIP LOCKED in mta/queue.claim), and the `mailroom`
command's user and queue commands work against it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, func, select, text

from common.clock import SystemClock
from common.db import Database
from common.dns import Wire
from common.models import DELIVERED, Event, Recipient
from common.reply import Reply
from mta import queue, resubmit
from mta.courier import Attempt, Delivered
from mta.delivery import RemoteDelivery
from mta.qmgr import Policy, QueueManager
from tests.harness.prepared import check_like_core
from tests.harness.users import add_user
from tests.support.postgres import PostgresServer
from tests.support.suite import Installation, maildir_messages, mbox_messages

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path) as server:
        yield server


def on_postgres(root: Path, pg: PostgresServer) -> Installation:
    """An installation whose shared database is the PostgreSQL cluster (set before any user exists)."""
    inst = Installation(root / "mailroom")
    inst.set("mailroom", "database", json.dumps(pg.url))
    assert inst.config.database_url == pg.url
    # `mailroom init` made the default SQLite file; nothing may use it from here on.
    for leftover in inst.root.glob("mailroom.db*"):
        leftover.unlink()
    return inst


def tables(pg: PostgresServer) -> set[str]:
    db = Database(pg.url, threads=1)
    try:
        with db.read() as s:
            return set(s.scalars(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")))
    finally:
        db.close()


@pytest.mark.timeout(60)
def test_the_pipeline_runs_end_to_end_on_postgresql(tmp_path: Path, postgres: PostgresServer) -> None:
    inst = on_postgres(tmp_path, postgres)
    assert "users" not in tables(postgres)  # the schema comes from the CLI's alembic upgrade below
    add_user(inst, "alice@example.org", "maildir")
    add_user(inst, "bob@example.org", "mbox")
    assert {"alembic_version", "users", "messages", "recipients", "events"} <= tables(postgres)
    assert not list(inst.root.glob("*.db*"))  # nothing went to a SQLite file

    inst.start()
    try:
        body = b"Subject: shared\r\nFrom: alice@example.org\r\nTo: bob@example.org\r\n\r\nOn PostgreSQL.\r\n"
        code, reply = inst.submit("alice@example.org", ["alice@example.org", "bob@example.org"], body)
        assert code == 250, reply
        m = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-F]{18})", reply)
        assert m, reply
        trace_id = m.group(1).decode()
        alice, bob = inst.mailbox("alice@example.org"), inst.mailbox("bob@example.org")
        inst.wait_for(lambda: len(maildir_messages(alice)) == 1, what="Maildir delivery")
        inst.wait_for(lambda: len(mbox_messages(bob)) == 1, what="mbox delivery")
        assert maildir_messages(alice)[0].read_bytes().endswith(b"\n\nOn PostgreSQL.\n")
        assert mbox_messages(bob)[0].endswith(b"\n\nOn PostgreSQL.\n")
        inst.wait_for(
            lambda: sum(e["event"] == "delivered" for e in inst.trace(trace_id)["events"] if e["hop"] == "qmgr") == 2,
            what="qmgr delivered events",
        )
        hops = {e["hop"] for e in inst.trace(trace_id)["events"]}
        assert {"msa", "mta", "qmgr", "mda"} <= hops
        assert "Traceback" not in inst.log_text()
    finally:
        inst.stop()
    assert not list(inst.root.glob("*.db*"))


@pytest.mark.timeout(30)
def test_processes_starting_together_on_an_empty_database_create_the_schema_once(
    postgres: PostgresServer,
) -> None:
    # Every daemon runs the migrations at start, all four at once on a new
    # installation: on PostgreSQL two CREATE TABLEs of one name collide
    # (UniqueViolation on pg_type) unless the upgrades take turns.
    # Separate processes, as the daemons are (alembic's context is one per process),
    # each connected first and then upgrading at the same agreed instant.
    script = (
        "import sys, time\n"
        "from sqlalchemy import text\n"
        "from common.db import Database\n"
        "db = Database(sys.argv[1], threads=1)\n"
        "with db.engine.connect() as c: c.execute(text('SELECT 1'))\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "db.create_schema()\n"
    )
    at = time.time() + 2.0  # after every interpreter has started and connected
    procs = [
        subprocess.Popen([sys.executable, "-c", script, postgres.url, str(at)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(6)
    ]
    outcomes = [(p.wait(timeout=20), p.communicate()[0]) for p in procs]
    failed = [[line for line in out.splitlines() if "Error" in line][-1:] for rc, out in outcomes if rc != 0]
    assert not failed, failed
    assert {"alembic_version", "users", "messages", "recipients", "events"} <= tables(postgres)


class RecordingLMTP:
    """A courier standing in for the MDA: records each recipient handed to it, says 250 for each."""

    local = True

    def __init__(self) -> None:
        self.received: collections.Counter[str] = collections.Counter()

    async def deliver(self, attempt: Attempt) -> Delivered:
        await asyncio.sleep(0.001)  # let the other queue managers run their claims meanwhile
        self.received.update(attempt.recipients)
        # Like our MDA asked XRECORD: the queue manager records the MDA's events too.
        return Delivered([Reply(250, "2.0.0", "Ok") for _ in attempt.recipients], "mda.test",
                         ours_to_record=True, paths=["/mail/x"] * len(attempt.recipients))

    async def close(self) -> None:
        pass


@pytest.mark.timeout(60)
def test_queue_managers_sharing_one_queue_never_deliver_a_recipient_twice(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    messages, per_message, managers = 300, 2, 3
    setup = Database(postgres.url, threads=1)
    setup.create_schema()
    now = SystemClock().now()
    expected: list[str] = []
    with setup.write() as s:
        for n in range(messages):
            rcpts = [f"user{n}-{k}@example.org" for k in range(per_message)]
            expected += rcpts
            queue.enqueue(
                s, trace=f"T{n:017d}", sender="carol@example.net", body=b"Subject: x\r\n\r\nhi\r\n",
                recipients=[queue.QueuedRecipient(a, a) for a in rcpts], now=now,
            )
        s.commit()

    lmtp = RecordingLMTP()
    claimed_by: collections.Counter[str] = collections.Counter()
    # The first claims start together, so their SELECTs meet the same due rows:
    # the race the row locks must win (left alone, one claim may finish before
    # the next begins and prove nothing).  Later rounds run as they come.
    together = threading.Barrier(managers)

    class RacingManager(QueueManager):
        first = True

        def _claim(self, conn: Connection, traces: list[str] | None = None) -> list[queue.Job]:
            if self.first:
                self.first = False
                together.wait(timeout=10)
            return super()._claim(conn, traces)

    async def one_manager(n: int) -> None:
        # Its own engine and pool, as a separate process would have; its own owner tag.
        db = Database(postgres.url, threads=4)
        qm = RacingManager(
            db=db, clock=SystemClock(), policy=Policy([60.0], 3600.0, 0.0),
            local_domains=["example.org"], hostname=f"mx{n}.test", local=lmtp,
            remote=RemoteDelivery(  # never used: every recipient is local
                hostname=f"mx{n}.test", resolver=Wire([], 1.0), relayhost="", relayhost_auth=None,
                transport={}, remote_port=25, per_destination=1, connect_timeout=1.0,
            ),
            max_in_flight=50,
        )
        qm.owner = f"mx{n}.test:{n}"
        try:
            while True:
                got = await qm.run_once()
                claimed_by[qm.owner] += got
                if not got:
                    await qm.drain()
                    with db.read() as s:
                        left = s.scalar(select(func.count()).where(Recipient.state != DELIVERED))
                    if left == 0:
                        return
                    await asyncio.sleep(0.02)
        finally:
            db.close()

    async def all_managers() -> None:
        await asyncio.gather(*(one_manager(n) for n in range(managers)))

    asyncio.run(all_managers())

    twice = {a: c for a, c in lmtp.received.items() if c != 1}
    assert not twice, f"recipients handed over more than once: {list(twice.items())[:5]}"
    assert sorted(lmtp.received) == sorted(expected)
    # The managers really shared the work (else this proves nothing about locking).
    assert all(claimed_by.values()) and len(claimed_by) == managers, claimed_by
    with setup.read() as s:
        states = collections.Counter(s.scalars(select(Recipient.state)))
        owners = set(s.scalars(select(Recipient.owner)))
    assert states == {DELIVERED: messages * per_message}, states
    assert owners == {""}
    # The MDA left its events to the queue managers (XRECORD): each delivery is
    # in the trace once, with the path its 250 named.
    with setup.read() as s:
        recorded = s.scalars(select(Event).where(Event.hop == "mda", Event.event == "delivered"))
        mda = collections.Counter((e.recipient, e.path) for e in recorded)
    assert sorted(a for a, _ in mda) == sorted(expected) and set(mda.values()) == {1}
    assert {p for _, p in mda} == {"/mail/x"}
    setup.close()


@pytest.mark.timeout(30)
def test_the_mailroom_command_manages_users_and_queue_on_postgresql(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    inst = on_postgres(tmp_path, postgres)
    add_user(inst, "alice@example.org", "maildir")
    add_user(inst, "bob@example.org", "mbox")
    r = inst.cli("user", "add", "alice@example.org", "--password-stdin", stdin="x\n")
    assert r.returncode == 1 and "exists" in r.stderr
    r = inst.cli("user", "list")
    assert r.returncode == 0, r.stderr
    assert [line.split()[:2] for line in r.stdout.splitlines()] == [
        ["alice@example.org", "maildir"], ["bob@example.org", "mbox"]
    ]

    r = inst.cli("queue", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    db = Database(postgres.url, threads=1)
    try:
        with db.write() as s:
            queue.enqueue(
                s, trace="Q00000000000000001", sender="carol@example.net", body=b"Subject: q\r\n\r\nq\r\n",
                recipients=[queue.QueuedRecipient("dave@example.net", "dave@example.net")],
                now=SystemClock().now(),
            )
            s.commit()
    finally:
        db.close()
    r = inst.cli("queue", "--json")
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)
    assert [(i["id"], i["sender"], [x["address"] for x in i["recipients"]]) for i in items] == [
        ("Q00000000000000001", "carol@example.net", ["dave@example.net"])
    ]
    assert items[0]["recipients"][0]["state"] == "queued"


def test_the_same_message_checked_by_two_sessions_at_once_is_queued_once(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    # A client that never saw our 250 sends again while the first copy is still being
    # committed (two MTAs, or two sessions of one): the second check must wait for
    # the first transaction and then find it, not queue the message a second time.
    import datetime as dt

    db = Database(postgres.url, threads=2)
    db.create_schema()
    now = SystemClock().now()
    since = now - dt.timedelta(days=1)
    check = {"message_id": "<same@example.net>", "sender": "a@example.net", "originals": ["b@example.org"],
             "digest": "d" * 64, "since": since}
    seen: list[str | None] = []
    try:
        with db.write() as first:
            assert resubmit.find(first, **check) is None
            queue.enqueue(first, trace="0192F3A1B2C3D4E5F6", sender="a@example.net", body=b"x", now=now,
                          recipients=[queue.QueuedRecipient("b@example.org", "b@example.org")],
                          message_id="<same@example.net>", digest="d" * 64)

            def second() -> None:
                with db.write() as s:
                    seen.append(resubmit.find(s, **check))
                    s.commit()

            t = threading.Thread(target=second)
            t.start()
            time.sleep(0.5)
            assert seen == []  # it waits for the first transaction...
            first.commit()
        t.join(10)
        assert seen == ["0192F3A1B2C3D4E5F6"]  # ...and then finds its message
    finally:
        db.close()


@pytest.mark.timeout(60)
def test_statements_on_the_drivers_cursor_store_and_read_as_core_does(postgres: PostgresServer) -> None:
    # common/prepared.py on psycopg: its named parameters, casts, and errors.
    db = Database(postgres.url, threads=1)
    db.create_schema()
    try:
        check_like_core(db)
    finally:
        db.close()
