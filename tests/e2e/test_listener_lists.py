"""A listener setting holding several addresses: the real daemons serve every one of them.

The installation's MSA, MTA (public and internal) and MDA listeners each get a
second address (127.0.0.2, or ::1, on another port).  Every address answers
with the same service; mail submitted on the MSA's second address crosses the
internal hand-off and the LMTP hop (both connect to the first address) into
the mailbox, and so does mail given to the MTA's second public address.
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator

import pytest

from tests.support.ports import free_port
from tests.support.suite import PASSWORD, Installation, maildir_messages, running, tls_client_context

pytestmark = pytest.mark.timeout(120)

ALICE = "alice@example.org"


@pytest.fixture
def doubled(installation: Installation) -> Iterator[tuple[Installation, dict[str, tuple[str, int]]]]:
    """The installation with a second address on each of its daemons' listeners, running."""
    inst = installation
    # The internal listener on TCP here (its default is a Unix socket): the MSA logs in with the secret.
    inst.ports["internal"] = free_port()
    second = {
        "submission": ("127.0.0.2", free_port("127.0.0.2")),
        "submissions": ("127.0.0.2", free_port("127.0.0.2")),
        "smtp": ("127.0.0.2", free_port("127.0.0.2")),
        "internal": ("::1", free_port("::1")),
        "lmtp": ("::1", free_port("::1")),
    }
    for section, key in (("msa", "submission"), ("msa", "submissions"), ("mta", "smtp"),
                         ("mta", "internal"), ("mda", "lmtp")):
        host, port = second[key]
        shown = f"[{host}]" if ":" in host else host
        inst.set(section, key, f'["127.0.0.1:{inst.ports[key]}", "{shown}:{port}"]')
    yield from ((i, second) for i in running(inst))


def _greeting(host: str, port: int) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect((host, port))
        return s.recv(512)


def test_every_address_of_a_listener_setting_is_served(
    doubled: tuple[Installation, dict[str, tuple[str, int]]],
) -> None:
    inst, second = doubled
    cfg = inst.config
    assert [str(e) for e in cfg.endpoints("mta.smtp")] == [
        f"127.0.0.1:{inst.ports['smtp']}", f"127.0.0.2:{second['smtp'][1]}"
    ]
    for key in ("submission", "smtp", "internal", "lmtp"):
        for host, port in (("127.0.0.1", inst.ports[key]), second[key]):
            assert _greeting(host, port).startswith(b"220 mail.test "), (key, host, port)
    # The implicit-TLS role on its second address: TLS first, then the greeting.
    host, port = second["submissions"]
    with smtplib.SMTP_SSL(host, port, timeout=30, context=tls_client_context()) as s:
        assert s.ehlo()[0] == 250
        assert "auth" in s.esmtp_features
    # The LMTP listener's second address speaks LMTP.
    with smtplib.LMTP("::1", second["lmtp"][1], timeout=30) as lmtp:
        assert lmtp.docmd("EHLO", "mta.test")[0] == 500  # LMTP wants LHLO (RFC 2033 4.1)
        assert lmtp.ehlo("mta.test")[0] == 250  # smtplib's LMTP says LHLO


def test_mail_through_the_second_addresses_reaches_the_mailbox(
    doubled: tuple[Installation, dict[str, tuple[str, int]]],
) -> None:
    inst, second = doubled
    host, port = second["submission"]
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.starttls(context=tls_client_context())
        s.login(ALICE, PASSWORD)
        s.sendmail(ALICE, [ALICE], b"From: alice@example.org\r\nSubject: via 127.0.0.2\r\n\r\nsubmitted\r\n")
    host, port = second["smtp"]
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.sendmail("carol@example.net", [ALICE], b"From: carol@example.net\r\nSubject: public\r\n\r\nfrom afar\r\n")
    box = inst.mailbox(ALICE)
    inst.wait_for(lambda: len(maildir_messages(box)) == 2, what="both messages delivered")
    bodies = b"".join(p.read_bytes() for p in maildir_messages(box))
    assert b"Subject: via 127.0.0.2" in bodies and b"Subject: public" in bodies
