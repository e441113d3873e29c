"""DMARC aggregate reports end to end: the real MTA records each verdict of mail from the
Internet, `mailroom dmarc report` makes the day's report and queues it, and it arrives.

DNS comes from the test's server: sender.test publishes p=reject with three report
addresses: ours (another organization, which has agreed to take its reports), one
whose size limit the report exceeds, and one at an agency that has not agreed
(RFC 7489 7.1), so only the first gets it.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import gzip
import smtplib
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.support.dns_server import DNSServer
from tests.support.suite import Installation, maildir_messages

pytestmark = pytest.mark.timeout(180)

RUA = "mailto:reports@example.org!1m, mailto:small@example.org!1k, mailto:dmarc@agency.test"
RECORDS = {
    "sender.test": {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
    "_dmarc.sender.test": {"TXT": [f'"v=DMARC1; p=reject; rua={RUA}"']},
    "sender.test._report._dmarc.example.org": {"TXT": ['"v=DMARC1"']},  # example.org agreed to take them
}


def _send(inst: Installation, mail_from: str, header_from: str) -> int:
    with smtplib.SMTP("127.0.0.1", inst.ports["smtp"], timeout=30) as c:
        c.ehlo("mx.sender.test")
        c.mail(mail_from)
        c.rcpt("alice@example.org")
        code, _ = c.data(f"From: {header_from}\r\nTo: alice@example.org\r\nSubject: hi\r\n\r\nhello\r\n".encode())
    return code


def test_the_days_verdicts_reach_the_domain_that_asks_for_them(installation: Installation, tmp_path: Path) -> None:
    inst = installation
    inst.set("mailauth", "check", "true")
    for alias in ("reports", "small"):
        assert inst.cli("alias", "add", f"{alias}@example.org", "alice@example.org").returncode == 0
    with DNSServer(RECORDS) as dns:
        inst.set("dns", "nameservers", f'["{dns.address}"]')
        inst.start()
        try:
            assert _send(inst, "a@sender.test", "a@sender.test") == 250  # SPF aligned: pass
            assert _send(inst, "a@sender.test", "a@sender.test") == 250
            assert _send(inst, "b@elsewhere.test", "b@sender.test") == 550  # DMARC fails, p=reject
            db = sqlite3.connect(inst.config.database_url.removeprefix("sqlite:///"))
            inst.wait_for(lambda: db.execute("SELECT count(*) FROM dmarc_verdicts").fetchone()[0] == 3,
                          what="the verdicts recorded")
            tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).date().isoformat()
            dry = inst.cli("dmarc", "report", "--before", tomorrow, "--dry-run")
            assert "to reports@example.org: would send 3 message(s)" in dry.stdout, dry.stdout
            r = inst.cli("dmarc", "report", "--before", tomorrow)
            assert r.returncode == 0, r.stderr
            out = r.stdout
            assert "to reports@example.org: 3 message(s) reported in" in out, out
            assert "to small@example.org: not sent:" in out and "over its limit of 1024" in out
            assert "to dmarc@agency.test: not sent: that domain has not agreed" in out
            assert db.execute("SELECT count(*) FROM dmarc_verdicts").fetchone()[0] == 0
            box = inst.mailbox("alice@example.org")
            inst.wait_for(lambda: any(b"Report Domain: sender.test" in p.read_bytes() for p in maildir_messages(box)),
                          what="the report delivered")
        finally:
            inst.stop()
    [report] = [p for p in maildir_messages(box) if b"Report Domain: sender.test" in p.read_bytes()]
    msg = email.message_from_bytes(report.read_bytes(), policy=email.policy.default)
    assert msg["From"] == "postmaster@example.org" and msg["DKIM-Signature"]
    assert "Submitter: mail.test" in msg["Subject"]
    [attachment] = [p for p in msg.iter_attachments()]
    name = attachment.get_filename()
    assert name.startswith("mail.test!sender.test!") and name.endswith(".xml.gz")
    root = ET.fromstring(gzip.decompress(attachment.get_content()))
    assert root.findtext("policy_published/domain") == "sender.test"
    assert root.findtext("policy_published/p") == "reject" and root.findtext("policy_published/pct") == "100"
    rows = {(r.findtext("row/policy_evaluated/disposition"), r.findtext("row/policy_evaluated/spf")):
            (int(r.findtext("row/count") or 0), r.findtext("identifiers/header_from"), r.findtext("row/source_ip"))
            for r in root.findall("record")}
    assert rows == {("none", "pass"): (2, "sender.test", "127.0.0.1"),
                    ("reject", "fail"): (1, "sender.test", "127.0.0.1")}
