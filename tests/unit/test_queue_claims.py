"""Claims on the queue: a restarted queue manager takes back only what dead holders left."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from common.clock import SystemClock
from common.db import Database
from common.models import ACTIVE, QUEUED, Recipient
from mta import queue


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
        with db.write() as s:
            [job2] = queue.claim(s, dead, SystemClock().now(), limit=1)
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
