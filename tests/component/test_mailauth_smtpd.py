"""Sender authentication through the MTA's real listeners, with DNS from a real server.

The public and internal listeners run in process on loopback ports against a
throwaway installation whose `[dns] nameservers` is the test DNS server
(tests/support/dns_server.py): every SPF, DKIM, DMARC and DNSBL lookup
crosses a real socket.  The stored queue entry shows what was signed or
which headers were added; the SMTP reply shows what was refused.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cli.main import main as mailroom_main
from common import hop_secret
from common.dns import Wire
from common.models import Message, Recipient
from mta.auth import checks, dkim
from tests.harness.services import Stack
from tests.harness.users import add_user
from tests.support.dns_server import DNSServer
from tests.support.ports import free_port
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(60)

# The outside sender's domain, its keys made once for the module.
OUTSIDE = "example.net"


class MTA:
    """Both listeners of one installation on the harness's event loop (Stack.listen_mta)."""

    def __init__(self, inst: Installation, **sections: dict[str, Any]) -> None:
        self.inst = inst
        self.stack = Stack(inst)
        self.ctx, self.public_port, self.internal_port = self.stack.listen_mta(tls=False, **sections)

    def close(self) -> None:
        self.stack.close()

    def send(self, sender: str, rcpts: list[str], msg: bytes, *, internal: bool = False,
             helo: str = "mx.example.net") -> tuple[int, bytes]:
        port = self.internal_port if internal else self.public_port
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo(helo)
            if internal:  # over TCP the internal listener takes our MSA only, after AUTH with the secret
                c.login(hop_secret.LOGIN, hop_secret.load(self.inst.config.run_dir))
            code, text = c.mail(sender)
            assert code == 250, text
            for r in rcpts:
                code, text = c.rcpt(r)
                if code != 250:
                    return code, text
            return c.data(msg)

    def stored(self, text: bytes) -> tuple[bytes, list[str], str]:
        m = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-F]{18})", text)
        assert m, text
        with self.ctx.db.read() as s:
            msg = s.get(Message, m.group(1).decode())
            assert msg is not None
            rcpts = [r.address for r in s.scalars(select(Recipient).where(Recipient.message_id == msg.id))]
            assert msg.body is not None
            return bytes(msg.body), rcpts, msg.sender


@pytest.fixture(scope="module")
def outside_keys(tmp_path_factory: pytest.TempPathFactory) -> list[dkim.Key]:
    return dkim.generate(tmp_path_factory.mktemp("outside") / "dkim", OUTSIDE, "o1")


def zone(outside: list[dkim.Key], ours: list[dkim.Key], **extra: Any) -> dict[str, Any]:
    records: dict[str, Any] = {
        OUTSIDE: {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
        f"_dmarc.{OUTSIDE}": {"TXT": ['"v=DMARC1; p=reject"']},
        "quarantine.test": {"TXT": ['"v=spf1 -all"']},
        "_dmarc.quarantine.test": {"TXT": ['"v=DMARC1; p=quarantine"']},
        "broken.test": "SERVFAIL",
    }
    for k in [*outside, *ours]:
        text = dkim.public_record(k)
        records[k.dns_name] = {"TXT": [" ".join(f'"{text[i:i + 200]}"' for i in range(0, len(text), 200))]}
    records.update(extra)
    return records


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer({}) as server:
        yield server


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory, dns_server: DNSServer,
         outside_keys: list[dkim.Key]) -> Installation:
    inst = Installation(tmp_path_factory.mktemp("auth") / "m")
    inst.set("dns", "nameservers", f'["{dns_server.address}"]')
    inst.set("dns", "timeout", '"3s"')
    inst.set("mailauth", "check", "true")
    add_user(inst, "alice@example.org", "maildir")
    assert mailroom_main(["--config", str(inst.config_path), "alias", "add", "fwd@example.org",
                          "carol@elsewhere.test"]) == 0
    return inst


