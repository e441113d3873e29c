"""The queue manager's wake-up: a datagram on a Unix socket (Postfix's qmgr trigger).

The MTA sends one after each commit, naming the message it has just queued
(its trace id), and the queue manager claims that message at once, by its id.
`mailroom queue` sends one naming nothing (`scan`), which asks for a scan of
everything due.  The datagram carries no state: what is to be delivered is in
the queue (mta/queue.py), and a wake-up that is lost only makes the mail wait
for the queue manager's next periodic scan.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

from common.log import is_trace_id

# What a wake-up datagram without a trace id says: look for everything due.
SCAN = b"w"

_socket: socket.socket | None = None
_lost = False


def send(path: os.PathLike[str] | str, trace: str = "") -> None:
    """Tell the queue manager there is new mail: the message `trace`, or anything due.

    Best effort: if nobody listens the queue manager still finds the mail on
    its next periodic scan.  The kernel keeps only a few datagrams waiting
    (net.unix.max_dgram_qlen, 10): when one was refused, the next wake-up that
    gets through asks for a scan as well, so the refused one is found then.
    """
    global _socket, _lost
    try:
        if _socket is None:
            # One socket for the process, not three system calls more per message.
            _socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            _socket.setblocking(False)
            atexit.register(_socket.close)
        target = os.fspath(path)
        if _lost:
            _socket.sendto(SCAN, target)
            _lost = False
        _socket.sendto(trace.encode("ascii") if trace else SCAN, target)
    except BlockingIOError:
        _lost = True
    except OSError:
        pass


def scan(path: os.PathLike[str] | str) -> bool:
    """Ask the queue manager for a scan of everything due; whether one listens (and so was woken)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        try:
            s.sendto(SCAN, os.fspath(path))
        except BlockingIOError:
            return True  # it listens, and has wake-ups waiting already
        except OSError:  # no socket file, or nobody bound to it
            return False
    return True


def named(data: bytes) -> str | None:
    """The trace id a wake-up names, or None: a scan for everything due."""
    text = data.decode("ascii", "replace")
    return text if is_trace_id(text) else None


async def listen(path: Path, woken: Callable[[bytes], None]) -> asyncio.DatagramTransport:
    """Bind the wake-up socket at `path`; `woken` gets each datagram."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    # Bound here and handed over: uvloop takes a Unix datagram socket only as `sock`.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: _Receiver(woken), sock=sock)
    return transport


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, woken: Callable[[bytes], None]) -> None:
        self.woken = woken

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.woken(data)
