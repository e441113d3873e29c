"""A domain whose DNS never answers costs only its own messages (the MTA's public listener).

Sessions sending from stall.test, whose SPF and DMARC names a scripted DNS
server never answers, wait for their checks; meanwhile sessions sending from
fast.test go through as if nothing were wrong.  Each stalled message gets its
reply within `[dns] timeout` + 1 s: 451 4.7.1 (`[mailauth] dns_error =
"defer"`), or, with "accept", it is queued marked spf=temperror; and its
session carries on.
"""

from __future__ import annotations

import smtplib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.daemon import Context
from common.models import Message
from tests.harness.services import Stack
from tests.harness.users import add_user
from tests.support.dns_server import DNSServer
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(90)

TIMEOUT = 3.0  # [dns] timeout of the installation
RECORDS: dict[str, Any] = {
    "fast.test": {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
    "_dmarc.fast.test": {"TXT": ['"v=DMARC1; p=reject"']},
    "stall.test": "TIMEOUT",
    "_dmarc.stall.test": "TIMEOUT",
}


def message(domain: str, n: int) -> bytes:
    return (f"From: someone@{domain}\r\nTo: alice@example.org\r\nSubject: {n}\r\n"
            f"Message-ID: <{n}.{time.monotonic_ns()}@{domain}>\r\n\r\nbody {n}\r\n").encode()


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer(RECORDS) as server:
        yield server


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory, dns_server: DNSServer) -> Installation:
    inst = Installation(Path(tmp_path_factory.mktemp("stall")) / "m")
    inst.set("dns", "nameservers", f'["{dns_server.address}"]')
    inst.set("dns", "timeout", f'"{TIMEOUT:g}s"')
    inst.set("mailauth", "check", "true")
    add_user(inst, "alice@example.org", "maildir")
    return inst


def listen(inst: Installation, dns_error: str) -> tuple[Stack, Context, int]:
    stack = Stack(inst)
    ctx, port, _internal = stack.listen_mta(tls=False, mailauth={"dns_error": dns_error})
    return stack, ctx, port


def stored_header(ctx: Context, reply: bytes) -> bytes:
    trace = reply.decode().rsplit(" ", 1)[1]
    with ctx.db.read() as s:
        msg = s.get(Message, trace)
        assert msg is not None and msg.body is not None
        return bytes(msg.body).split(b"\r\n\r\n", 1)[0]


def send(client: smtplib.SMTP, domain: str, n: int) -> tuple[int, bytes, float]:
    """One transaction; (code, text, seconds from the end of DATA to the reply)."""
    code, text = client.mail(f"someone@{domain}")
    assert code == 250, text
    code, text = client.rcpt("alice@example.org")
    assert code == 250, text
    code, text = client.docmd("DATA")
    assert code == 354, text
    client.send(message(domain, n).replace(b"\r\n.", b"\r\n..") + b".\r\n")
    started = time.monotonic()
    code, text = client.getreply()
    return code, text, time.monotonic() - started


def test_a_stalled_domain_costs_only_its_own_messages(inst: Installation) -> None:
    stack, _ctx, port = listen(inst, "defer")
    stalled: list[tuple[int, bytes, float]] = []
    after: list[int] = []
    first_stalled_reply: list[float] = []

    def stalled_session(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("mx.stall.test")
            code, text, took = send(c, "stall.test", n)
            first_stalled_reply.append(time.monotonic())
            stalled.append((code, text, took))
            # The session carries on after the refusal: the next message is another matter.
            code, _text, _ = send(c, "fast.test", 1000 + n)
            after.append(code)

    try:
        threads = [threading.Thread(target=stalled_session, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # the stalled sessions are all waiting for DNS now
        started = time.monotonic()
        fast = []
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("mx.fast.test")
            for i in range(20):
                code, text, took = send(c, "fast.test", i)
                assert code == 250, text
                fast.append(took)
        finished = time.monotonic()
        for t in threads:
            t.join(30)
        assert not first_stalled_reply or min(first_stalled_reply) > finished, (
            "the fast sender's messages waited behind the stalled ones"
        )
        assert finished - started < TIMEOUT - 0.5, f"20 messages took {finished - started:.2f}s"
        assert len(stalled) == 10
        for code, text, took in stalled:
            assert (code, text[:5]) == (451, b"4.7.1"), text
            assert b"spf" in text and b"dmarc" in text
            assert took < TIMEOUT + 1.0, f"a stalled message waited {took:.2f}s for its reply"
        assert after == [250] * 10
    finally:
        stack.close()


def test_with_dns_error_accept_a_stalled_message_is_queued_as_temperror(inst: Installation) -> None:
    stack, ctx, port = listen(inst, "accept")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("mx.stall.test")
            code, text, took = send(c, "stall.test", 1)
        assert code == 250, text
        assert took < TIMEOUT + 1.0
        head = stored_header(ctx, text)
        assert b"spf=temperror" in head and b"dmarc=temperror" in head
    finally:
        stack.close()