@pytest.fixture
def records(inst: Installation, dns_server: DNSServer, outside_keys: list[dkim.Key]) -> dict[str, Any]:
    ours = dkim.load_keys(inst.config.resolve(inst.config.dkim.key_dir))
    recs = zone(outside_keys, ours)
    dns_server.set_records(recs)
    return recs


@pytest.fixture
def mta(inst: Installation, records: dict[str, Any]) -> Iterator[MTA]:
    server = MTA(inst)
    try:
        yield server
    finally:
        server.close()


def outside_message(frm: str = f"Alice <alice@{OUTSIDE}>", body: bytes = b"Hello Bob.\r\n") -> bytes:
    return (
        f"From: {frm}\r\nTo: alice@example.org\r\nSubject: hello\r\nMessage-ID: <x@{OUTSIDE}>\r\n".encode()
        + b"Authentication-Results: mail.test; dkim=pass header.d=forged.test\r\n\r\n" + body
    )


def test_signed_mail_from_the_internet_gets_one_results_header(mta: MTA, outside_keys: list[dkim.Key]) -> None:
    msg = outside_message()
    signed = dkim.sign(msg, outside_keys) + msg
    code, text = mta.send(f"alice@{OUTSIDE}", ["alice@example.org"], signed)
    assert code == 250, text
    body, _, _ = mta.stored(text)
    head = body.split(b"\r\n\r\n", 1)[0].decode()
    results = re.findall(r"(?m)^Authentication-Results:[^\r\n]*(?:\r\n\t[^\r\n]*)*", head)
    assert len(results) == 1, head  # the forged one naming mail.test is gone
    assert results[0].startswith("Authentication-Results: mail.test;")
    for part in ("spf=pass", "smtp.mailfrom=alice@example.net", "dkim=pass header.d=example.net header.s=o1-rsa",
                 "header.s=o1-ed25519", "dmarc=pass (p=reject) header.from=example.net", "arc=none"):
        assert part in results[0], results[0]
    assert "forged.test" not in head


def test_dmarc_reject_failure_is_refused_at_end_of_data(mta: MTA) -> None:
    code, text = mta.send("bounce@spammer.test", ["alice@example.org"], outside_message())
    assert (code, text[:5]) == (550, b"5.7.1"), text
    assert b"DMARC" in text


def test_modified_signed_mail_is_refused(mta: MTA, outside_keys: list[dkim.Key]) -> None:
    msg = outside_message()
    signed = dkim.sign(msg, outside_keys) + msg
    code, text = mta.send("list@lists.test", ["alice@example.org"], signed.replace(b"Hello Bob", b"Hello Eve"))
    assert code == 550 and b"DMARC" in text


def test_dmarc_quarantine_is_delivered_with_a_header(mta: MTA) -> None:
    code, text = mta.send("x@quarantine.test", ["alice@example.org"],
                          b"X-Mailroom-Quarantine: no\r\n" + outside_message("x@quarantine.test"))
    assert code == 250, text
    body, _, _ = mta.stored(text)
    head = body.split(b"\r\n\r\n", 1)[0]
    assert head.count(b"X-Mailroom-Quarantine:") == 1  # the one from outside is gone
    assert b"X-Mailroom-Quarantine: dmarc=fail policy=quarantine header.from=quarantine.test" in head
    assert b"spf=fail" in head


def test_dns_failure_defers(mta: MTA) -> None:
    code, text = mta.send("x@broken.test", ["alice@example.org"], outside_message("x@broken.test"))
    assert code == 451 and text.startswith(b"4.7."), text


def test_dns_failure_accepted_when_configured(inst: Installation, records: dict[str, Any]) -> None:
    server = MTA(inst, mailauth={"dns_error": "accept"})
    try:
        code, text = server.send("x@broken.test", ["alice@example.org"], outside_message("x@broken.test"))
        assert code == 250, text
        body, _, _ = server.stored(text)
        assert b"spf=temperror" in body
    finally:
        server.close()


