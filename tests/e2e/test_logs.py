"""Each program writes its own log file, and nothing a peer sends can hide or forge a line of it.

The daemons run as `mailroom run` runs them (supervisord); each writes
`[mailroom] log_dir`/PROGRAM.log itself.  What a client sends reaches those
files only as text: supervisord never sees it (its capture mode, which obeys
`<!--XSUPERVISOR:BEGIN-->` in a program's output, would otherwise hide every
later line), and a control character in it cannot start a line of its own.
Rotation is the shipped `deploy/logrotate.conf`, run by the real logrotate.
"""

from __future__ import annotations

import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.client import Client
from tests.harness.users import add_user
from tests.support import peers
from tests.support.suite import PASSWORD, Installation, maildir_messages, running, tls_client_context

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
ALICE = "alice@example.org"
BEGIN = "<!--XSUPERVISOR:BEGIN-->"
# What every line of a daemon's log starts with (the text format).
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (msa|mta|qmgr|mda|web|lab)\[\d+\] ([0-9A-F]{18}|-): ")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    """One running suite for the module: starting and stopping it took longer than the
    tests.  What each test looks for in the logs is its own (its trace ids, its tags and
    forgeries), and what the others logged before it only adds lines that must be whole
    records too; the rotation test finds whatever came before in the moved files."""
    inst = Installation(tmp_path_factory.mktemp("logs") / "mailroom")
    add_user(inst, ALICE, "maildir")
    add_user(inst, "bob@example.org", "mbox")
    yield from running(inst)


def submit(inst: Installation, subject: str) -> str:
    """alice to alice through the MSA; the trace id, once the message is in her Maildir."""
    before = len(maildir_messages(inst.mailbox(ALICE)))
    code, text = inst.submit(ALICE, [ALICE], f"From: {ALICE}\r\nSubject: {subject}\r\n\r\nhi\r\n".encode())
    assert code == 250, text
    trace = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-F]{18})", text)
    assert trace, text
    inst.wait_for(lambda: len(maildir_messages(inst.mailbox(ALICE))) > before, what="the delivery")
    return trace.group(1).decode()


def test_supervisor_capture_tags_sent_to_either_port_hide_no_later_line(suite: Installation) -> None:
    # The public port, no AUTH: the tag in a recipient the MTA refuses and logs.
    mta = Client.session(suite.ports["smtp"])
    assert mta.cmd("EHLO attacker.example").code == 250
    assert mta.cmd("MAIL FROM:<x@outside.example>").code == 250
    assert mta.cmd(f'RCPT TO:<"{BEGIN}"@outside.example>').code == 554
    mta.quit()
    # The submission port: the tag as an AUTH PLAIN user name, a failed login the MSA logs.
    msa = Client.session(suite.ports["submission"])
    assert msa.cmd("EHLO attacker.example").code == 250
    assert msa.cmd("STARTTLS").code == 220
    msa.starttls()
    assert msa.cmd("EHLO attacker.example").code == 250
    assert msa.auth_plain(BEGIN, "wrong").code == 535
    msa.quit()

    trace = submit(suite, "after the tags")
    # Every later line is in its program's log: the MTA queued it, the MSA relayed it,
    # the MDA and the queue manager delivered it.
    for program, what in [("mta", "queued from=<alice@example.org>"), ("msa", "relayed from=<alice@example.org>"),
                          ("mda", "delivered to=<alice@example.org>"), ("qmgr", "delivered to=<alice@example.org>")]:
        line = re.compile(rf"^\S+ \S+ {program}\[\d+\] {trace}: {re.escape(what)}", re.M)
        suite.wait_for(lambda line=line: line.search(suite.log_text()) is not None, timeout=10,
                       what=f"{program}'s line '{what}'")
    # The tags themselves are in the logs as the text they were, each inside its record.
    assert re.search(rf"mta\[\d+\] [0-9A-F]{{18}}: relay denied to=<\"{re.escape(BEGIN)}\"@outside.example>",
                     suite.log("mta")), suite.log("mta")
    assert re.search(rf"msa\[\d+\] -: authentication failed for '{re.escape(BEGIN)}'", suite.log("msa"))
    # And supervisord took nothing for a message to its event listener.
    run_dir = suite.config.run_dir
    assert not list(run_dir.glob("*.failed")) and not (run_dir / "stopped").exists()
    assert BEGIN not in suite.output()


# Characters a reader may take for the end of a line: vertical tab, form feed, the file
# separators, NEL, the Unicode line and paragraph separators (Python's splitlines, editors,
# terminals); carriage return and escape rewrite what a terminal shows.
# (A bare carriage return cannot be sent: the MSA closes the session on one.)
BREAKS = ["\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029", "\x1b[2K\x1b[1G"]


def test_a_line_break_in_an_address_stays_inside_its_record(suite: Installation) -> None:
    client = Client.session(suite.ports["submission"])
    assert client.cmd("EHLO client.example").code == 250
    assert client.cmd("STARTTLS").code == 220
    client.starttls()
    assert client.cmd("EHLO client.example").code == 250
    assert client.auth_plain(ALICE, PASSWORD).code == 235
    forged = "2030-01-01 00:00:00.000 mda[1] 012345678901234567: delivered to=<mallory@example.org>"
    for i, brk in enumerate(BREAKS):
        # The From: address is logged when it is not alice's own (refused with 550 5.7.1).
        header = f'From: "x{i}{brk}{forged}"@example.org\r\nSubject: forged {i}\r\n\r\nhi\r\n'
        rcpt, data = client.deliver(ALICE, [ALICE], header.encode(), lmtp=False)
        assert rcpt[0].code == 250 and data[0].code == 550, (rcpt, data)
        assert client.cmd("RSET").code == 250
    client.quit()
    submit(suite, "after the forgeries")
    suite.wait_for(lambda: suite.log("msa").count("may not send with From:") == len(BREAKS), timeout=10,
                   what="the refusals in the MSA's log")

    for program in ("msa", "mta", "mda", "qmgr"):
        text = suite.log(program)
        assert text.endswith("\n")
        # However the file is split into lines, each is a record of the daemon's, whole.
        for lines in (text.split("\n")[:-1], text.splitlines()):
            for line in lines:
                assert RECORD.match(line), (program, line)
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]", text), program
    records = [line for line in suite.log("msa").splitlines() if "may not send with From:" in line]
    assert len(records) == len(BREAKS)
    # Each forgery is inside its refusal, its break written as an escape.
    for i, record in enumerate(records):
        assert f'may not send with From: "x{i}' in record and record.endswith(f'{forged}"@example.org'), record
    assert "x0\\x0b2030-01-01" in records[0] and "x4\\u20282030-01-01" in records[4]
    assert "x6\\x1b[2k\\x1b[1g2030-01-01" in records[6]  # (the MSA lower-cases the address)
    assert "mallory" not in suite.log("mda")


def _logrotate_conf(inst: Installation, dest: Path) -> Path:
    """deploy/logrotate.conf for this installation: its paths in place of /srv/mailroom's."""
    text = (REPO / "deploy" / "logrotate.conf").read_text()
    assert "/srv/mailroom/log/*.log" in text and "/srv/mailroom/run/dovecot.conf" in text
    conf = dest / "logrotate.conf"
    conf.write_text(text.replace("/srv/mailroom", str(inst.root)))
    conf.chmod(0o644)  # logrotate refuses a config others may write
    return conf


