"""Maildir delivery the qmail way, made idempotent.

Write to tmp/ under a name nobody else can pick (O_EXCL), fsync, hard-link into
new/ (link() fails rather than overwriting), fsync new/, then drop the tmp
name.  A reader never sees a half-written message, and a crash leaves at worst
a stale file in tmp/, which `clean_tmp` removes after 36 hours (qmail's rule).

On Linux the file in tmp/ gets no name at all: open(O_TMPFILE) makes an
unnamed file on tmp/'s filesystem, and link() through /proc/self/fd gives it
its name in new/ once written and fsync'd.  Same promise, two fewer changes
to tmp/ (no entry made, none removed), and a crash leaves nothing behind.
Where the filesystem or the kernel cannot (EOPNOTSUPP), or /proc is not
mounted, the named file in tmp/ is used.

System calls.  A delivery makes only the calls the promise needs: open in
tmp/, write, fsync, close, link into new/ (and, for a named tmp/ file, unlink
it), and the fsync of new/ that concurrent deliveries share.  What a Maildir
looked like is remembered per process (its folders exist, the device of tmp/, an
unlimited quota's file is gone): a Maildir removed behind our back shows as
FileNotFoundError, and the delivery then makes its folders again and goes
once more.

Names.  The tmp/ name is unique the qmail way: time, microseconds, pid, a
per-process counter, the device of the Maildir and the host name, and O_EXCL
makes a clash an error rather than a shared file.  The name in new/ is instead
a function of the trace id and the recipient, `<sec>.M<usec>R<hash>.<host>`:
the time is the message's arrival time carried in the trace id, and R (which
the Maildir spec reserves for a random number) is a hash of (trace id,
recipient).  Trace ids are unique per message (microseconds plus 20 random
bits), so the name is unique per delivery without the device and inode that
qmail's recipe uses, and a redelivery of the same message to the same
recipient (the queue manager retrying after a crash) finds the first copy:
link() refuses to overwrite it, so the message is never stored twice.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import threading
import time
from pathlib import Path

from common.log import trace_time_us
from mda import quota

_counter = itertools.count()
STALE_TMP_SECONDS = 36 * 3600

# Maildirs (and Maildir++ folders) known to have tmp/, new/ and cur/: the device of
# their tmp/, which goes into tmp/ names.  Forgotten when a delivery finds one gone.
_known: dict[Path, int] = {}
# Unlimited Maildirs whose quota file this process has already removed.
_unlimited: set[Path] = set()


def ensure(maildir: Path) -> None:
    """Create tmp/, new/ and cur/ (and make their creation durable)."""
    if maildir in _known:
        return
    if not all((maildir / sub).is_dir() for sub in ("tmp", "new", "cur")):
        for sub in ("tmp", "new", "cur"):
            # The daemon's umask decides what the group gets (077: nothing; 027 with a mail group: read).
            (maildir / sub).mkdir(mode=0o770, parents=True, exist_ok=True)
        _fsync_dir(maildir)
        _fsync_dir(maildir.parent)
    if len(_known) > 100_000:
        _known.clear()
    _known[maildir] = os.stat(maildir / "tmp").st_dev


def _forget(*maildirs: Path) -> None:
    for m in maildirs:
        _known.pop(m, None)
        _unlimited.discard(m)


def _host_part(hostname: str) -> str:
    # The Maildir spec's escapes: '/' and ':' cannot appear in the name.
    return hostname.replace("/", "\\057").replace(":", "\\072")


def unique_name(trace_id: str, recipient: str, hostname: str) -> str:
    """'<seconds>.M<usec>R<hash>.<host>': the receipt time comes from the trace id."""
    micros = trace_time_us(trace_id)
    digest = hashlib.sha256(f"{trace_id}\0{recipient}".encode()).hexdigest()[:16]
    return f"{micros // 1_000_000}.M{micros % 1_000_000:06d}R{digest}.{_host_part(hostname)}"


def deliver(
    maildir: Path, content: bytes, name: str, *, quota_limit: int = 0, look_in_cur: bool = False,
    folder: Path | None = None, flags: str = "",
) -> tuple[Path, bool]:
    """Store `content` as new/<name>; returns (path, stored_now).

    stored_now is False when an earlier delivery of the same message already
    stored it.  With look_in_cur (a retry: an earlier attempt may have stored
    it), a copy a reader has since moved to cur/ (as `<name>:2,FLAGS`) counts
    too; that costs a listing of cur/, so only retries ask for it.  Raises
    quota.QuotaExceeded when it would not fit.

    `folder` is a Maildir++ subfolder of `maildir` (`.Junk`) to store in
    instead of the inbox (created on first use; the quota stays the whole
    Maildir's).  `flags` (IMAP system flags as Maildir letters, "FS") store
    the message in cur/ as `<name>:2,FLAGS`, already flagged.
    """
    remembered = maildir in _known or (folder is not None and folder in _known)
    try:
        return _deliver(maildir, content, name, quota_limit, look_in_cur, folder, flags)
    except FileNotFoundError:
        if not remembered:
            raise  # its folders were looked at just now: nothing stale to forget
        # A folder we remembered is gone (a reader or the operator removed it):
        # make it again and go once more (link() still refuses a second copy).
        _forget(maildir, *(() if folder is None else (folder,)))
        return _deliver(maildir, content, name, quota_limit, look_in_cur, folder, flags)


def _deliver(
    maildir: Path, content: bytes, name: str, quota_limit: int, look_in_cur: bool, folder: Path | None, flags: str,
) -> tuple[Path, bool]:
    ensure(maildir)
    target = maildir
    if folder is not None:
        ensure(folder)
        marker = folder / "maildirfolder"  # Maildir++: this folder belongs to the Maildir above
        if not marker.exists():
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o660))
        target = folder
    flags = "".join(sorted(set(flags)))
    new_path = target / "new" / name if not flags else target / "cur" / f"{name}:2,{flags}"
    # A first delivery needs no look for an earlier copy: link() below refuses to
    # overwrite one.  A retry, a flagged copy (stored in cur/, so link() cannot
    # see one in new/) and a quota (a copy already stored must not be refused
    # as over quota) look first.
    if (look_in_cur or flags or quota_limit > 0) and (target / "new" / name).exists():
        return target / "new" / name, False
    if look_in_cur or flags:
        seen = _in_cur(target, name)
        if seen is not None:
            return seen, False
    if quota_limit > 0:
        _unlimited.discard(maildir)
        quota.check_maildir(maildir, quota_limit, len(content))
    elif maildir not in _unlimited:
        quota.forget(maildir)
        _unlimited.add(maildir)
    fd, tmp_path = _create_tmp(target, name.rsplit(".", 1)[-1])
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        if tmp_path is None:  # unnamed: link it while the descriptor still holds it
            stored = _link(str(fd), new_path, _proc_fds())
    except BaseException:
        os.close(fd)
        if tmp_path is not None:
            os.unlink(tmp_path)
        raise
    os.close(fd)
    if tmp_path is not None:
        try:
            stored = _link(tmp_path, new_path)
        finally:
            os.unlink(tmp_path)
    _sync_new_entry(new_path.parent)
    if stored and quota_limit > 0:
        quota.record(maildir, len(content))
    return new_path, stored


def _in_cur(maildir: Path, name: str) -> Path | None:
    """The copy named `name` that a reader moved to cur/ (adding `:2,` and flags), if any."""
    flagged = name + ":"
    with os.scandir(maildir / "cur") as entries:
        for e in entries:
            if e.name == name or e.name.startswith(flagged):
                return Path(e.path)
    return None


def _link(source: str | Path, new_path: Path, source_dir: int | None = None) -> bool:
    """link() `source` to `new_path`; False when a concurrent redelivery got there first."""
    try:
        # With a folder given, linkat(AT_SYMLINK_FOLLOW): /proc/self/fd/N leads to the file itself.
        os.link(source, new_path, src_dir_fd=source_dir, follow_symlinks=True)
        return True
    except FileExistsError:
        return False


_proc_fd: tuple[int, int] | None = None  # (pid, descriptor) of /proc/self/fd, as opened


def _proc_fds() -> int:
    """/proc/self/fd, open: plain link() would not follow its entries (linkat does).

    Opened again in a forked child: "self" was resolved when it was opened, and
    the parent's descriptor N is another file."""
    global _proc_fd
    pid = os.getpid()
    if _proc_fd is None or _proc_fd[0] != pid:
        _proc_fd = (pid, os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY))
    return _proc_fd[1]