def test_submission_leaving_our_domain_is_signed_once_with_both_keys(mta: MTA, inst: Installation) -> None:
    msg = b"From: Alice <alice@example.org>\r\nTo: x@remote.test\r\nSubject: out\r\n\r\nbye\r\n"
    code, text = mta.send("alice@example.org", ["x@remote.test"], msg, internal=True)
    assert code == 250, text
    body, _, _ = mta.stored(text)
    head = body.split(b"\r\n\r\n", 1)[0]
    assert head.count(b"DKIM-Signature:") == 2
    results = asyncio.run(checks.check_dkim(body, Wire(inst.config.dns.nameservers, 3)))
    assert [(r.result, r.domain, r.algorithm) for r in results] == [
        ("pass", "example.org", "rsa-sha256"), ("pass", "example.org", "ed25519-sha256"),
    ]
    assert b"h=from : to : subject : from" in re.sub(rb"\r\n\s+", b" ", head)  # From over-signed


def test_local_mail_and_foreign_from_are_not_signed(mta: MTA) -> None:
    msg = b"From: alice@example.org\r\nSubject: in\r\n\r\nhi\r\n"
    _, text = mta.send("alice@example.org", ["alice@example.org"], msg, internal=True)
    assert b"DKIM-Signature" not in mta.stored(text)[0]
    other = b"From: someone@not-ours.test\r\nSubject: out\r\n\r\nhi\r\n"
    _, text = mta.send("alice@example.org", ["x@remote.test"], other, internal=True)
    assert b"DKIM-Signature" not in mta.stored(text)[0]


def test_trusted_network_on_the_public_listener_is_signed(inst: Installation, records: dict[str, Any]) -> None:
    server = MTA(inst, mta={"trusted_networks": ["127.0.0.0/8"]})
    try:
        msg = b"From: alice@example.org\r\nSubject: out\r\n\r\nhi\r\n"
        _, text = server.send("alice@example.org", ["x@remote.test"], msg)
        body = server.stored(text)[0]
        assert body.count(b"DKIM-Signature:") == 2 and b"Authentication-Results" not in body
    finally:
        server.close()


def test_bounce_to_an_srs_address_goes_back_to_the_sender(mta: MTA) -> None:
    from mta.auth.mailauth import MailAuth

    codec = MailAuth.from_config(mta.ctx.config, mta.ctx.resolver()).srs_codec  # the MTA's secret, in its run folder
    srs_address = codec.forward("alice@example.net")
    code, text = mta.send("", [srs_address], b"From: MAILER-DAEMON@elsewhere.test\r\nSubject: bounce\r\n\r\nx\r\n",
                          helo="elsewhere.test")
    assert code == 250, text
    _, rcpts, sender = mta.stored(text)
    assert rcpts == ["alice@example.net"] and sender == ""


def test_forged_srs_address_is_refused(mta: MTA) -> None:
    with smtplib.SMTP("127.0.0.1", mta.public_port, timeout=30) as c:
        c.ehlo("elsewhere.test")
        c.mail("")
        code, text = c.rcpt("SRS0=abcd=AB=victim.test=bob@example.org")
        assert (code, text[:5]) == (550, b"5.7.1"), text


def test_dnsbl_listed_client_is_refused_at_connect(
    inst: Installation, dns_server: DNSServer, records: dict[str, Any]
) -> None:
    dns_server.set_records({**records, "1.0.0.127.bl.test": {"A": ["127.0.0.2"]}})
    server = MTA(inst, filter={"dnsbl_zones": ["ok.test", "bl.test"]})
    try:
        with pytest.raises(smtplib.SMTPConnectError) as info:
            smtplib.SMTP("127.0.0.1", server.public_port, timeout=30)
        assert info.value.smtp_code == 554 and b"bl.test" in info.value.smtp_error
        # The internal listener is ours: never checked.
        with smtplib.SMTP("127.0.0.1", server.internal_port, timeout=30) as c:
            assert c.noop()[0] == 250
    finally:
        server.close()


