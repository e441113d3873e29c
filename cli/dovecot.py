"""Dovecot for IMAP and POP3: the configuration and the user file Mailroom generates for it.

`mailroom run` writes RUN_DIR/dovecot.conf (from the `[imap]`, `[tls]` and
`[mailroom]` settings) and supervisord runs `dovecot -F -c RUN_DIR/dovecot.conf`
as the program `imap`.  Nothing of the system's /etc/dovecot is used.

Users: Dovecot reads a passwd-file, RUN_DIR/dovecot/users, that Mailroom
rewrites from the users table at every start and every `mailroom user`
change.  Chosen over Dovecot's SQL driver because it needs no extra Dovecot
package (dovecot-sqlite / dovecot-pgsql) and works the same whichever database
holds the users; the database stays private to the Mailroom user instead of
being opened by a second program that knows nothing of SQLite's write lock;
and Dovecot re-reads the file whenever its mtime changes (no auth cache is
configured), so a new user, a new password or a deleted user counts at the
next login.  The cost: a change made to the users table by anything but
`mailroom user` reaches Dovecot only at the next `mailroom run` (or
`mailroom user sync`).

Each line carries the argon2id hash exactly as argon2-cffi stored it (Dovecot's
ARGON2ID scheme reads the same PHC string), the user's own mail location
(Maildir, or mbox with its folders beside it) and, for Maildir users with a
quota, the same limit the MDA enforces: Dovecot's `maildir` quota backend keeps
the Maildir++ `maildirsize` file the MDA reads and appends to (mda/quota.py).

Logins are the whole address, lower-cased, as on the MSA: `alice+tag@...` is a
login the MSA does not know either.  Mail is accessed as `[mailroom] user`
when one is set (Dovecot, started as root, then reads what the daemons wrote as
that user), and otherwise as whoever runs `mailroom run`: Dovecot refuses to
touch mail as root, so as root without a user it is not started.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from cli import dovecot_sieve
from common.config import Config, parse_hostport
from common.db import Database
from common.models import User

# Where Debian and most builds put the binary; not always in a user's PATH.
SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
QUOTA_ROOT = "Mailbox"  # one word: the users file separates fields with spaces
# Unix socket paths are limited to 107 bytes; Dovecot puts sockets up to
# about 30 bytes deep under base_dir.
MAX_BASE_DIR = 70


@dataclass(frozen=True)
class MailIds:
    """Whom Dovecot accesses mail as, and who runs its internal processes."""

    uid: int
    gid: int
    name: str
    as_root: bool  # the master runs as root and drops to these ids


def find_dovecot(cfg: Config) -> str | None:
    """The dovecot program, or None when it is not installed."""
    return find_program(cfg.imap.dovecot)


def find_program(name: str) -> str | None:
    if "/" in name:
        return name if os.access(name, os.X_OK) else None
    path = os.pathsep.join([os.environ.get("PATH", ""), *SEARCH_DIRS])
    return shutil.which(name, path=path)


def mail_ids(cfg: Config) -> MailIds | None:
    """[mailroom] user when started as root; the current user otherwise; None for root alone."""
    if os.geteuid() != 0:
        pw = pwd.getpwuid(os.geteuid())
        return MailIds(pw.pw_uid, pw.pw_gid, pw.pw_name, as_root=False)
    if not cfg.mailroom.user:
        return None
    try:
        pw = pwd.getpwnam(cfg.mailroom.user)
    except KeyError:
        return None  # why_not() says so; the daemons refuse to start too
    return MailIds(pw.pw_uid, pw.pw_gid, pw.pw_name, as_root=pw.pw_uid != 0)


def why_not(cfg: Config) -> str | None:
    """One line saying why Dovecot will not run, or None when it will."""
    if not cfg.imap.enabled:
        return "IMAP and POP3 are off ([imap] enabled = false)"
    if find_dovecot(cfg) is None:
        return (f"IMAP and POP3 are off: Dovecot ({cfg.imap.dovecot}) is not installed "
                "(apt-get install dovecot-imapd dovecot-pop3d)")
    if any(c.isspace() for c in str(cfg.mail_root.resolve())):
        # The users file separates its fields with spaces and has no way to quote one.
        return f"IMAP and POP3 are off: the mail root {cfg.mail_root.resolve()} has a space in its path"
    ids = mail_ids(cfg)
    if os.geteuid() == 0 and cfg.mailroom.user and ids is None:
        return f"IMAP and POP3 are off: [mailroom] user {cfg.mailroom.user!r} does not exist"
    if ids is None or not ids.as_root and os.geteuid() == 0:
        return "IMAP and POP3 are off: Dovecot will not read mail as root; set [mailroom] user"
    return None


def users_file(cfg: Config) -> Path:
    return cfg.run_dir.resolve() / "dovecot" / "users"


def config_file(cfg: Config) -> Path:
    return cfg.run_dir.resolve() / "dovecot.conf"


def mail_location(cfg: Config, user: User) -> str:
    """Dovecot's mail location for a user, from the users table (never from the address)."""
    path = (cfg.mail_root / user.mailbox).resolve()
    if user.store == "mbox":
        # Other folders (Sent, Drafts...) and Dovecot's indexes go beside the file.
        return f"mbox:{path}.folders:INBOX={path}"
    return f"maildir:{path}"


