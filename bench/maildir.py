"""`python -m bench.maildir`: the MDA's Maildir write alone, with its file in tmp/ named or unnamed.

A whole `make bench` run moves by more than a change to one process's system
calls can show (Postfix's own CPU per message moved from 1.7 to 3.6 ms
between two runs on one machine).  This measures only `mda.maildir.deliver`:
N messages of 5 KiB into one Maildir from T threads (the MDA's delivery
threads), once with the file in tmp/ unnamed (O_TMPFILE, linked into new/
through /proc/self/fd) and once named (open O_EXCL, link, unlink), taking
turns, and prints this process's user and system CPU per message, medians
over the runs.  The Maildir lives under --workdir (a real disk: fsync is the
point).

    python -m bench.maildir                     # 5 runs each, 4 threads, 3000 messages
    python -m bench.maildir --threads 1 --runs 3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from mda import maildir

BODY = b"Subject: bench\n\n" + b"x" * 5120


def one_run(box: Path, unnamed: bool, messages: int, threads: int) -> tuple[float, float, float]:
    """(user, system, wall) milliseconds per message for one batch of deliveries."""
    maildir._unnamed_tmp = unnamed
    shutil.rmtree(box, ignore_errors=True)
    maildir._forget(box)
    maildir.deliver(box, BODY, "0.M0R0.warm")  # the folders made outside the measurement
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: maildir.deliver(box, BODY, f"{i}.M{i}R{i}.bench"), range(1, messages + 1)))
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - started
    shutil.rmtree(box, ignore_errors=True)
    return (
        (after.ru_utime - before.ru_utime) * 1000 / messages,
        (after.ru_stime - before.ru_stime) * 1000 / messages,
        wall * 1000 / messages,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.maildir", description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args(argv)
    if not maildir._unnamed_tmp:
        print("this system cannot make unnamed files (no O_TMPFILE or no /proc): nothing to compare")
        return 1
    figures: dict[str, list[tuple[float, float, float]]] = {"unnamed": [], "named": []}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="mailroom-bench-maildir-") as work:
        for run in range(args.runs):
            order = ["unnamed", "named"] if run % 2 == 0 else ["named", "unnamed"]
            for how in order:
                figures[how].append(one_run(Path(work) / how, how == "unnamed", args.messages, args.threads))
    print(f"{args.messages} x 5 KiB from {args.threads} threads, {args.runs} runs each; median ms per message")
    for how, runs in figures.items():
        user, system, wall = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"  tmp/ file {how:8} user {user:.3f}  system {system:.3f}  CPU {user + system:.3f}  wall {wall:.3f}")
    cpu = {how: statistics.median(r[0] + r[1] for r in runs) for how, runs in figures.items()}
    print(f"unnamed_vs_named_cpu={cpu['unnamed'] / cpu['named']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
