"""The queue manager in process, against scripted next hops found through a real DNS server.

`Rig` is a `QueueManager` with a FakeClock, a SQLite queue and the real
`RemoteDelivery` and `LocalDelivery`.  The remote hosts (tests/harness/peers.py)
listen on 127.0.0.x loopback addresses, one per role in `IPS`, all on one port
(the `port` fixture, `[mta] remote_port`), named by `RECORDS` in a real DNS
server on loopback (the `dns_server` fixture, tests/support/dns_server.py).
A test module imports the fixtures it uses (`dns_server`, `port`, `rig_args`)
and runs a rig and its peers on one event loop with `asyncio.run`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from common.clock import FakeClock
from common.db import Database
from common.dns import Wire
from common.log import new_trace_id
from common.models import Event, Message, Recipient
from mta import queue
from mta.delivery import LocalDelivery, RemoteDelivery
from mta.qmgr import Policy, QueueManager
from tests.support.dns_server import DNSServer
from tests.support.ports import free_port

IPS = {
    "ok": "127.0.0.2", "soft": "127.0.0.3", "hard": "127.0.0.4", "drop": "127.0.0.5", "stall": "127.0.0.6",
    "down": "127.0.0.7", "sender": "127.0.0.8", "backup": "127.0.0.9", "transport": "127.0.0.10",
}
RECORDS: dict[str, Any] = {
    **{f"{name}.test": {"MX": [(10, f"mx.{name}.test")]} for name in IPS},
    **{f"mx.{name}.test": {"A": [ip]} for name, ip in IPS.items()},
    "twomx.test": {"MX": [(10, "mx.down.test"), (20, "mx.backup.test")]},
    "nomx.test": {"A": [IPS["ok"]]},
    "nullmx.test": {"MX": [(0, ".")]},
    "servfail.test": "SERVFAIL",
    "loop.test": {"MX": [(10, "mail.test")]},
}
SENDER = "alice@sender.test"
BODY = b"From: Alice <alice@sender.test>\r\nSubject: the plan\r\nMessage-ID: <p@sender.test>\r\n\r\nhello\r\n"

# A header, then octets no DATA could carry: NUL, bare LF, bare CR, a lone dot line, 0xFF.
BINARY = (
    b"From: Alice <alice@sender.test>\r\nSubject: bits\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
    + b"\x00\x01bare\nLF\rCR\r\n.\r\nend\xff" + bytes(range(256))
)


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer(RECORDS) as server:
        yield server


@pytest.fixture(scope="module")
def port() -> int:
    """One port free on every 127.0.0.x we use (the MX hosts all listen on it)."""
    for _ in range(50):
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(socket.socket()) for _ in IPS]
            try:
                p = free_port(IPS["ok"])
                socks[0].bind((IPS["ok"], p))
                for s, ip in zip(socks[1:], list(IPS.values())[1:], strict=True):
                    s.bind((ip, p))
                return p
            except OSError:
                continue
    raise AssertionError("no common free port")



def queue_message(db: Database, clock: FakeClock, recipients: list[str], sender: str, body: bytes,
                  trace: str | None = None) -> str:
    """Put a message in the queue as the MTA's accept would, due now; returns its trace id."""
    trace = trace or new_trace_id()
    with db.write() as s:
        queue.enqueue(s, trace=trace, sender=sender, body=body, now=clock.now(),
                      recipients=[queue.QueuedRecipient(r, r) for r in recipients])
        s.commit()
    return trace


class Rig:
    def __init__(self, tmp: Path, dns: DNSServer, port: int, *, lmtp: str = "127.0.0.1:9", policy: Policy | None = None,
                 **remote: Any) -> None:
        self.db = Database(f"sqlite:///{tmp / 'q.db'}", threads=2)
        self.db.create_schema()
        self.clock = FakeClock(dt.datetime(2030, 1, 1, 12, 0, 0))
        args: dict[str, Any] = {
            "hostname": "mail.test", "resolver": Wire([dns.address], 1.0), "relayhost": "",
            "relayhost_auth": None, "transport": {}, "remote_port": port, "per_destination": 10,
            "connect_timeout": 2.0, "timeout": 2.0,
        }
        args.update(remote)
        self.remote = RemoteDelivery(**args)
        self.local = LocalDelivery(lmtp, hostname="mail.test", sessions=2, timeout=5)
        self.qm = QueueManager(
            db=self.db, clock=self.clock,
            policy=policy or Policy([300.0, 600.0, 1200.0, 2400.0, 3600.0], 5 * 86400.0, 4 * 3600.0),
            local_domains=["example.org"], hostname="mail.test", local=self.local, remote=self.remote,
        )

    def enqueue(self, recipients: list[str], sender: str = SENDER, body: bytes = BODY) -> str:
        return queue_message(self.db, self.clock, recipients, sender, body)

    async def run(self) -> int:
        """One queue manager round, waited for."""
        n = await self.qm.run_once()
        await self.qm.drain()
        return n

    def recipients(self, trace: str) -> dict[str, Recipient]:
        with self.db.read() as s:
            return {r.address: r for r in s.scalars(select(Recipient).where(Recipient.message_id == trace))}

    def events(self, trace: str) -> list[Event]:
        with self.db.read() as s:
            return list(s.scalars(select(Event).where(Event.trace_id == trace).order_by(Event.id)))

    def dsns(self) -> list[Message]:
        with self.db.read() as s:
            return list(s.scalars(select(Message).where(Message.is_bounce.is_(True)).order_by(Message.id)))

    async def close(self) -> None:
        await self.remote.close()
        await self.local.close()
        self.db.close()


@pytest.fixture
def rig_args(tmp_path: Path, dns_server: DNSServer, port: int) -> tuple[Path, DNSServer, int]:
    return tmp_path, dns_server, port



def enqueue(rig: Rig, recipients: dict[str, tuple[str, str]], *, body: bytes = BODY, sender: str = SENDER,
            **options: Any) -> str:
    """Queue a message; recipients: address -> (NOTIFY, ORCPT); options: Message columns."""
    trace = new_trace_id()
    with rig.db.write() as s:
        queue.enqueue(
            s, trace=trace, sender=sender, body=body, now=rig.clock.now(), options=options,
            recipients=[queue.QueuedRecipient(a, a, notify=n, orcpt=o) for a, (n, o) in recipients.items()],
        )
        s.commit()
    return trace


def state(rig: Rig, trace: str, address: str) -> tuple[str, str]:
    """A recipient's state and the last reply about it."""
    r = rig.recipients(trace)[address]
    return r.state, r.last_reply
