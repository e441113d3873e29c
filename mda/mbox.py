"""mbox delivery the mboxrd way, locked the way Dovecot and mutt expect.

Each message starts with a `From sender date` line; any line that starts
with `>*From ` gets one more `>` (so a reader can undo it exactly), and a blank
line follows the message.  Locking is a dotlock first, then fcntl, the order
Dovecot uses (mbox_write_locks = dotlock fcntl).  The quota is checked under
the lock, so concurrent deliveries cannot overshoot it together.  If anything
fails while appending, the file is truncated back to its old size, so a failed
delivery never leaves half a message behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from pathlib import Path

from mda.quota import QuotaExceeded

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_QUOTED_FROM_LINE = re.compile(rb"^>(>*From )", re.MULTILINE)
# A dotlock untouched this long was left by a crashed writer (Dovecot's
# dotlock_change_timeout is 2 minutes; we are more patient).
STALE_DOTLOCK_SECONDS = 300


class LockTimeout(Exception):
    """The mailbox stayed locked by someone else for the whole timeout."""


def quote(body: bytes) -> bytes:
    """mboxrd: '>*From ' at a line start gains one '>'."""
    return _FROM_LINE.sub(rb">\1", body)


def unquote(body: bytes) -> bytes:
    """mboxrd reading: '>+From ' at a line start loses one '>'."""
    return _QUOTED_FROM_LINE.sub(rb"\1", body)


def from_line(sender: str, when: float) -> bytes:
    """The separator line: `From sender asctime-date`, MAILER-DAEMON for the null sender."""
    who = sender or "MAILER-DAEMON"
    return f"From {who} {time.asctime(time.gmtime(when))}\n".encode()


def entry(content: bytes, sender: str, when: float) -> bytes:
    """The bytes appended for one message (LF line endings expected)."""
    data = from_line(sender, when) + quote(content)
    if not data.endswith(b"\n"):
        data += b"\n"
    return data + b"\n"


def deliver(path: Path, content: bytes, sender: str, *, lock_timeout: float = 30.0, quota_limit: int = 0) -> None:
    """Append one message to the mbox file at `path`, durably (fsync'd on return).

    Raises LockTimeout, QuotaExceeded, or OSError (after truncating back).
    """
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o770, parents=True, exist_ok=True)  # less the daemon's umask
    data = entry(content, sender, time.time())
    deadline = time.monotonic() + lock_timeout
    lock_path = path.with_name(path.name + ".lock")
    _dotlock(lock_path, deadline)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o660)
        try:
            _fcntl_lock(fd, deadline)
            size = os.fstat(fd).st_size
            if quota_limit > 0 and size + len(data) > quota_limit:
                raise QuotaExceeded(f"{path}: quota {quota_limit} bytes")
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)
                os.fsync(fd)
                raise
            if size == 0:
                _fsync_dir(path.parent)  # a new file: make its name durable too
        finally:
            os.close(fd)  # also releases the fcntl lock
    finally:
        os.unlink(lock_path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dotlock(lock_path: Path, deadline: float) -> None:
    while True:
        try:
            fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
            return
        except FileExistsError:
            try:
                if time.time() - lock_path.stat().st_mtime > STALE_DOTLOCK_SECONDS or _holder_gone(lock_path):
                    os.unlink(lock_path)  # left by a crashed writer
                    continue
            except FileNotFoundError:
                continue  # released meanwhile: try again at once
        if time.monotonic() > deadline:
            raise LockTimeout(str(lock_path))
        time.sleep(0.005)


def _holder_gone(lock_path: Path) -> bool:
    """The dotlock names a process that no longer exists (an MDA killed with SIGKILL):
    without this check every delivery to the mailbox waits out STALE_DOTLOCK_SECONDS."""
    try:
        pid = int(lock_path.read_text().strip() or "0")
    except (ValueError, OSError):
        return False
    if pid <= 0 or pid == os.getpid():
        return False  # being written right now, or held by another thread of ours
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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
