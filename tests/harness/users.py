"""The one way tests make users and aliases: the real `mailroom user add` and `mailroom alias add`.

The commands run in this process (`cli.main.main`), so a user costs no Python
start-up, and what a test gets is exactly what an operator's command writes:
the mailbox name, the store, the quota, postmaster and abuse pointing at the
first user, Dovecot's users file.  Only argon2 is shortened: the command hashes
each password on purpose slowly (most of a second here), so each password is
hashed once per test process and the hash reused.

A test that needs a row the command would never write (a mailbox path that
escapes the mail root: a damaged or hostile database) says so with `mailbox=`,
which changes that one column after the command made the user.
"""

from __future__ import annotations

import contextlib
import functools
import io
import sys
from pathlib import Path

from sqlalchemy import select, update

import cli.main
from common.models import User
from common.users import hash_password
from tests.support.suite import PASSWORD, Installation


@functools.cache
def _hash_once(password: str) -> str:
    return hash_password(password)


def _mailroom(inst: Installation, *args: str, stdin: str = "") -> str:
    """Run one `mailroom` command in-process; its output, or AssertionError with it."""
    out, err = io.StringIO(), io.StringIO()
    real_hash, real_stdin = cli.main.hash_password, sys.stdin
    cli.main.hash_password = _hash_once  # type: ignore[attr-defined]
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main.main(["--config", str(inst.config_path), *args])
    finally:
        cli.main.hash_password, sys.stdin = real_hash, real_stdin  # type: ignore[attr-defined]
    assert status == 0, f"mailroom {' '.join(args)}: {status}\n{out.getvalue()}{err.getvalue()}"
    return out.getvalue()


def add_user(
    inst: Installation, address: str, store: str = "maildir", *, password: str = PASSWORD, quota: int = 0,
    mailbox: str | None = None,
) -> Path:
    """`mailroom user add ADDRESS --store STORE --quota N`; returns the mailbox path."""
    _mailroom(inst, "user", "add", address, "--password-stdin", "--store", store, "--quota", str(quota),
              stdin=password + "\n")
    db = inst.db()
    try:
        if mailbox is not None:
            with db.write() as s:
                s.execute(update(User).where(User.address == address.lower()).values(mailbox=mailbox))
                s.commit()
        with db.read() as s:
            name = s.scalars(select(User.mailbox).where(User.address == address.lower())).one()
    finally:
        db.close()
    return inst.config.mail_root / name


def add_users(inst: Installation, *addresses: str, store: str = "maildir", password: str = PASSWORD) -> None:
    for a in addresses:
        add_user(inst, a, store, password=password)


def add_alias(inst: Installation, source: str, *targets: str) -> None:
    """`mailroom alias add SOURCE TARGET...`."""
    _mailroom(inst, "alias", "add", source, *targets)

