"""Mailbox quotas in bytes (User.quota; 0 is unlimited): how full is a mailbox?

An mbox is one file, so its size is one fstat, taken under the delivery lock.

A Maildir is a folder of files, and adding up their sizes on every delivery
costs one stat per stored message: O(n) per delivery, O(n^2) for a burst into
an unread mailbox.  We keep the running total the Maildir++ way instead (the
quota scheme of Courier, maildrop and Dovecot's `quota = maildir` backend):
a file `maildirsize` at the top of the Maildir whose first line is the limit
(`<bytes>S`) and whose other lines are changes (`<bytes> <count>`), each
appended with one O_APPEND write, so concurrent writers never interleave.
Reading it costs the size of that small file.  We chose it over a scan cached
per process because the MDA is not the only writer: Dovecot (IMAP expunge,
with its maildir quota backend) and other MDA processes update the same file,
while a per-process cache could only notice them through directory mtimes,
which do not change reliably within one timestamp tick.

The total can drift (a reader that deletes mail without updating the file,
mutt for instance, or a delivery racing a recalculation), so, as Maildir++
prescribes, the file is rebuilt by a scan when it is missing, when the limit
changed, when it grew past 5120 bytes, or when a message would not fit but
the file was last written more than 15 minutes ago.  Drift can therefore refuse mail
wrongly for at most those 15 minutes, never accept unboundedly much.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from pathlib import Path

SIZE_FILE = "maildirsize"
MAX_SIZE_FILE = 5120  # bytes; Maildir++: recalculate when the file is larger
STALE_OVER_QUOTA = 15 * 60  # seconds; Maildir++: trust an "over quota" only this long

_counter = itertools.count()


class QuotaExceeded(Exception):
    """Storing the message would take the mailbox over its quota."""


def maildir_usage(maildir: Path, limit: int) -> tuple[int, float]:
    """(bytes used by the Maildir and its Maildir++ folders, age in seconds of that figure)."""
    path = maildir / SIZE_FILE
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            text = f.read(MAX_SIZE_FILE + 1)
    except FileNotFoundError:
        return recalculate(maildir, limit), 0.0
    lines = text.split(b"\n")
    if len(text) > MAX_SIZE_FILE or lines[0].strip() != _definition(limit):
        return recalculate(maildir, limit), 0.0
    used = 0
    for line in lines[1:]:
        fields = line.split()
        if not fields:
            continue
        try:
            used += int(fields[0])
        except ValueError:
            return recalculate(maildir, limit), 0.0  # damaged: rebuild rather than guess
    return used, time.time() - st.st_mtime


def check_maildir(maildir: Path, limit: int, size: int) -> None:
    """Raise QuotaExceeded when `size` more bytes would not fit (limit 0: unlimited)."""
    if limit <= 0:
        return
    used, age = maildir_usage(maildir, limit)
    if used + size > limit and age > STALE_OVER_QUOTA:
        used = recalculate(maildir, limit)  # "full" for a while: recount before refusing
    if used + size > limit:
        raise QuotaExceeded(f"{maildir}: quota {limit} bytes")


def record(maildir: Path, size: int) -> None:
    """Add one stored message to `maildirsize`, if the mailbox keeps one."""
    try:
        fd = os.open(maildir / SIZE_FILE, os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:
        return  # no quota kept (yet): the first check will count this message by scanning
    try:
        os.write(fd, f"{size} 1\n".encode())
    finally:
        os.close(fd)


def forget(maildir: Path) -> None:
    """The mailbox is unlimited now: drop the total, which nobody keeps up to date any more.

    Otherwise a quota set again later would start from a figure that missed
    every delivery made meanwhile, and let the mailbox grow past it.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(maildir / SIZE_FILE)


def recalculate(maildir: Path, limit: int) -> int:
    """Scan the Maildir, write a fresh `maildirsize` (atomically) and return the total."""
    used = count = 0
    for folder in folders(maildir):
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError), os.scandir(folder / sub) as entries:
                for e in entries:
                    try:
                        if e.is_file(follow_symlinks=False):
                            used += e.stat(follow_symlinks=False).st_size
                            count += 1
                    except FileNotFoundError:
                        pass  # expunged while we looked
    tmp = maildir / "tmp" / f"{SIZE_FILE}.{os.getpid()}.{next(_counter)}"
    tmp.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp.write_bytes(_definition(limit) + f"\n{used} {count}\n".encode())
    os.replace(tmp, maildir / SIZE_FILE)
    return used


def _definition(limit: int) -> bytes:
    return f"{limit}S".encode()


def folders(maildir: Path) -> list[Path]:
    """The Maildir and its Maildir++ subfolders (`.Name` directories), which share the quota."""
    found = [maildir]
    with contextlib.suppress(FileNotFoundError), os.scandir(maildir) as entries:
        found += [
            Path(e.path)
            for e in entries
            if e.name.startswith(".") and e.name not in (".", "..") and e.is_dir(follow_symlinks=False)
        ]
    return found
