"""Users and aliases, changed the one way: what `mailroom user`, `mailroom alias` and the admin page call.

Each function checks what it is given against the config (a local domain, a
full address), makes the change in one write transaction (common/users.py) and
does what must follow: the first user gets the postmaster and abuse roles, a
deletion says which role addresses no longer reach anyone, and Dovecot's
users file is rewritten so IMAP and POP3 know at the next login.  A refusal
is `Refused` with the line to show; a change gives the lines that say what was
done, and warnings.  Passwords arrive in clear and are hashed here, before the
write transaction (it holds SQLite's write lock; hashing takes tens of ms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cli import dovecot, postmaster
from cli.show import clean
from common.config import Config
from common.db import Database
from common.models import Alias, User
from common.passwords import WeakPassword
from common.users import (
    DISABLED,
    add_alias_targets,
    find_user,
    hash_new_password,
    is_disabled,
    new_user,
    set_disabled,
)

MAX_ADDRESS = 320  # RFC 5321 4.5.3.1: 64 + @ + 255


class Refused(Exception):
    """The change cannot be made; the text says why, in one line."""


@dataclass
class Done:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unsynced: bool = False  # Dovecot's users file could not be rewritten


def expect(cfg: Config, db: Database, address: str, *, exists: bool) -> str:
    """Refused unless the user exists (or does not): checked before a password is asked for."""
    address = local_address(cfg, address)
    with db.read() as s:
        found = find_user(s, address) is not None
    if found and not exists:
        raise Refused(f"{clean(address)} exists")
    if exists and not found:
        raise Refused(f"{clean(address)}: no such user")
    return address


def local_address(cfg: Config, address: str, *, catch_all: bool = False) -> str:
    address = address.strip().lower()
    local, at, domain = address.rpartition("@")
    shown = clean(address)
    if len(address) > MAX_ADDRESS:
        raise Refused(f"{shown[:60]}...: longer than an address can be ({MAX_ADDRESS})")
    if not at or "@" in local or (not local and not catch_all) or not cfg.is_local_domain(domain):
        what = "not an address or @domain in a local domain" if catch_all else "not in a local domain"
        raise Refused(f"{shown}: {what} ({', '.join(cfg.mailroom.domains)})")
    return address


def _password(password: str, address: str) -> str:
    """The hash to store, once the password passes the rule every setter applies
    (common/passwords.py: length, well-known passwords, the address itself)."""
    try:
        return hash_new_password(password, address)
    except WeakPassword as exc:
        raise Refused(f"{clean(address)}: password refused: {exc}") from None


def add_user(cfg: Config, db: Database, address: str, password: str, *, store: str | None = None,
             quota: int = 0) -> Done:
    address = local_address(cfg, address)
    if quota < 0:
        raise Refused("quota: bytes, 0 for none")
    with db.read() as s:
        if find_user(s, address) is not None:
            raise Refused(f"{clean(address)} exists")
    hashed = _password(password, address)
    done = Done()
    with db.write() as s:
        if find_user(s, address) is not None:
            raise Refused(f"{clean(address)} exists")
        first = s.scalars(select(User.id)).first() is None
        store = store or cfg.mda.default_store
        user = new_user(s, address, hashed, store=store, quota=quota)
        done.lines.append(f"added {clean(address)} ({store} at {clean(cfg.mail_root / user.mailbox)})")
        if first:  # the first user is postmaster unless `init --postmaster` named someone
            for role in postmaster.point_at(s, cfg.mailroom.domains, address, only_missing=True):
                done.lines.append(f"{clean(role)} -> {clean(address)}")
        s.commit()
    return _synced(cfg, db, done)


def _existing(s: Session, address: str) -> User:
    user = find_user(s, address)
    if user is None:
        raise Refused(f"{clean(address)}: no such user")
    return user


def set_password(cfg: Config, db: Database, address: str, password: str) -> Done:
    address = local_address(cfg, address)
    with db.read() as s:
        _existing(s, address)
    hashed = _password(password, address)
    with db.write() as s:
        user = _existing(s, address)
        # A disabled user stays disabled with the new password.
        user.password_hash = (DISABLED if is_disabled(user) else "") + hashed
        s.commit()
    return _synced(cfg, db, Done([f"password changed for {clean(address)}"]))


def set_quota(cfg: Config, db: Database, address: str, quota: int) -> Done:
    address = local_address(cfg, address)
    if quota < 0:
        raise Refused("quota: bytes, 0 for none")
    with db.write() as s:
        user = _existing(s, address)
        user.quota = quota
        s.commit()
    shown = f"{quota} bytes" if quota else "none"
    return _synced(cfg, db, Done([f"quota of {clean(address)}: {shown}"]))


def set_login(cfg: Config, db: Database, address: str, *, enabled: bool) -> Done:
    """Turn a user's logins (submission, IMAP, POP3) off or on; mail to them is still delivered."""
    address = local_address(cfg, address)
    with db.write() as s:
        user = _existing(s, address)
        changed = set_disabled(user, not enabled)
        s.commit()
    state = "enabled" if enabled else "disabled (mail to it is still delivered)"
    line = f"{clean(address)}: logins {state}" if changed else f"{clean(address)}: logins already {state.split()[0]}"
    return _synced(cfg, db, Done([line]))


