"""How fast can the queue commit?  Per-message commits against group commit, on this disk.

    python -m bench.commits [--messages 2000] [--sessions 20]

The MTA's 250 waits for one fsync'd SQLite commit per message (message row,
recipient row, `received` and `queued` events), which is where load 1 spends
its time.  This measures, on the same disk and in one process, 20 concurrent
sessions storing messages shaped like the MTA's:

- per message: `await db.run(store)`, one fsync'd commit each (the MTA today);
- group commit: `await db.write_batched(store_in)`, one fsync'd commit per
  batch of whatever arrived while the last commit ran (same promise: each
  caller resumes only after the commit that holds its message);
- and the follow-up event rows (qmgr settle, MDA `delivered`) with fsync'd
  commits against `write_relaxed` (synchronous=NORMAL) commits.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from sqlalchemy import Connection, insert

from common.db import Database
from common.events import EventName, Hop
from common.log import new_trace_id
from common.models import Message, Recipient, add_event, utcnow

BODY = b"x" * 5 * 1024


def _store_in(conn: Connection, trace: str) -> None:
    # Core statements on the connection, as the MTA's store (group commit hands it a Connection).
    now = utcnow()
    add_event(conn, trace, Hop.MTA, EventName.RECEIVED, time=now, detail="smtp from 127.0.0.1 helo=bench")
    conn.execute(insert(Message), {"id": trace, "sender": "load@source.test", "size": len(BODY), "body": BODY,
                                   "received": now})
    conn.execute(insert(Recipient), {"message_id": trace, "address": "load1@example.org",
                                     "original": "load1@example.org", "next_attempt": now})
    add_event(conn, trace, Hop.MTA, EventName.QUEUED, time=now, detail=f"size={len(BODY)} nrcpt=1")


def _store(db: Database, trace: str) -> None:
    with db.write() as s:
        _store_in(s.connection(), trace)
        s.commit()


def _event(db: Database, trace: str, relaxed: bool) -> None:
    with (db.write_relaxed() if relaxed else db.write()) as s:
        add_event(s, trace, Hop.MDA, EventName.DELIVERED, recipient="load1@example.org", detail="250 2.0.0 Ok")
        s.commit()


async def _run(db: Database, messages: int, sessions: int, mode: str) -> float:
    todo = iter(range(messages))

    async def session() -> None:
        for _ in todo:
            trace = new_trace_id()
            if mode == "per message":
                await db.run(_store, db, trace)
            elif mode == "group commit":
                await db.write_batched(_store_in, trace)
            else:
                await db.run(_event, db, trace, mode == "events, relaxed")

    start = time.monotonic()
    await asyncio.gather(*(session() for _ in range(sessions)))
    return messages / (time.monotonic() - start)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.commits")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    modes = ("per message", "group commit", "events, fsync'd", "events, relaxed")
    # Two rounds, alternating, on one database each: the machine is shared and noisy.
    for round_ in (1, 2):
        for mode in modes:
            with tempfile.TemporaryDirectory(dir=args.workdir) as d:
                db = Database(f"sqlite:///{d}/bench.db", threads=4)
                db.create_schema()
                rate = asyncio.run(_run(db, args.messages, args.sessions, mode))
                db.close()
            print(f"round {round_}: {mode:<16} {rate:8.0f} /s", flush=True)


if __name__ == "__main__":
    main()
