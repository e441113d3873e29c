"""What `mailroom init` does for least privilege: the Mailroom user, and a private installation.

Run as root, init makes sure a system user exists for the daemons to serve as
(`mailroom`: no login shell, no home, its own group), the way Debian's postfix
package creates `postfix`, and gives it the installation.  Run as anyone else,
that person is the Mailroom user.  It never changes a user that already exists.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from common.config import Config
from common.privileges import Account, current_user, database_files, searchable_by

SYSTEM_USER = "mailroom"


class SetupError(Exception):
    """The installation cannot be set up; the text says why."""


def mailroom_account(name: str) -> Account:
    """As root: the system user `name`, created when missing.  Otherwise: the current user."""
    if os.getuid() != 0:
        return Account(current_user(), os.getuid(), os.getgid())
    if name == "root":
        raise SetupError("--user root: the daemons never serve as root; name an unprivileged user")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        pw = _create_system_user(name)
    if pw.pw_uid == 0:
        raise SetupError(f"--user {name}: that is root; name an unprivileged user")
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid)


def _create_system_user(name: str) -> pwd.struct_passwd:
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    nologin = shutil.which("nologin") or "/usr/sbin/nologin"
    proc = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", nologin, "--comment", "Mailroom mail system", name],
        capture_output=True, text=True,
    )
    try:
        # Another init may have created it at the same moment: what counts is that it exists.
        return pwd.getpwnam(name)
    except KeyError:
        raise SetupError(
            f"cannot create the system user {name}: {proc.stderr.strip() or f'{useradd} failed'}"
        ) from None


def give_installation(cfg: Config, acct: Account) -> None:
    """As root: everything init created belongs to the Mailroom user (chown -R, without
    following links out of the installation)."""
    if os.getuid() != 0:
        return
    paths = [cfg.base, cfg.path, cfg.run_dir, cfg.mail_root, *[p for p in database_files(cfg) if p.exists()]]
    for key in (cfg.tls.cert, cfg.tls.key):
        path = cfg.resolve(key)
        paths += [path.parent, path]
    for path in dict.fromkeys(paths):
        if path.exists() and (path == cfg.base or path.is_relative_to(cfg.base)):
            os.chown(path, acct.uid, acct.gid, follow_symlinks=False)


def unreachable(base: Path, acct: Account) -> Path | None:
    """The first folder on the way to `base` that `acct` may not pass, or None."""
    for p in reversed(base.parents):
        if not searchable_by(p, acct):
            return p
    return None
