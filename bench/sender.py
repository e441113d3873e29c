"""A paced SMTP client: one message every 1/rate seconds, each on its own connection.

smtp-source sends as fast as it can; a latency figure needs an open-loop load
instead (a new message every 20 ms whether or not the last one is done), or a
slow server would simply be sent less.  Each message carries an X-Bench-Seq
header so the benchmark can tell which file in the Maildir is which, and the
client notes the moment it sent the end-of-data dot: from then on the message
is the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field


@dataclass
class PacedRun:
    sent_at: dict[int, float] = field(default_factory=dict)  # seq -> monotonic time of the dot
    accepted_at: dict[int, float] = field(default_factory=dict)  # seq -> monotonic time of the 250
    accepted: int = 0
    errors: list[str] = field(default_factory=list)


def message(seq: int, sender: str, recipient: str, size: int) -> bytes:
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: bench {seq}\r\n"
        f"Message-ID: <bench.{seq}.{time.time_ns()}@source.test>\r\nX-Bench-Seq: {seq}\r\n\r\n"
    ).encode()
    line = b"La de da de da 1.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


async def _expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            break
    if not line.startswith(code):
        raise RuntimeError(line.decode(errors="replace").strip())


async def _one(host: str, port: int, seq: int, sender: str, recipient: str, size: int, run: PacedRun) -> None:
    data = message(seq, sender, recipient, size)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _expect(reader, b"220")
        for cmd, code in ((b"EHLO bench.test", b"250"), (f"MAIL FROM:<{sender}>".encode(), b"250"),
                          (f"RCPT TO:<{recipient}>".encode(), b"250"), (b"DATA", b"354")):
            writer.write(cmd + b"\r\n")
            await _expect(reader, code)
        writer.write(data + b".\r\n")
        await writer.drain()
        run.sent_at[seq] = time.monotonic()
        await _expect(reader, b"250")
        run.accepted_at[seq] = time.monotonic()
        run.accepted += 1
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _paced(
    host: str, port: int, *, rate: float, duration: float, sender: str, recipient: str, size: int
) -> PacedRun:
    run = PacedRun()
    total = int(rate * duration)
    start = time.monotonic()
    tasks = []

    async def guarded(seq: int) -> None:
        try:
            await _one(host, port, seq, sender, recipient, size, run)
        except Exception as exc:  # noqa: BLE001 - a failed message is a figure, not a crash
            run.errors.append(f"{seq}: {exc}")

    for seq in range(total):
        delay = start + seq / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(guarded(seq)))
    await asyncio.gather(*tasks)
    return run


def paced(
    host: str, port: int, *, rate: float, duration: float, sender: str, recipient: str, size: int
) -> PacedRun:
    """Send `rate * duration` messages at a steady `rate` per second; returns when all got a reply."""
    return asyncio.run(
        _paced(host, port, rate=rate, duration=duration, sender=sender, recipient=recipient, size=size)
    )


def hold_idle(host: str, port: int, count: int, timeout: float = 120.0) -> tuple[list[object], int]:
    """Open `count` connections and read each greeting; returns (sockets, how many were greeted).

    The caller closes the sockets.  A connection counts only once the server
    sent its 220, so it really holds a session (for Postfix: an smtpd process).
    """
    import selectors
    import socket

    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    greeted = 0
    deadline = time.monotonic() + timeout
    pending: dict[socket.socket, bytes] = {}
    for i in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((host, port))
        socks.append(s)
        sel.register(s, selectors.EVENT_READ)
        pending[s] = b""
        if i % 100 == 99:  # let the server's accept queue drain between bursts
            time.sleep(0.05)
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            s = sock
            try:
                chunk = s.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                sel.unregister(s)
                pending.pop(s, None)
                continue
            pending[s] += chunk
            if pending[s].endswith(b"\n") and pending[s][3:4] != b"-":
                if pending[s].startswith(b"220"):
                    greeted += 1
                sel.unregister(s)
                del pending[s]
    sel.close()
    return list(socks), greeted
