"""Spam and users' filters end to end: `mailroom run` with its own rspamd, Redis and Dovecot (Debian's).

One installation for the module (rspamd takes tens of seconds to start): alice
reads her Maildir over IMAP, rspamd asks a DNS server of the test's own on
loopback (so its blocklists are on, and nothing is asked outside this host).
The tests run in order: learning first, then the learnt shape goes to Junk.
"""

from __future__ import annotations

import email.utils
import imaplib
import json
import smtplib
import time
import urllib.request
from collections.abc import Iterator

import pytest
from sievelib.managesieve import Client as SieveClient

from cli import rspamd
from tests.support.dns_server import DNSServer
from tests.support.dovecot import imaps, reading_installation
from tests.support.suite import PASSWORD, Installation, maildir_messages, tls_client_context

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

ALICE = "alice@example.org"
LISTED_IP = "192.0.2.10"  # TEST-NET-1: only a header value, never contacted


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    records = {f"{'.'.join(reversed(LISTED_IP.split('.')))}.zen.spamhaus.org": {"A": ["127.0.0.2"]}}
    with DNSServer(records) as dns:
        inst = reading_installation(tmp_path_factory.mktemp("spam") / "inst", [(ALICE, "maildir", 0)])
        inst.supervise_filter(min_learns=10, nameserver=dns.address)
        inst.set("filter", "spam_score", "4.0")
        inst.start()
        try:
            yield inst
        finally:
            inst.stop()


def scan(inst: Installation, message: bytes, ip: str = "127.0.0.1") -> dict[str, object]:
    req = urllib.request.Request(f"http://127.0.0.1:{inst.ports['scanner']}/checkv2", data=message, method="POST",
                                 headers={"IP": ip, "From": "seller@shop.example", "Rcpt": ALICE})
    with urllib.request.urlopen(req, timeout=60) as r:
        return dict(json.loads(r.read()))


def bayes(result: dict[str, object]) -> float:
    symbols = result.get("symbols") or {}
    assert isinstance(symbols, dict)
    return sum(float(v["score"]) for k, v in symbols.items() if k.startswith("BAYES_"))


def shape(i: int, kind: str = "spam") -> bytes:
    """Messages of one shape: the same words, a different Message-ID each time."""
    if kind == "spam":
        words = ("Cheap replica watches and miracle pills, limited offer, order now, best price guaranteed, "
                 "wholesale discount pharmacy, exclusive deal for winners, claim your prize today")
    else:
        words = ("Minutes of the committee meeting on Tuesday: budget for the library, the garden rota, "
                 "volunteers for the summer fair, and the next meeting in the village hall")
    # rspamd learns a text once (by its digest): each copy carries a reference of its own.
    ref = f"Reference {kind}{i * 7919}x{time.time_ns() % 100000}"
    return (f"From: someone{i}@shop.example\r\nTo: {ALICE}\r\nSubject: {kind} {i}\r\n"
            f"Message-ID: <{kind}.{i}.{time.time_ns()}@shop.example>\r\nDate: {email.utils.formatdate()}\r\n"
            f"\r\n{words}\r\n{ref}\r\n{words}\r\n").encode()


def imap_login(inst: Installation) -> imaplib.IMAP4_SSL:
    m = imaps(inst.ports["imaps"])
    m.login(ALICE, PASSWORD)
    return m


def test_the_filter_runs_on_loopback_with_passwords(suite: Installation) -> None:
    cfg = suite.config
    assert "127.0.0.1" in cfg.filter.scanner
    # The controller wants the password over TCP (Debian's stock file trusts loopback with "q1").
    req = urllib.request.Request(f"http://127.0.0.1:{suite.ports['controller']}/stat")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code in (401, 403)
    refused.value.close()
    req.add_header("Password", rspamd.secret(cfg, "controller"))
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
    # Redis: only with its password.
    import socket

    with socket.create_connection(("127.0.0.1", suite.ports["redis"]), timeout=10) as s:
        s.sendall(b"PING\r\n")
        assert s.recv(100).startswith(b"-NOAUTH")
        s.sendall(f"AUTH {rspamd.secret(cfg, 'redis')}\r\nPING\r\n".encode())
        time.sleep(0.2)
        assert b"+PONG" in s.recv(100)


