"""Sender authentication with independent peers, through the real Mailroom processes.

One world for the module: the test DNS server publishes every record; rspamd
(Debian package) runs on loopback with its DNS pointed there and is also the
MTA's content filter; an aiosmtpd sink plays the outside mail hosts (the
transport map sends remote.test, elsewhere.test and example.net to it); the
whole suite runs under supervisord.

- mail Mailroom sends is DKIM-signed (RSA and Ed25519) and rspamd, whose DKIM,
  SPF and DMARC code owes nothing to dkimpy, says it passes; so does opendkim;
- mail signed by opendkim (opendkim-genkey + opendkim-testmsg) is verified by
  Mailroom; modified or wrong-key copies and forged From: get 550 5.7.1;
- rspamd's verdict becomes the reply (GTUBE: 550 5.7.1) or X-Spam headers;
- a message forwarded by an alias leaves with an SRS sender (SPF passes at the
  next hop) and our ARC seal (rspamd validates it), and the bounce to that
  sender comes back to the original sender.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from mta.auth import dkim
from tests.harness.peers import MX, Received, mx_thread
from tests.harness.users import add_user
from tests.support import peers
from tests.support.dns_server import DNSServer
from tests.support.rspamd import RspamdServer
from tests.support.suite import Installation, maildir_messages, running

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@dataclass
class Sink(MX):
    """The outside hosts: an aiosmtpd host that keeps what it got, and defers a recipient's first attempt when told."""

    defer_once: set[str] = field(default_factory=set)  # recipients whose first attempt gets 451
    deferred: list[bytes] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        for r in envelope.rcpt_tos:
            if r in self.defer_once:
                self.defer_once.discard(r)
                self.deferred.append(envelope.original_content or b"")
                return "451 4.3.0 Try again later"
        return await super().handle_DATA(server, session, envelope)

    def find(self, rcpt: str) -> list[Received]:
        return [r for r in self.received if rcpt in r.recipients]


@pytest.fixture(scope="module")
def sink() -> Iterator[tuple[Sink, int]]:
    with mx_thread(Sink()) as handler:
        yield handler, handler.port


