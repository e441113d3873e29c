"""When a session's commands run: at once from `data_received`, or in the session's task.

A session (common/smtp/session.py) executes what needs no waiting straight
from `data_received` while its task waits for the client: no task wake-up
per command.  A command that may wait for something (a TLS handshake, the
client's next line, a handler's verdict) is handed to the task instead.
`waiting_verbs` says which commands those are for a kind of handler.

`Started` runs the first step of a coroutine now, from a callback, and the
rest where it is awaited: the implicit-TLS handshake must take the transport
in `connection_made` (uvloop starts reading when that returns), and the
session's task finishes it.

Nothing here reads or writes a socket.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar, cast

from common.smtp.handler import Handler

T = TypeVar("T")
# Commands that may wait for something (a TLS handshake, the client's next line)
# and so always run in the session's task; MAIL and RCPT join them when the
# handler has a hook for them.
MAY_WAIT = frozenset({b"STARTTLS", b"AUTH", b"BDAT"})
_VERBS: dict[type, frozenset[bytes]] = {}


def waiting_verbs(handler: type[Handler]) -> frozenset[bytes]:
    """The commands that may wait with this kind of handler: MAIL and RCPT too
    when it has a hook for them (its own `mail` or `rcpt`)."""
    verbs = _VERBS.get(handler)
    if verbs is None:
        extra = {b"MAIL"} if handler.mail is not Handler.mail else set()
        if handler.rcpt is not Handler.rcpt:
            extra.add(b"RCPT")
        verbs = _VERBS[handler] = MAY_WAIT | extra
    return verbs


class Started(Generic[T]):
    """A coroutine whose first step runs now, from a callback (say, connection_made);
    awaiting this, in a task, runs the rest and gives its result."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._first: Any = None
        self._result: T | None = None
        self._error: BaseException | None = None
        self._done = False
        try:
            self._first = coro.send(None)
        except StopIteration as stop:
            self._done, self._result = True, cast(T, stop.value)
        except Exception as exc:  # raised where it is awaited, as if it had run there
            self._done, self._error = True, exc

    def __await__(self) -> Generator[Any, Any, T]:
        if self._done:
            if self._error is not None:
                raise self._error
            return cast(T, self._result)
        coro, out = self._coro, self._first
        while True:
            try:
                sent = yield out  # what the coroutine waits for, waited for by our task
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancelled, say: the coroutine hears of it
                try:
                    out = coro.throw(exc)
                except StopIteration as stop:
                    return cast(T, stop.value)
            else:
                try:
                    out = coro.send(sent)
                except StopIteration as stop:
                    return cast(T, stop.value)
