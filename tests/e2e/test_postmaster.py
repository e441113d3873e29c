"""postmaster works out of the box (RFC 5321 4.5.1), and abuse too (RFC 2142).

`mailroom init` with no --postmaster leaves the role addresses to the first
user added; with --postmaster they go where the operator says.  Every local
domain's postmaster, and a bare <Postmaster> in any case, is accepted on the
public listener and delivered; removing the user or alias behind them is said.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.users import add_user
from tests.support.suite import Installation, maildir_messages

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def test_postmaster_of_every_local_domain_is_accepted_and_delivered(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "m")
    inst.set("mailroom", "domains", '["example.org", "example.net"]')
    first = inst.cli("user", "add", "alice@example.org", "--password-stdin", stdin="kettle drum under the stairs\n")
    assert first.returncode == 0, first.stderr
    assert "postmaster@example.org -> alice@example.org" in first.stdout  # said, not silent
    add_user(inst, "bob@example.org")  # not the first: the role addresses stay with alice
    recipients = ["postmaster@example.org", "POSTMASTER@Example.Net", "Postmaster", "abuse@example.org",
                  "abuse@example.net"]
    inst.start()
    try:
        with smtplib.SMTP("127.0.0.1", inst.ports["smtp"], timeout=30) as client:
            client.ehlo("client.test")
            for n, rcpt in enumerate(recipients):
                client.mail("someone@remote.test")
                code, text = client.rcpt(rcpt)
                assert code == 250, (rcpt, code, text)
                code, text = client.data(f"Subject: to {rcpt}\r\nMessage-ID: <{n}@remote.test>\r\n\r\nhi\r\n".encode())
                assert code == 250, (rcpt, code, text)
        box = inst.mailbox("alice@example.org")
        inst.wait_for(lambda: len(maildir_messages(box)) == len(recipients), what="delivery to the postmaster")
    finally:
        inst.stop()
    subjects = sorted(m.read_bytes().split(b"Subject: to ", 1)[1].split(b"\n", 1)[0] for m in maildir_messages(box))
    assert subjects == sorted(r.encode() for r in recipients)
    assert maildir_messages(inst.mailbox("bob@example.org")) == []


def test_init_postmaster_names_where_postmaster_and_abuse_go(tmp_path: Path) -> None:
    root = tmp_path / "m"
    r = subprocess.run(
        [sys.executable, "-m", "cli.main", "init", "--dir", str(root), "--domain", "example.org",
         "--postmaster", "Admin@Elsewhere.test"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert "postmaster@example.org and abuse@example.org go to admin@elsewhere.test" in r.stdout
    conf = ["--config", str(root / "mailroom.toml")]
    add = subprocess.run([sys.executable, "-m", "cli.main", *conf, "user", "add", "alice@example.org",
                          "--password-stdin"], input="kettle drum under the stairs\n", capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert add.returncode == 0, add.stderr
    listed = subprocess.run([sys.executable, "-m", "cli.main", *conf, "alias", "list"],
                            capture_output=True, text=True, timeout=60, cwd=REPO).stdout.splitlines()
    assert sorted(listed) == ["abuse@example.org -> admin@elsewhere.test",
                              "postmaster@example.org -> admin@elsewhere.test"]


def test_init_refuses_a_postmaster_that_is_not_an_address(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "cli.main", "init", "--dir", str(tmp_path / "m"), "--domain", "example.org",
         "--postmaster", "admin"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert r.returncode == 1 and "--postmaster admin: expected a full address" in r.stderr
    assert not (tmp_path / "m" / "mailroom.toml").exists()


def test_removing_the_postmaster_is_said(installation: Installation) -> None:
    # The installation fixture's first user is alice: she is postmaster and abuse.
    listed = installation.cli("alias", "list").stdout
    assert "postmaster@example.org -> alice@example.org" in listed
    assert "abuse@example.org -> alice@example.org" in listed
    r = installation.cli("user", "del", "alice@example.org")
    assert r.returncode == 0, r.stderr
    assert "warning: postmaster@example.org now delivers to nobody" in r.stderr
    assert "warning: abuse@example.org now delivers to nobody" in r.stderr

    assert installation.cli("alias", "add", "postmaster@example.org", "bob@example.org").returncode == 0
    r = installation.cli("alias", "del", "postmaster@example.org", "alice@example.org")
    assert r.returncode == 0 and "postmaster" not in r.stderr  # bob still gets it: nothing to say
    r = installation.cli("alias", "del", "postmaster@example.org")
    assert r.returncode == 0
    assert "warning: postmaster@example.org now delivers to nobody" in r.stderr
    # A change that leaves them reachable says nothing.
    r = installation.cli("alias", "del", "abuse@example.org")
    assert r.returncode == 0 and "warning" not in r.stderr  # abuse was already unreachable