def test_logrotate_moves_each_log_and_the_next_lines_land_in_new_files(suite: Installation, tmp_path: Path) -> None:
    logrotate = peers.require("logrotate")
    before = submit(suite, "before the rotation")
    folder = suite.config.log_dir
    assert folder is not None
    suite.wait_for(lambda: before in suite.log("qmgr"), timeout=10, what="the queue manager's line")
    # Every supervised program that logs: the four daemons, the web pages, Dovecot and
    # the daily jobs (the certificate renewer only runs with ACME on).
    programs = {"msa", "mta", "qmgr", "mda", "web", "imap", "schedule"}
    assert {p.stem for p in folder.glob("*.log")} == programs

    conf = _logrotate_conf(suite, tmp_path)
    r = subprocess.run([logrotate, "--force", "--state", str(tmp_path / "state"), str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # Each file moved aside (the newest kept uncompressed), the old lines with it.
    for program in programs:
        assert (folder / f"{program}.log.1").exists(), sorted(folder.iterdir())
    assert before in (folder / "mta.log.1").read_text() and before in (folder / "mda.log.1").read_text()

    after = submit(suite, "after the rotation")
    # Dovecot reopened its file (the example's postrotate): a login is written to the new one.
    import imaplib

    with imaplib.IMAP4_SSL("127.0.0.1", suite.ports["imaps"], ssl_context=tls_client_context(), timeout=30) as imap:
        imap.login(ALICE, PASSWORD)
    for program, what in [("msa", after), ("mta", after), ("mda", after), ("qmgr", after),
                          ("imap", "Login: user=<alice@example.org>")]:
        suite.wait_for(lambda p=program, w=what: w in suite.log(p), timeout=10, what=f"{what} in the new {program}.log")
        assert what not in (folder / f"{program}.log.1").read_text(), program
        assert before not in suite.log(program), program
    # The new files are the Mailroom user's and owner-only, as the first ones were.
    owner = (folder / "mta.log.1").stat().st_uid
    for program in programs:
        st = (folder / f"{program}.log").stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (owner, 0o600), program
