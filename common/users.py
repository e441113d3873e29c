"""Users and their addresses: who exists, where their mailbox is, what they may send as.

Passwords are argon2id hashes (argon2-cffi's defaults, RFC 9106's second
recommended profile).  Verifying one takes tens of milliseconds on purpose;
callers in an event loop run it in a thread (`Database.run`).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from common import passwords
from common.address import lookup_key, split
from common.models import Alias, User

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verifying against this keeps an unknown user as slow as a wrong password.

    Made on first use, not at import: hashing takes as long as verifying, and every
    process that imports this module (each `mailroom` command) would pay for it.
    Both checks below ask for it before they verify, whoever the login is for, so
    the first check in a process is as slow for a known user as for an unknown one."""
    return _hasher.hash("not a password")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def hash_new_password(password: str, address: str) -> str:
    """The hash to store for a password being set for `address`, once the password
    passes the rule every setter applies (common/passwords.py; WeakPassword if not)."""
    passwords.check(password, address=address)
    return hash_password(password)


def check_password(user: User | None, password: str) -> bool:
    dummy = _dummy_hash()
    try:
        return _hasher.verify(user.password_hash if user else dummy, password) and (
            user is not None
        )
    except (VerificationError, InvalidHashError):
        return False


def verify_hash(password_hash: str | None, password: str) -> bool:
    """Does `password` match the argon2 hash (None: no such account, checked as slowly as a wrong password)?"""
    dummy = _dummy_hash()
    try:
        return _hasher.verify(password_hash or dummy, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def find_user(session: Session, address: str, delimiter: str = "") -> User | None:
    """The local user an address delivers to directly (user+tag@domain -> user@domain)."""
    key = lookup_key(address, delimiter)
    return session.scalars(select(User).where(User.address == key)).first()


def mailbox_name(address: str) -> str:
    """A mailbox folder name chosen at `user add` time: domain/local, made path-safe.

    Delivery never derives paths from addresses: it reads User.mailbox.  This
    is only the suggestion for a new user, and it cannot escape the mail root.
    """
    local, domain = split(address.lower())
    safe = re.sub(r"[^a-z0-9._+-]", "_", local).lstrip(".") or "_"
    safe_domain = re.sub(r"[^a-z0-9.-]", "_", domain).strip(".") or "_"
    return f"{safe_domain}/{safe}"


def addresses_of(session: Session, login: str) -> set[str]:
    """Addresses a user may send as: their own and the aliases that lead to them."""
    owned = {login.lower()}
    sources = session.scalars(select(Alias.source).where(Alias.target == login.lower()))
    owned.update(s for s in sources if not s.startswith("@"))
    return owned


# Where users' Sieve scripts live: beside the mailboxes, under a folder no mailbox
# name can take (a mailbox is "domain/local", and no domain starts with a dot).
SIEVE_ROOT = ".sieve"


def sieve_dir(mail_root: Path, mailbox: str) -> Path:
    """The folder of a user's Sieve scripts (Dovecot's ManageSieve writes them there, the
    MDA runs `active.sieve`, the link to the active one), from the users table's mailbox name."""
    return mail_root / SIEVE_ROOT / mailbox


def active_sieve(mail_root: Path, mailbox: str) -> Path:
    return sieve_dir(mail_root, mailbox) / "active.sieve"


# --- changes: what `mailroom user` / `mailroom alias` and the admin page both do ---------
#
# The checks that name the config (local domains, the default store) and what follows a
# change (Dovecot's users file, the postmaster role) are cli/accounts.py's.

# A password hash that starts with this is a login turned off (the shadow file's `!`):
# no argon2 hash starts so, so every check fails (check_password, Dovecot's users file
# leaves it out), and taking the `!` away gives the same password back.  Mail to the
# user is still delivered.
DISABLED = "!"


def is_disabled(user: User) -> bool:
    return user.password_hash.startswith(DISABLED)


def set_disabled(user: User, disabled: bool) -> bool:
    """Turn the user's logins off (or on again); whether anything changed."""
    if disabled == is_disabled(user):
        return False
    user.password_hash = DISABLED + user.password_hash if disabled else user.password_hash[len(DISABLED):]
    return True


def new_user(session: Session, address: str, password_hash: str, *, store: str, quota: int = 0) -> User:
    """A user row with a mailbox folder of its own under the mail root (chosen now, never from the address later)."""
    name = mailbox_name(address) + (".mbox" if store == "mbox" else "")
    user = User(address=address.lower(), password_hash=password_hash, store=store, mailbox=name, quota=quota)
    session.add(user)
    return user


def add_alias_targets(session: Session, source: str, targets: list[str]) -> list[str]:
    """Add `source -> target` for each target not there yet; the ones added."""
    have = set(session.scalars(select(Alias.target).where(Alias.source == source)))
    added = []
    for t in targets:
        if t not in have:
            session.add(Alias(source=source, target=t))
            have.add(t)
            added.append(t)
    return added
