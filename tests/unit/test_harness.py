"""The test harness itself: what the other tests stand on must do what it says."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from cli.dovecot import users_file
from common import reply as R
from common.models import Alias, User
from common.reply import Reply
from common.smtp import Handler, Limits, MailEnvelope, MailSession
from common.users import check_password
from tests.harness import dialogue
from tests.harness.client import Client
from tests.harness.services import Stack
from tests.harness.users import add_alias, add_user
from tests.support.suite import PASSWORD, Installation

pytestmark = pytest.mark.timeout(60)


def test_setting_a_key_missing_from_its_section_adds_it_there_and_leaves_later_sections_alone(
    tmp_path: Path,
) -> None:
    inst = Installation(tmp_path / "mailroom")
    before = tomllib.loads(inst.config_path.read_text())
    assert "enabled" not in before["mailroom"] and before["imap"]["enabled"] is True

    inst.set("mailroom", "enabled", "false")  # [imap] further down has a key of that name

    after = tomllib.loads(inst.config_path.read_text())
    assert after["mailroom"]["enabled"] is False
    assert after["imap"] == before["imap"]


def test_setting_a_key_present_in_its_section_changes_only_that_line(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "mailroom")
    inst.set("mta", "max_hops", "7")
    inst.set("mailroom", "log_level", '"debug"')
    after = tomllib.loads(inst.config_path.read_text())
    assert after["mta"]["max_hops"] == 7 and after["mailroom"]["log_level"] == "debug"
    assert inst.config_path.read_text().count("max_hops") == 1


def test_setting_a_key_of_a_section_init_does_not_write_adds_the_section(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "mailroom")
    assert "[smtp]" not in inst.config_path.read_text()
    inst.set("smtp", "idle_timeout", "7")
    inst.set("smtp", "max_recipients", "3")
    assert inst.config.smtp.idle_timeout == 7 and inst.config.smtp.max_recipients == 3


def _users_and_aliases(inst: Installation) -> tuple[list[tuple[str, str, str, int, bool]], list[tuple[str, str]]]:
    db = inst.db()
    try:
        with db.read() as s:
            users = [(u.address, u.store, u.mailbox, u.quota, check_password(u, PASSWORD))
                     for u in s.scalars(select(User).order_by(User.address))]
            aliases = [(a.source, a.target) for a in s.scalars(select(Alias).order_by(Alias.source, Alias.target))]
    finally:
        db.close()
    return users, aliases


def _dovecot_users(inst: Installation) -> str:
    """Dovecot's users file with the installation's folder and the salted hashes made alike."""
    text = users_file(inst.config).read_text().replace(str(inst.root.resolve()), "ROOT")
    return re.sub(r"\$argon2id\$[^:]*", "HASH", text)


def test_the_user_writer_writes_what_mailroom_user_add_writes(tmp_path: Path) -> None:
    by_command, by_harness = Installation(tmp_path / "a"), Installation(tmp_path / "b")
    for address, store, quota in (("Alice@Example.org", "maildir", 0), ("bob@example.org", "mbox", 5000)):
        r = by_command.cli("user", "add", address, "--password-stdin", "--store", store, "--quota", str(quota),
                           stdin=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
        add_user(by_harness, address, store, quota=quota)
    assert by_command.cli("alias", "add", "sales@example.org", "alice@example.org", "bob@example.org").returncode == 0
    add_alias(by_harness, "sales@example.org", "alice@example.org", "bob@example.org")

    users, aliases = _users_and_aliases(by_harness)
    assert (users, aliases) == _users_and_aliases(by_command)
    assert _dovecot_users(by_harness) == _dovecot_users(by_command)
    assert _dovecot_users(by_harness).count("HASH") == 2  # both users can log in to IMAP
    assert users[0] == ("alice@example.org", "maildir", "example.org/alice", 0, True)
    assert ("postmaster@example.org", "alice@example.org") in aliases  # the first user is postmaster


# --- the dialogue runner (tests/harness/dialogue.py) ---------------------------------------------


class _Accept(Handler):
    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
        return R.OK.with_text("kept")


GOOD = """# A whole transaction, pipelined, against an engine listener that keeps everything.
listener: mta
S: 220 engine.test
C: EHLO client.example
S: 250-PIPELINING
S: 250
C: MAIL FROM:<a@remote.example>
C: RCPT TO:<x@example.org>
C: DATA
S: 250 2.1.0
S: 250 2.1.5
S: 354
C: Subject: s
C:
C: hi
C: .
S: 250 2.0.0 kept
C: QUIT
S: 221 2.0.0
S: <closed>
"""


@pytest.fixture(scope="module")
def engine_port() -> Iterator[int]:
    stack = Stack()
    try:
        yield stack.listen(_Accept, hostname="engine.test", limits=Limits(idle_timeout=10))
    finally:
        stack.close()


def _play(port: int, text: str) -> None:
    c = Client.connect(port)
    try:
        dialogue.play(c, dialogue.parse(text, "t.txt"))
    finally:
        c.close()


def test_a_transcript_that_matches_the_server_passes(engine_port: int) -> None:
    _play(engine_port, GOOD)


@pytest.mark.parametrize(("right", "wrong", "why"), [
    ("S: 250 2.1.5", "S: 550 2.1.5", "a wrong code"),
    ("S: 250 2.1.5", "S: 250 2.1.0", "a wrong enhanced code"),
    ("S: 250 2.0.0 kept", "S: 250 2.0.0 lost", "a wrong text"),
    ("S: 250-PIPELINING", "S: 250-CHUNKING", "a keyword the reply lacks"),
    ("S: <closed>", "S: 220", "a reply where the server hangs up"),
    ("S: 221 2.0.0\n", "S: 221 2.0.0\nS: 221\n", "a reply that never comes"),
])
def test_a_transcript_that_expects_a_wrong_reply_fails(engine_port: int, right: str, wrong: str, why: str) -> None:
    assert right in GOOD
    with pytest.raises(AssertionError, match=r"t\.txt:\d+: expected"):
        _play(engine_port, GOOD.replace(right, wrong, 1))


def test_a_transcript_must_name_a_listener_the_runner_knows() -> None:
    with pytest.raises(ValueError, match="no listener 'imap'"):
        dialogue.parse("listener: imap\nS: 220\n")
    with pytest.raises(ValueError, match="no `listener:` line"):
        dialogue.parse("S: 220\n", "t.txt")
