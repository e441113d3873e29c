"""The five loads, each run against one system at a time.

The driver (bench/__main__.py) runs every load against Mailroom and Postfix in
turn, so both see the same machine at nearly the same moment.
"""

from __future__ import annotations

import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench import procmem, sender
from bench.inotify import MaildirWatch
from tests.support.postfix import smtp_source

MESSAGE_SIZE = 5 * 1024


class System(Protocol):
    name: str

    @property
    def port(self) -> int: ...
    def new_folder(self, user: str) -> Path: ...
    def listener_pids(self) -> list[int]: ...
    def processes(self) -> dict[int, str]: ...
    def own_latencies(self, user: str) -> list[float]: ...


@dataclass
class Throughput:
    messages: int
    sessions: int
    accepted_per_s: float
    e2e_per_s: float
    delivered: int
    source_seconds: float
    e2e_seconds: float


def throughput(
    system: System, watch: MaildirWatch, user: str, *, messages: int, sessions: int,
    timeout: float = 900.0, sampler: procmem.Sampler | None = None, sender: str = "load@source.test",
) -> Throughput:
    """smtp-source `messages` x 5 KiB over `sessions` sessions from `sender`; wait until all are in new/."""
    folder = system.new_folder(user)
    before = watch.count(folder)
    started = time.monotonic()
    run = smtp_source(
        f"127.0.0.1:{system.port}", count=messages, sessions=sessions, size=MESSAGE_SIZE,
        sender=sender, recipient=f"{user}@example.org", timeout=timeout, check=False,
    )
    if run.process.returncode != 0:
        raise RuntimeError(f"{system.name}: smtp-source failed: {run.process.stderr.strip()[-2000:]}")
    last = watch.wait_for(folder, before + messages, timeout)
    delivered = watch.count(folder) - before
    end = last if last is not None else time.monotonic()
    e2e = end - started
    return Throughput(
        messages=messages, sessions=sessions,
        accepted_per_s=messages / run.elapsed, e2e_per_s=delivered / e2e if e2e > 0 else 0.0,
        delivered=delivered, source_seconds=run.elapsed, e2e_seconds=e2e,
    )


@dataclass
class Latency:
    rate: float
    duration: float
    sent: int
    accepted: int
    delivered: int
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    own_p50_ms: float
    own_p99_ms: float
    own_max_ms: float


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def _seq_of(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    for line in head.split(b"\n"):
        if line.lower().startswith(b"x-bench-seq:"):
            return int(line.split(b":", 1)[1])
    return None


def latency(
    system: System, watch: MaildirWatch, user: str, *, rate: float, duration: float,
    timeout: float = 120.0,
) -> Latency:
    """A steady `rate` msgs/s for `duration` s; latency = dot sent -> file in new/ (same clock)."""
    folder = system.new_folder(user)
    before = watch.count(folder)
    run = sender.paced(
        "127.0.0.1", system.port, rate=rate, duration=duration,
        sender="load@source.test", recipient=f"{user}@example.org", size=MESSAGE_SIZE,
    )
    watch.wait_for(folder, before + run.accepted, timeout)
    arrivals = watch.times(folder)[before:]
    lat = []
    for t, name in arrivals:
        seq = _seq_of(folder / name)
        if seq is None:
            seq = _seq_of_moved(folder, name)
        if seq is not None and seq in run.sent_at:
            lat.append(t - run.sent_at[seq])
    own = system.own_latencies(user)
    ms = [x * 1000 for x in lat]
    own_ms = [x * 1000 for x in own]
    return Latency(
        rate=rate, duration=duration, sent=int(rate * duration), accepted=run.accepted,
        delivered=len(arrivals), errors=len(run.errors),
        p50_ms=_pct(ms, 0.50), p99_ms=_pct(ms, 0.99), max_ms=max(ms, default=float("nan")),
        own_p50_ms=_pct(own_ms, 0.50), own_p99_ms=_pct(own_ms, 0.99),
        own_max_ms=max(own_ms, default=float("nan")),
    )


def _seq_of_moved(new_folder: Path, name: str) -> int | None:
    # Nothing here reads the Maildir, but be safe: a reader may have moved it to cur/.
    cur = new_folder.parent / "cur"
    for p in cur.glob(name + "*"):
        return _seq_of(p)
    return None


@dataclass
class Idle:
    connections: int
    greeted: int
    listener_processes: int
    rss_before_mb: float
    rss_mb: float
    pss_mb: float
    kb_per_connection: float


def idle(system: System, count: int) -> Idle:
    """Hold `count` greeted connections open; resident memory of the listening process(es)."""
    before = sum(procmem.rss_kb(p) for p in system.listener_pids())
    socks, greeted = sender.hold_idle("127.0.0.1", system.port, count)
    try:
        time.sleep(1.0)  # let forked smtpd processes settle (and Python allocate what it will)
        pids = system.listener_pids()
        rss = sum(procmem.rss_kb(p) for p in pids)
        pss = sum(procmem.pss_kb(p) for p in pids)
    finally:
        for s in socks:
            assert isinstance(s, socket.socket)
            s.close()
    return Idle(
        connections=count, greeted=greeted, listener_processes=len(pids),
        rss_before_mb=before / 1024, rss_mb=rss / 1024, pss_mb=pss / 1024,
        kb_per_connection=(rss - before) / max(1, greeted),
    )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
