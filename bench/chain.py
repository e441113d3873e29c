"""`python -m bench.chain`: one message's way at a low rate, cut in two at the MTA's 250.

Load 3 of the bench gives the whole latency (the dot sent -> the file in
new/).  This splits it where the client sees it: from the dot to the MTA's
250 (reading the message's end, the DATA handler, the fsync'd commit: what
the client waits for), and from the 250 to the file in new/ (the wake-up
datagram, the queue manager's claim, LMTP, the MDA's write, fsync and link).
It starts a throwaway Mailroom (as `make bench` does: run as root), sends
`--messages` at `--rate` per second, a new connection each, and prints the
p50/p90/p99 of each part.  Both stamps come from time.monotonic() in this
process; the file's arrival is seen by inotify (bench/inotify.py).  On a
busy machine the second part can be below zero: the MTA sends its wake-up
before its 250, and the delivery may beat this process's reading of the 250.

    sudo .venv/bin/python -m bench.chain                 # 500 messages at 50/s
    sudo .venv/bin/python -m bench.chain --messages 100 --rate 20
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.support lives outside the installed packages

from bench import sender  # noqa: E402
from bench.inotify import MaildirWatch  # noqa: E402
from bench.systems import MailroomSystem  # noqa: E402

USER = "chain"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chain", description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="mailroom-bench-chain-") as work:
        Path(work).chmod(0o711)  # the daemons serve as the Mailroom user
        system = MailroomSystem(Path(work) / "mailroom", [USER], idle_connections=10)
        system.start()
        try:
            folder = system.new_folder(USER)
            watch = MaildirWatch()
            watch.add(folder)
            # A warm-up, delivered before the count starts (its numbers repeat the load's).
            warm_up = _send(system.port, 20.0, 1.0)  # 20 messages
            watch.wait_for(folder, warm_up.accepted, 60)
            before = watch.count(folder)
            run = _send(system.port, args.rate, args.messages / args.rate)
            watch.wait_for(folder, before + run.accepted, 60)
            parts: list[tuple[float, float, float]] = []
            for arrived, name in watch.times(folder)[before:]:
                seq = re.search(rb"X-Bench-Seq: (\d+)", (folder / name).read_bytes()[:2000])
                if seq is None or int(seq[1]) not in run.accepted_at:
                    continue
                dot, ok = run.sent_at[int(seq[1])], run.accepted_at[int(seq[1])]
                parts.append((ok - dot, arrived - ok, arrived - dot))
        finally:
            system.stop()
    print(f"{len(parts)} messages at {args.rate:g}/s, a new connection each (ms)")
    titles = ("dot -> 250 at the client (DATA's end, the handler, the fsync'd commit)",
              "250 -> file in new/ (wake-up, claim, LMTP, the MDA's write, fsync, link)",
              "dot -> file in new/")
    for i, title in enumerate(titles):
        ms = sorted(p[i] * 1000 for p in parts)
        print(f"  {title:74} p50 {statistics.median(ms):5.2f}  p90 {_at(ms, 0.9):5.2f}  p99 {_at(ms, 0.99):5.2f}")
    return 0


def _send(port: int, rate: float, duration: float) -> sender.PacedRun:
    return sender.paced("127.0.0.1", port, rate=rate, duration=duration, sender="load@source.test",
                        recipient=f"{USER}@example.org", size=5120)


def _at(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


if __name__ == "__main__":
    raise SystemExit(main())
