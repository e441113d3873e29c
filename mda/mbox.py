"""mbox delivery the mboxrd way, locked the way Dovecot and mutt expect.

Each message starts with a `From sender date` line; any line that starts
with `>*From ` gets one more `>` (so a reader can undo it exactly), and a blank
line follows the message.  Locking is a dotlock first, then fcntl, the order
Dovecot uses (mbox_write_locks = dotlock fcntl).  The quota is checked under
the lock, so concurrent deliveries cannot overshoot it together.  If anything
fails while appending, the file is truncated back to its old size, so a failed
delivery never leaves half a message behind.

Idempotence.  A redelivery of the same message to the same mailbox (the queue
manager retrying because it never saw our 250) must not store a second copy,
and the proof must be on disk before the 250, not in a database row that a
kill may lose.  So each delivery has an id (from the trace id and recipient),
and under the lock, *before* appending, we append `id offset` to a small
journal beside the mbox (`.NAME.delivered`, a dot file mail readers ignore)
and fsync it.  A delivery whose id is in the journal looks at the mbox at the
recorded offset: if the same entry is there, it is already stored; if only the
start of it is there (a kill in the middle of the append), the rest of the file
is exactly that torn entry, so it is cut off and written again; anything else
(a crash before the append, or a reader rewrote the file since) means it was
never stored, and it is appended as usual.  The journal line also gives the
entry's length, so the next delivery of any message first cuts off an entry a
kill tore (the mbox ends inside it, not on a message's end): otherwise the
torn part would stay in the mailbox as a message of its own, followed by the
later messages and, at its redelivery, by a second, whole copy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mda.quota import QuotaExceeded

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_QUOTED_FROM_LINE = re.compile(rb"^>(>*From )", re.MULTILINE)
# The journal keeps the latest deliveries only: redeliveries come within the
# queue lifetime, and a mailbox receives far fewer than this in that time.
JOURNAL_KEEP = 5000
# A dotlock untouched this long was left by a crashed writer (Dovecot's
# dotlock_change_timeout is 2 minutes; we are more patient).
STALE_DOTLOCK_SECONDS = 300
# An empty dotlock this old was left by a writer killed between creating it and
# writing its pid in the next system call: no holder is coming back for it.
EMPTY_DOTLOCK_SECONDS = 5


class _ThreadLocks:
    """One mutex per mbox path for the threads of this process.

    fcntl locks belong to the process, so they do not keep two of its threads
    apart; only the dotlock would, and breaking a stale dotlock is not atomic:
    two threads that both found a dead writer's lock could each remove it, the
    second removing the first's fresh lock, and both append at once, one of
    them journalling the wrong offset (a later redelivery then stores a second
    copy).  So the threads of one MDA queue here first.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def get(self, path: Path) -> threading.Lock:
        key = os.path.abspath(path)
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


_thread_locks = _ThreadLocks()


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


def deliver(
    path: Path,
    content: bytes,
    sender: str,
    *,
    delivery_id: str = "",
    lock_timeout: float = 30.0,
    quota_limit: int = 0,
) -> bool:
    """Append one message to the mbox file at `path`, durably (fsync'd on return).

    With a `delivery_id`, a second delivery under the same id stores nothing.
    Returns whether the message was stored now.  Raises LockTimeout,
    QuotaExceeded, or OSError (after truncating back).
    """
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o770, parents=True, exist_ok=True)  # less the daemon's umask
    data = entry(content, sender, time.time())
    deadline = time.monotonic() + lock_timeout
    mutex = _thread_locks.get(path)
    if not mutex.acquire(timeout=max(lock_timeout, 0.001)):
        raise LockTimeout(f"{path}: busy in this process")
    try:
        return _deliver_locked(path, data, delivery_id, deadline, quota_limit)
    finally:
        mutex.release()


def _deliver_locked(path: Path, data: bytes, delivery_id: str, deadline: float, quota_limit: int) -> bool:
    """deliver(), once this process's threads are kept out: the dotlock, fcntl, the append."""
    lock_path = path.with_name(path.name + ".lock")
    _dotlock(lock_path, deadline)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o660)
        try:
            _fcntl_lock(fd, deadline)
            size = os.fstat(fd).st_size
            journal = _Journal(path) if delivery_id else None
            if journal is not None:
                torn = journal.torn_last(fd, size)
                if torn is not None:
                    # The last append was cut off by a kill: its delivery was never
                    # answered 250 and comes again; nothing may follow the torn part.
                    os.ftruncate(fd, torn)
                    size = torn
                offset = journal.find(delivery_id)
                if offset is not None:
                    found = _stored_at(fd, offset, size, data)
                    if found == "whole":
                        return False
                    if found == "torn":
                        os.ftruncate(fd, offset)  # the rest of the file is our torn entry
                        size = offset
            if quota_limit > 0 and size + len(data) > quota_limit:
                raise QuotaExceeded(f"{path}: quota {quota_limit} bytes")
            if journal is not None:
                journal.add(delivery_id, size, len(data))
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
            return True
        finally:
            os.close(fd)  # also releases the fcntl lock
    finally:
        os.unlink(lock_path)


