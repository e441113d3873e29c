"""The MTA's two listeners (public, port 25 role; internal, for the MSA), in process.

Each test runs the real listeners with the real handler on 127.0.0.1:0 against a
throwaway installation (real SQLite file) and talks to them with smtplib.
"""

from __future__ import annotations

import sqlite3
import ssl
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from common.models import Event, Message
from tests.harness.mta import MSG, MTA, queued_id
from tests.harness.users import add_alias, add_user
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(30)

TRACE = "0192F3A1B2C3D4E5F6"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    """One installation for the module (making one costs seconds); tests only add to it."""
    inst = Installation(tmp_path_factory.mktemp("mta") / "m")
    add_user(inst, "alice@example.org", "maildir")
    add_user(inst, "bob@example.org", "mbox")
    # These tests send the same message again and again on purpose, each expecting
    # it queued: resubmission is tested in tests/e2e/test_resubmission.py.
    inst.set("mta", "resubmission_window", "0")
    return inst


@pytest.fixture
def mta(shared: Installation) -> Iterator[MTA]:
    server = MTA(shared)
    try:
        yield server
    finally:
        server.close()


def test_ehlo_advertises_the_extensions_and_starttls_uses_our_certificate(mta: MTA) -> None:
    with mta.client() as c:
        for kw in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "starttls", "smtputf8"):
            assert c.has_extn(kw), (kw, c.esmtp_features)
        assert not c.has_extn("xtrace")  # the public listener never takes a trace id
        ctx = ssl.create_default_context(cafile=str(mta.inst.config.resolve(mta.inst.config.tls.cert)))
        ctx.check_hostname = False
        code, _ = c.starttls(context=ctx)  # verifies the chain against the configured certificate
        assert code == 220
        c.ehlo("client.test")
        assert not c.has_extn("starttls")
        c.mail("someone@far.test")
        assert c.rcpt("alice@example.org")[0] == 250
        code, text = c.data(MSG)
        assert code == 250
    m, _ = mta.message(queued_id(text))
    assert m.body is not None and b"with ESMTPS id " in m.body


@pytest.mark.parametrize("rcpt", [
    "x@elsewhere.test", "x%elsewhere.test@example.org", "@example.org:x@elsewhere.test",
    '"x@elsewhere.test"@example.org', "elsewhere.test!x@example.org", "x@[192.0.2.1]",
])
def test_no_relay_for_an_untrusted_client_even_on_loopback(mta: MTA, rcpt: str) -> None:
    with mta.client() as c:
        c.mail("someone@far.test")
        code, text = c.rcpt(rcpt)
        assert (code, text[:5]) in ((554, b"5.7.1"), (550, b"5.7.1"), (550, b"5.1.1"), (501, b"5.1.3")), (
            rcpt, code, text)


def test_relay_denied_reply_and_trusted_networks(shared: Installation) -> None:
    untrusted = MTA(shared)
    try:
        with untrusted.client() as c:
            c.mail("someone@far.test")
            assert c.rcpt("x@elsewhere.test") == (554, b"5.7.1 Relay access denied")
    finally:
        untrusted.close()
    trusted = MTA(shared, trusted_networks=["127.0.0.0/8"])
    try:
        with trusted.client() as c:
            c.mail("someone@far.test")
            assert c.rcpt("x@elsewhere.test")[0] == 250
            code, text = c.data(MSG)
            assert code == 250
        _, rcpts = trusted.message(queued_id(text))
        assert [r.address for r in rcpts] == ["x@elsewhere.test"]
    finally:
        trusted.close()


def test_unknown_local_recipient_is_refused_at_rcpt(mta: MTA) -> None:
    with mta.client() as c:
        c.mail("someone@far.test")
        assert c.rcpt("nobody@example.org") == (550, b"5.1.1 Recipient address rejected: user unknown")
        assert c.rcpt("alice@example.org")[0] == 250
        assert c.rcpt("Bob+tag@Example.ORG")[0] == 250
        code, text = c.data(MSG)
        assert code == 250
    _, rcpts = mta.message(queued_id(text))
    assert sorted(r.address for r in rcpts) == ["alice@example.org", "bob@example.org"]