def test_dnsbl_is_off_by_default(mta: MTA, dns_server: DNSServer) -> None:
    dns_server.clear_queries()
    with smtplib.SMTP("127.0.0.1", mta.public_port, timeout=30) as c:
        assert c.noop()[0] == 250
    assert not any(name.endswith("bl.test.") for name, _ in dns_server.queries())


@pytest.mark.parametrize(("when_down", "expect"), [("accept_unscanned", 250), ("defer", 451)])
def test_filter_down(inst: Installation, records: dict[str, Any], tmp_path: Path, when_down: str, expect: int) -> None:
    port = free_port()  # a port nobody listens on
    server = MTA(inst, filter={"rspamd": f"127.0.0.1:{port}", "when_down": when_down, "timeout": 5.0})
    try:
        msg = dkim.sign(outside_message(), []) + outside_message()
        code, text = server.send(f"alice@{OUTSIDE}", ["alice@example.org"], msg)
        assert code == expect, text
        if expect == 250:
            assert b"X-Mailroom-Filter: unscanned" in server.stored(text)[0]
    finally:
        server.close()


def test_forwarded_mail_is_arc_sealed_over_our_results(mta: MTA, inst: Installation,
                                                       outside_keys: list[dkim.Key]) -> None:
    msg = outside_message().replace(b"To: alice@example.org", b"To: fwd@example.org")
    signed = dkim.sign(msg, outside_keys) + msg
    code, text = mta.send(f"alice@{OUTSIDE}", ["fwd@example.org"], signed)
    assert code == 250, text
    body, rcpts, _ = mta.stored(text)
    assert rcpts == ["carol@elsewhere.test"]
    head = re.sub(rb"\r\n\s+", b" ", body.split(b"\r\n\r\n", 1)[0])
    assert re.search(rb"(?m)^ARC-Seal: i=1; cv=none; a=rsa-sha256; d=example\.org; s=mr\d{6}-rsa", head), head
    assert re.search(rb"(?m)^ARC-Authentication-Results: i=1; mail\.test; .*dmarc=pass", head), head
    assert asyncio.run(checks.check_arc(body, Wire(inst.config.dns.nameservers, 3))) == "pass"
    # Mail that is not forwarded gets no seal.
    code, text = mta.send(f"alice@{OUTSIDE}", ["alice@example.org"], dkim.sign(outside_message(), outside_keys)
                          + outside_message())
    assert b"ARC-Seal" not in mta.stored(text)[0]


def test_expired_signature_counts_as_none(mta: MTA, outside_keys: list[dkim.Key],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import dkim as dkimpy

    gen = dkimpy.DKIM.gen_header

    def with_expiry(self: Any, fields: list[tuple[bytes, bytes]], *a: Any) -> Any:
        fields = [*fields[:-1], (b"x", str(int(time.time()) - 3600).encode()), fields[-1]]
        return gen(self, fields, *a)

    monkeypatch.setattr(dkimpy.DKIM, "gen_header", with_expiry)
    msg = outside_message()
    signed = dkim.sign(msg, outside_keys) + msg
    monkeypatch.undo()
    code, text = mta.send("list@lists.test", ["alice@example.org"], signed)
    assert (code, text[:5]) == (550, b"5.7.1"), text


def test_someone_elses_srs_address_is_an_ordinary_recipient(mta: MTA) -> None:
    msg = b"From: alice@example.org\r\nSubject: reply\r\n\r\nhi\r\n"
    code, text = mta.send("alice@example.org", ["SRS0=abcd=AB=example.net=bob@forwarder.test"], msg, internal=True)
    assert code == 250, text
    assert mta.stored(text)[1] == ["SRS0=abcd=AB=example.net=bob@forwarder.test"]
