"""Users and their addresses: who exists, where their mailbox is, what they may send as.

Passwords are argon2id hashes (argon2-cffi's defaults, RFC 9106's second
recommended profile).  Verifying one takes tens of milliseconds on purpose;
callers in an event loop run it in a thread (`Database.run`).
"""

from __future__ import annotations

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
# Verifying against this keeps an unknown user as slow as a wrong password.
_DUMMY_HASH = _hasher.hash("not a password")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def hash_new_password(password: str, address: str) -> str:
    """The hash to store for a password being set for `address`, once the password
    passes the rule every setter applies (common/passwords.py; WeakPassword if not)."""
    passwords.check(password, address=address)
    return hash_password(password)


def check_password(user: User | None, password: str) -> bool:
    try:
        return _hasher.verify(user.password_hash if user else _DUMMY_HASH, password) and (
            user is not None
        )
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
