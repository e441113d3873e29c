"""Claims are leases, and a holder that lost its lease settles nothing (mta/queue.py, mta/qmgr.py).

Two queue managers of two nodes ("mx1", "mx2") share one queue, each as
`python -m mta.qmgr` builds it (`QueueManager` with its node and `[queue]
lease`), on one fake clock so the lease can run out on cue.  mx1's deliveries
are held back after the next hop answered (`Held`): mx1 is a node that froze
between its delivery and its settle.  The tests check that mx2 takes over
only what is expired, and that mx1's late results change nothing; the last
one hands both deliveries to the real MDA and reads the mailboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from common.clock import FakeClock
from common.db import Database
from common.endpoint import Endpoint
from common.log import new_trace_id
from common.models import Event, Message, Recipient
from common.reply import Reply
from mta import queue
from mta.courier import Attempt, Courier, Delivered
from mta.delivery import LocalDelivery
from mta.qmgr import Policy, QueueManager
from tests.harness.services import Stack, installation
from tests.support.suite import Installation, maildir_messages, mbox_messages, wait_port

pytestmark = pytest.mark.timeout(60)

LEASE = 10.0
RECIPIENTS = ["alice@example.org", "bob@example.org"]
BODY = (b"From: carol@example.net\r\nSubject: leased\r\nMessage-ID: <leased@example.net>\r\n\r\n"
        b"Held, then taken over.\r\n")
OK = Reply(250, "2.0.0", "Ok")


class Held:
    """A courier whose answers wait for `release`: the hop (a scripted one, or `inner`)
    has answered, but the queue manager hears it only later, as a node that froze
    between its delivery and its settle."""

    local = True

    def __init__(self, replies: dict[str, Reply] | None = None, inner: Courier | None = None) -> None:
        self.replies = replies or {}
        self.inner = inner
        self.release = asyncio.Event()
        self.answered = asyncio.Event()
        self.attempts: list[Attempt] = []

    async def deliver(self, attempt: Attempt) -> Delivered:
        self.attempts.append(attempt)
        if self.inner is not None:
            got = await self.inner.deliver(attempt)
        else:
            got = Delivered([self.replies.get(r, OK) for r in attempt.recipients], "mda.test")
        self.answered.set()
        await self.release.wait()
        return got

    async def close(self) -> None:
        if self.inner is not None:
            await self.inner.close()


class Nowhere:
    """The remote courier: every recipient here is local."""

    local = False

    async def deliver(self, attempt: Attempt) -> Delivered:
        raise AssertionError(f"no remote delivery expected: {attempt.recipients}")

    async def close(self) -> None:
        pass


def manager(db: Database, clock: FakeClock, node: str, local: Courier) -> QueueManager:
    return QueueManager(
        db=db, clock=clock, policy=Policy([300.0], 5 * 86400.0, 0.0), local_domains=["example.org"],
        hostname=f"{node}.test", local=local, remote=Nowhere(), node=node, lease=LEASE,
    )


def enqueue(db: Database, clock: FakeClock) -> str:
    trace = new_trace_id()
    with db.write() as s:
        queue.enqueue(s, trace=trace, sender="carol@example.net", body=BODY, now=clock.now(),
                      recipients=[queue.QueuedRecipient(r, r) for r in RECIPIENTS])
        s.commit()
    return trace


def recipients(db: Database, trace: str) -> dict[str, Recipient]:
    with db.read() as s:
        return {r.address: r for r in s.scalars(select(Recipient).where(Recipient.message_id == trace))}


def events(db: Database, trace: str) -> list[tuple[str, str, str]]:
    with db.read() as s:
        return [(e.hop, e.event, e.recipient) for e in
                s.scalars(select(Event).where(Event.trace_id == trace, Event.hop.in_(("qmgr", "mda")))
                          .order_by(Event.id))]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.interop)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """The queue on SQLite, and on a throwaway PostgreSQL cluster (as several hosts share it)."""
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            from tests.support.postgres import PostgresServer

            url = stack.enter_context(PostgresServer(tmp_path)).url
        else:
            url = f"sqlite:///{tmp_path / 'queue.db'}"
        database = Database(url, threads=2)
        stack.callback(database.close)
        database.create_schema()
        yield database


def test_an_expired_lease_is_taken_over_by_a_queue_manager_of_any_node(db: Database) -> None:
    clock = FakeClock(dt.datetime(2030, 1, 1, 12, 0, 0))
    trace = enqueue(db, clock)

    async def go() -> tuple[Held, Held]:
        frozen, taking = Held(), Held()
        taking.release.set()  # mx2's hop answers at once
        mx1, mx2 = manager(db, clock, "mx1", frozen), manager(db, clock, "mx2", taking)
        assert await mx1.run_once() == 1
        await frozen.answered.wait()
        held = recipients(db, trace)
        assert {r.state for r in held.values()} == {"active"}
        assert {r.owner.split(":")[0] for r in held.values()} == {"mx1"}
        assert {r.lease_expires for r in held.values()} == {clock.now() + dt.timedelta(seconds=LEASE)}
        token = held["alice@example.org"].lease
        assert len(token) == 16 and {r.lease for r in held.values()} == {token}

        # Within the lease nobody else takes them, however often it looks.
        clock.advance(LEASE - 1)
        assert await mx2.run_once() == 0
        # mx1 renews while it works: the lease moves on from now.
        await mx1.renew()
        assert {r.lease_expires for r in recipients(db, trace).values()} == {clock.now() + dt.timedelta(seconds=LEASE)}
        clock.advance(LEASE - 1)
        assert await mx2.run_once() == 0  # past the first expiry, within the renewed one

        # mx1 falls silent past its lease: mx2 takes both over and delivers them.
        clock.advance(2)
        assert await mx2.run_once() == 1
        await mx2.drain()
        frozen.release.set()
        await mx1.drain()
        return frozen, taking

    frozen, taking = asyncio.run(go())
    after = recipients(db, trace)
    assert {r.state for r in after.values()} == {"delivered"}
    # The attempt mx1 may have made counts: mx2's is a retry, and says so (XRETRY to our MDA).
    assert {r.attempts for r in after.values()} == {2}
    assert [a.retry for a in taking.attempts] == [True] and [a.retry for a in frozen.attempts] == [False]
    assert {(r.owner, r.lease, r.lease_expires) for r in after.values()} == {("", "", None)}


def test_a_running_queue_manager_renews_its_leases_by_itself(db: Database) -> None:
    # mx1 as `python -m mta.qmgr` runs it (`serve`), with a short lease: while its delivery
    # takes many leases' time, mx2 never finds the claims expired.
    clock = FakeClock(dt.datetime(2030, 1, 1, 12, 0, 0))
    trace = enqueue(db, clock)
    short = 0.6

    async def go() -> None:
        frozen, taking = Held(), Held()
        taking.release.set()
        mx1, mx2 = manager(db, clock, "mx1", frozen), manager(db, clock, "mx2", taking)
        mx1.lease = mx2.lease = short
        mx1.lease_in_clock = mx2.lease_in_clock = short
        stop = asyncio.Event()
        serving = asyncio.create_task(mx1.serve(stop, poll_interval=0.05))
        await frozen.answered.wait()
        for _ in range(5):  # five leases' time on the clock, each renewed within a third of one
            clock.advance(short)
            await asyncio.sleep(short)
            assert await mx2.run_once() == 0
        stop.set()
        frozen.release.set()
        await serving

    asyncio.run(go())
    assert {r.state for r in recipients(db, trace).values()} == {"delivered"}
    assert {r.attempts for r in recipients(db, trace).values()} == {1}  # mx1's one attempt, nobody else's


def test_a_queue_manager_that_lost_its_lease_settles_nothing(
    db: Database, caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(dt.datetime(2030, 1, 1, 12, 0, 0))
    trace = enqueue(db, clock)

    async def go() -> None:
        # mx1's hop said 550 for alice and 451 for bob; mx1 hears it only after mx2 delivered both.
        frozen = Held({"alice@example.org": Reply(550, "5.1.1", "No such user"),
                       "bob@example.org": Reply(451, "4.3.0", "Try later")})
        taking = Held()
        taking.release.set()
        mx1, mx2 = manager(db, clock, "mx1", frozen), manager(db, clock, "mx2", taking)
        await mx1.run_once()
        await frozen.answered.wait()
        clock.advance(LEASE + 1)
        assert await mx2.run_once() == 1
        await mx2.drain()
        frozen.release.set()
        await mx1.drain()

    with caplog.at_level(logging.INFO, logger="qmgr"):
        asyncio.run(go())
    after = recipients(db, trace)
    # mx2's outcome stands: neither bounced nor deferred again by mx1's stale results.
    assert {a: r.state for a, r in after.items()} == {a: "delivered" for a in RECIPIENTS}
    assert events(db, trace) == [("qmgr", "delivered", "alice@example.org"), ("qmgr", "delivered", "bob@example.org")]
    with db.read() as s:
        assert s.scalars(select(Message.id).where(Message.is_bounce.is_(True))).all() == []  # no false bounce
    assert any("lease lost on 2 recipients" in r.getMessage() for r in caplog.records), caplog.text


def test_both_holders_delivered_and_the_mailboxes_hold_one_copy(tmp_path: Path) -> None:
    # The real MDA: mx1 handed the message over (the MDA wrote both copies) and froze before
    # its settle; mx2 took over and handed it over again.  The MDA's stores recognise the
    # repeat, the trace records one delivery per recipient, and mx1 records nothing.
    from mda.server import run as mda_run

    inst: Installation = installation(tmp_path / "store")
    stack = Stack(inst)
    db = Database(inst.config.database_url, threads=2)
    clock = FakeClock(dt.datetime(2030, 1, 1, 12, 0, 0))
    try:
        stack.start(mda_run)
        wait_port(inst.ports["lmtp"], 10)
        lmtp = Endpoint.parse(f"127.0.0.1:{inst.ports['lmtp']}")
        trace = enqueue(db, clock)

        async def go() -> None:
            frozen = Held(inner=LocalDelivery(lmtp, hostname="mx1.test", sessions=1, timeout=10))
            mx1 = manager(db, clock, "mx1", frozen)
            mx2 = manager(db, clock, "mx2", LocalDelivery(lmtp, hostname="mx2.test", sessions=1, timeout=10))
            await mx1.run_once()
            await frozen.answered.wait()  # both copies are written
            clock.advance(LEASE + 1)
            assert await mx2.run_once() == 1
            await mx2.drain()
            frozen.release.set()
            await mx1.drain()
            await mx1.local.close()
            await mx2.local.close()

        asyncio.run(go())
        assert len(maildir_messages(inst.mailbox("alice@example.org"))) == 1
        assert len(mbox_messages(inst.mailbox("bob@example.org"))) == 1
        assert {r.state for r in recipients(db, trace).values()} == {"delivered"}
        once_each = [(hop, "delivered", r) for r in RECIPIENTS for hop in ("mda", "qmgr")]
        assert sorted(events(db, trace)) == sorted(once_each)
    finally:
        db.close()
        stack.close()