def user_line(cfg: Config, user: User) -> str | None:
    """One passwd-file line; None for a user who cannot log in (no password) or cannot be written."""
    if not user.password_hash.startswith("$argon2") or any(c in user.address for c in ":\n\r\0"):
        return None
    fields = [f"userdb_mail={mail_location(cfg, user)}", *dovecot_sieve.user_fields(cfg, user.mailbox)]
    if user.quota > 0 and user.store == "maildir":
        # Only for Maildir: Dovecot's Maildir++ backend is the MDA's bookkeeping; an
        # mbox is measured by the MDA as one file's size, which no backend reports.
        fields += [f"userdb_quota=maildir:{QUOTA_ROOT}", f"userdb_quota_rule=*:bytes={user.quota}"]
    # user:password:uid:gid:gecos:home:shell:extra fields (uid/gid come from mail_uid/mail_gid)
    return f"{user.address.lower()}:{{ARGON2ID}}{user.password_hash}::::::{' '.join(fields)}"


def write_users(cfg: Config, db: Database) -> Path:
    """Rewrite the users file from the users table, atomically; returns its path."""
    with db.read() as s:
        lines = [line for u in s.scalars(select(User).order_by(User.address)) if (line := user_line(cfg, u))]
    path = users_file(cfg)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".users.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        ids = mail_ids(cfg)
        if ids is not None and ids.as_root:
            # Dovecot's auth process runs as the Mailroom user (see render_config).
            os.chown(tmp, ids.uid, ids.gid)
            os.chown(path.parent, ids.uid, ids.gid)
        # Dovecot notices a change by the file's mtime and size, in whole seconds:
        # a new password of the same length written within the same second as the
        # last change would go unnoticed, so the mtime always moves forward.
        try:
            old = int(path.stat().st_mtime)
        except FileNotFoundError:
            old = 0
        stamp = max(int(time.time()), old + 1)
        os.utime(tmp, (stamp, stamp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _base_dir(cfg: Config) -> Path:
    """Dovecot's socket folder: under the run dir when its path is short enough."""
    natural = cfg.run_dir.resolve() / "dovecot" / "run"
    if len(str(natural)) <= MAX_BASE_DIR:
        natural.mkdir(parents=True, exist_ok=True)
        # The mode Dovecot wants for it (it would fix it itself, with a warning at every
        # start); run/ above stays the Mailroom user's alone.
        natural.chmod(0o755)
        return natural
    digest = hashlib.sha256(str(cfg.run_dir.resolve()).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"mailroom-dovecot-{os.geteuid()}-{digest}"
    try:
        short.mkdir(mode=0o755)
    except FileExistsError:
        st = short.lstat()
        if not short.is_dir() or short.is_symlink() or st.st_uid != os.geteuid():
            raise RuntimeError(f"{short} exists and is not ours; remove it") from None
    return short


def _listener(name: str, listen: str, *, ssl: bool) -> str:
    if not listen:
        return f"  inet_listener {name} {{\n    port = 0\n  }}\n"
    host, port = parse_hostport(listen)
    return (f"  inet_listener {name} {{\n    address = {host}\n    port = {port}\n"
            f"    ssl = {'yes' if ssl else 'no'}\n  }}\n")


def _log_file(cfg: Config, ids: MailIds) -> str:
    """Dovecot's log: the program `imap`'s own file, as every program has one
    (`[mailroom] log_dir`/imap.log; `doveadm log reopen` after logrotate moved
    it), made beforehand as the Mailroom user's and owner-only; or stderr."""
    if cfg.log_dir is None:
        return "/dev/stderr"
    path = cfg.log_dir / "imap.log"
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if ids.as_root:
            os.fchown(fd, ids.uid, ids.gid)
    finally:
        os.close(fd)
    return str(path.resolve())


def render_config(cfg: Config, ids: MailIds) -> Path:
    """Write RUN_DIR/dovecot.conf; returns its path."""
    run = cfg.run_dir.resolve()
    state = run / "dovecot" / "state"
    state.mkdir(parents=True, exist_ok=True)
    base = _base_dir(cfg)
    if ids.as_root:
        os.chown(state, ids.uid, ids.gid)
    users = users_file(cfg)
    cert, key = cfg.resolve(cfg.tls.cert).resolve(), cfg.resolve(cfg.tls.key).resolve()
    instance = "mailroom-" + hashlib.sha256(str(run).encode()).hexdigest()[:8]
    try:
        login_user = pwd.getpwnam("dovenull").pw_name if ids.as_root else ids.name
    except KeyError:
        login_user = ids.name
    # Dovecot's internal sockets belong to this group: ours when not root (we could
    # not give them to Dovecot's), the Mailroom user's when root (its processes use them).
    try:
        group = grp.getgrgid(ids.gid).gr_name
    except KeyError:
        group = str(ids.gid)
    # Not root: no chroot for the login processes, and every service runs as us.
    no_chroot = "" if ids.as_root else "  chroot =\n"
    log_path = _log_file(cfg, ids)
    text = f"""\
# Generated by `mailroom run` from {cfg.path}: edit that file, not this one.
# Dovecot serves IMAP and POP3 from Mailroom's mailboxes, for Mailroom's users.
base_dir = {base}
state_dir = {state}
instance_name = {instance}
protocols = imap pop3{dovecot_sieve.protocols(cfg)}
listen = 127.0.0.1
log_path = {log_path}
log_timestamp = "%Y-%m-%d %H:%M:%S "

# TLS with Mailroom's certificate; passwords only inside TLS (Dovecot counts a
# connection from an address to that same address, i.e. on this host, as secure).
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
auth_username_format = %Lu

default_internal_user = {ids.name}
default_internal_group = {group}
default_login_user = {login_user}
mail_uid = {ids.uid}
mail_gid = {ids.gid}
first_valid_uid = {ids.uid}
last_valid_uid = {ids.uid}
first_valid_gid = {ids.gid}

# Each user's location comes from the users file.  mbox locking as the MDA locks.
mail_location =
mbox_write_locks = dotlock fcntl
mbox_read_locks = fcntl
maildir_very_dirty_syncs = no
pop3_uidl_format = %08Xu%08Xv

# Maildir++ quota: the `maildirsize` file the MDA also keeps (mda/quota.py).
# The users file sets `quota` and `quota_rule` for each Maildir user with a quota.
mail_plugins = $mail_plugins quota
protocol imap {{
  mail_plugins = $mail_plugins imap_quota{dovecot_sieve.imap_plugins(cfg)}
}}

passdb {{
  driver = passwd-file
  args = scheme=ARGON2ID {users}
}}
userdb {{
  driver = passwd-file
  args = {users}
}}

service imap-login {{
{_listener("imap", cfg.imap.imap, ssl=False)}{_listener("imaps", cfg.imap.imaps, ssl=True)}{no_chroot}}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
{_listener("pop3s", cfg.imap.pop3s, ssl=True)}{no_chroot}}}
service anvil {{
{no_chroot}}}
# Failed logins, counted by Dovecot's own statistics (an event per finished
# authentication, grouped by protocol): the web program reads them from the
# stats-reader socket for /metrics beside the MSA's (web/dovecot_stats.py).
metric auth_failures {{
  filter = event=auth_request_finished AND NOT success=yes
  group_by = service
}}
service stats {{
  unix_listener stats-reader {{
    user = {ids.name}
    mode = 0600
  }}
{no_chroot}}}
# The users file belongs to the Mailroom user; so does the process reading it.
service auth {{
  user = {ids.name}
}}
service auth-worker {{
  user = {ids.name}
}}
"""
    # Users' filters: ManageSieve, and learning spam from IMAP moves (cli/dovecot_sieve.py).
    text += dovecot_sieve.render(cfg, no_chroot)
    if ids.as_root and dovecot_sieve.learning_on(cfg):
        # Dovecot's imap processes read the scripts and keep their compiled forms there.
        learn = dovecot_sieve.learn_dir(cfg)
        for path in (learn, *learn.iterdir()):
            os.chown(path, ids.uid, ids.gid)
    out = config_file(cfg)
    out.write_text(text)
    _name_stats_socket(cfg, base / "stats-reader", ids)
    return out


def _name_stats_socket(cfg: Config, path: Path, ids: MailIds) -> None:
    """Say where Dovecot's stats-reader socket is, for the web program's /metrics
    (web/dovecot_stats.py): the base folder may be a short one under /tmp."""
    from web.dovecot_stats import SOCKET_FILE

    pointer = cfg.run_dir.resolve() / SOCKET_FILE
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(f"{path}\n")
    if ids.as_root:
        os.chown(pointer, ids.uid, ids.gid)


def prepare(cfg: Config, db: Database) -> str | None:
    """For `mailroom run`: write the users file and dovecot.conf.

    Returns one line saying why Dovecot will not run, or None when it will.
    """
    reason = why_not(cfg)
    if reason is not None:
        return reason
    ids = mail_ids(cfg)
    assert ids is not None
    write_users(cfg, db)
    render_config(cfg, ids)
    return None
