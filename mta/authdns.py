"""The blocking face of common/dns.py, for one-shot commands (`mailroom dns --check`).

The daemons never use it: they are given the process's asynchronous, caching
resolver (common/dns.py) and await it on their event loop.  A command that
runs once and prints, outside any event loop, asks here instead: each
`query` runs one lookup on a private event loop, through the same `Wire` the
daemons use (no cache: the command wants what DNS says now).  An answer is a
list of values: TXT as bytes (strings joined), A/AAAA and PTR as text, MX as
(preference, exchange).  No such name or no such record is an empty list; a
failure to learn the answer raises `DNSTempError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

from common.dns import DNSTempError, Wire

__all__ = ["DNSTempError", "Resolver", "SyncResolver", "txt"]


class Resolver(Protocol):
    def query(self, name: str, rdtype: str) -> list[Any]: ...


class SyncResolver:
    """Blocking lookups through the configured nameservers (empty: the system's)."""

    def __init__(self, nameservers: Sequence[str], timeout: float) -> None:
        self.nameservers = tuple(nameservers)
        self.timeout = timeout

    def query(self, name: str, rdtype: str) -> list[Any]:
        async def ask() -> list[Any]:
            answer = await Wire(self.nameservers, self.timeout).lookup(name, rdtype)
            return [_value(rdtype.upper(), rd) for rd in answer.records]

        with contextlib.closing(asyncio.new_event_loop()) as loop:
            return loop.run_until_complete(ask())


def _value(rdtype: str, rd: Any) -> Any:
    if rdtype == "TXT":
        return b"".join(rd.strings)
    if rdtype in ("A", "AAAA"):
        return str(rd.address)
    if rdtype == "MX":
        return (int(rd.preference), rd.exchange.to_text(omit_final_dot=True))
    if rdtype in ("PTR", "CNAME"):
        return rd.target.to_text(omit_final_dot=True)
    return rd.to_text()


def txt(resolver: Resolver, name: str) -> list[bytes]:
    return [bytes(v) for v in resolver.query(name, "TXT")]
