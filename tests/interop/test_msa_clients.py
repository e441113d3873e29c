"""Real submission clients against the real suite: swaks, msmtp and smtplib, on both MSA roles.

Each client authenticates, submits, and the message must reach a mailbox
through MSA -> MTA -> qmgr -> MDA (four supervised processes).  The same
clients are also turned away when they try without AUTH or as someone else.
One installation serves the whole module, so the daemons start once.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.users import add_user
from tests.support import peers
from tests.support.suite import PASSWORD, Installation, maildir_messages, running, tls_client_context

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

ALICE = "alice@example.org"
TRACE = re.compile(r"queued as ([0-9A-F]{18})")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    inst = Installation(tmp_path_factory.mktemp("clients") / "mailroom")
    add_user(inst, ALICE, "maildir")
    add_user(inst, "bob@example.org", "mbox")
    yield from running(inst)


def delivered(suite: Installation, subject: str) -> bytes:
    """Wait until alice's Maildir holds the message with `subject`; return it."""
    box = suite.mailbox(ALICE)
    found: list[bytes] = []

    def arrived() -> bool:
        found[:] = [p.read_bytes() for p in maildir_messages(box) if f"Subject: {subject}".encode() in p.read_bytes()]
        return bool(found)

    suite.wait_for(arrived, what=f"delivery of {subject!r}")
    return found[0]


def message(subject: str) -> str:
    return f"From: {ALICE}\r\nTo: {ALICE}\r\nSubject: {subject}\r\n\r\nSent by a real client.\r\n"


def swaks(suite: Installation, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [peers.require("swaks"), "--to", ALICE, "--from", ALICE, "--timeout", "30", *args],
        capture_output=True, text=True, timeout=60,
    )


def test_swaks_starttls_and_auth_on_the_submission_port(suite: Installation) -> None:
    subject = f"swaks 587 {uuid.uuid4().hex}"
    r = swaks(suite, "--server", f"127.0.0.1:{suite.ports['submission']}", "--tls",
              "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", PASSWORD,
              "--header", f"Subject: {subject}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "<~  250 2.0.0 Ok: queued as" in r.stdout  # after the STARTTLS, so swaks marks it '~'
    stored = delivered(suite, subject)
    trace = TRACE.search(r.stdout)
    assert trace and f"with ESMTPSA id {trace.group(1)}".encode() in stored


def test_swaks_implicit_tls_and_auth_login_on_the_submissions_port(suite: Installation) -> None:
    subject = f"swaks 465 {uuid.uuid4().hex}"
    r = swaks(suite, "--server", f"127.0.0.1:{suite.ports['submissions']}", "--tlsc",
              "--auth", "LOGIN", "--auth-user", ALICE, "--auth-password", PASSWORD,
              "--header", f"Subject: {subject}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "250 2.0.0 Ok: queued as" in r.stdout
    delivered(suite, subject)


def test_swaks_is_refused_without_auth_and_as_someone_else(suite: Installation) -> None:
    port = f"127.0.0.1:{suite.ports['submission']}"
    r = swaks(suite, "--server", port, "--tls")
    assert r.returncode != 0 and "530 5.7.0" in r.stdout, r.stdout
    r = swaks(suite, "--server", port)  # no TLS at all
    assert r.returncode != 0 and "530 5.7.0" in r.stdout, r.stdout
    r = swaks(suite, "--server", port, "--tls", "--auth", "PLAIN", "--auth-user", ALICE,
              "--auth-password", PASSWORD, "--from", "bob@example.org")
    assert r.returncode != 0 and "553 5.7.1" in r.stdout, r.stdout
    r = swaks(suite, "--server", port, "--tls", "--auth", "PLAIN", "--auth-user", ALICE,
              "--auth-password", PASSWORD, "--header", "From: bob@example.org")
    assert r.returncode != 0 and "550 5.7.1" in r.stdout, r.stdout


@pytest.mark.parametrize("role", ["submission", "submissions"])
def test_msmtp(suite: Installation, tmp_path: Path, role: str) -> None:
    msmtp = peers.require("msmtp")
    rc = tmp_path / "msmtprc"
    rc.write_text(
        "defaults\n"
        "tls on\n"
        "tls_certcheck off\n"  # the installation's certificate is self-signed
        f"logfile {tmp_path / 'msmtp.log'}\n"
        "account mailroom\n"
        "host 127.0.0.1\n"
        f"port {suite.ports[role]}\n"
        f"tls_starttls {'on' if role == 'submission' else 'off'}\n"
        "auth plain\n"
        f"user {ALICE}\n"
        f"password {PASSWORD}\n"
        f"from {ALICE}\n"
    )
    rc.chmod(0o600)  # msmtp refuses a password file others can read
    subject = f"msmtp {role} {uuid.uuid4().hex}"
    r = subprocess.run([msmtp, "-C", str(rc), "-a", "mailroom", ALICE], input=message(subject),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "smtpstatus=250" in (tmp_path / "msmtp.log").read_text()
    delivered(suite, subject)


def test_smtplib_starttls(suite: Installation) -> None:
    subject = f"smtplib starttls {uuid.uuid4().hex}"
    with smtplib.SMTP("127.0.0.1", suite.ports["submission"], timeout=30) as s:
        s.starttls(context=tls_client_context())
        s.login(ALICE, PASSWORD)
        assert s.sendmail(ALICE, [ALICE], message(subject)) == {}
    delivered(suite, subject)


def test_smtplib_ssl(suite: Installation) -> None:
    subject = f"smtplib ssl {uuid.uuid4().hex}"
    with smtplib.SMTP_SSL("127.0.0.1", suite.ports["submissions"], timeout=30, context=tls_client_context()) as s:
        s.login(ALICE, PASSWORD)
        assert s.sendmail(ALICE, [ALICE], message(subject)) == {}
    delivered(suite, subject)
