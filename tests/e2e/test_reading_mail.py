"""Reading mail: a message submitted on 587 is read back over IMAP and POP3 from
the suite's own Dovecot (the `imap` program of `mailroom run`), with real clients.

One installation runs for the whole module (starting it is the slow part); each
test uses its own users, so the tests do not depend on each other.  Clients:
Python's imaplib and poplib, and curl (Debian's command-line IMAP/POP3 client).
"""

from __future__ import annotations

import email
import imaplib
import itertools
import math
import pwd
import re
import smtplib
import socket
import subprocess
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from mda import quota
from tests.support import peers
from tests.support.dovecot import IMAPClient, imap_starttls, imaps, pop3s, reading_installation
from tests.support.suite import PASSWORD, Installation, maildir_messages, mbox_messages, tls_client_context

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

ALICE = "alice@example.org"  # Maildir, with a quota
BOB = "bob@example.org"  # mbox
CAROL = "carol@example.org"  # Maildir: flags and expunge
DAVE = "dave@example.org"  # Maildir: IDLE
ERIN = "erin@example.org"  # mbox over POP3
QUOTA = 500_000


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    peers.require_root("Dovecot reading the suite's mail as the Mailroom user")
    inst = reading_installation(
        tmp_path_factory.mktemp("reading") / "mailroom",
        users=[(ALICE, "maildir", QUOTA), (BOB, "mbox", 0), (CAROL, "maildir", 0), (DAVE, "maildir", 0),
               (ERIN, "mbox", 0)],
    )
    # The tests try wrong passwords on purpose; the MSA must not lock this client out.
    inst.set("msa", "max_auth_failures", "1000")
    inst.start()
    try:
        yield inst
    finally:
        inst.stop()


def message(sender: str, to: str, subject: str, body: str = "Hello over IMAP.\r\n") -> bytes:
    return f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n{body}".encode()


def deliver(inst: Installation, to: str, subject: str, body: str = "Hello over IMAP.\r\n") -> str:
    """Submit on 587 (STARTTLS + AUTH as the recipient) and wait for the MDA; returns the trace id."""
    code, reply = inst.submit(to, [to], message(to, to, subject, body))
    assert code == 250, reply
    trace = reply.decode().rsplit(" ", 1)[1]
    inst.wait_for(lambda: any(e["event"] == "delivered" and e["hop"] == "mda"
                              for e in inst.trace(trace)["events"]), what=f"delivery of {subject}")
    return trace


def subjects(client: imaplib.IMAP4) -> list[str]:
    typ, data = client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK", data
    return [email.message_from_bytes(part[1])["Subject"] for part in data if isinstance(part, tuple)]


def test_a_message_submitted_on_587_is_read_back_over_imaps_and_pop3s(suite: Installation) -> None:
    deliver(suite, ALICE, "first message", "It went MSA, MTA, MDA, Dovecot.\r\n")

    client = imaps(suite.ports["imaps"])
    try:
        assert client.login(ALICE, PASSWORD)[0] == "OK"
        typ, folders = client.list()
        assert typ == "OK" and any(b"INBOX" in f for f in folders), folders
        typ, count = client.select("INBOX")
        assert typ == "OK" and int(count[0]) >= 1
        typ, data = client.fetch("1", "(RFC822)")
        assert typ == "OK"
        raw = data[0][1]
        msg = email.message_from_bytes(raw)
        assert msg["Subject"] == "first message"
        assert msg["Delivered-To"] == ALICE and msg["Return-Path"] == f"<{ALICE}>"
        assert "It went MSA, MTA, MDA, Dovecot." in msg.get_payload()
    finally:
        client.logout()

    pop = pop3s(suite.ports["pop3s"])
    try:
        pop.user(ALICE)
        assert pop.pass_(PASSWORD).startswith(b"+OK")
        count, _ = pop.stat()
        assert count >= 1
        lines = pop.retr(1)[1]
        assert b"Subject: first message" in lines
    finally:
        pop.quit()


