"""common.users: argon2id hashes, one answer for unknown users and wrong passwords, owned addresses."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.db import Database
from common.models import Alias, User
from common.users import addresses_of, check_password, hash_password

pytestmark = pytest.mark.timeout(20)


def test_passwords_are_argon2id_hashes() -> None:
    h = hash_password("secret")
    assert h.startswith("$argon2id$v=19$")
    assert "secret" not in h
    assert hash_password("secret") != h  # salted


def test_check_password() -> None:
    user = User(address="alice@example.org", password_hash=hash_password("secret"), mailbox="x")
    assert check_password(user, "secret")
    assert not check_password(user, "Secret")
    assert not check_password(user, "")
    assert not check_password(None, "secret")
    broken = User(address="b@example.org", password_hash="", mailbox="y")  # e.g. a user without a password
    assert not check_password(broken, "")


def _fastest(fn: object, n: int = 3) -> float:
    best = 1e9
    for _ in range(n):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def test_an_unknown_user_costs_as_much_as_a_wrong_password() -> None:
    # Otherwise the time of a 535 tells an attacker which addresses exist.
    user = User(address="alice@example.org", password_hash=hash_password("secret"), mailbox="x")
    known = _fastest(lambda: check_password(user, "wrong"))
    unknown = _fastest(lambda: check_password(None, "wrong"))
    assert known > 0.005  # argon2 is deliberately slow
    assert unknown > 0.5 * known, (known, unknown)


def test_addresses_of_a_user_are_their_own_and_the_aliases_leading_to_them(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'm.db'}", threads=1)
    db.create_schema()
    try:
        with db.write() as s:
            s.add_all([
                Alias(source="sales@example.org", target="alice@example.org"),
                Alias(source="team@example.org", target="alice@example.org"),
                Alias(source="team@example.org", target="bob@example.org"),
                Alias(source="info@example.org", target="bob@example.org"),
                Alias(source="@example.org", target="alice@example.org"),  # a catch-all is no address to send as
            ])
            s.commit()
        with db.read() as s:
            assert addresses_of(s, "Alice@Example.org") == {
                "alice@example.org", "sales@example.org", "team@example.org",
            }
            assert addresses_of(s, "bob@example.org") == {"bob@example.org", "team@example.org", "info@example.org"}
    finally:
        db.close()
