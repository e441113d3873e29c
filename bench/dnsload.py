"""The DNS loads: what the sender checks cost, and what a domain whose DNS never answers costs others.

A second throwaway Mailroom runs with `[mailauth] check = true`, its resolver
pointed at a local DNS server (tests/support/dns_server.py) that publishes an
SPF pass and a DMARC record for the load's sender domain, and never answers
for stall.test.

- `checks`: load 1 (smtp-source, the same messages and sessions) against it;
  the driver divides its rate by load 1's against the main Mailroom (checks
  off) in the same run: `checks_ratio`.
- `stall`: `sessions` sessions send `messages` from fast.test alone, then
  again while `stalled` other sessions send from stall.test, each waiting for
  its reply before sending the next: `dns_stall_ratio` is the first group's
  rate with the stall over its rate alone.  Each stalled message must get its
  reply (451 4.7.1) within `[dns] timeout` + 1 s.  The installation remembers
  no failure (`failure_ttl = 0`), so every stalled message really waits for
  DNS, rather than getting its 451 at once from the failure remembered for
  the one before.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loads
from bench.inotify import MaildirWatch
from bench.systems import DOMAIN, MailroomSystem
from tests.support.dns_server import DNSServer

USERS = ["checks", "fast", "warm"]
RECORDS: dict[str, Any] = {
    # The load's sender (smtp-source writes From: <load@source.test> too) and the fast group's.
    **{d: {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']} for d in ("source.test", "fast.test")},
    **{f"_dmarc.{d}": {"TXT": ['"v=DMARC1; p=reject"']} for d in ("source.test", "fast.test")},
    "stall.test": "TIMEOUT",
    "_dmarc.stall.test": "TIMEOUT",
}


class ChecksSystem(MailroomSystem):
    """A Mailroom with the sender checks on, asking `dns` with `timeout` per check."""

    name = "Mailroom checks on"

    def __init__(self, root: Path, dns: DNSServer, *, timeout: float, mta_processes: int = 1) -> None:
        super().__init__(root, USERS, 0, mta_processes=mta_processes)
        self.timeout = timeout
        self.inst.set("mailauth", "check", "true")
        self.inst.set("dns", "nameservers", f'["{dns.address}"]')
        self.inst.set("dns", "timeout", f'"{timeout:g}s"')
        self.inst.set("dns", "failure_ttl", '"0s"')
        self.inst.set("imap", "enabled", "false")  # not measured here: one program fewer to start


def start_dns() -> DNSServer:
    return DNSServer(RECORDS).start()


@dataclass
class Stall:
    messages: int
    sessions: int
    stalled_sessions: int
    alone_per_s: float
    with_stall_per_s: float
    ratio: float
    stalled_replies: int  # replies the stalled sessions got while the fast group ran and just after
    stalled_max_s: float  # the longest a stalled message waited for its reply
    stalled_codes: dict[str, int] = field(default_factory=dict)


def stall(
    system: ChecksSystem, watch: MaildirWatch, *, messages: int, sessions: int, stalled: int,
) -> Stall:
    alone = loads.throughput(system, watch, "fast", messages=messages, sessions=sessions, sender="load@fast.test")
    senders = _Stalled(system.port, stalled)
    senders.start()
    try:
        senders.wait_all_waiting(timeout=10)
        during = loads.throughput(
            system, watch, "fast", messages=messages, sessions=sessions, sender="load@fast.test"
        )
    finally:
        senders.stop(timeout=system.timeout + 10)
    return Stall(
        messages=messages, sessions=sessions, stalled_sessions=stalled,
        alone_per_s=alone.e2e_per_s, with_stall_per_s=during.e2e_per_s,
        ratio=during.e2e_per_s / alone.e2e_per_s if alone.e2e_per_s else float("nan"),
        stalled_replies=len(senders.waits), stalled_max_s=max(senders.waits, default=float("nan")),
        stalled_codes=dict(senders.codes),
    )


class _Stalled:
    """`n` SMTP sessions on their own thread and event loop, each sending from stall.test
    again and again, one message at a time, timing each reply."""

    def __init__(self, port: int, n: int) -> None:
        self.port = port
        self.n = n
        self.waits: list[float] = []
        self.codes: dict[str, int] = {}
        self.waiting = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait_all_waiting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.waiting < self.n and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self, timeout: float) -> None:
        """No new message; each session's last one gets its reply (or `timeout` passes)."""
        self._stop.set()
        self._thread.join(timeout)

    async def _main(self) -> None:
        await asyncio.gather(*(self._session(i) for i in range(self.n)), return_exceptions=True)

    async def _session(self, i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            await _reply(reader)
            await _command(writer, reader, b"EHLO mx.stall.test")
            seq = 0
            while not self._stop.is_set():
                seq += 1
                await _command(writer, reader, b"MAIL FROM:<spam@stall.test>")
                await _command(writer, reader, f"RCPT TO:<fast@{DOMAIN}>".encode())
                await _command(writer, reader, b"DATA")
                writer.write(
                    f"From: spam@stall.test\r\nTo: fast@{DOMAIN}\r\nSubject: {i}.{seq}\r\n"
                    f"Message-ID: <{i}.{seq}.{time.time_ns()}@stall.test>\r\n\r\nhello\r\n.\r\n".encode()
                )
                await writer.drain()
                started = time.monotonic()
                self.waiting += 1 if seq == 1 else 0
                code = await _reply(reader)
                self.waits.append(time.monotonic() - started)
                self.codes[code] = self.codes.get(code, 0) + 1
            writer.write(b"QUIT\r\n")
            await writer.drain()
        except (OSError, RuntimeError) as exc:
            self.errors.append(str(exc))
        finally:
            writer.close()


async def _reply(reader: asyncio.StreamReader) -> str:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line[:3].decode()


async def _command(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, line: bytes) -> str:
    writer.write(line + b"\r\n")
    await writer.drain()
    return await _reply(reader)
