"""Least privilege: which account a daemon serves as, the switch to it, private files.

Mailroom never serves the network as root.  A daemon started as root binds its
ports and reads its TLS key, then becomes `[mailroom] user` before it reads a
byte from a client; with no user configured it refuses to start.  Everything it
holds (the database with every queued message and password hash, the config
with the relay password, the TLS key, the run folder and the mail root) is
owner-only: 0600 files, 0700 folders, umask 077.  A reader such as Dovecot gets
the mail root through `[mailroom] mail_group`, never through world bits.

This module never opens a socket and never reads mail.
"""

from __future__ import annotations

import contextlib
import grp
import importlib
import importlib.util
import logging
import os
import pkgutil
import pwd
import stat
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from common import hop_secret
from common import log as logmod
from common.config import Config

log = logging.getLogger("daemon")

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
UMASK = 0o077
# With a mail group, the MDA writes mailboxes the group may read (and nothing else is
# written by it outside the mail root: the database's side files copy the database's mode).
MAIL_UMASK = 0o027
# Suffixes of the database's companions: SQLite's journal, WAL and shared memory,
# and our writers' gate (common/db.py).
DB_SIDE_FILES = ("-wal", "-shm", "-journal", "-writers")


class StartError(Exception):
    """The daemon cannot start safely; the text is the one line that says why and what to do."""


@dataclass(frozen=True)
class Account:
    """The Mailroom user: who the daemons serve as and who owns the installation."""

    name: str
    uid: int
    gid: int
    mail_gid: int | None = None

    @property
    def is_current(self) -> bool:
        return os.getuid() == self.uid


def current_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def account(cfg: Config) -> Account:
    """The account to serve as; StartError when that would be root or the user is unknown.

    Started as root it is `[mailroom] user`.  Started as anyone else there is
    nothing to switch: it is the current user (a configured name that differs
    is logged, not fatal, so a developer can run a copied config).
    """
    name = cfg.mailroom.user
    if os.getuid() != 0:
        me = current_user()
        if name and name != me:
            log.warning("not started as root: serving as %s, not as [mailroom] user = %s", me, name)
        return Account(me, os.getuid(), os.getgid(), _mail_gid(cfg))
    if not name:
        raise StartError(
            f"started as root with no [mailroom] user: Mailroom never serves as root; "
            f'set user = "mailroom" under [mailroom] in {cfg.path} '
            f"(`mailroom init` as root creates that system user)"
        )
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise StartError(
            f"[mailroom] user = {name}: no such user; create it with "
            f"`useradd --system --no-create-home --shell /usr/sbin/nologin {name}`"
        ) from None
    if pw.pw_uid == 0:
        raise StartError(f"[mailroom] user = {name}: that is root; name an unprivileged user")
    return Account(name, pw.pw_uid, pw.pw_gid, _mail_gid(cfg))


def _mail_gid(cfg: Config) -> int | None:
    name = cfg.mailroom.mail_group
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise StartError(f"[mailroom] mail_group = {name}: no such group") from None


# --- private files -------------------------------------------------------------


def database_files(cfg: Config) -> list[Path]:
    """The SQLite database file and its companions (empty for a server database)."""
    url = cfg.database_url
    prefix = "sqlite:///"
    if not url.startswith(prefix) or ":memory:" in url:
        return []
    path = url[len(prefix):].split("?", 1)[0]
    return [Path(path + suffix) for suffix in ("", *DB_SIDE_FILES)]


