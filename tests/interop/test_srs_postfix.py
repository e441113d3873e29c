"""SRS through a real outside MTA: Postfix takes a forwarded message, bounces it, and the
bounce finds its way back to the original sender through Mailroom.

The world: the test DNS server (SPF for example.net), Mailroom's four processes with
an alias fwd@example.org -> carol@elsewhere.test, a private Postfix that is
elsewhere.test's mail host (it accepts carol's mail and then fails it, as a host
whose mailbox was closed after the RCPT check would), and an aiosmtpd sink as
example.net's mail host.  Postfix writes its own DSN to the SRS sender it was given;
Mailroom must undo the rewriting and deliver the DSN to alice@example.net.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.peers import MX, mx_thread
from tests.harness.users import add_user
from tests.support.dns_server import DNSServer
from tests.support.postfix import PostfixInstance
from tests.support.suite import Installation, running

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Installation, PostfixInstance, MX]]:
    inst = Installation(tmp_path / "mailroom")
    add_user(inst, "alice@example.org", "maildir")
    assert inst.cli("alias", "add", "fwd@example.org", "carol@elsewhere.test").returncode == 0
    transport = tmp_path / "postfix-transport"
    postfix = PostfixInstance(
        tmp_path / "postfix", relay_to=f"127.0.0.1:{inst.ports['smtp']}",
        relay_domains=["example.org", "elsewhere.test"],
        # Accept carol at RCPT (no check of the error transport there), fail her afterwards.
        main_cf={"transport_maps": f"texthash:{transport}", "smtpd_reject_unlisted_recipient": "no"},
    )
    # elsewhere.test: accepted at RCPT, then failed: Postfix returns it with a DSN.
    transport.write_text(
        "elsewhere.test error:5.1.1 carol has left this company\n"
        f"example.org smtp:[127.0.0.1]:{inst.ports['smtp']}\n"
    )
    records = {
        "example.net": {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
        "_dmarc.example.net": {"TXT": ['"v=DMARC1; p=reject"']},
    }
    with mx_thread(MX()) as sink, DNSServer(records) as dns_server, postfix:
        inst.set("dns", "nameservers", f'["{dns_server.address}"]')
        inst.set("mailauth", "check", "true")
        inst.set("mta", "retry_schedule", '["1s"]')
        inst.set("mta.transport", '"elsewhere.test"', f'"{postfix.address}"')
        inst.set("mta.transport", '"example.net"', f'"127.0.0.1:{sink.port}"')
        for running_inst in running(inst):
            yield running_inst, postfix, sink


def test_bounce_from_postfix_to_the_srs_sender_reaches_the_original_sender(
    world: tuple[Installation, PostfixInstance, MX],
) -> None:
    inst, postfix, sink = world
    msg = (b"From: Alice <alice@example.net>\r\nTo: fwd@example.org\r\nSubject: for Carol\r\n"
           b"Message-ID: <srs-pf@example.net>\r\n\r\nPlease pass this on.\r\n")
    with smtplib.SMTP("127.0.0.1", inst.ports["smtp"], timeout=60) as c:
        c.ehlo("mx.example.net")
        c.mail("alice@example.net")
        assert c.rcpt("fwd@example.org")[0] == 250
        code, text = c.data(msg)
        assert code == 250, text

    def returned() -> bool:
        return any("alice@example.net" in g.recipients for g in sink.received)

    inst.wait_for(returned, timeout=90, what="the DSN back at example.net\n" + postfix.log_text()[-2000:])
    log = postfix.log_text()
    # Postfix saw our SRS sender, not alice's address (which SPF would not let us use).
    m = re.search(r"from=<(SRS0=[^>]+@example\.org)>", log)
    assert m, log[-3000:]
    assert "to=<carol@elsewhere.test>" in log and "status=bounced" in log
    [got] = [g for g in sink.received if "alice@example.net" in g.recipients]
    sender, rcpts, data = got.sender, got.recipients, got.content
    assert sender in ("", "<>") and rcpts == ["alice@example.net"]
    assert b"carol has left this company" in data
    # Postfix's own DSN, not one Mailroom made up.
    assert b"\r\nFrom: Mail Delivery System <MAILER-DAEMON@" + postfix.hostname.encode() + b">\r\n" in data
    assert b"<srs-pf@example.net>" in data  # the returned original
