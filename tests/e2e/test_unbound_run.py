"""`[dns] resolver = "unbound"`: `mailroom run` supervises a local unbound and the daemons ask it.

The whole suite under supervisord with a real unbound (Debian's) forwarding to
a test DNS server on loopback: the program `unbound` runs, answers on
`[dns] unbound_listen`, and a message from the Internet is checked (SPF,
DMARC) with answers that came through it.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import config as configmod
from common.daemon import resolver_settings
from common.dns import Wire
from tests.harness.users import add_user
from tests.support.dns_server import DNSServer
from tests.support.ports import free_port
from tests.support.suite import Installation, maildir_messages

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

RECORDS = {
    "fast.test": {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
    "_dmarc.fast.test": {"TXT": ['"v=DMARC1; p=reject"']},
}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Installation, str, DNSServer]]:
    with DNSServer(RECORDS) as server:
        inst = Installation(Path(tmp_path_factory.mktemp("unbound")) / "m")
        listen = f"127.0.0.1:{free_port(udp=True)}"
        inst.set("dns", "resolver", '"unbound"')
        inst.set("dns", "unbound_listen", f'"{listen}"')
        inst.set("dns", "nameservers", f'["{server.address}"]')
        inst.set("mailauth", "check", "true")
        add_user(inst, "alice@example.org", "maildir")
        inst.start()
        try:
            yield inst, listen, server
        finally:
            inst.stop()


def test_the_daemons_are_pointed_at_the_local_resolver(tmp_path: Path) -> None:
    cfg = configmod.from_dict({
        "mailroom": {"domains": ["example.org"]},
        "dns": {"resolver": "unbound", "unbound_listen": "127.0.0.1:2053", "nameservers": ["192.0.2.53:53"]},
    }, tmp_path / "m.toml")
    assert resolver_settings(cfg).nameservers == ("127.0.0.1:2053",)
    system = configmod.from_dict({"mailroom": {"domains": ["example.org"]}}, tmp_path / "m.toml")
    assert resolver_settings(system).nameservers == ()  # the default: the system's resolver


def test_unbound_is_supervised_and_answers(running: tuple[Installation, str, DNSServer]) -> None:
    inst, listen, _server = running
    assert "unbound" in inst.program_pids("unbound")
    answer = asyncio.run(Wire([listen], 5).lookup("fast.test", "TXT"))
    assert answer.texts() == [b"v=spf1 ip4:127.0.0.1 -all"]
    conf = (inst.config.run_dir / "unbound.conf").read_text()
    assert f"forward-addr: {_server.address.replace(':', '@')}" in conf
    assert 'trust-anchor-file: "/usr/share/dns/root.key"' in conf


def test_mail_from_the_internet_is_checked_through_it(running: tuple[Installation, str, DNSServer]) -> None:
    inst, _listen, _server = running
    msg = (b"From: someone@fast.test\r\nTo: alice@example.org\r\nSubject: hi\r\n"
           b"Message-ID: <1@fast.test>\r\n\r\nhello\r\n")
    with smtplib.SMTP("127.0.0.1", inst.ports["smtp"], timeout=30) as c:
        c.ehlo("mx.fast.test")
        code, text = c.mail("someone@fast.test")
        assert code == 250, text
        code, text = c.rcpt("alice@example.org")
        assert code == 250, text
        code, text = c.data(msg)
    assert code == 250, text
    box = inst.mailbox("alice@example.org")
    inst.wait_for(lambda: maildir_messages(box), what="the message in alice's Maildir")
    head = maildir_messages(box)[0].read_bytes().split(b"\n\n", 1)[0]
    assert b"spf=pass" in head and b"dmarc=pass" in head, head