def make_private(path: Path, acct: Account, *, what: str, own: bool = False) -> None:
    """Owner-only mode for an existing file (and, as root with `own`, the Mailroom user as owner).

    Fixed when this process may (root, or the owner); otherwise a StartError
    names the file and the command that fixes it.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(st.st_mode)
    root = os.getuid() == 0
    if root and own and (st.st_uid, st.st_gid) != (acct.uid, acct.gid):
        os.chown(path, acct.uid, acct.gid)
    if mode & 0o077:
        if not (root or st.st_uid == os.getuid()):
            raise StartError(
                f"{what} {path} is readable by others (mode {mode:04o}) and not ours to fix: "
                f"chmod 600 {path}"
            )
        os.chmod(path, mode & 0o700 or PRIVATE_FILE)
        log.warning("%s %s was readable by others (mode %04o): made it %04o", what, path, mode, mode & 0o700)


def private_dir(path: Path, acct: Account, *, group: int | None = None) -> None:
    """Create `path` owner-only (0700; 2750 for a reader group) and, as root, give it to the Mailroom user."""
    mode = PRIVATE_DIR if group is None else 0o2750
    if not path.exists():
        path.mkdir(mode=mode, parents=True, exist_ok=True)  # daemons start together
        os.chmod(path, mode)  # mkdir's mode passes through the umask
    if os.getuid() == 0:
        st = path.stat()
        gid = acct.gid if group is None else group
        if (st.st_uid, st.st_gid) != (acct.uid, gid):
            os.chown(path, acct.uid, gid)
    st = path.stat()
    if st.st_uid == os.getuid() or os.getuid() == 0:
        if stat.S_IMODE(st.st_mode) & 0o077 & ~(0o050 if group is not None else 0):
            os.chmod(path, mode)
            log.warning("%s was open to others: made it %04o", path, mode)
        elif group is not None and stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)


def secure(cfg: Config, acct: Account) -> None:
    """Before the switch: the run folder and mail root exist and are the user's, and the
    database, its side files, the config, the TLS key and the DKIM keys are owner-only."""
    private_dir(cfg.run_dir, acct)
    private_dir(cfg.mail_root, acct, group=acct.mail_gid)
    for path in database_files(cfg):
        make_private(path, acct, what="database file", own=True)
    make_private(cfg.path, acct, what="config")
    # Made by whichever process needed it first (perhaps root, in a test or a command).
    make_private(cfg.run_dir / hop_secret.FILE, acct, what="internal hop secret", own=True)
    make_private(cfg.resolve(cfg.tls.key), acct, what="TLS key")
    key_dir = cfg.resolve(cfg.dkim.key_dir)
    if key_dir.is_dir():  # made by `mailroom init` or `mailroom dkim keygen`, perhaps as root
        private_dir(key_dir, acct)
        for path in key_dir.iterdir():
            make_private(path, acct, what="DKIM key", own=True)


def open_log(cfg: Config, acct: Account, program: str) -> None:
    """Send this process's log records to `[mailroom] log_dir`/PROGRAM.log from now on
    (the folder made owner-only and the Mailroom user's, the file too); nothing when
    log_dir is empty (they stay on standard error).  Called before the switch: a
    folder it cannot make is a StartError."""
    folder = cfg.log_dir
    if folder is None:
        return
    try:
        private_dir(folder, acct)
        logmod.to_file(folder / f"{program}.log", owner=(acct.uid, acct.gid) if os.getuid() == 0 else None)
    except OSError as exc:
        raise StartError(f"[mailroom] log_dir = {cfg.mailroom.log_dir}: {exc.strerror or exc} ({folder})") from None


def helper_account(cfg: Config) -> Account | None:
    """account() for the programs beside the daemons (web, renew, schedule), which may
    stay root when no `[mailroom] user` is set: then None (nothing to switch to)."""
    if cfg.mailroom.user or os.getuid() != 0:
        return account(cfg)
    return None


def open_helper_log(cfg: Config, program: str) -> None:
    """open_log for the programs beside the daemons; one that stays root (helper_account)
    logs to standard error."""
    acct = helper_account(cfg)
    if acct is not None:
        open_log(cfg, acct, program)


def hand_over(path: str, acct: Account) -> None:
    """A Unix socket bound as root becomes the Mailroom user's (its clients run as that user)."""
    if os.getuid() == 0:
        os.chown(path, acct.uid, acct.gid)


# --- the switch ------------------------------------------------------------------


# What a daemon loads only after the switch: the schema migrations (alembic reads
# its scripts then), the thread pool, time zones, text codecs named by a message's
# charset, the parts of the email package that rewrite or build messages.
PRELOAD = (
    "alembic.command", "alembic.config", "alembic.op", "alembic.runtime.environment",
    "alembic.runtime.migration", "alembic.script", "alembic.ddl.sqlite", "alembic.ddl.postgresql",
    "sqlalchemy.dialects.sqlite.pysqlite", "sqlite3", "concurrent.futures.thread", "queue",
    "zoneinfo", "configparser", "logging.config", "encodings.idna", "stringprep", "unicodedata",
    "email.generator", "email.policy", "email.headerregistry", "email.contentmanager",
    "email.mime.text", "email.mime.multipart", "email.mime.message", "email.mime.nonmultipart",
    "email.quoprimime", "email.base64mime", "email.encoders", "email.iterators",
    "asyncio.sslproto", "ssl", "hmac", "secrets", "uuid", "fcntl", "shutil", "mailbox",
    "dns.asyncbackend", "dns._asyncio_backend", "sniffio",
)


# Mailroom's own packages: what the daemons import, and the files they read from them.
CODE_PACKAGES = ("common", "msa", "mta", "mda", "cli", "web", "lab")


def _may(st: os.stat_result, acct: Account, need: int) -> bool:
    shift = 6 if st.st_uid == acct.uid else 3 if st.st_gid == acct.gid else 0
    return (st.st_mode >> shift) & need == need


def code_problem(acct: Account) -> str | None:
    """As root: the one line saying that `acct` may not read Mailroom's code (a folder on
    the way to a package, a package folder, or a file in one: the schema migrations are
    among them), or None.  The daemons start as root and import as root, but read more
    of the code after the switch (modules loaded on first use; the web program's files)."""
    if os.getuid() != 0 or acct.uid == 0:
        return None
    for name in CODE_PACKAGES:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            top = Path(location)
            for p in reversed(top.parents):
                if not _may(p.stat(), acct, 0o1):
                    return (f"{acct.name} cannot read Mailroom's code in {top}: {p} is closed to it "
                            f"(mode {stat.S_IMODE(p.stat().st_mode):04o}), and the daemons read the code after they "
                            f"become {acct.name}; put the code where every user can read it (a clone, or a venv "
                            f"with `pip install .`, under /opt or /usr/local)")
            for folder, dirs, files in os.walk(top):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                here = Path(folder)
                for path, need in [(here, 0o5), *((here / f, 0o4) for f in files)]:
                    if not _may(path.stat(), acct, need):
                        return (f"{acct.name} cannot read Mailroom's code: {path} is closed to it "
                                f"(mode {stat.S_IMODE(path.stat().st_mode):04o}), and the daemons read the code after "
                                f"they become {acct.name}; give every user read access (chmod -R a+rX {top})")
    return None


def preload() -> None:
    """Load now what would be loaded lazily later: after the switch the Python
    installation may not be readable (a pyenv under /root, mode 0700)."""
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    import encodings

    for info in pkgutil.iter_modules(encodings.__path__):
        # A codec for another platform (mbcs, oem) does not import here.
        with contextlib.suppress(ImportError):
            importlib.import_module(f"encodings.{info.name}")


def become(acct: Account, *, umask: int = UMASK) -> None:
    """Switch to the Mailroom user for good (groups, gid, uid: root cannot come back),
    then the umask for everything created from here on."""
    if os.getuid() == 0:
        stdlib = sysconfig.get_paths()["stdlib"]
        unreadable = not readable_by(Path(stdlib), acct)
        closed_code = code_problem(acct)
        if unreadable or closed_code:
            preload()
        # No supplementary groups: a mail group reaches new mailboxes through the
        # mail root's setgid bit, not through membership.
        os.setgroups([])
        os.setgid(acct.gid)
        os.setuid(acct.uid)
        if os.getuid() == 0 or os.geteuid() == 0:  # pragma: no cover - the kernel refused
            raise StartError("could not give up root")
        log.info("dropped privileges to %s", acct.name)
        if unreadable:
            log.warning(
                "Python's library %s is not readable by %s: modules were loaded before the "
                "switch; a Python every user can read (/usr/bin/python3 -m venv) is safer",
                stdlib, acct.name,
            )
        if closed_code:
            log.warning("%s: modules were loaded and the schema migrations read before the switch "
                        "(`mailroom run` refuses to start so)", closed_code)
        if (unreadable or closed_code) and os.environ.get("MAILROOM_IMPORT_AUDIT"):
            sys.addaudithook(_audit_import)
    os.umask(umask)


def _audit_import(event: str, args: tuple[object, ...]) -> None:
    # Development aid (MAILROOM_IMPORT_AUDIT=1): name each module loaded after the switch.
    if event == "import" and args[0] not in sys.modules:
        log.warning("module %s loaded after the switch", args[0])


def searchable_by(path: Path, acct: Account) -> bool:
    """Can `acct` pass through `path` (search permission on it and every folder above)?"""
    for p in [*reversed(path.parents), path]:
        try:
            st = p.stat()
        except OSError:
            return False
        shift = 6 if st.st_uid == acct.uid else 3 if st.st_gid == acct.gid else 0
        if not (st.st_mode >> shift) & 0o1:
            return False
    return True


def readable_by(path: Path, acct: Account) -> bool:
    """Can `acct` read `path` (every folder on the way searchable, the last one listable)?"""
    for p in [*reversed(path.parents), path]:
        try:
            st = p.stat()
        except OSError:
            return False
        need = 0o5 if p == path else 0o1
        shift = 6 if st.st_uid == acct.uid else 3 if st.st_gid == acct.gid else 0
        if (st.st_mode >> shift) & need != need:
            return False
    return True


def writable_problem(cfg: Config, acct: Account) -> str | None:
    """After the switch: the one line saying which folder or file this process cannot
    write, and the command that fixes it; None when all is well."""
    files = database_files(cfg)
    folders = [files[0].parent] if files else []
    folders += [cfg.run_dir, cfg.mail_root]
    for folder in folders:
        if not os.access(folder, os.W_OK | os.X_OK):
            return _problem(acct, f"cannot create files in {folder}", cfg.base)
    for f in files:
        if f.exists() and not os.access(f, os.R_OK | os.W_OK):
            return _problem(acct, f"cannot write {f}", cfg.base)
    return None


def _problem(acct: Account, what: str, base: Path) -> str:
    return f"running as {acct.name}, {what}: give {acct.name} the installation's folder (chown -R {acct.name}: {base})"
