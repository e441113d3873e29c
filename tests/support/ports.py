"""Free loopback ports for listeners that tests start.

A port the kernel hands out for `bind(0)` lies in the ephemeral range
(/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 on Debian), the same range
it draws from for the local end of every outgoing connection.  Between the
moment a test picks such a port and the moment a daemon binds it, any client
connection in the run may take it, and the daemon fails with "address already
in use".  So ports come from below the ephemeral range, at random, and not again
in one test process until half of its range has been given out since (by then the
test that had it is long over).  When pytest-xdist runs the tests in several
worker processes, each worker draws from its own slice of that range, so two
workers never pick the same port between checking it and binding it.
"""

from __future__ import annotations

import os
import random
import socket

_BOTTOM, _TOP = 20000, 32000


def _worker_range() -> tuple[int, int]:
    """This process's share of the range: all of it, or one slice per xdist worker ("gw0", "gw1", ...)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return _BOTTOM, _TOP
    slices = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "8")))
    width = (_TOP - _BOTTOM) // slices
    low = _BOTTOM + (int(worker[2:]) % slices) * width
    return low, low + width - 1


_LOW, _HIGH = _worker_range()
_given: dict[int, None] = {}  # in the order given: the oldest are let go first


def free_port(host: str = "127.0.0.1", *, udp: bool = False) -> int:
    """A TCP port on `host` (and UDP too, with `udp`) that is free right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    for _ in range(1000):
        port = random.randint(_LOW, _HIGH)
        if port in _given:
            continue
        try:
            for kind in kinds:
                with socket.socket(family, kind) as s:
                    s.bind((host, port))
        except OSError:
            continue
        _given[port] = None
        if len(_given) > (_HIGH - _LOW) // 2:
            del _given[next(iter(_given))]
        return port
    raise RuntimeError(f"no free port on {host} between {_LOW} and {_HIGH}")