@pytest.fixture(scope="module")
def opendkim_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A key made by opendkim-genkey: (private key file, the TXT record text)."""
    genkey = peers.require("opendkim-genkey")
    d = tmp_path_factory.mktemp("opendkim")
    subprocess.run([genkey, "-b", "2048", "-D", str(d), "-d", "example.net", "-s", "od"], check=True, timeout=60)
    zone_text = (d / "od.txt").read_text()
    record = "".join(re.findall(r'"([^"]*)"', zone_text))
    assert record.startswith("v=DKIM1;"), zone_text
    return d / "od.private", record


def _txt(text: str) -> list[str]:
    return [" ".join(f'"{text[i:i + 200]}"' for i in range(0, len(text), 200))]


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, sink: tuple[Sink, int], opendkim_key: tuple[Path, str],
) -> Iterator[tuple[Installation, DNSServer, RspamdServer, dict[str, Any]]]:
    _, sink_port = sink
    with DNSServer({}) as dns_server:
        inst = Installation(tmp_path_factory.mktemp("peers") / "m")
        records: dict[str, Any] = {
            "example.org": {"MX": [(10, "mail.test")], "TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
            "_dmarc.example.org": {"TXT": ['"v=DMARC1; p=reject"']},
            "example.net": {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
            "_dmarc.example.net": {"TXT": ['"v=DMARC1; p=reject"']},
            "od._domainkey.example.net": {"TXT": _txt(opendkim_key[1])},
            "mail.test": {"A": ["127.0.0.1"]},
        }
        for k in dkim.load_keys(inst.root / "dkim"):
            records[k.dns_name] = {"TXT": _txt(dkim.public_record(k))}
        dns_server.set_records(records)
        with RspamdServer(dns_server.address, actions={"reject": 15, "add_header": 2, "greylist": "null"}) as rsp:
            inst.set("dns", "nameservers", f'["{dns_server.address}"]')
            inst.set("dns", "timeout", '"3s"')
            inst.set("mailauth", "check", "true")
            inst.set("filter", "rspamd", f'"{rsp.address}"')
            inst.set("mta", "retry_schedule", '["1s"]')
            for domain in ("remote.test", "elsewhere.test", "example.net"):
                inst.set("mta.transport", f'"{domain}"', f'"127.0.0.1:{sink_port}"')
            add_user(inst, "alice@example.org", "maildir")
            r = inst.cli("alias", "add", "fwd@example.org", "carol@elsewhere.test")
            assert r.returncode == 0, r.stderr
            for running_inst in running(inst):
                yield running_inst, dns_server, rsp, records


def _wait(inst: Installation, sink: Sink, rcpt: str, n: int = 1) -> list[Received]:
    inst.wait_for(lambda: len(sink.find(rcpt)) >= n, timeout=60, what=f"delivery to {rcpt} at the sink")
    return sink.find(rcpt)


def _send_public(
    inst: Installation, sender: str, rcpt: str, msg: bytes, helo: str = "mx.example.net"
) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", inst.ports["smtp"], timeout=60) as c:
        c.ehlo(helo)
        c.mail(sender)
        code, text = c.rcpt(rcpt)
        if code != 250:
            return code, text
        return c.data(msg)


def _opendkim_verify(inst: Installation, message: bytes, tmp_path: Path) -> str:
    """opendkim's Authentication-Results for `message`, our public keys read from a file."""
    opendkim = peers.require("opendkim")
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{k.dns_name} {dkim.public_record(k)}\n" for k in dkim.load_keys(inst.root / "dkim")))
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Mode v\nTestPublicKeys {keys}\nSyslog no\nAuthservID verifier.test\nAlwaysAddARHeader yes\n")
    (tmp_path / "msg.eml").write_bytes(message)
    r = subprocess.run([opendkim, "-x", str(conf), "-t", str(tmp_path / "msg.eml"), "-vvv"],
                       capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def test_rspamd_and_opendkim_verify_what_mailroom_signs(
    world: tuple[Installation, DNSServer, RspamdServer, dict[str, Any]], sink: tuple[Sink, int], tmp_path: Path,
) -> None:
    inst, _, rsp, _ = world
    msg = (b"From: Alice <alice@example.org>\r\nTo: x@remote.test\r\nSubject: signed\r\n\r\n"
           b"A message that leaves our domain.\r\n")
    code, text = inst.submit("alice@example.org", ["x@remote.test"], msg)
    assert code == 250, text
    [got] = _wait(inst, sink[0], "x@remote.test")
    assert got.content.count(b"DKIM-Signature:") == 2
    data = got.content.replace(b"\n", b"\r\n") if b"\r\n" not in got.content else got.content
    res = rsp.scan(data, ip="127.0.0.1", helo="mail.test", mail_from="alice@example.org", rcpt="x@remote.test")
    symbols = res["symbols"]
    assert "R_DKIM_ALLOW" in symbols and "R_DKIM_REJECT" not in symbols, sorted(symbols)
    assert "DMARC_POLICY_ALLOW" in symbols and "R_SPF_ALLOW" in symbols, sorted(symbols)
    # Each signature on its own: rspamd verifies the Ed25519 one (RFC 8463) as well as RSA.
    head, body = data.split(b"\r\n\r\n", 1)
    fields = re.split(rb"\r\n(?=[^ \t])", head)
    sigs = [f for f in fields if f.lower().startswith(b"dkim-signature:")]
    assert b"a=ed25519-sha256" in sigs[1]
    for keep in sigs:
        only = b"\r\n".join(f for f in fields if f not in sigs or f == keep) + b"\r\n\r\n" + body
        one = rsp.scan(only, ip="127.0.0.1", helo="mail.test", mail_from="alice@example.org", rcpt="x@remote.test")
        assert "R_DKIM_ALLOW" in one["symbols"], (keep[:80], sorted(one["symbols"]))
    # opendkim, a second independent verifier (its test mode, keys from a file), agrees on both.
    verdict = _opendkim_verify(inst, data, tmp_path)
    assert "dkim=pass (2048-bit key) header.d=example.org" in verdict, verdict
    assert re.search(r"dkim=pass header\.d=example\.org \S+ header\.a=ed25519-sha256", verdict), verdict
    # And a modified copy fails for rspamd too: the signature covers what we sent.
    bad = rsp.scan(data.replace(b"leaves our domain", b"leaves our domian"), ip="127.0.0.1", helo="mail.test",
                   mail_from="alice@example.org", rcpt="x@remote.test")
    assert "R_DKIM_REJECT" in bad["symbols"], sorted(bad["symbols"])


def test_a_retry_sends_the_same_signed_bytes(
    world: tuple[Installation, DNSServer, RspamdServer, dict[str, Any]], sink: tuple[Sink, int]
) -> None:
    inst = world[0]
    sink[0].defer_once.add("retry@remote.test")
    msg = b"From: alice@example.org\r\nTo: retry@remote.test\r\nSubject: twice\r\n\r\nSecond time lucky.\r\n"
    code, text = inst.submit("alice@example.org", ["retry@remote.test"], msg)
    assert code == 250, text
    [got] = _wait(inst, sink[0], "retry@remote.test")
    [first] = sink[0].deferred
    # Signed once, at queue time: the retry carries the very same two signatures.
    assert got.content == first and got.content.count(b"DKIM-Signature:") == 2


def _opendkim_sign(key: Path, msg: bytes) -> bytes:
    testmsg = peers.require("opendkim-testmsg")
    r = subprocess.run([testmsg, "-C", "-d", "example.net", "-s", "od", "-k", str(key)],
                       input=msg, capture_output=True, timeout=60, check=True)
    assert r.stdout.startswith(b"DKIM-Signature:"), r.stdout[:200] + r.stderr
    return r.stdout


OUTSIDE_MSG = (b"From: Alice <alice@example.net>\r\nTo: alice@example.org\r\nSubject: from opendkim\r\n"
               b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <od1@example.net>\r\n\r\n"
               b"Signed by an independent signer.\r\n")


def test_mailroom_verifies_what_opendkim_signs(
    world: tuple[Installation, DNSServer, RspamdServer, dict[str, Any]], opendkim_key: tuple[Path, str]
) -> None:
    inst = world[0]
    signed = _opendkim_sign(opendkim_key[0], OUTSIDE_MSG)
    # A mailing list's envelope sender: SPF says nothing for example.net, DKIM must carry DMARC.
    code, text = _send_public(inst, "bounces@lists.test", "alice@example.org", signed)
    assert code == 250, text
    box = inst.mailbox("alice@example.org")
    inst.wait_for(lambda: any(b"od1@example.net" in p.read_bytes() for p in maildir_messages(box)),
                  what="delivery of the opendkim-signed message")
    stored = next(p.read_bytes() for p in maildir_messages(box) if b"od1@example.net" in p.read_bytes())
    head = re.sub(rb"\n\s+", b" ", stored.split(b"\n\n", 1)[0])
    assert b"Authentication-Results: mail.test;" in head
    assert b"dkim=pass header.d=example.net header.s=od" in head
    assert b"dmarc=pass (p=reject) header.from=example.net" in head
    assert b"spf=none" in head


def test_modified_wrong_key_and_forged_mail_is_refused(
    world: tuple[Installation, DNSServer, RspamdServer, dict[str, Any]], opendkim_key: tuple[Path, str],
    tmp_path: Path,
) -> None:
    inst = world[0]
    signed = _opendkim_sign(opendkim_key[0], OUTSIDE_MSG)
    # Replayed with a changed body.
    code, text = _send_public(inst, "bounces@lists.test", "alice@example.org",
                              signed.replace(b"independent signer", b"independent sinner"))
    assert (code, text[:5]) == (550, b"5.7.1") and b"DMARC" in text, text
    # Signed with a key that is not the published one.
    subprocess.run([peers.require("opendkim-genkey"), "-D", str(tmp_path), "-d", "example.net", "-s", "od"],
                   check=True, timeout=60)
    code, text = _send_public(inst, "bounces@lists.test", "alice@example.org",
                              _opendkim_sign(tmp_path / "od.private", OUTSIDE_MSG))
    assert (code, text[:5]) == (550, b"5.7.1"), text
    # No signature, someone else's server.
    code, text = _send_public(inst, "ceo@phish.test", "alice@example.org", OUTSIDE_MSG)
    assert (code, text[:5]) == (550, b"5.7.1"), text


def test_rspamd_verdicts_become_replies_and_headers(
    world: tuple[Installation, DNSServer, RspamdServer, dict[str, Any]],
) -> None:
    inst = world[0]
    base = b"From: alice@example.net\r\nTo: alice@example.org\r\nSubject: offer\r\nMessage-ID: <s1@example.net>\r\n\r\n"
    code, text = _send_public(inst, "alice@example.net", "alice@example.org", base + GTUBE + b"\r\n")
    assert (code, text[:5]) == (550, b"5.7.1"), text
    code, text = _send_public(inst, "alice@example.net", "alice@example.org",
                              base.replace(b"<s1@", b"<s2@") + b"Just a note.\r\n")
    assert code == 250, text
    box = inst.mailbox("alice@example.org")
    inst.wait_for(lambda: any(b"<s2@example.net>" in p.read_bytes() for p in maildir_messages(box)),
                  what="delivery of the scanned message")
    stored = next(p.read_bytes() for p in maildir_messages(box) if b"<s2@example.net>" in p.read_bytes())
    assert re.search(rb"\nX-Spam-Status: (Yes|No), score=", stored), stored[:800]


def test_srs_round_trip_through_an_outside_forward(
    world: tuple[Installation, DNSServer, RspamdServer, dict[str, Any]], sink: tuple[Sink, int]
) -> None:
    inst, _, rsp, _ = world
    msg = (b"From: Alice <alice@example.net>\r\nTo: fwd@example.org\r\nSubject: please forward\r\n"
           b"Message-ID: <srs1@example.net>\r\n\r\nto Carol.\r\n")
    code, text = _send_public(inst, "alice@example.net", "fwd@example.org", msg)
    assert code == 250, text
    [fwd] = _wait(inst, sink[0], "carol@elsewhere.test")
    assert re.fullmatch(r"SRS0=[^=]{4}=[A-Z2-7]{2}=example\.net=alice@example\.org", fwd.sender), fwd.sender
    # The next hop (rspamd standing in for it) sees SPF pass for the SRS sender and our ARC seal.
    seen = rsp.scan(fwd.content, ip="127.0.0.1", helo="mail.test", mail_from=fwd.sender, rcpt="carol@elsewhere.test")
    assert "R_SPF_ALLOW" in seen["symbols"] and "ARC_ALLOW" in seen["symbols"], sorted(seen["symbols"])
    # elsewhere.test cannot deliver and bounces to the SRS address, as a real MTA does.
    dsn = (b"From: MAILER-DAEMON@elsewhere.test\r\nTo: " + fwd.sender.encode() +
           b"\r\nSubject: Undelivered Mail Returned to Sender\r\nMessage-ID: <dsn1@elsewhere.test>\r\n\r\n"
           b"carol@elsewhere.test: mailbox unavailable\r\n")
    code, text = _send_public(inst, "", fwd.sender, dsn, helo="elsewhere.test")
    assert code == 250, text
    [back] = _wait(inst, sink[0], "alice@example.net")
    assert back.sender in ("", "<>") and b"<dsn1@elsewhere.test>" in back.content
    # A made-up SRS address is refused at RCPT.
    forged = fwd.sender.replace("=example.net=alice@", "=victim.test=bob@")
    code, text = _send_public(inst, "", forged, dsn, helo="elsewhere.test")
    assert (code, text[:5]) == (550, b"5.7.1"), text