def test_dns_blocklists_through_rspamd(suite: Installation) -> None:
    assert rspamd.dnsbl_active(suite.config)
    listed = scan(suite, shape(0, "ham"), ip=LISTED_IP)
    assert "RBL_SPAMHAUS_SBL" in (listed.get("symbols") or {}), listed.get("symbols")
    clean = scan(suite, shape(0, "ham"), ip="192.0.2.11")
    assert not any(k.startswith("RBL_SPAMHAUS") for k in (clean.get("symbols") or {}))


def test_moving_into_junk_over_imap_teaches_rspamd(suite: Installation) -> None:
    """20 messages of a shape moved into Junk (and 20 of another moved out of it): Bayes learns."""
    before = bayes(scan(suite, shape(999)))
    m = imap_login(suite)
    try:
        m.create("Junk")
        for i in range(20):
            assert m.append("INBOX", None, None, shape(i))[0] == "OK"
            assert m.append("Junk", None, None, shape(i, "ham"))[0] == "OK"
        m.select("INBOX")
        typ, _ = m.uid("MOVE", "1:*", "Junk")
        assert typ == "OK"
        m.select("Junk")
        typ, data = m.uid("SEARCH", "SUBJECT", "ham")
        assert typ == "OK" and len(data[0].split()) == 20
        typ, _ = m.uid("MOVE", b",".join(data[0].split()).decode(), "INBOX")
        assert typ == "OK"
    finally:
        m.logout()
    deadline = time.monotonic() + 60
    after = before
    while time.monotonic() < deadline:
        after = bayes(scan(suite, shape(1000)))
        if after > before:
            break
        time.sleep(1)
    relevant = "\n".join(x for x in suite.log_text().splitlines() if "imap(" in x or "learn_" in x)
    assert after > before, f"Bayes score of the spam shape {before} -> {after}\n{relevant[-6000:]}"
    assert bayes(scan(suite, shape(1000, "ham"))) < 0  # and the ham shape is ham


def test_spam_is_delivered_to_junk(suite: Installation) -> None:
    """The shape rspamd learnt: its score passes [filter] spam_score, so it goes to Junk."""
    alice = suite.mailbox(ALICE)
    junk_before = len(maildir_messages(alice / ".Junk"))
    with smtplib.SMTP("127.0.0.1", suite.ports["smtp"], timeout=60) as s:
        s.sendmail("someone@shop.example", [ALICE], shape(2000))
        s.sendmail("someone@shop.example", [ALICE], shape(2000, "ham"))
    suite.wait_for(lambda: len(maildir_messages(alice / ".Junk")) > junk_before, timeout=60, what="spam in Junk")
    newest = max(maildir_messages(alice / ".Junk"), key=lambda p: p.stat().st_mtime).read_bytes()
    assert b"X-Spam-Status: Yes" in newest and b"Subject: spam 2000" in newest
    suite.wait_for(lambda: any(b"Subject: ham 2000" in p.read_bytes() for p in maildir_messages(alice)),
                   timeout=60, what="ham in the inbox")


class _Sieve(SieveClient):  # type: ignore[misc]
    """sievelib's client with the installation's self-signed certificate accepted."""

    def _Client__enable_ssl(self, keyfile: str | None = None, certfile: str | None = None) -> None:
        self.sock = tls_client_context().wrap_socket(self.sock, server_hostname="127.0.0.1")