def _stored_at(fd: int, offset: int, size: int, data: bytes) -> str:
    """Is `data` stored at `offset`: "whole", "torn" (a prefix reaching the end), or "no"?

    The From_ line carries the delivery time, so only the bytes after it are compared.
    """
    if offset >= size:
        return "no"
    found = os.pread(fd, min(len(data) + 1, size - offset), offset)
    at_end = offset + len(found) == size
    head, sep, rest = found.partition(b"\n")
    if not sep:  # torn inside the From_ line itself?
        return "torn" if at_end and (head.startswith(b"From ") or b"From ".startswith(head)) else "no"
    if not head.startswith(b"From "):
        return "no"
    expected = data[data.index(b"\n") + 1 :]
    if rest[: len(expected)] == expected:
        return "whole"
    if at_end and expected.startswith(rest):
        return "torn"
    return "no"


class _Journal:
    """`.NAME.delivered` beside the mbox: one line `delivery-id offset` per delivery.

    Read once, under the mailbox lock, for both the look-up and the append."""

    def __init__(self, mbox_path: Path) -> None:
        self.path = mbox_path.with_name(f".{mbox_path.name}.delivered")
        try:
            self.text = self.path.read_bytes()
        except FileNotFoundError:
            self.text = b""

    def find(self, delivery_id: str) -> int | None:
        key = delivery_id.encode() + b" "
        at = self.text.rfind(b"\n" + key)
        if at < 0:
            if not self.text.startswith(key):
                return None
            at = -1
        line = self.text[at + 1 :].split(b"\n", 1)[0]
        try:
            return int(line[len(key) :].split(b" ")[0])
        except ValueError:
            return None  # torn by a crash while it was written: not proof of anything

    def torn_last(self, fd: int, size: int) -> int | None:
        """Where the last append starts, if the mbox ends in the middle of it (a kill
        while it was written); None when the mbox ends cleanly.

        Its journal line says where it starts and how long it is.  Only a file
        ending inside that span, at a From_ line, and not on a message's end (the
        blank line) counts: a reader that rewrote the mbox since leaves whole
        messages, which end in a blank line, and is never cut.
        """
        lines = self.text.rsplit(b"\n", 2)
        if len(lines) < 2 or lines[-1]:
            return None  # empty, or the last line itself was torn (then nothing was appended)
        fields = lines[-2].split(b" ")
        try:
            offset, length = int(fields[1]), int(fields[2])
        except (IndexError, ValueError):
            return None  # an older line without the length
        if not offset < size < offset + length:
            return None
        if os.pread(fd, 5, offset) != b"From " or os.pread(fd, 2, size - 2) == b"\n\n":
            return None
        return offset

    def add(self, delivery_id: str, offset: int, length: int) -> None:
        if "\n" in delivery_id or " " in delivery_id:
            raise ValueError("a delivery id is one word")
        line = f"{delivery_id} {offset} {length}\n".encode()
        if self.text.count(b"\n") >= 2 * JOURNAL_KEEP:
            # Rewrite with the newest half (a new file renamed over the old one).
            tmp = self.path.with_name(self.path.name + ".new")
            kept = self.text.splitlines(keepends=True)[-JOURNAL_KEEP:]
            _write_durably(tmp, b"".join(kept) + line, os.O_TRUNC)
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
            return
        _write_durably(self.path, line, os.O_APPEND)
        if not self.text:
            _fsync_dir(self.path.parent)


def _write_durably(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o660)  # less the umask, as the mbox
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


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
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:
                # A full disk creates the file but refuses its one line.  An empty
                # dotlock names no holder, so every later delivery would wait it out
                # as if a live writer had it: take it away again.
                os.unlink(lock_path)
                raise
            finally:
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
    """The dotlock names a process that no longer exists (an MDA killed with SIGKILL),
    or whose id now belongs to a younger process: without this check every delivery
    to the mailbox waits out STALE_DOTLOCK_SECONDS."""
    try:
        text = lock_path.read_text().strip()
        if not text:
            return time.time() - lock_path.stat().st_mtime > EMPTY_DOTLOCK_SECONDS
        pid = int(text)
    except (ValueError, OSError):
        return False
    if pid <= 0 or pid == os.getpid():
        return False  # being written right now, or held by another thread of ours
    started = _seconds_since_start(pid)
    if started is None:
        return True
    # Process ids are reused (32768 of them go round in minutes when daemons are
    # restarted often): a process that started after the dotlock was made is not
    # the writer that made it, and that one is gone.
    try:
        return started < time.time() - lock_path.stat().st_mtime - 0.1
    except FileNotFoundError:
        return False  # released meanwhile: the caller tries again


def _seconds_since_start(pid: int) -> float | None:
    """How long ago process `pid` started (from /proc), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except FileNotFoundError:
        return None
    except OSError:
        return float("inf")  # cannot tell: take it for the holder
    # Field 22, after the parenthesised command name: start time in clock ticks since boot.
    ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


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


@contextlib.contextmanager
def held(path: Path, lock_timeout: float = 30.0) -> Iterator[int]:
    """Hold the mailbox as a delivery does (dotlock, then fcntl) and give its open
    descriptor: a copy read meanwhile (a backup) is whole messages, never half an append.
    FileNotFoundError when there is no such mailbox."""
    deadline = time.monotonic() + lock_timeout
    mutex = _thread_locks.get(path)
    if not mutex.acquire(timeout=max(lock_timeout, 0.001)):
        raise LockTimeout(f"{path}: busy in this process")
    try:
        fd = os.open(path, os.O_RDWR)  # before the dotlock: no lock is made for a mailbox that is not there
        try:
            lock_path = path.with_name(path.name + ".lock")
            _dotlock(lock_path, deadline)
            try:
                _fcntl_lock(fd, deadline)
                yield fd
            finally:
                os.unlink(lock_path)
        finally:
            os.close(fd)
    finally:
        mutex.release()
