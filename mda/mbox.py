"""mbox delivery the mboxrd way, locked the way Dovecot and mutt expect.

Each message starts with a `From sender date` line; any body line that starts
with `>*From ` gets one more `>` (so a reader can undo it exactly), and a blank
line follows the message.  Locking is a dotlock first, then fcntl, the order
Dovecot uses (mbox_write_locks = dotlock fcntl).  If anything fails while
appending, the file is truncated back to its old size, so a failed delivery
never leaves half a message behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from pathlib import Path

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
STALE_DOTLOCK_SECONDS = 300


class LockTimeout(Exception):
    pass


def quote(body: bytes) -> bytes:
    """mboxrd: '>*From ' at a line start gains one '>'."""
    return _FROM_LINE.sub(rb">\1", body)


def unquote(body: bytes) -> bytes:
    return re.sub(rb"^>(>*From )", rb"\1", body, flags=re.MULTILINE)


def from_line(sender: str, when: float) -> bytes:
    who = sender or "MAILER-DAEMON"
    return f"From {who} {time.asctime(time.gmtime(when))}\n".encode()


def deliver(path: Path, content: bytes, sender: str, *, lock_timeout: float = 30.0) -> None:
    """Append one message (LF line endings) to the mbox file at `path`, durably."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = from_line(sender, time.time()) + quote(content)
    if not data.endswith(b"\n"):
        data += b"\n"
    data += b"\n"
    deadline = time.monotonic() + lock_timeout
    lock_path = path.with_name(path.name + ".lock")
    _dotlock(lock_path, deadline)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            _fcntl_lock(fd, deadline)
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)
                os.fsync(fd)
                raise
        finally:
            os.close(fd)  # also releases the fcntl lock
    finally:
        os.unlink(lock_path)


def _dotlock(lock_path: Path, deadline: float) -> None:
    while True:
        try:
            fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
            return
        except FileExistsError:
            try:
                if time.time() - lock_path.stat().st_mtime > STALE_DOTLOCK_SECONDS:
                    os.unlink(lock_path)  # left by a crashed writer
                    continue
            except FileNotFoundError:
                continue
        if time.monotonic() > deadline:
            raise LockTimeout(str(lock_path))
        time.sleep(0.005)


def _fcntl_lock(fd: int, deadline: float) -> None:
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        if time.monotonic() > deadline:
            raise LockTimeout("fcntl")
        time.sleep(0.005)
