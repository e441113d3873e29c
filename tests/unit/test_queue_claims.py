"""Claims on the queue: a restarted queue manager takes back only what dead holders left."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

from sqlalchemy import select, update

from common.clock import SystemClock
from common.db import Database
from common.models import ACTIVE, DELIVERED, QUEUED, Recipient
from mta import queue, wakeup


def _queue_one(db: Database, trace: str) -> None:
    with db.write() as s:
        queue.enqueue(s, trace=trace, sender="a@example.org", body=b"Subject: x\r\n\r\nx\r\n",
                      recipients=[queue.QueuedRecipient("b@example.org", "b@example.org")],
                      now=SystemClock().now())
        s.commit()


def test_release_stale_frees_only_claims_of_dead_queue_managers(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/q.db", threads=1)
    db.create_schema()
    try:
        _queue_one(db, "0000000000001AAAAA")
        _queue_one(db, "0000000000002BBBBB")
        alive = queue.owner_id("mx1")  # this very process: still delivering
        dead = "mx1:999999999.12345"  # no such process
        with db.write() as s:
            [job] = queue.claim(s, alive, SystemClock().now(), limit=1)
            s.commit()
        with db.write() as s:
            [job2] = queue.claim(s, dead, SystemClock().now(), limit=1)
            s.commit()
        with db.write() as s:
            assert queue.release_stale(s, "mx2") == 0  # another host's claims are not ours to judge
            assert queue.release_stale(s, "mx1") == 1
        with db.read() as s:
            states = dict(s.execute(select(Recipient.message_id, Recipient.state)).all())
        assert states == {job.trace: ACTIVE, job2.trace: QUEUED}
        with db.read() as s:
            attempts = dict(s.execute(select(Recipient.message_id, Recipient.attempts)).all())
        # The attempt the crash cut short counts: the next one is a retry.
        assert attempts == {job.trace: 0, job2.trace: 1}
    finally:
        db.close()


def test_the_claim_returns_each_jobs_delivery_options(tmp_path: Path) -> None:
    # Read with the claim, so the queue manager needs no read of its own per message.
    db = Database(f"sqlite:///{tmp_path}/q.db", threads=1)
    db.create_schema()
    try:
        with db.write() as s:
            queue.enqueue(
                s, trace="0000000000001AAAAA", sender="a@example.org", body=b"Subject: x\r\n\r\nx\r\n",
                recipients=[queue.QueuedRecipient("b@example.org", "b@example.org", notify="SUCCESS,DELAY",
                                                  orcpt="rfc822;b@example.org"),
                            queue.QueuedRecipient("c@example.org", "c@example.org")],
                now=SystemClock().now(),
                options={"ret": "HDRS", "envid": "QQ314159", "body_type": "8BITMIME", "smtputf8": True,
                         "requiretls": True},
            )
            _plain = queue.QueuedRecipient("d@example.org", "d@example.org")
            queue.enqueue(s, trace="0000000000002BBBBB", sender="", body=b"x\r\n", recipients=[_plain],
                          now=SystemClock().now())
            s.commit()
        with db.write() as s:
            jobs = {j.trace: j for j in queue.claim(s, "mx1:1.1", SystemClock().now())}
        asked = jobs["0000000000001AAAAA"].asked
        assert (asked.ret, asked.envid, asked.body_type, asked.smtputf8, asked.requiretls) == (
            "HDRS", "QQ314159", "8BITMIME", True, True)
        # Each claimed recipient carries its own NOTIFY and ORCPT.
        assert {r.address: (r.notify, r.orcpt) for r in jobs["0000000000001AAAAA"].recipients} == {
            "b@example.org": ("SUCCESS,DELAY", "rfc822;b@example.org"), "c@example.org": ("", "")}
        plain = jobs["0000000000002BBBBB"].asked
        assert (plain.ret, plain.envid, plain.body_type, plain.smtputf8, plain.requiretls) == (
            "", "", "7BIT", False, False)
    finally:
        db.close()


def test_a_claim_by_trace_ids_takes_only_those_messages(tmp_path: Path) -> None:
    # The MTA's wake-up names the message it queued: claimed by its id, not by a scan.
    db = Database(f"sqlite:///{tmp_path}/q.db", threads=1)
    db.create_schema()
    try:
        for trace in ("0000000000001AAAAA", "0000000000002BBBBB", "0000000000003CCCCC"):
            _queue_one(db, trace)
        with db.write() as s:
            got = queue.claim(s, "mx1:1.1", SystemClock().now(), traces=["0000000000002BBBBB"])
            assert queue.claim(s, "mx1:1.1", SystemClock().now(), traces=[]) == []
            s.commit()
        assert [j.trace for j in got] == ["0000000000002BBBBB"]
        with db.read() as s:
            states = dict(s.execute(select(Recipient.message_id, Recipient.state)).all())
        assert states == {"0000000000001AAAAA": QUEUED, "0000000000002BBBBB": ACTIVE, "0000000000003CCCCC": QUEUED}
        with db.write() as s:  # claimed already: a second wake-up for it takes nothing
            assert queue.claim(s, "mx1:1.1", SystemClock().now(), traces=["0000000000002BBBBB"]) == []
    finally:
        db.close()


def test_a_wake_up_the_kernel_refused_makes_the_next_one_ask_for_a_scan(tmp_path: Path) -> None:
    # The kernel keeps only max_dgram_qlen datagrams waiting; the trace id in a
    # refused one is lost, so the queue manager must be told to look for it.
    path = tmp_path / "qmgr.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as qmgr:
        qmgr.bind(str(path))
        qmgr.setblocking(False)
        traces = [f"{n:018X}" for n in range(64)]  # more than any queue keeps
        for t in traces:
            wakeup.send(path, t)
        got = _drain(qmgr)
        assert got and got == [t.encode() for t in traces[: len(got)]] and len(got) < len(traces)
        wakeup.send(path, "00000000000000FFFF")
        assert _drain(qmgr) == [wakeup.SCAN, b"00000000000000FFFF"]
        wakeup.send(path, "00000000000000FFFE")  # nothing lost since: the trace id alone
        assert _drain(qmgr) == [b"00000000000000FFFE"]


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(100))
        except BlockingIOError:
            return out


def test_the_claim_counts_each_messages_unfinished_recipients(tmp_path: Path) -> None:
    # When a job holds them all, its settle drops the body without reading the states again.
    db = Database(f"sqlite:///{tmp_path}/q.db", threads=1)
    db.create_schema()
    try:
        now = SystemClock().now()
        with db.write() as s:
            for trace, rcpts in (("0000000000001AAAAA", ["b@example.org", "c@example.org"]),
                                 ("0000000000002BBBBB", ["d@example.org", "e@example.org"])):
                queue.enqueue(s, trace=trace, sender="a@example.org", body=b"x\r\n", now=now,
                              recipients=[queue.QueuedRecipient(a, a) for a in rcpts])
            s.execute(update(Recipient).where(Recipient.address == "c@example.org").values(state=DELIVERED))
            s.execute(update(Recipient).where(Recipient.address == "e@example.org")
                      .values(state=ACTIVE, owner="mx2:1.1", lease="t2",  # another queue manager's
                              lease_expires=now + dt.timedelta(seconds=60)))
            s.commit()
        with db.write() as s:
            jobs = {j.trace: j for j in queue.claim(s, "mx1:1.1", now)}
        assert [(len(j.recipients), j.unfinished) for j in jobs.values()] == [(1, 1), (1, 2)]
    finally:
        db.close()
