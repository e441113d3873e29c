"""Interop with Postfix, both ways, ending in a mailbox each time.

- Postfix relays mail for our local domain to our public listener (it is an
  untrusted client: only our own domain is accepted), and it reaches a
  Mailroom Maildir.
- Our queue manager delivers to Postfix through `[mta.transport]`, and the
  message reaches a Postfix virtual(8) Maildir.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.postfix import PostfixInstance
from tests.support.suite import Installation, maildir_messages, running

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


@pytest.fixture
def both(installation: Installation, tmp_path: Path) -> Iterator[tuple[Installation, PostfixInstance]]:
    postfix = PostfixInstance(
        tmp_path / "postfix", virtual_domains=["postfix.test"], virtual_mailboxes=["carol@postfix.test"],
        relay_to=f"127.0.0.1:{installation.ports['smtp']}", relay_domains=["example.org"],
    )
    installation.set("mta.transport", '"postfix.test"', f'"{postfix.address}"')
    with postfix:
        yield from ((inst, postfix) for inst in running(installation))


def test_postfix_relays_to_our_public_listener(both: tuple[Installation, PostfixInstance]) -> None:
    inst, postfix = both
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=30) as c:
        c.sendmail("carol@postfix.test", ["alice@example.org"],
                   b"From: carol@postfix.test\r\nTo: alice@example.org\r\nSubject: from postfix\r\n\r\nhi alice\r\n")
    box = inst.mailbox("alice@example.org")
    inst.wait_for(lambda: len(maildir_messages(box)) == 1, timeout=40,
                  what=f"delivery from Postfix\n{postfix.log_text()[-2000:]}")
    postfix.wait_queue_empty()
    msg = email.message_from_bytes(maildir_messages(box)[0].read_bytes(), policy=email.policy.default)
    assert msg["Subject"] == "from postfix" and msg["Return-Path"] == "<carol@postfix.test>"
    received = msg.get_all("Received")
    assert received and "by mail.test (Mailroom)" in received[0] and postfix.hostname in received[0]
    assert "Postfix" in received[1]  # Postfix's own hop came before ours
    assert "status=sent" in postfix.log_text()


def test_our_queue_manager_delivers_to_postfix(both: tuple[Installation, PostfixInstance]) -> None:
    inst, postfix = both
    body = b"From: alice@example.org\r\nTo: carol@postfix.test\r\nSubject: to postfix\r\n\r\nhi carol\r\n"
    code, _ = inst.submit("alice@example.org", ["carol@postfix.test"], body)
    assert code == 250
    inst.wait_for(lambda: postfix.maildir_count("carol@postfix.test") == 1, timeout=40,
                  what=f"delivery to Postfix\n{postfix.log_text()[-2000:]}")
    maildir = postfix.maildir_path("carol@postfix.test")
    [path] = [p for sub in ("new", "cur") for p in (maildir / sub).iterdir()]
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert msg["Subject"] == "to postfix"
    assert any("by mail.test (Mailroom)" in r for r in msg.get_all("Received", []))
    assert "Mailbox full" not in inst.log_text()
