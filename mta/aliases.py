"""Alias expansion, done when a message is queued (as Postfix's virtual_alias_maps).

An address in a local domain expands to the users and outside addresses it
stands for; forwarded mail is then queued and retried like any other.  Lookup
order for each address: an alias for the exact address, the user itself, a
catch-all alias `@domain`.  A target equal to its source keeps a local copy.
postmaster at any local domain must reach someone (RFC 5321 4.5.1): where a
domain has none of these for it, it is the first local domain's postmaster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.address import domain_of, lookup_key
from common.models import Alias
from common.users import find_user

MAX_DEPTH = 20


class AliasLoop(Exception):
    pass


@dataclass(frozen=True)
class Expansion:
    local: list[str]  # users of local domains
    remote: list[str]  # outside addresses (forwarding)


class _Named(Protocol):
    @property
    def address(self) -> str: ...


class Lookup(Protocol):
    """Where expansion reads users and aliases: the database, or a Directory snapshot."""

    def targets(self, source: str) -> list[str]: ...

    def user(self, address: str, delimiter: str = "") -> _Named | None: ...


class _SessionLookup:
    def __init__(self, session: Session) -> None:
        self.session = session

    def targets(self, source: str) -> list[str]:
        return list(self.session.scalars(select(Alias.target).where(Alias.source == source).order_by(Alias.id)))

    def user(self, address: str, delimiter: str = "") -> _Named | None:
        return find_user(self.session, address, delimiter)


def expand(
    session: Session, address: str, *, local_domains: list[str], delimiter: str = ""
) -> Expansion | None:
    """What `address` (in a local domain) delivers to; None when nobody is there."""
    return expand_from(_SessionLookup(session), address, local_domains=local_domains, delimiter=delimiter)


def expand_from(
    lookup: Lookup, address: str, *, local_domains: list[str], delimiter: str = ""
) -> Expansion | None:
    """`expand`, reading from `lookup` (the MTA passes its in-memory Directory snapshot)."""
    local: list[str] = []
    remote: list[str] = []
    seen: set[str] = set()

    def visit(addr: str, depth: int) -> bool:
        if depth > MAX_DEPTH:
            raise AliasLoop(address)
        if domain_of(addr) not in local_domains:
            if addr not in remote:
                remote.append(addr)
            return True
        key = lookup_key(addr, delimiter)
        if key in seen:
            raise AliasLoop(address)
        # `seen` holds the path from the address to here: two branches may
        # lead to one user, and that is not a loop.
        seen.add(key)
        try:
            targets = lookup.targets(key)
            user = lookup.user(key)
            if not targets and user is None:
                targets = lookup.targets("@" + domain_of(key))
                postmaster = f"postmaster@{local_domains[0]}"
                if not targets and key.startswith("postmaster@") and key != postmaster:
                    targets = [postmaster]
            if targets:
                found = False
                for t in targets:
                    if t == key and user is not None:
                        found |= _add(local, user.address)
                    else:
                        found |= visit(t, depth + 1)
                return found
            if user is not None:
                return _add(local, user.address)
            return False
        finally:
            seen.discard(key)

    if not visit(address, 0):
        return None
    return Expansion(local, remote)


def _add(items: list[str], item: str) -> bool:
    if item not in items:
        items.append(item)
    return True