def test_more_received_headers_than_max_hops_is_a_loop(mta: MTA) -> None:
    def with_hops(n: int) -> bytes:
        return b"".join(b"Received: from a%d by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i for i in range(n)) + MSG

    with mta.client() as c:
        c.mail("someone@far.test")
        c.rcpt("alice@example.org")
        assert c.data(with_hops(51)) == (554, b"5.4.6 Too many hops, mail loop detected")
        c.mail("someone@far.test")
        c.rcpt("alice@example.org")
        assert c.data(with_hops(50))[0] == 250  # exactly max_hops is still fine


def test_received_header_names_the_trace_id_and_the_queue_is_committed_before_250(mta: MTA) -> None:
    with mta.client() as c:
        c.mail("someone@far.test")
        c.rcpt("alice@example.org")
        code, text = c.data(MSG)
        trace = queued_id(text)
        # Read with a separate connection while the session is still open: the
        # commit happened before the 250 reached us.
        con = sqlite3.connect(mta.inst.config.database_url.removeprefix("sqlite:///"))
        try:
            body, sender = con.execute("select body, sender from messages where id=?", (trace,)).fetchone()
            rows = con.execute("select address, state from recipients where message_id=?", (trace,)).fetchall()
        finally:
            con.close()
    assert sender == "someone@far.test" and rows == [("alice@example.org", "queued")]
    first = body.split(b"\r\n\t")[0:3]
    assert body.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby mail.test (Mailroom) with ESMTP id "
                           + trace.encode()), first
    assert body.endswith(MSG)
    with mta.ctx.db.read() as s:
        events = [e.event for e in s.scalars(select(Event).where(Event.trace_id == trace))]
    assert events == ["received", "queued"]


def test_internal_listener_relays_anywhere_and_keeps_the_trace_id(mta: MTA) -> None:
    with mta.client(internal=True) as c:
        assert c.has_extn("xtrace")
        assert c.mail("alice@example.org", [f"XTRACE={TRACE}"])[0] == 250
        assert c.rcpt("someone@far.test")[0] == 250
        assert c.rcpt("bob@example.org")[0] == 250
        code, text = c.data(MSG)
    assert queued_id(text) == TRACE
    m, rcpts = mta.message(TRACE)
    assert sorted(r.address for r in rcpts) == ["bob@example.org", "someone@far.test"]
    assert m.body is not None and f"id {TRACE}".encode() in m.body
    # A malformed trace id is refused (it used to be replaced silently); the session goes on.
    with mta.client(internal=True) as c:
        code, text = c.mail("alice@example.org", ["XTRACE=../../x"])
        assert (code, text[:5]) == (501, b"5.5.4"), text
        assert c.mail("alice@example.org")[0] == 250  # no XTRACE: a fresh id is made
        c.rcpt("bob@example.org")
        code, text = c.data(MSG)
    assert code == 250 and queued_id(text) != TRACE


def test_public_listener_refuses_xtrace(mta: MTA) -> None:
    with mta.client() as c:
        code, text = c.mail("someone@far.test", [f"XTRACE={TRACE}"])
        assert code == 555 and text.startswith(b"5.5.4"), (code, text)
        assert c.mail("someone@far.test")[0] == 250
        c.rcpt("alice@example.org")
        code, text = c.data(MSG)
    assert code == 250 and queued_id(text) != TRACE


def test_aliases_are_expanded_when_queued(mta: MTA) -> None:
    add_alias(mta.inst, "team@example.org", "alice@example.org", "bob@example.org", "x@far.test")
    with mta.client() as c:
        c.mail("someone@far.test")
        assert c.rcpt("team@example.org")[0] == 250  # the outside target is no relay: it is our alias
        code, text = c.data(MSG)
    _, rcpts = mta.message(queued_id(text))
    assert sorted((r.address, r.original) for r in rcpts) == [
        ("alice@example.org", "team@example.org"), ("bob@example.org", "team@example.org"),
        ("x@far.test", "team@example.org"),
    ]
    add_alias(mta.inst, "loop1@example.org", "loop2@example.org")
    add_alias(mta.inst, "loop2@example.org", "loop1@example.org")
    with mta.client() as c:
        c.mail("someone@far.test")
        code, text = c.rcpt("loop1@example.org")
        assert code == 554 and text.startswith(b"5.4.6"), (code, text)


def test_store_failure_answers_451_and_keeps_nothing(installation: Installation) -> None:
    mta = MTA(installation)  # its own installation: this one gets broken
    con = sqlite3.connect(mta.inst.config.database_url.removeprefix("sqlite:///"))
    con.execute("drop table recipients")  # the queue cannot take the recipients
    con.commit()
    con.close()
    with mta.client() as c:
        c.mail("someone@far.test")
        c.rcpt("alice@example.org")
        code, text = c.data(MSG)
        assert (code, text[:5]) == (451, b"4.3.0"), (code, text)
        assert c.noop()[0] == 250  # the session carries on
    try:
        with mta.ctx.db.read() as s:
            assert s.scalars(select(Message)).all() == []  # nothing half-written
    finally:
        mta.close()


def test_low_disk_refuses_at_mail_with_452(shared: Installation) -> None:
    server = MTA(shared, min_free_disk=1 << 62)
    try:
        with server.client() as c:
            code, text = c.mail("someone@far.test")
            assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
    finally:
        server.close()
