"""`python -m bench.chain`: one message's way at a low rate, cut in two at the MTA's 250.

Load 3 of the bench gives the whole latency (the dot sent -> the file in
new/).  This splits it where the client sees it: from the dot to the MTA's
250 (reading the message's end, the DATA handler, the fsync'd commit: what
the client waits for), and from the 250 to the file in new/ (the wake-up
datagram, the queue manager's claim, LMTP, the MDA's write, fsync and link).
It starts a throwaway Mailroom (as `make bench` does: run as root), sends
`--messages` at `--rate` per second, a new connection each, and prints the
p50/p90/p99 of each part.  Both stamps come from time.monotonic() in this
process; the file's arrival is seen by inotify (bench/inotify.py).

    sudo .venv/bin/python -m bench.chain                 # 500 messages at 50/s
    sudo .venv/bin/python -m bench.chain --messages 100 --rate 20
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.support lives outside the installed packages

from bench.inotify import MaildirWatch  # noqa: E402
from bench.sender import _expect, message  # noqa: E402
from bench.systems import MailroomSystem  # noqa: E402

USER = "chain"


async def _one(port: int, seq: int, stamps: dict[int, tuple[float, float]]) -> None:
    data = message(seq, "load@source.test", f"{USER}@example.org", 5120)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _expect(reader, b"220")
        for cmd, code in ((b"EHLO bench.test", b"250"), (b"MAIL FROM:<load@source.test>", b"250"),
                          (f"RCPT TO:<{USER}@example.org>".encode(), b"250"), (b"DATA", b"354")):
            writer.write(cmd + b"\r\n")
            await _expect(reader, code)
        writer.write(data + b".\r\n")
        await writer.drain()
        dot = time.monotonic()
        await _expect(reader, b"250")
        stamps[seq] = (dot, time.monotonic())
        writer.write(b"QUIT\r\n")
    finally:
        writer.close()


async def _paced(port: int, seqs: range, rate: float) -> dict[int, tuple[float, float]]:
    stamps: dict[int, tuple[float, float]] = {}
    start, tasks = time.monotonic(), []
    for i, seq in enumerate(seqs):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(port, seq, stamps)))
    await asyncio.gather(*tasks)
    return stamps


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
            warm_up = asyncio.run(_paced(system.port, range(-20, 0), 20))  # numbered apart from the load
            watch.wait_for(folder, len(warm_up), 60)
            before = watch.count(folder)
            stamps = asyncio.run(_paced(system.port, range(args.messages), args.rate))
            watch.wait_for(folder, before + len(stamps), 60)
            parts: list[tuple[float, float, float]] = []
            for arrived, name in watch.times(folder)[before:]:
                seq = re.search(rb"X-Bench-Seq: (\d+)", (folder / name).read_bytes()[:2000])
                if seq is None or int(seq[1]) not in stamps:
                    continue
                dot, ok = stamps[int(seq[1])]
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


def _at(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


if __name__ == "__main__":
    raise SystemExit(main())