def test_an_mbox_user_lists_fetches_flags_and_expunges_over_imap_with_starttls(suite: Installation) -> None:
    deliver(suite, BOB, "to keep")
    deliver(suite, BOB, "to delete")
    box = suite.mailbox(BOB)
    assert len(mbox_messages(box)) == 2

    client = imap_starttls(suite.ports["imap"])
    try:
        assert client.login(BOB, PASSWORD)[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
        assert sorted(subjects(client)) == ["to delete", "to keep"]
        typ, data = client.search(None, "SUBJECT", '"to delete"')
        assert typ == "OK"
        number = data[0].decode()
        assert client.store(number, "+FLAGS", r"(\Deleted)")[0] == "OK"
        typ, data = client.fetch(number, "(FLAGS)")
        assert rb"\Deleted" in data[0]
        assert client.expunge()[0] == "OK"
        assert subjects(client) == ["to keep"]
    finally:
        client.logout()
    # Dovecot rewrote the mbox the MDA writes to, under the same locks.
    remaining = mbox_messages(box)
    assert len(remaining) == 1 and b"Subject: to keep" in remaining[0]


def test_flags_set_over_imap_are_kept_in_the_maildir_and_expunge_removes_the_file(suite: Installation) -> None:
    deliver(suite, CAROL, "flag me")
    deliver(suite, CAROL, "expunge me")
    maildir = suite.mailbox(CAROL)
    assert len(maildir_messages(maildir)) == 2

    client = imaps(suite.ports["imaps"])
    try:
        assert client.login(CAROL, PASSWORD)[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
        order = subjects(client)
        flag, gone = str(order.index("flag me") + 1), str(order.index("expunge me") + 1)
        assert client.store(flag, "+FLAGS", r"(\Seen \Flagged)")[0] == "OK"
        assert client.store(gone, "+FLAGS", r"(\Deleted)")[0] == "OK"
        assert client.expunge()[0] == "OK"
        assert subjects(client) == ["flag me"]
    finally:
        client.logout()
    files = maildir_messages(maildir)
    assert len(files) == 1
    # Maildir flags live in the file name: F(lagged) and S(een), in cur/.
    assert files[0].parent.name == "cur" and files[0].name.endswith(":2,FS"), files


def test_idle_announces_a_message_delivered_while_the_client_waits(suite: Installation) -> None:
    deliver(suite, DAVE, "before idle")
    client = imaps(suite.ports["imaps"])
    try:
        assert client.login(DAVE, PASSWORD)[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
        tag = client._new_tag().decode()  # imaplib (3.11) has no IDLE: speak it on the socket
        client.send(f"{tag} IDLE\r\n".encode())
        assert client.readline().startswith(b"+")
        sender = threading.Thread(target=deliver, args=(suite, DAVE, "during idle"))
        sender.start()
        client.sock.settimeout(60)
        seen = b""
        deadline = time.monotonic() + 60
        while b"EXISTS" not in seen and time.monotonic() < deadline:
            seen += client.readline()
        sender.join(60)
        assert re.search(rb"\* 2 EXISTS", seen), seen
        client.send(b"DONE\r\n")
        while not (line := client.readline()).startswith(tag.encode()):
            pass
        assert b"OK" in line
        assert subjects(client) == ["before idle", "during idle"]
    finally:
        client.logout()


def test_wrong_passwords_and_plain_text_logins_without_tls_are_refused(suite: Installation) -> None:
    client = imaps(suite.ports["imaps"], fresh_source())
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login(ALICE, "not the password")
    client.logout()

    pop = pop3s(suite.ports["pop3s"], fresh_source())
    pop.user(ALICE)
    with pytest.raises(Exception, match="ERR"):
        pop.pass_("not the password")
    pop.quit()

    # Dovecot treats a client on the server's own address as local (secure), so
    # the client comes from another loopback address, as a remote one would.
    plain = IMAPClient(suite.ports["imap"], source="127.0.0.2")
    try:
        assert "LOGINDISABLED" in plain.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED|disallowed"):
            plain.login(ALICE, PASSWORD)
    finally:
        plain.shutdown()
    # The same client after STARTTLS gets in.
    secured = imap_starttls(suite.ports["imap"], source="127.0.0.2")
    try:
        assert secured.login(ALICE, PASSWORD)[0] == "OK"
    finally:
        secured.logout()


_sources = (f"127.0.1.{n}" for n in itertools.count(1))


def fresh_source() -> str:
    """A loopback address no login has come from yet: Dovecot and the MSA slow down
    every login from an address that has failed one (tests/support/dovecot.py: imaps)."""
    return next(_sources)


def _imap_login_ok(inst: Installation, login: str, password: str) -> bool:
    client = imaps(inst.ports["imaps"], fresh_source())
    try:
        client.login(login, password)
        return True
    except imaplib.IMAP4.error:
        return False
    finally:
        client.shutdown()


def _msa_login_ok(inst: Installation, login: str, password: str) -> bool:
    with smtplib.SMTP("127.0.0.1", inst.ports["submission"], timeout=30, source_address=(fresh_source(), 0)) as s:
        s.starttls(context=tls_client_context())
        try:
            s.login(login, password)
            return True
        except smtplib.SMTPAuthenticationError:
            return False


def _next_second() -> None:
    """Dovecot looks at its users file at most once a second (by its clock's whole
    seconds), so a change is seen by the logins of the next second on."""
    time.sleep(1.05 - time.time() % 1)


def test_user_add_passwd_and_del_count_at_the_next_login_without_a_restart(suite: Installation) -> None:
    frank = "frank@example.org"
    assert not _imap_login_ok(suite, frank, "first password, long enough")
    r = suite.cli("user", "add", frank, "--password-stdin", stdin="first password, long enough\n")
    assert r.returncode == 0, r.stderr
    _next_second()
    assert _imap_login_ok(suite, frank, "first password, long enough")
    # A password of the same length, within the same second as the last change: still
    # noticed (the users file's mtime always moves forward, cli/dovecot.py).
    r = suite.cli("user", "passwd", frank, "--password-stdin", stdin="other password, long enough\n")
    assert r.returncode == 0, r.stderr
    _next_second()
    for login_ok in (_imap_login_ok, _msa_login_ok):
        assert not login_ok(suite, frank, "first password, long enough"), login_ok
        assert login_ok(suite, frank, "other password, long enough"), login_ok
    r = suite.cli("user", "del", frank)
    assert r.returncode == 0, r.stderr
    _next_second()
    assert not _imap_login_ok(suite, frank, "other password, long enough")
    assert not _msa_login_ok(suite, frank, "other password, long enough")


def test_logins_are_the_address_as_on_the_msa(suite: Installation) -> None:
    # Case does not matter; a +tag is part of an address to send from, not a login.
    for login in ("Alice@Example.ORG", "alice+lists@example.org", "alice"):
        assert _imap_login_ok(suite, login, PASSWORD) == _msa_login_ok(suite, login, PASSWORD), login
    assert _imap_login_ok(suite, "Alice@Example.ORG", PASSWORD)


def _storage(client: imaplib.IMAP4) -> tuple[int, int]:
    """(used, limit) in KiB from GETQUOTAROOT INBOX."""
    typ, data = client.getquotaroot("INBOX")
    assert typ == "OK", data
    text = b" ".join(x for x in data[1] if isinstance(x, bytes)).decode()
    found = re.search(r"STORAGE (\d+) (\d+)", text)
    assert found, text
    return int(found.group(1)), int(found.group(2))


def test_dovecot_reports_the_quota_and_usage_the_mda_enforces(suite: Installation) -> None:
    deliver(suite, ALICE, "quota one", ("x" * 78 + "\r\n") * 250)
    deliver(suite, ALICE, "quota two", ("y" * 78 + "\r\n") * 400)
    maildir = suite.mailbox(ALICE)
    client = imaps(suite.ports["imaps"])
    try:
        assert client.login(ALICE, PASSWORD)[0] == "OK"
        used_k, limit_k = _storage(client)
        used, _ = quota.maildir_usage(maildir, QUOTA)  # what the MDA checks the next delivery against
        assert used > 50_000
        assert limit_k == math.ceil(QUOTA / 1024)
        assert used_k == math.ceil(used / 1024), (used_k, used, (maildir / quota.SIZE_FILE).read_text())

        # An expunge over IMAP gives the space back to the MDA too (one shared maildirsize).
        assert client.select("INBOX")[0] == "OK"
        typ, found = client.search(None, "SUBJECT", '"quota two"')
        assert typ == "OK" and found[0]
        assert client.store(found[0].decode(), "+FLAGS", r"(\Deleted)")[0] == "OK"
        assert client.expunge()[0] == "OK"
        after_k, _ = _storage(client)
    finally:
        client.logout()
    after, _ = quota.maildir_usage(maildir, QUOTA)
    assert used - after > 30_000
    assert after_k == math.ceil(after / 1024), (after_k, after, (maildir / quota.SIZE_FILE).read_text())


def test_curl_reads_the_message_over_imaps_and_pop3s(suite: Installation) -> None:
    curl = peers.require("curl")
    deliver(suite, ERIN, "for curl", "Read by curl.\r\n")
    common = [curl, "--silent", "--show-error", "--insecure", "--max-time", "30", "--user", f"{ERIN}:{PASSWORD}"]
    imap = subprocess.run([*common, f"imaps://127.0.0.1:{suite.ports['imaps']}/INBOX;UID=1"],
                          capture_output=True, timeout=60, check=False)
    assert imap.returncode == 0, imap.stderr
    assert b"Subject: for curl" in imap.stdout and b"Read by curl." in imap.stdout
    pop = subprocess.run([*common, f"pop3s://127.0.0.1:{suite.ports['pop3s']}/1"],
                         capture_output=True, timeout=60, check=False)
    assert pop.returncode == 0, pop.stderr
    assert b"Subject: for curl" in pop.stdout


def test_clients_find_their_settings_in_the_autoconfig_xml_and_client_config(suite: Installation) -> None:
    base = f"http://127.0.0.1:{suite.ports['listen']}"
    for path in ("/.well-known/autoconfig/mail/config-v1.1.xml", "/mail/config-v1.1.xml?emailaddress=" + ALICE):
        with urllib.request.urlopen(base + path, timeout=30) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/xml")
            root = ET.fromstring(resp.read())
        provider = root.find("emailProvider")
        assert provider is not None and provider.findtext("domain") == "example.org"
        servers = {(s.get("type"), int(s.findtext("port", "0")), s.findtext("socketType"))
                   for s in root.iter() if s.tag in ("incomingServer", "outgoingServer")}
        assert servers == {
            ("imap", suite.ports["imaps"], "SSL"), ("imap", suite.ports["imap"], "STARTTLS"),
            ("pop3", suite.ports["pop3s"], "SSL"),
            ("smtp", suite.ports["submissions"], "SSL"), ("smtp", suite.ports["submission"], "STARTTLS"),
        }
        assert {s.findtext("username") for s in root.iter("incomingServer")} == {"%EMAILADDRESS%"}
    r = suite.cli("client-config", ALICE)
    assert r.returncode == 0, r.stderr
    assert f"IMAP mail.test port {suite.ports['imaps']} SSL/TLS" in r.stdout
    assert f"SMTP mail.test port {suite.ports['submission']} STARTTLS" in r.stdout
    # The settings work: a client following them reads its mail.
    client = imaps(suite.ports["imaps"])
    assert client.login(ALICE, PASSWORD)[0] == "OK"
    client.logout()


def test_without_dovecot_mailroom_run_says_so_in_one_line_and_runs_the_rest(tmp_path: Path) -> None:
    peers.require_root("the suite as the Mailroom user")
    inst = reading_installation(tmp_path / "mailroom", users=[(ALICE, "maildir", 0)])
    inst.set("imap", "dovecot", '"/nonexistent/sbin/dovecot"')
    inst.start()
    try:
        deliver(inst, ALICE, "no imap here")
        lines = [line for line in inst.log_text().splitlines() if "Dovecot" in line]
        assert len(lines) == 1 and "not installed" in lines[0], lines
        assert "imap" not in inst.cli("status").stdout.split()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", inst.ports["imaps"])) != 0
    finally:
        inst.stop()


def _children(pid: int) -> dict[int, tuple[str, int]]:
    """{pid: (command name, real uid)} of the processes whose parent is `pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = dict(line.split(":\t", 1) for line in (entry / "status").read_text().splitlines()
                          if ":\t" in line)
        except OSError:
            continue
        if int(status["PPid"]) == pid:
            found[int(entry.name)] = (status["Name"].strip(), int(status["Uid"].split()[0]))
    return found


def test_dovecot_reads_mail_as_the_mailroom_user_never_as_root(suite: Installation) -> None:
    user = pwd.getpwnam(suite.config.mailroom.user)
    master = suite.program_pid("imap")
    client = imaps(suite.ports["imaps"])
    try:
        assert client.login(ALICE, PASSWORD)[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
        children = _children(master)
    finally:
        client.logout()
    sessions = [uid for name, uid in children.values() if name == "imap"]
    assert sessions and set(sessions) == {user.pw_uid}, children
    auth = [uid for name, uid in children.values() if name == "auth"]
    assert auth == [user.pw_uid], children
    logins = [uid for name, uid in children.values() if name == "imap-login"]
    assert logins and 0 not in logins, children