# Whether open(O_TMPFILE) may be tried: Linux with /proc, until a filesystem refuses it.
_unnamed_tmp = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


def _create_tmp(maildir: Path, host: str) -> tuple[int, Path | None]:
    """An open file in `maildir`/tmp/, and its name (None: unnamed, O_TMPFILE)."""
    global _unnamed_tmp
    if _unnamed_tmp:
        try:
            return os.open(maildir / "tmp", os.O_WRONLY | os.O_TMPFILE, 0o660), None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise  # a missing folder (FileNotFoundError), a full disk, ...: as for a named file
            _unnamed_tmp = False  # this filesystem cannot: named files from now on
    dev = _known.get(maildir)
    if dev is None:
        dev = os.stat(maildir / "tmp").st_dev
    while True:
        now = time.time_ns() // 1000
        tmp_path = maildir / "tmp" / (
            f"{now // 1_000_000}.M{now % 1_000_000:06d}P{os.getpid()}Q{next(_counter)}V{dev:x}.{host}"
        )
        try:
            return os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660), tmp_path
        except FileExistsError:
            continue  # cannot happen with a fresh counter value, but never share a file


class _DirSync:
    """How many links into one directory were made, and how many are known fsync'd."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.linked = 0
        self.synced = 0


_dir_syncs: dict[Path, _DirSync] = {}
_dir_syncs_lock = threading.Lock()


def _sync_new_entry(directory: Path) -> None:
    """Make our link() in `directory` durable, sharing one fsync among concurrent deliveries.

    An fsync of a directory makes durable every entry added before it started,
    so deliveries that linked while another thread's fsync was waiting to begin
    need no fsync of their own (group commit, for directories).
    """
    with _dir_syncs_lock:
        state = _dir_syncs.setdefault(directory, _DirSync())
        state.linked += 1
        mine = state.linked
    with state.lock:
        if state.synced >= mine:
            return
        with _dir_syncs_lock:
            covered = state.linked  # every one of these links has already returned
        _fsync_dir(directory)
        state.synced = covered


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_tmp(maildir: Path, now: float | None = None) -> int:
    """Remove tmp/ files neither written nor read for 36 hours (qmail's rule); returns how many.

    Covers the Maildir++ subfolders too.  Only plain files are removed (a
    symlink is unlinked, never followed).
    """
    limit = (time.time() if now is None else now) - STALE_TMP_SECONDS
    removed = 0
    for folder in quota.folders(maildir):
        try:
            with os.scandir(folder / "tmp") as entries:
                for e in entries:
                    try:
                        st = e.stat(follow_symlinks=False)
                        if e.is_dir(follow_symlinks=False) or max(st.st_mtime, st.st_atime) >= limit:
                            continue
                        os.unlink(e.path)
                        removed += 1
                    except FileNotFoundError:
                        pass
        except (FileNotFoundError, NotADirectoryError):
            pass
    return removed
