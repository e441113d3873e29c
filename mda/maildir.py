"""Maildir delivery the qmail way, made idempotent.

Write to tmp/ under a name nobody else can pick (O_EXCL), fsync, hard-link into
new/ (link() fails rather than overwriting), fsync new/, then drop the tmp
name.  A reader never sees a half-written message, and a crash leaves at worst
a stale file in tmp/, which `clean_tmp` removes after 36 hours (qmail's rule).

The name in new/ is derived from the trace id and the recipient, so when the
queue manager redelivers after a crash the second link() finds the first copy
and the message is not stored twice.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from pathlib import Path

from common.log import trace_time_us

_counter = itertools.count()
STALE_TMP_SECONDS = 36 * 3600


def ensure(maildir: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)


def unique_name(trace_id: str, recipient: str, hostname: str) -> str:
    """'<seconds>.M<usec>R<hash>.<host>': the receipt time comes from the trace id."""
    micros = trace_time_us(trace_id)
    digest = hashlib.sha256(f"{trace_id}\0{recipient}".encode()).hexdigest()[:16]
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return f"{micros // 1_000_000}.M{micros % 1_000_000:06d}R{digest}.{host}"


def deliver(maildir: Path, content: bytes, name: str) -> tuple[Path, bool]:
    """Store `content` as new/<name>; returns (path, stored_now).

    stored_now is False when an earlier delivery of the same message already
    stored it (in new/, or already seen by a reader and moved to cur/).
    """
    ensure(maildir)
    new_path = maildir / "new" / name
    if new_path.exists() or _in_cur(maildir, name):
        return new_path, False
    now = time.time()
    tmp_name = (
        f"{int(now)}.M{int(now * 1e6) % 1_000_000:06d}P{os.getpid()}"
        f"Q{next(_counter)}.{name.rsplit('.', 1)[-1]}"
    )
    tmp_path = maildir / "tmp" / tmp_name
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(content)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp_path)
        raise
    os.close(fd)
    try:
        os.link(tmp_path, new_path)
        stored = True
    except FileExistsError:
        stored = False  # a concurrent redelivery won the race
    finally:
        os.unlink(tmp_path)
    _fsync_dir(maildir / "new")
    return new_path, stored


def _in_cur(maildir: Path, name: str) -> bool:
    # Readers move new/NAME to cur/NAME:2,FLAGS (Dovecot may add ,S=size first).
    prefix = name
    try:
        with os.scandir(maildir / "cur") as entries:
            return any(e.name.startswith(prefix) for e in entries)
    except FileNotFoundError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_tmp(maildir: Path, now: float | None = None) -> int:
    """Remove tmp/ files older than 36 hours; returns how many."""
    limit = (now or time.time()) - STALE_TMP_SECONDS
    removed = 0
    try:
        with os.scandir(maildir / "tmp") as entries:
            for e in entries:
                if e.is_file() and e.stat().st_mtime < limit:
                    os.unlink(e.path)
                    removed += 1
    except FileNotFoundError:
        pass
    return removed
