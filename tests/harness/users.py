"""The one way in-process tests make users and aliases.

`add_users` writes what `mailroom user add` writes (cli/main.py), with the same
helpers of common/users.py and cli/: the address lower-cased, the mailbox named
by `mailbox_name` (".mbox" added for an mbox), an argon2id password hash, the
quota, postmaster and abuse pointing at the first user of the installation,
and Dovecot's users file rewritten.  tests/unit/test_harness.py holds the two
side by side, so this writer cannot drift from the command.  It differs in
speed only: many users in one transaction, and each password hashed once per
test process (argon2 takes most of a second here, on purpose), where the
command starts Python, opens and migrates the database and hashes for every
user.

A test that needs a row the command would never write (a mailbox path that
escapes the mail root: a damaged or hostile database) says so with `mailbox=`;
Dovecot's users file is then left as it was.
"""

from __future__ import annotations

import functools
from pathlib import Path

from sqlalchemy import select

from cli import dovecot, postmaster
from common.models import Alias, User
from common.users import hash_password, mailbox_name
from tests.support.suite import PASSWORD, Installation


@functools.cache
def password_hash(password: str) -> str:
    return hash_password(password)


def add_users(
    inst: Installation, *addresses: str, store: str = "maildir", password: str = PASSWORD, quota: int = 0,
    mailbox: str | None = None,
) -> list[Path]:
    """Users as `mailroom user add ADDRESS --store STORE --quota N` makes them; their mailbox paths."""
    config = inst.config
    db = inst.db()
    names = []
    try:
        with db.write() as s:
            for address in addresses:
                address = address.lower()
                first = s.scalars(select(User.id)).first() is None
                name = mailbox if mailbox is not None else mailbox_name(address) + (".mbox" if store == "mbox" else "")
                s.add(User(address=address, password_hash=password_hash(password), store=store, mailbox=name,
                           quota=quota))
                if first:
                    postmaster.point_at(s, config.mailroom.domains, address, only_missing=True)
                names.append(name)
            s.commit()
        if mailbox is None:  # as the command does: IMAP logins know the user at once
            dovecot.write_users(config, db)  # (a damaged row would not even make a users file)
    finally:
        db.close()
    return [config.mail_root / n for n in names]


def add_user(
    inst: Installation, address: str, store: str = "maildir", *, password: str = PASSWORD, quota: int = 0,
    mailbox: str | None = None,
) -> Path:
    """One user (see add_users); its mailbox path."""
    return add_users(inst, address, store=store, password=password, quota=quota, mailbox=mailbox)[0]


def add_alias(inst: Installation, source: str, *targets: str) -> None:
    """As `mailroom alias add SOURCE TARGET...`: each target not yet there is added."""
    db = inst.db()
    try:
        with db.write() as s:
            source = source.lower()
            have = set(s.scalars(select(Alias.target).where(Alias.source == source)))
            for t in (t.lower() for t in targets):
                if t not in have:
                    s.add(Alias(source=source, target=t))
                    have.add(t)
            s.commit()
    finally:
        db.close()
