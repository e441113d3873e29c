"""A client that never saw our 250 sends the same message again: it is queued once.

RFC 5321 lets a lost 250 turn into a duplicate.  Mailroom recognises the same
message (Message-ID, envelope sender, recipients and content, Received fields
aside) within `[mta] resubmission_window`, answers with the first trace id and
queues nothing new; a different message that reuses a Message-ID is queued.
That holds when the MTA, or the MSA between the MTA and the client, is killed
after the commit and before the client read its 250.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import sqlite3
import time
from collections.abc import Iterator

import pytest

from tests.harness.users import add_user, add_users
from tests.support.suite import (
    PASSWORD,
    Installation,
    maildir_messages,
    mbox_messages,
    running,
    tls_client_context,
    wait_port,
)

pytestmark = pytest.mark.timeout(120)

# Each test's recipients (a Maildir and an mbox) are its own, so the tests share one
# running suite, yet each counts only the copies of its own message.
RCPTS = {
    test: [f"{test}-maildir@example.org", f"{test}-mbox@example.org"]
    for test in ("msa", "public", "killed-mta", "killed-msa")
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    """One suite for the module: starting and stopping it took longer than most tests.
    The killed daemons are restarted by supervisord within their test."""
    inst = Installation(tmp_path_factory.mktemp("resubmission") / "mailroom")
    add_user(inst, "alice@example.org", "maildir")  # the sender who logs in to the MSA
    add_users(inst, *(maildir for maildir, _ in RCPTS.values()), store="maildir")
    add_users(inst, *(mbox for _, mbox in RCPTS.values()), store="mbox")
    yield from running(inst)


def _message(message_id: str, text: str) -> bytes:
    return (
        f"From: alice@example.org\r\nTo: alice@example.org, bob@example.org\r\n"
        f"Date: Tue, 01 Dec 2026 12:00:00 +0000\r\nMessage-ID: {message_id}\r\n"
        f"Subject: resubmitted\r\n\r\n{text}\r\n"
    ).encode()


def _queued_as(text: bytes) -> str:
    m = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-F]{18})", text)
    assert m, text
    return m.group(1).decode()


def _public(suite: Installation, sender: str, recipients: list[str], message: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", suite.ports["smtp"], timeout=30) as client:
        client.ehlo("client.test")
        client.mail(sender)
        for r in recipients:
            assert client.rcpt(r)[0] == 250
        return client.data(message)


def test_a_resubmission_through_the_msa_is_answered_with_the_first_trace_and_stored_once(
    suite: Installation,
) -> None:
    rcpts = RCPTS["msa"]
    message = _message("<once@example.org>", "hello")
    code, text = suite.submit("alice@example.org", rcpts, message)
    assert code == 250
    first = _queued_as(text)
    code, text = suite.submit("alice@example.org", rcpts, message, implicit_tls=True)
    assert code == 250 and _queued_as(text) == first

    alice, bob = suite.mailbox(rcpts[0]), suite.mailbox(rcpts[1])
    suite.wait_for(lambda: len(maildir_messages(alice)) == 1 and len(mbox_messages(bob)) == 1, what="delivery")
    time.sleep(1.0)  # a second copy, if there were one, would follow within the queue manager's poll
    assert len(maildir_messages(alice)) == 1 and len(mbox_messages(bob)) == 1
    events = [(e["hop"], e["event"]) for e in suite.trace(first)["events"]]
    assert ("mta", "resubmitted") in events

    # Same Message-ID, different content: another message, delivered too.
    code, text = suite.submit("alice@example.org", rcpts, _message("<once@example.org>", "changed"))
    assert code == 250 and _queued_as(text) != first
    suite.wait_for(lambda: len(maildir_messages(alice)) == 2, what="the second message")
    # Same message to fewer recipients: another message as well.
    code, text = suite.submit("alice@example.org", rcpts[:1], message)
    assert code == 250 and _queued_as(text) != first
    suite.wait_for(lambda: len(maildir_messages(alice)) == 3, what="the third message")


def test_a_resubmission_on_the_public_listener_is_queued_once(suite: Installation) -> None:
    message = _message("<public-once@example.net>", "from outside").replace(
        b"From: alice@example.org", b"From: carol@example.net"
    )
    rcpts = RCPTS["public"][:1]
    code, text = _public(suite, "carol@example.net", rcpts, message)
    first = _queued_as(text)
    code, text = _public(suite, "carol@example.net", rcpts, message)
    assert code == 250 and _queued_as(text) == first
    alice = suite.mailbox(rcpts[0])
    suite.wait_for(lambda: len(maildir_messages(alice)) == 1, what="delivery")
    time.sleep(1.0)
    assert len(maildir_messages(alice)) == 1
    # Another envelope sender: not the same message.
    code, text = _public(suite, "dave@example.net", rcpts, message)
    assert code == 250 and _queued_as(text) != first
    suite.wait_for(lambda: len(maildir_messages(alice)) == 2, what="the other sender's message")


# --- a daemon killed after the commit, before the client read its 250 -------------------


def _queued_traces(suite: Installation) -> list[str]:
    conn = sqlite3.connect(suite.config.database_url.removeprefix("sqlite:///"), timeout=30)
    try:
        return [row[0] for row in conn.execute("SELECT id FROM messages ORDER BY received")]
    finally:
        conn.close()


def _send_unanswered(client: smtplib.SMTP, sender: str, recipients: list[str], message: bytes) -> None:
    """Everything up to the final dot, without reading the reply to it."""
    client.mail(sender)
    for r in recipients:
        assert client.rcpt(r)[0] == 250
    assert client.docmd("DATA")[0] == 354
    client.send(message + b".\r\n")


def _kill_once_queued(suite: Installation, program: str, before: list[str]) -> str:
    """SIGKILL `program` as soon as the MTA has committed a new message; its trace id."""
    suite.wait_for(lambda: bool(set(_queued_traces(suite)) - set(before)), what="the commit")
    pid = suite.program_pid(program)
    os.kill(pid, signal.SIGKILL)
    suite.wait_for(lambda: _restarted(suite, program, pid), timeout=30, what=f"{program} to be restarted")
    (trace,) = set(_queued_traces(suite)) - set(before)
    return trace


def _restarted(suite: Installation, program: str, old: int) -> bool:
    try:
        return suite.program_pid(program) != old
    except AssertionError:  # not RUNNING yet
        return False


def test_the_mta_killed_between_its_commit_and_the_clients_read_queues_the_resend_once(
    suite: Installation,
) -> None:
    message = _message("<killed-mta@example.net>", "the first 250 never arrived").replace(
        b"From: alice@example.org", b"From: carol@example.net"
    )
    rcpts = RCPTS["killed-mta"][:1]
    before = _queued_traces(suite)
    client = smtplib.SMTP("127.0.0.1", suite.ports["smtp"], timeout=30)
    client.ehlo("client.test")
    _send_unanswered(client, "carol@example.net", rcpts, message)
    first = _kill_once_queued(suite, "mta", before)
    client.close()
    wait_port(suite.ports["smtp"])

    code, text = _public(suite, "carol@example.net", rcpts, message)
    assert code == 250 and _queued_as(text) == first
    assert set(_queued_traces(suite)) - set(before) == {first}  # one message more: the first
    alice = suite.mailbox(rcpts[0])
    suite.wait_for(lambda: len(maildir_messages(alice)) == 1, what="delivery")
    time.sleep(1.0)
    assert len(maildir_messages(alice)) == 1


def test_the_msa_killed_after_the_mtas_commit_passes_the_resend_on_to_be_recognised(
    suite: Installation,
) -> None:
    rcpts = RCPTS["killed-msa"]
    message = _message("<killed-msa@example.org>", "the MSA died holding our 250")
    before = _queued_traces(suite)
    client = smtplib.SMTP_SSL("127.0.0.1", suite.ports["submissions"], timeout=30, context=tls_client_context())
    client.login("alice@example.org", PASSWORD)
    _send_unanswered(client, "alice@example.org", rcpts, message)
    first = _kill_once_queued(suite, "msa", before)
    client.close()
    wait_port(suite.ports["submissions"])

    code, text = suite.submit("alice@example.org", rcpts, message, implicit_tls=True)
    assert code == 250 and _queued_as(text) == first
    assert set(_queued_traces(suite)) - set(before) == {first}
    alice, bob = suite.mailbox(rcpts[0]), suite.mailbox(rcpts[1])
    suite.wait_for(lambda: len(maildir_messages(alice)) == 1 and len(mbox_messages(bob)) == 1, what="delivery")
    time.sleep(1.0)
    assert len(maildir_messages(alice)) == 1 and len(mbox_messages(bob)) == 1