def test_managesieve_upload_and_activation_then_delivery(suite: Installation) -> None:
    shown = suite.cli("client-config", ALICE).stdout
    assert f"ManageSieve mail.test port {suite.ports['sieve']} STARTTLS" in shown, shown
    c = _Sieve("127.0.0.1", suite.ports["sieve"])
    assert c.connect(ALICE, PASSWORD, starttls=True)
    try:
        assert "vacation" in c.get_sieve_capabilities()
        assert not c.putscript("bad", 'require ["enotify"];\n')  # Pigeonhole refuses what the MDA cannot run
        assert c.putscript("rules", 'require ["fileinto", "vacation"];\n'
                                    'if header :contains "subject" "report" { fileinto "Reports"; stop; }\n'
                                    'vacation :days 1 "Back on Monday.";\n')
        assert c.setactive("rules")
        assert c.listscripts()[0] == "rules"
    finally:
        c.logout()
    with smtplib.SMTP("127.0.0.1", suite.ports["smtp"], timeout=60) as s:
        for _ in range(2):
            s.sendmail("boss@example.net", [ALICE], f"From: boss@example.net\r\nTo: {ALICE}\r\n"
                       f"Subject: weekly report\r\nMessage-ID: <r{time.time_ns()}@example.net>\r\n\r\nfigures\r\n")
    alice = suite.mailbox(ALICE)
    suite.wait_for(lambda: len(maildir_messages(alice / ".Reports")) == 2, timeout=60, what="fileinto Reports")
    m = imap_login(suite)
    try:
        typ, data = m.lsub('""', "Reports")
        assert typ == "OK" and data[0] and b"Reports" in data[0]
    finally:
        m.logout()


def test_vacation_once_per_sender_through_the_suite(suite: Installation) -> None:
    """The active script answers: its reply leaves through the MTA (here, to ourselves)."""
    bob = "bob@example.org"
    r = suite.cli("user", "add", bob, "--password-stdin", "--store", "mbox", stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    suite.give()
    with smtplib.SMTP("127.0.0.1", suite.ports["smtp"], timeout=60) as s:
        for i in range(3):
            s.sendmail(bob, [ALICE], f"From: {bob}\r\nTo: {ALICE}\r\nSubject: lunch? {i}\r\n"
                       f"Message-ID: <l{i}.{time.time_ns()}@example.org>\r\n\r\nAre you in?\r\n")
    from tests.support.suite import mbox_messages

    suite.wait_for(lambda: len(mbox_messages(suite.mailbox(bob))) >= 1, timeout=60, what="the vacation reply")
    time.sleep(3)
    replies = mbox_messages(suite.mailbox(bob))
    assert len(replies) == 1 and b"Back on Monday." in replies[0] and b"Auto-Submitted: auto-replied" in replies[0]


def _plain(subject: str) -> bytes:
    return (f"From: carol@example.net\r\nTo: {ALICE}\r\nSubject: {subject}\r\nDate: {email.utils.formatdate()}\r\n"
            f"Message-ID: <{time.time_ns()}@example.net>\r\n\r\nhello\r\n").encode()


def test_when_rspamd_or_redis_is_down_when_down_holds(suite: Installation) -> None:
    alice = suite.mailbox(ALICE)
    assert suite.cli("stop", "redis").returncode == 0
    try:  # rspamd without its Redis still scans (Bayes is skipped): mail flows
        with smtplib.SMTP("127.0.0.1", suite.ports["smtp"], timeout=60) as s:
            s.sendmail("carol@example.net", [ALICE], _plain("no redis"))
        suite.wait_for(lambda: any(b"Subject: no redis" in p.read_bytes() for p in maildir_messages(alice)),
                       timeout=60, what="delivery without Redis")
        assert suite.cli("stop", "rspamd").returncode == 0
        # [filter] when_down = "accept_unscanned" (the default): delivered, marked unscanned.
        with smtplib.SMTP("127.0.0.1", suite.ports["smtp"], timeout=60) as s:
            s.sendmail("carol@example.net", [ALICE], _plain("no rspamd"))
        suite.wait_for(lambda: any(b"Subject: no rspamd" in p.read_bytes() for p in maildir_messages(alice)),
                       timeout=60, what="delivery without rspamd")
        stored = next(p.read_bytes() for p in maildir_messages(alice) if b"Subject: no rspamd" in p.read_bytes())
        assert b"X-Mailroom-Filter: unscanned" in stored
    finally:
        suite.cli("start", "redis")
        suite.cli("start", "rspamd")
