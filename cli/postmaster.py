"""The role addresses every mail domain must have: postmaster (RFC 5321 4.5.1) and abuse (RFC 2142).

`mailroom init --postmaster ADDRESS` points both at ADDRESS.  Without it they
are filled in by the first `mailroom user add`, for that user: before any user
exists there is nobody to deliver to.  postmaster at a domain without its own
alias reaches the first domain's postmaster (mta/aliases.py), so a domain added
later to the config has one too.  `user del` and `alias del` say so when they
leave a role address delivering nowhere.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.models import Alias, User
from mta import aliases

ROLES = ("postmaster", "abuse")


def role_addresses(domains: list[str]) -> list[str]:
    return [f"{role}@{d}" for d in domains for role in ROLES]


def point_at(s: Session, domains: list[str], target: str, *, only_missing: bool = False) -> list[str]:
    """Alias every role address of `domains` to `target`; returns the ones added."""
    added = []
    for address in role_addresses(domains):
        exists = s.scalars(select(Alias.id).where(Alias.source == address)).first() is not None or (
            s.scalars(select(User.id).where(User.address == address)).first() is not None
        )
        if only_missing and exists:
            continue
        if s.scalars(select(Alias.id).where(Alias.source == address, Alias.target == target)).first() is None:
            s.add(Alias(source=address, target=target))
            added.append(address)
    s.flush()
    return added


def reachable(s: Session, domains: list[str], delimiter: str) -> set[str]:
    """The role addresses that deliver somewhere now."""
    found = set()
    for address in role_addresses(domains):
        try:
            if aliases.expand(s, address, local_domains=domains, delimiter=delimiter) is not None:
                found.add(address)
        except aliases.AliasLoop:
            pass
    return found
