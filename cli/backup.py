"""`mailroom backup`: a snapshot of the whole installation, taken while mail flows.

    mailroom backup init          make the backup key ([backup] key) and the backup folder
    mailroom backup [--to DIR]    one snapshot into [backup] dir (or DIR), then the old ones pruned
    mailroom backup list [--to DIR]

What a snapshot holds, in this order (the order is what makes it consistent):

1. the database, first: SQLite through its online backup API (one read
   transaction: a consistent copy while the daemons write on); PostgreSQL with
   `pg_dump` (one transaction too).  Every message answered 250 before this
   moment is in it, queued or with its delivery recorded;
2. the mail root: Maildir files as they are in `cur/` and `new/` (never
   `tmp/`, where files are still being written; a file a reader moves from
   `new/` to `cur/` meanwhile is found under its new name), each mbox while
   holding its lock as a delivery does (dotlock, then fcntl), its delivery
   journal with it.  A delivery recorded in step 1 wrote its file before its
   record, so its file is here;
3. the rest of the installation folder: the config, the TLS certificate and
   key, the DKIM keys, the SRS secret, and whatever else lives there, except
   the backups themselves and the backup key.

Each file is cut into pieces stored once by content (cli/archive.py), so a
Maildir message, which never changes, is stored by the first backup that sees
it, and an mbox that grows keeps its earlier pieces.  Everything is encrypted
with the backup key.  The snapshot's manifest is written last: a backup that
fails half-way (a full disk) leaves no snapshot, only pieces the next
successful backup's pruning removes.  Its outcome goes to RUN_DIR/backup.json
(common/backupstatus.py) for `mailroom status`, the status checks and /metrics.

Run as root, it reads the files above as root and does the rest as the Mailroom
user, so every file it makes is the daemons' user's, as the scheduled run's are.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import fcntl
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.archive import CHUNK, ArchiveError, Folder, Key, new_key_text, read_key
from common import backupstatus, privileges
from common.config import Config

# A file of the installation folder larger than this is not state but something left there.
MAX_INSTALLATION_FILE = 64 * 1024 * 1024
SQLITE_BUSY_TIMEOUT = 30.0
FORMAT = 1


class BackupError(Exception):
    """The backup cannot be made; the text says why."""


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "init":
        return init(cfg)
    dest = Path(args.to).absolute() if args.to else cfg.resolve(cfg.backup.dir)
    if args.action == "list":
        return listing(cfg, dest)
    outcome = backup(cfg, dest)
    if not outcome.ok:
        print(f"mailroom backup: {outcome.error}; no snapshot was made", file=sys.stderr)
        return 1
    print(f"snapshot {outcome.snapshot} in {dest}: {outcome.files} files, "
          f"{_size(outcome.new_bytes)} new (the rest was already there), {outcome.finished - outcome.started:.1f} s")
    return 0


# --- init ---------------------------------------------------------------------------


def init(cfg: Config) -> int:
    path = cfg.resolve(cfg.backup.key)
    if path.exists():
        print(f"mailroom backup init: {path} exists; a new key could not read the backups made with it",
              file=sys.stderr)
        return 1
    try:
        acct = privileges.account(cfg)
    except privileges.StartError as exc:
        print(f"mailroom backup init: {exc}", file=sys.stderr)
        return 1
    text = new_key_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    dest = cfg.resolve(cfg.backup.dir)
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.getuid() == 0:
        for p in (path, dest):
            os.chown(p, acct.uid, acct.gid)
    key = read_key(path)
    print(f"made the backup key {path} (key id {key.ident.hex()}); backups go to {dest}")
    print("Keep a copy of the key away from this host (a password manager, a paper copy): without it no backup "
          "can be read.  The key:")
    print(text.strip())
    if not cfg.backup.at:
        print('Daily backups: set at = "03:30" under [backup] in the config, then `mailroom restart`.')
    return 0


# --- one backup ---------------------------------------------------------------------


@dataclass
class _Layout:
    """Where each part of the installation goes in a restored folder, and the settings that must
    then name it (a part that lived outside the installation folder comes back inside it)."""

    base: Path
    relocate: dict[str, str] = field(default_factory=dict)

    def place(self, path: Path, default: str, setting: str, value: str | None = None) -> str:
        p = path.resolve()
        if p != self.base and p.is_relative_to(self.base):
            return str(p.relative_to(self.base))
        self.relocate[setting] = value if value is not None else default
        return default


def _layout(cfg: Config) -> tuple[_Layout, dict[str, str]]:
    lay = _Layout(cfg.base.resolve())
    parts = {
        "mail_root": lay.place(cfg.mail_root, "mail", "mailroom.mail_root"),
        "run_dir": lay.place(cfg.run_dir, "run", "mailroom.run_dir"),
        "tls_cert": lay.place(cfg.resolve(cfg.tls.cert), "tls/cert.pem", "tls.cert"),
        "tls_key": lay.place(cfg.resolve(cfg.tls.key), "tls/key.pem", "tls.key"),
        "dkim": lay.place(cfg.resolve(cfg.dkim.key_dir), "dkim", "dkim.key_dir"),
    }
    db = _sqlite_file(cfg)
    if db is not None:
        parts["database"] = lay.place(db, "mailroom.db", "mailroom.database", "sqlite:///mailroom.db")
    return lay, parts


def _sqlite_file(cfg: Config) -> Path | None:
    files = privileges.database_files(cfg)
    return files[0] if files else None


@dataclass
class _Small:
    """A file of the installation read before the switch to the Mailroom user (it may be root's alone)."""

    path: str  # relative to the restored folder
    mode: int
    data: bytes


def installation_files(cfg: Config, dest: Path, parts: dict[str, str]) -> tuple[list[_Small], list[tuple[str, int]]]:
    """The installation folder without the database, the mail root, the run folder (but its SRS
    secret), the backups and the backup key; and the TLS and DKIM files kept outside it."""
    base = cfg.base.resolve()
    skip = {p.resolve() for p in (cfg.mail_root, cfg.run_dir, dest, cfg.resolve(cfg.backup.dir))}
    skip_files = {p.resolve() for p in [cfg.resolve(cfg.backup.key), *privileges.database_files(cfg)]}
    files: list[_Small] = []
    dirs: list[tuple[str, int]] = []

    def take(path: Path, rel: str) -> None:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_INSTALLATION_FILE:
            return
        files.append(_Small(rel, stat.S_IMODE(st.st_mode), path.read_bytes()))

    for folder, subdirs, names in os.walk(base):
        here = Path(folder)
        subdirs[:] = sorted(d for d in subdirs if (here / d).resolve() not in skip and not (here / d).is_symlink())
        rel_here = here.relative_to(base)
        if here != base:
            dirs.append((str(rel_here), stat.S_IMODE(here.stat().st_mode)))
        for name in sorted(names):
            p = here / name
            if p.resolve() in skip_files or name.startswith(".tmp-"):
                continue
            take(p, str(rel_here / name) if here != base else name)
    secret = cfg.run_dir / "srs.secret"
    if secret.exists():
        take(secret, f"{parts['run_dir']}/srs.secret")
    outside = [(cfg.resolve(cfg.tls.cert), parts["tls_cert"]), (cfg.resolve(cfg.tls.key), parts["tls_key"])]
    key_dir = cfg.resolve(cfg.dkim.key_dir)
    if not key_dir.resolve().is_relative_to(base) and key_dir.is_dir():
        dirs.append((parts["dkim"], 0o700))
        outside += [(p, f"{parts['dkim']}/{p.name}") for p in sorted(key_dir.iterdir())]
    for path, rel in outside:
        if path.exists() and not path.resolve().is_relative_to(base):
            take(path, rel)
    return files, dirs


def backup(cfg: Config, dest: Path, *, now: float | None = None) -> backupstatus.Outcome:
    """Make one snapshot; its outcome, also written to RUN_DIR/backup.json."""
    started = time.time() if now is None else now
    previous = backupstatus.read(cfg.run_dir)
    acct: privileges.Account | None = None
    try:
        key = read_key(cfg.resolve(cfg.backup.key))
        acct = privileges.account(cfg)
        lay, parts = _layout(cfg)
        small, small_dirs = installation_files(cfg, dest, parts)
        _prepare(dest, acct)
        if os.getuid() == 0:
            # Everything from here is written as the daemons' user, as the scheduled backups are.
            _preload()
            privileges.become(acct)
        name, files, new_bytes = _make(cfg, Folder(dest, key), lay, parts, small, small_dirs, started)
    except Exception as exc:  # noqa: BLE001 - whatever it was, the outcome is recorded and said
        outcome = backupstatus.Outcome(started, time.time(), False, error=_one_line(exc),
                                       last_ok=previous.last_ok if previous else 0.0)
    else:
        finished = time.time()
        outcome = backupstatus.Outcome(started, finished, True, name, files=files, new_bytes=new_bytes,
                                       last_ok=finished)
    _record(cfg, outcome, acct)
    return outcome


def _preload() -> None:
    """What is loaded late, loaded now: after the switch Python's own library may not be readable."""
    from mda import mbox  # noqa: F401 - for the mailboxes

    snapshot_time(Path("20000101T000000Z.snap"))  # strptime loads _strptime on first use
    dt.datetime.fromtimestamp(0, dt.UTC).isoformat()


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the backup folder is full ({exc.strerror}{': ' + exc.filename if exc.filename else ''})"
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
        return f"the backup folder is full (database copy: {exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    if isinstance(exc, ArchiveError | BackupError | privileges.StartError | sqlite3.Error):
        return " ".join(str(exc).split())
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _record(cfg: Config, outcome: backupstatus.Outcome, acct: privileges.Account | None) -> None:
    try:
        backupstatus.write(cfg.run_dir, outcome)
        if os.getuid() == 0 and acct is not None:
            os.chown(backupstatus.path(cfg.run_dir), acct.uid, acct.gid)
    except OSError as exc:  # a full disk may refuse this too; the command's own line still says it
        print(f"mailroom backup: could not record the outcome in {backupstatus.path(cfg.run_dir)}: {exc}",
              file=sys.stderr)


def _prepare(dest: Path, acct: privileges.Account) -> None:
    if not dest.exists():
        dest.mkdir(mode=0o700, parents=True)
        if os.getuid() == 0:
            os.chown(dest, acct.uid, acct.gid)
    if os.getuid() == 0 and dest.stat().st_uid != acct.uid:
        raise BackupError(f"{dest} belongs to another user than {acct.name}, who writes the backups: "
                          f"chown -R {acct.name}: {dest}")


def _make(cfg: Config, folder: Folder, lay: _Layout, parts: dict[str, str], small: list[_Small],
          small_dirs: list[tuple[str, int]], started: float) -> tuple[str, int, int]:
    folder.prepare()
    with _locked(folder.root):
        _clean_leftovers(folder.root)
        name = _new_name(folder, started)
        files: list[dict[str, Any]] = []
        dirs: list[dict[str, Any]] = [{"p": p, "m": m} for p, m in small_dirs]
        database = _database(cfg, folder, parts, files)
        _mail(cfg, folder, parts["mail_root"], files, dirs)
        for s in small:
            files.append({"p": s.path, "m": s.mode, "s": len(s.data), "c": _pieces(folder, s.data)})
        folder.sync()
        manifest = {
            "format": FORMAT, "name": name, "created": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
            "hostname": cfg.mailroom.hostname, "config": cfg.path.name, "database": database,
            "run_dir": parts["run_dir"], "backup_key": _inside(cfg, cfg.resolve(cfg.backup.key)),
            "relocate": lay.relocate, "dirs": dirs, "files": files,
        }
        folder.write_snapshot(name, manifest)
        try:
            prune(folder, cfg.backup.keep_days, cfg.backup.keep_weeks, started)
        except (ArchiveError, OSError) as exc:
            print(f"mailroom backup: warning: old snapshots not pruned: {exc}", file=sys.stderr)
    return name, len(files), folder.new_bytes


def _inside(cfg: Config, path: Path) -> str:
    p, base = path.resolve(), cfg.base.resolve()
    return str(p.relative_to(base)) if p.is_relative_to(base) else ""


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One backup at a time per folder (a scheduled one and a manual one)."""
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"another backup into {root} is running") from None
        yield
    finally:
        os.close(fd)


def _clean_leftovers(root: Path) -> None:
    """Temporary files of a backup that was killed (we hold the lock: none is being written)."""
    for p in root.glob(".db-snapshot-*"):
        p.unlink(missing_ok=True)
    for sub in (root / "objects").glob("*"):
        for p in sub.glob(".tmp-*"):
            p.unlink(missing_ok=True)


def _new_name(folder: Folder, when: float) -> str:
    name = dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    taken = {p.name.removesuffix(".snap") for p in folder.snapshot_paths()}
    n, candidate = 1, name
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _pieces(folder: Folder, data: bytes) -> list[str]:
    return [folder.put(data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)] if data else []


def _store_fd(folder: Folder, fd: int) -> tuple[int, list[str]]:
    """Store an open file's bytes from its start; (size, pieces)."""
    names: list[str] = []
    size = offset = 0
    while True:
        data = os.pread(fd, CHUNK, offset)
        if not data:
            return size, names
        names.append(folder.put(data))
        size += len(data)
        offset += len(data)


# --- 1. the database -------------------------------------------------------------------


def _database(cfg: Config, folder: Folder, parts: dict[str, str], files: list[dict[str, Any]]) -> dict[str, str]:
    tmp = folder.root / f".db-snapshot-{os.getpid()}"
    try:
        db = _sqlite_file(cfg)
        if db is not None:
            _sqlite_copy(db, tmp)
            kind, rel = "sqlite", parts["database"]
        else:
            _pg_dump(cfg.database_url, tmp)
            kind, rel = "pg_dump", "database.pgdump"
        fd = os.open(tmp, os.O_RDONLY)
        try:
            size, names = _store_fd(folder, fd)
        finally:
            os.close(fd)
        files.append({"p": rel, "m": 0o600, "s": size, "c": names})
        return {"kind": kind, "path": rel}
    finally:
        tmp.unlink(missing_ok=True)


def _sqlite_copy(db: Path, out: Path) -> None:
    """A consistent copy through SQLite's online backup API, while the daemons go on writing."""
    if not db.exists():
        raise BackupError(f"no database at {db}")
    src = sqlite3.connect(db, timeout=SQLITE_BUSY_TIMEOUT)
    try:
        dst = sqlite3.connect(out)
        try:
            src.backup(dst)  # all pages in one step: one read transaction, one moment
            # The copy stands alone: no WAL beside it, so it is one file to store.
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    finally:
        src.close()


def _pg_dump(url: str, out: Path) -> None:
    """pg_dump's custom format: one transaction (a consistent dump), restored with pg_restore."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    env = dict(os.environ)
    if parsed.password:
        env["PGPASSWORD"] = str(parsed.password)  # not on the command line, where `ps` shows it
    target = parsed.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    program = shutil.which("pg_dump")
    if program is None:
        raise BackupError("pg_dump is not installed (Debian: apt-get install postgresql-client)")
    proc = subprocess.run([program, "--format=custom", "--no-owner", f"--file={out}", f"--dbname={target}"],
                          env=env, capture_output=True, text=True, timeout=6 * 3600)
    if proc.returncode != 0:
        raise BackupError(f"pg_dump failed: {' '.join(proc.stderr.split())[:300]}")


# --- 2. the mail root ------------------------------------------------------------------


def _mail(cfg: Config, folder: Folder, rel_root: str, files: list[dict[str, Any]],
          dirs: list[dict[str, Any]]) -> None:
    root = cfg.mail_root.resolve()
    if not root.is_dir():
        return
    dirs.append({"p": rel_root, "m": stat.S_IMODE(root.stat().st_mode)})
    for folder_path, subdirs, names in os.walk(root):
        here = Path(folder_path)
        rel_here = f"{rel_root}/{here.relative_to(root)}" if here != root else rel_root
        subdirs[:] = sorted(d for d in subdirs if not (here / d).is_symlink())
        if here != root:
            dirs.append({"p": rel_here, "m": stat.S_IMODE(here.stat().st_mode)})
        maildir_part = here.name in ("cur", "new", "tmp") and (here.parent / "cur").is_dir() \
            and (here.parent / "new").is_dir()
        if maildir_part and here.name == "tmp":
            continue  # files still being written: never in a backup
        for name in sorted(names):
            path = here / name
            if name.endswith(".lock") or (name.startswith(".") and name.endswith(".delivered")):
                continue  # dotlocks; journals are taken with their mbox
            entry = _maildir_file(folder, path) if maildir_part else _mail_file(cfg, folder, path)
            if entry is not None:
                for e in entry:
                    e["p"] = f"{rel_here}/{e.pop('name')}"
                    files.append(e)


def _maildir_file(folder: Folder, path: Path) -> list[dict[str, Any]] | None:
    """A Maildir message, which never changes; a reader may rename it meanwhile (new/ -> cur/, flags)."""
    for candidate in (path, *_renamed(path)):
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            size, names = _store_fd(folder, fd)
        finally:
            os.close(fd)
        return [{"name": candidate.name, "m": stat.S_IMODE(st.st_mode), "s": size, "c": names}]
    return None  # deleted by its reader meanwhile


def _renamed(path: Path) -> list[Path]:
    """Where a reader may have moved a Maildir message: cur/, with `:2,FLAGS` added or changed."""
    base = path.name.split(":", 1)[0]
    cur = path.parent.parent / "cur"
    try:
        return [cur / n for n in os.listdir(cur) if n == base or n.startswith(base + ":")]
    except FileNotFoundError:
        return []


def _mail_file(cfg: Config, folder: Folder, path: Path) -> list[dict[str, Any]] | None:
    """An mbox (taken under its lock, with its journal) or any other file (indexes, quotas, Sieve)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, OSError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        is_mbox = os.pread(fd, 5, 0) == b"From "
        if not is_mbox:
            size, names = _store_fd(folder, fd)
            return [{"name": path.name, "m": stat.S_IMODE(st.st_mode), "s": size, "c": names}]
    finally:
        os.close(fd)
    return _mbox(cfg, folder, path)


def _mbox(cfg: Config, folder: Folder, path: Path) -> list[dict[str, Any]] | None:
    from mda import mbox

    journal = path.with_name(f".{path.name}.delivered")
    out: list[dict[str, Any]] = []
    try:
        with mbox.held(path, cfg.mda.lock_timeout) as fd:
            st = os.fstat(fd)
            size, names = _store_fd(folder, fd)
            out.append({"name": path.name, "m": stat.S_IMODE(st.st_mode), "s": size, "c": names})
            with contextlib.suppress(FileNotFoundError):
                data = journal.read_bytes()
                out.append({"name": journal.name, "m": stat.S_IMODE(journal.stat().st_mode), "s": len(data),
                            "c": _pieces(folder, data)})
    except FileNotFoundError:
        return None
    except mbox.LockTimeout:
        raise BackupError(f"{path}: still locked after {cfg.mda.lock_timeout:g} s") from None
    return out


# --- keeping days and weeks ---------------------------------------------------------------


def snapshot_time(path: Path) -> dt.datetime:
    return dt.datetime.strptime(path.name[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)


def kept(paths: list[Path], keep_days: int, keep_weeks: int, now: float) -> list[Path]:
    """The newest snapshot, the newest of each of the last `keep_days` days and of each of the
    last `keep_weeks` weeks (UTC)."""
    if not paths:
        return []
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    days = {today - dt.timedelta(days=i) for i in range(keep_days)}
    this_week = today - dt.timedelta(days=today.weekday())
    weeks = {this_week - dt.timedelta(weeks=i) for i in range(keep_weeks)}
    newest_of: dict[tuple[str, dt.date], Path] = {}
    for p in sorted(paths, key=snapshot_time):
        day = snapshot_time(p).date()
        if day in days:
            newest_of[("day", day)] = p
        week = day - dt.timedelta(days=day.weekday())
        if week in weeks:
            newest_of[("week", week)] = p
    keep = set(newest_of.values()) | {max(paths, key=snapshot_time)}
    return sorted(keep, key=snapshot_time)


def prune(folder: Folder, keep_days: int, keep_weeks: int, now: float) -> int:
    """Remove the snapshots not kept, then the pieces no kept snapshot names; how many snapshots went."""
    paths = folder.snapshot_paths()
    keep = kept(paths, keep_days, keep_weeks, now)
    # Read every kept manifest before deleting anything: one that cannot be read stops the pruning.
    wanted: set[str] = set()
    for p in keep:
        wanted.update(c for f in folder.read_snapshot(p)["files"] for c in f["c"])
    gone = [p for p in paths if p not in keep]
    for p in gone:
        p.unlink()
    for obj in folder.object_names():
        if obj.name not in wanted and not obj.name.startswith(".tmp-"):
            obj.unlink()
    return len(gone)


# --- list and status ------------------------------------------------------------------------


def listing(cfg: Config, dest: Path) -> int:
    try:
        folder = Folder(dest, read_key(cfg.resolve(cfg.backup.key)))
        paths = folder.snapshot_paths()
        if not paths:
            print(f"no snapshots in {dest}")
            return 0
        for p in paths:
            m = folder.read_snapshot(p)
            size = sum(f["s"] for f in m["files"])
            print(f"{p.name.removesuffix('.snap')}  {len(m['files']):>7} files  {_size(size):>9}  "
                  f"database: {m['database']['kind']}")
    except ArchiveError as exc:
        print(f"mailroom backup list: {exc}", file=sys.stderr)
        return 1
    return 0


def status_line(cfg: Config, now: float | None = None) -> str:
    """One line for `mailroom status`: the last backup and the next one."""
    last = backupstatus.read(cfg.run_dir)
    now = time.time() if now is None else now
    when = f"daily at {cfg.backup.at}" if cfg.backup.at else "no schedule ([backup] at)"
    if last is None:
        return f"backup: none yet; {when}"
    if not last.ok:
        good = f"last good one {_ago(now - last.last_ok)}" if last.last_ok else "none has succeeded"
        return f"backup: FAILED {_ago(now - last.finished)}: {last.error}; {good}; {when}"
    return f"backup: ok {last.snapshot}, {_ago(now - last.finished)}; {when}"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def key_of(cfg: Config) -> Key:
    return read_key(cfg.resolve(cfg.backup.key))
