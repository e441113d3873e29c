"""`python -m bench.queue`: the queue's database work for one message, alone.

A whole `make bench` run moves by more than a tenth of a millisecond per
message between runs.  This measures only the three steps each message costs
the database, each in a write transaction of its own as in one session: the
MTA's `queue.accept` (fsync'd commit, the resubmission look-up included), the
queue manager's claim of the message its wake-up named (`queue.claim` with
the trace id) and its `queue.settle` after a delivery (relaxed commits).  N
messages of 5 KiB with one local recipient into a real SQLite file under
--workdir; prints this process's CPU per message for each step (user and
system, `time.process_time`), medians over the runs.  To compare two versions
of the code, run it on each checkout.

    python -m bench.queue                   # 5 runs of 500 messages
    python -m bench.queue --messages 100 --runs 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

from common.db import Database
from common.reply import Reply
from mta import queue
from mta.options import Asked

BODY = b"Subject: bench\r\n\r\n" + b"La de da de da.\r\n" * 300
POLICY = queue.Policy(retry_schedule=[60.0], max_queue_lifetime=86400.0, delay_warning=0.0)
STEPS = ("accept", "claim", "settle")


def one_run(db: Database, run: int, messages: int) -> dict[str, float]:
    """CPU milliseconds per message of each step, for one run."""
    spent = dict.fromkeys(STEPS, 0.0)
    for n in range(messages):
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        trace = f"{run:06X}{n:012X}"
        incoming = queue.Incoming(
            trace, "load@source.test", BODY, [queue.QueuedRecipient("u@example.org", "u@example.org")],
            ["u@example.org"], now, "127.0.0.1", "smtp from 127.0.0.1", f"<{trace}@source.test>", trace, Asked(),
        )
        t0 = time.process_time()
        with db.engine.begin() as conn:
            queue.accept(conn, incoming, "mx.example.org", ["example.org"], window=86400.0)
        t1 = time.process_time()
        with db.relaxed_engine.begin() as conn:
            [job] = queue.claim(conn, "bench:1.1", now, traces=[trace])
        t2 = time.process_time()
        results = [queue.Result(r, Reply(250, "2.0.0", "Ok"), local=True) for r in job.recipients]
        with db.relaxed_engine.begin() as conn:
            queue.settle(conn, job, results, now=now, policy=POLICY, hostname="mx.example.org",
                         local_domains=["example.org"])
        t3 = time.process_time()
        spent["accept"] += t1 - t0
        spent["claim"] += t2 - t1
        spent["settle"] += t3 - t2
    return {step: seconds * 1000 / messages for step, seconds in spent.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.queue", description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="mailroom-bench-queue-") as work:
        db = Database(f"sqlite:///{work}/queue.db", threads=1)
        db.create_schema()
        try:
            one_run(db, 0, min(args.messages, 100))  # warm-up: imports, compiled statements
            runs = [one_run(db, run, args.messages) for run in range(1, args.runs + 1)]
        finally:
            db.close()
    print(f"{args.messages} messages of 5 KiB, one transaction per step, {args.runs} runs; "
          "median CPU ms per message")
    for step in STEPS:
        print(f"  {step:7} {statistics.median(r[step] for r in runs):.3f}")
    print(f"queue_cpu_ms_per_msg={statistics.median(sum(r.values()) for r in runs):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