def delete_user(cfg: Config, db: Database, address: str) -> Done:
    address = local_address(cfg, address)
    done = Done()
    with db.write() as s:
        user = _existing(s, address)
        before = postmaster.reachable(s, cfg.mailroom.domains, cfg.mda.recipient_delimiter)
        s.delete(user)
        s.flush()
        done.lines.append(f"deleted {clean(address)} (the mailbox files are kept)")
        # Left as they are (an alias may still reach other users), but said.
        for source in s.scalars(select(Alias.source).where(Alias.target == user.address)):
            done.lines.append(f"note: alias {clean(source)} still points to {clean(address)}; "
                              f"`mailroom alias del {clean(source)} {clean(address)}` removes it")
        done.warnings += _lost_roles(s, cfg, before)
        s.commit()
    return _synced(cfg, db, done)


def add_alias(cfg: Config, db: Database, source: str, targets: list[str]) -> Done:
    source = local_address(cfg, source, catch_all=True)
    targets = [t.strip().lower() for t in targets if t.strip()]
    if not targets:
        raise Refused("alias add needs at least one target")
    bad = [t for t in targets if t.count("@") != 1 or t.startswith("@") or t.endswith("@") or len(t) > MAX_ADDRESS]
    if bad:
        raise Refused(f"{clean(bad[0][:MAX_ADDRESS])}: a target must be a full address (user@domain)")
    with db.write() as s:
        add_alias_targets(s, source, targets)
        s.commit()
    return Done([f"{clean(source)} -> {clean(', '.join(targets))}"])


def delete_alias(cfg: Config, db: Database, source: str, targets: list[str]) -> Done:
    source = local_address(cfg, source, catch_all=True)
    targets = [t.strip().lower() for t in targets if t.strip()]
    done = Done()
    with db.write() as s:
        q = delete(Alias).where(Alias.source == source)
        if targets:
            q = q.where(Alias.target.in_(targets))
        before = postmaster.reachable(s, cfg.mailroom.domains, cfg.mda.recipient_delimiter)
        if s.execute(q).rowcount == 0:  # type: ignore[attr-defined]
            raise Refused(f"{clean(source)}: no such alias")
        done.lines.append(f"deleted {clean(source)}" + (f" -> {clean(', '.join(targets))}" if targets else ""))
        done.warnings += _lost_roles(s, cfg, before)
        s.commit()
    return done


def _lost_roles(s: Session, cfg: Config, before: set[str]) -> list[str]:
    """Which of postmaster and abuse no longer reach anyone (the change is kept)."""
    lost = before - postmaster.reachable(s, cfg.mailroom.domains, cfg.mda.recipient_delimiter)
    return [f"{role} now delivers to nobody, and every mail domain must have it; "
            f"`mailroom alias add {role} ADDRESS` sets it" for role in sorted(lost)]


def _synced(cfg: Config, db: Database, done: Done) -> Done:
    """Dovecot reads its own copy of the users: rewritten now, a change counts at the next login."""
    try:
        dovecot.write_users(cfg, db)
    except OSError as exc:
        done.warnings.append(f"Dovecot's users file was not rewritten ({exc}); IMAP and POP3 still know "
                             "the old users until `mailroom user sync`")
        done.unsynced = True
    return done
