"""`mailroom user quota|disable|enable` and `mailroom admin add|passwd|del|list`."""

from __future__ import annotations

import pytest

from common.db import Database
from common.users import check_password, find_user
from tests.harness.users import add_user
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    i = Installation(tmp_path_factory.mktemp("accounts") / "m")
    add_user(i, "alice@example.org")
    return i


def _password_ok(inst: Installation, password: str) -> bool:
    db = Database(inst.config.database_url, threads=1)
    try:
        with db.read() as s:
            return check_password(find_user(s, "alice@example.org"), password)
    finally:
        db.close()


def test_logins_off_and_on_keep_the_password(inst: Installation) -> None:
    from tests.support.suite import PASSWORD

    users = inst.config.run_dir / "dovecot" / "users"
    assert _password_ok(inst, PASSWORD) and "alice@example.org:" in users.read_text()
    off = inst.cli("user", "disable", "alice@example.org")
    assert off.returncode == 0 and "logins disabled (mail to it is still delivered)" in off.stdout
    assert "(logins disabled)" in inst.cli("user", "list").stdout
    assert not _password_ok(inst, PASSWORD) and "alice@example.org:" not in users.read_text()
    assert "logins already disabled" in inst.cli("user", "disable", "alice@example.org").stdout
    on = inst.cli("user", "enable", "alice@example.org")
    assert on.returncode == 0 and _password_ok(inst, PASSWORD) and "alice@example.org:" in users.read_text()
    assert inst.cli("user", "disable", "nobody@example.org").returncode == 1


def test_quota(inst: Installation) -> None:
    assert inst.cli("user", "quota", "alice@example.org", "2000000").returncode == 0
    assert "quota=2000000" in inst.cli("user", "list").stdout
    assert "userdb_quota_rule=*:bytes=2000000" in (inst.config.run_dir / "dovecot" / "users").read_text()
    assert inst.cli("user", "quota", "alice@example.org", "0").returncode == 0
    assert "quota=" not in inst.cli("user", "list").stdout


def test_admin_accounts(inst: Installation) -> None:
    added = inst.cli("admin", "add", "Boss", "--password-stdin", stdin="secret words of the night\n")
    assert added.returncode == 0 and "added admin boss" in added.stdout
    assert inst.cli("admin", "add", "boss", "--password-stdin", stdin="x\n").returncode == 1
    assert inst.cli("admin", "add", "../x", "--password-stdin", stdin="x\n").returncode == 1
    assert inst.cli("admin", "add", "eve", "--password-stdin", stdin="\n").returncode != 0  # empty password
    # An admin's password passes the rule a mail user's does: long enough, not guessable from the name.
    for weak in ("secret words", "evelyn-evelyn-evelyn-99"):
        refused = inst.cli("admin", "add", "evelyn", "--password-stdin", stdin=weak + "\n")
        assert refused.returncode == 1 and "password refused" in refused.stderr, refused
    listed = inst.cli("admin", "list").stdout
    assert listed.startswith("boss  since ") and "evelyn" not in listed
    assert inst.cli("admin", "passwd", "boss", "--password-stdin", stdin="other words for the day\n").returncode == 0
    assert inst.cli("admin", "passwd", "boss", "--password-stdin", stdin="too short\n").returncode == 1
    assert inst.cli("admin", "del", "boss").returncode == 0
    assert inst.cli("admin", "list").stdout == "" and inst.cli("admin", "del", "boss").returncode == 1
