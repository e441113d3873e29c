"""`python -m cli.supervisord`: supervisord, woken at once when a program exits.

supervisord's main loop waits up to a second in `poll()` between its looks at
the programs, and it stops one program at a time in priority order, going on to
the next only at a look after the last one exited.  A signal does not end the
wait (Python retries an interrupted `poll()`), so each program cost about a
second to stop, whatever the program itself took, and the first programs
started a second late.  Here a pipe joins supervisord's poll set, and
`signal.set_wakeup_fd` writes a byte into it at every signal: a SIGCHLD (a
program exited) or a SIGTERM ends the wait at once.  Nothing else changes:
the same configuration, the same order, the same supervisord.
"""

from __future__ import annotations

import contextlib
import os
import signal

from supervisor import supervisord
from supervisor.medusa import asyncore_25


class _Waker:
    """A pipe in supervisord's socket map: readable when a signal has arrived."""

    def __init__(self) -> None:
        self.fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def handle_read_event(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 4096)  # the signals are handled by supervisord's own loop

    def handle_error(self) -> None:  # called by supervisord's loop if a read fails
        pass

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.write_fd)


class Supervisor(supervisord.Supervisor):  # type: ignore[misc] # (supervisor has no type hints)
    def run(self) -> None:
        waker = _Waker()
        asyncore_25.socket_map[waker.fd] = waker
        signal.set_wakeup_fd(waker.write_fd, warn_on_full_buffer=False)
        os.write(waker.write_fd, b"\0")  # the first look now: start the programs without waiting
        try:
            super().run()
        finally:
            signal.set_wakeup_fd(-1)
            del asyncore_25.socket_map[waker.fd]
            waker.close()


if __name__ == "__main__":
    supervisord.Supervisor = Supervisor  # what supervisord.main() starts (and starts again on SIGHUP)
    supervisord.main()
