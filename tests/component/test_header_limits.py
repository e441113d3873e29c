"""A stranger's header is bounded before anything parses it, on the MSA and the MTA alike.

The attack that found it: after AUTH, a From: of 120,000 folded `=?utf-8?q?a?=`
words (1.9 MB).  The MSA's parse of it was quadratic and ran on the event loop:
50 s, during which a new connection waited for its greeting.  Now the header is
checked first (common/headers.py): the attack gets 552 5.3.4 at once, another
client is greeted meanwhile, the session goes on, and a long but legal header
still passes.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Iterator

import pytest

from common import headers
from mta.auth.dkim import from_domain
from tests.harness.client import Client, logged_in, stuff
from tests.harness.services import Stack, installation, running
from tests.support.suite import PASSWORD, Installation

pytestmark = pytest.mark.timeout(60)

TRACE = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]{18})")
# The tester's input: 120,000 folded encoded words in From:, 1.9 MB.
ATTACK_FROM = "\r\n ".join(["=?utf-8?q?a?="] * 120_000) + " <alice@example.org>"


def fold(text: str, width: int = 900) -> str:
    """`text` with a fold (CRLF and a space) every `width` characters: lines stay legal (RFC 5322 2.1.1)."""
    return "\r\n ".join(text[i : i + width] for i in range(0, len(text), width))


def message(from_value: str, extra: str = "") -> bytes:
    return f"From: {fold(from_value)}\r\nTo: bob@example.org\r\nSubject: limits\r\n{extra}\r\nhello\r\n".encode()


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    return installation(
        tmp_path_factory.mktemp("headers") / "mailroom",
        users=(("alice@example.org", "maildir"), ("bob@example.org", "maildir")),
        mta={"resubmission_window": '"0"'},
    )


@pytest.fixture
def stack(inst: Installation) -> Iterator[Stack]:
    with running(inst, "mta", "msa") as s:
        yield s


def authenticated(inst: Installation) -> Client:
    """A raw client on the 587 role after STARTTLS and AUTH (so it can send the big header itself)."""
    c = Client.session(inst.ports["submission"], timeout=30)
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS").code == 220
    c.starttls()
    c.cmd("EHLO client.test")
    assert c.auth_plain("alice@example.org", PASSWORD).code == 235
    return c


def greeting_time(port: int) -> float:
    """Seconds until a new connection is greeted (it fails after 5 s)."""
    start = time.monotonic()
    probe = Client.session(port, timeout=5)
    try:
        assert probe.greeting.code == 220, probe.greeting
        return time.monotonic() - start
    finally:
        probe.quit()


def test_the_attack_from_is_refused_at_once_and_others_are_greeted_meanwhile(stack: Stack, inst: Installation) -> None:
    c = authenticated(inst)
    try:
        assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
        assert c.cmd("RCPT TO:<bob@example.org>").code == 250
        assert c.cmd("DATA").code == 354
        start = time.monotonic()
        c.send(stuff(message(ATTACK_FROM)))
        # While the MSA takes in and judges the 1.9 MB, a second client is greeted.
        waited = greeting_time(inst.ports["submission"])
        reply = c.reply()
        took = time.monotonic() - start
        assert reply.text.startswith("552 5.3.4 Message header too big"), reply
        assert waited < 2.0, f"a new client waited {waited:.1f} s for its greeting"
        assert took < 15.0, f"the refusal took {took:.1f} s"
        # The session goes on: the next message is taken.
        assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
        assert c.cmd("RCPT TO:<bob@example.org>").code == 250
        (done,) = c.data(message("Alice <alice@example.org>"))
        assert TRACE.search(done.text), done
    finally:
        c.quit()
    assert len(stack.queued()) == 1  # the refused one is nowhere


@pytest.mark.parametrize(
    ("from_value", "expected"),
    [
        # Under the header's limit, over the field's.
        (("=?utf-8?q?a?= " * 1400) + "<alice@example.org>", "552 5.3.4 From: field too long"),
        ('"' + "a" * 20_000 + '" <alice@example.org>', "552 5.3.4 From: field too long"),
        (("=?utf-8?q?a?= " * 200) + "<alice@example.org>", "552 5.3.4 From: too many encoded words"),
        # Nested comments: the email package's parser recursed until RecursionError (a 421 before).
        ("(" * 5000 + "alice@example.org", "550 5.7.1 From: header cannot be read unambiguously"),
        ("g:" * 3000 + "alice@example.org;", "550 5.7.1 From: header cannot be read unambiguously"),
    ],
    ids=["many-words", "long-quoted", "encoded-words", "nested-comments", "nested-groups"],
)
def test_an_originator_field_over_the_limits_gets_a_clear_refusal(
    stack: Stack, inst: Installation, from_value: str, expected: str
) -> None:
    with logged_in(inst) as c:
        c.mail("alice@example.org")
        c.rcpt("bob@example.org")
        code, text = c.data(message(from_value))
        assert f"{code} {text.decode()}".startswith(expected), (code, text)
        c.rset()
        c.mail("alice@example.org")
        c.rcpt("bob@example.org")
        code, text = c.data(message("Alice <alice@example.org>"))
        assert code == 250, text


def test_sender_and_resent_fields_are_bounded_too(stack: Stack, inst: Installation) -> None:
    big = "x" * (headers.MAX_ADDRESS_FIELD + 10) + " <alice@example.org>"
    for name in ("Sender", "Resent-From", "Resent-Sender"):
        with logged_in(inst) as c:
            c.mail("alice@example.org")
            c.rcpt("bob@example.org")
            code, text = c.data(message("alice@example.org", f"{name}: {fold(big)}\r\n"))
            assert code == 552 and text.startswith(f"5.3.4 {name}: field too long".encode()), (name, text)


def test_a_long_but_legal_header_still_passes(stack: Stack, inst: Installation) -> None:
    # A display name of 40 encoded words (folded), 3,000 recipients in To:, a long References.
    name = "\r\n ".join(["=?utf-8?b?w4lsw6lvbm9yZSBkZSBsYSBDb3VyIGRlcyBNaXJhY2xlcw==?="] * 40)
    to = ",\r\n ".join(f"member{i}@lists.example.net" for i in range(3000))
    refs = "\r\n ".join(f"<{i}.thread@lists.example.net>" for i in range(300))
    body = message(f"{name} <alice@example.org>", f"Cc: {to}\r\nReferences: {refs}\r\n")
    assert 100_000 < len(body) < headers.MAX_HEADER
    with logged_in(inst) as c:
        c.mail("alice@example.org")
        c.rcpt("bob@example.org")
        code, text = c.data(body)
    assert code == 250, text
    (queued,) = [q for q in stack.queued() if b"member2999@lists.example.net" in q.body]
    assert b"w4lsw6lvbm9yZSBkZSBsYSBDb3VyIGRlcyBNaXJhY2xlcw==" in queued.body


def test_the_mta_bounds_the_header_of_public_mail_too(tmp_path_factory: pytest.TempPathFactory) -> None:
    inst = installation(tmp_path_factory.mktemp("mta-headers") / "mailroom")
    stack = Stack(inst)
    try:
        _ctx, public, _internal = stack.listen_mta(tls=False)
        many = "".join(f"X-Field-{i}: v\r\n" for i in range(1500))
        with smtplib.SMTP("127.0.0.1", public, timeout=30) as c:
            c.ehlo("sender.example.net")
            for body, expected in (
                (message(ATTACK_FROM.replace("alice@example.org", "x@example.net")), b"5.3.4 Message header too big"),
                (message("x@example.net", many), b"5.3.4 Message header has too many fields"),
                # Unreadable, but no longer a RecursionError (421).
                (message("(" * 5000 + "x@example.net"), b"2.0.0 Ok"),
            ):
                c.mail("someone@example.net")
                c.rcpt("alice@example.org")
                code, text = c.data(body)
                assert text.startswith(expected), (code, text[:80])
                c.rset()
        # Our own Authentication-Results are stripped from what comes in; reading the
        # authserv-id behind 200,000 unclosed "(" took 20 s of the event loop.
        bomb = message("Someone <x@example.net>", f"Authentication-Results: {fold('(' * 200_000)} mail.test;\r\n")
        c2 = Client.session(public, timeout=30)
        try:
            c2.cmd("EHLO sender.example.net")
            assert c2.cmd("MAIL FROM:<x@example.net>").code == 250
            assert c2.cmd("RCPT TO:<alice@example.org>").code == 250
            assert c2.cmd("DATA").code == 354
            c2.send(stuff(bomb))
            waited = greeting_time(public)
            reply = c2.reply()
            assert reply.code == 250, reply
            assert waited < 2.0, f"a new client waited {waited:.1f} s for its greeting"
        finally:
            c2.quit()
        with smtplib.SMTP("127.0.0.1", public, timeout=30) as c:
            c.ehlo("sender.example.net")
            c.mail("someone@example.net")
            c.rcpt("alice@example.org")
            code, text = c.data(message("Someone <someone@example.net>"))
            assert code == 250, text
    finally:
        stack.close()


def test_the_from_domain_for_dmarc_is_read_within_the_limits() -> None:
    # What the DMARC step and DKIM signing read From: with; a nested From: raised RecursionError there.
    assert from_domain(message("(" * 5000 + "x@example.net")) is None
    assert from_domain(message("g:" * 3000 + "x@example.net;")) is None
    assert from_domain(message(ATTACK_FROM)) is None
    assert from_domain(message("Alice <alice@Example.ORG>")) == "example.org"
