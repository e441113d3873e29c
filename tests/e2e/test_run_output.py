"""`mailroom run > file` keeps every line whole.

The shell's `>` opens the file without O_APPEND.  Several processes write to
it: supervisord its own lines through the descriptor it inherits, and each
program's output through its own open of /dev/stdout.  Without O_APPEND on
the inherited one, supervisord's lines landed over what the programs had
appended meanwhile (the file kept 31 of 37 lines, one line's start
overwritten).  Here the suite runs with its output in such a file, with the
daemons' logs in their own files (the default) and with `log_dir = ""`, where
every daemon line goes through that shared output too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli import dovecot
from tests.support.suite import DOVECOT_PORTS, FILTER_PORTS, Installation, maildir_messages, wait_port

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
ALICE = "alice@example.org"
# How each writer's lines start: supervisord's, a daemon's record, Dovecot's, and the
# lines `mailroom run` and Dovecot print before their logs are set up.
START = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(,\d{3} (INFO|WARN|CRIT|ERRO|DEBG) "
    r"|\.\d{3} (msa|mta|qmgr|mda|web|schedule|renew)\[\d+\] ([0-9A-F]{18}|-): | [a-z0-9-]+: )|mailroom: |Warning: "
)


@pytest.mark.parametrize("log_dir", ["log", ""], ids=["logs in files", "logs on the shared output"])
def test_every_line_of_mailroom_run_lands_whole_in_a_file_opened_without_append(
    installation: Installation, log_dir: str
) -> None:
    inst = installation
    if not log_dir:
        inst.set("mailroom", "log_dir", '""')
    out = inst.root / "run.out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # what `mailroom run > run.out` does
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--config", str(inst.config_path), "run"],
                            stdout=fd, stderr=fd, cwd=REPO, start_new_session=True)
    os.close(fd)
    programs = ["mda", "qmgr", "mta", "msa", "web"]
    if dovecot.why_not(inst.config) is None:
        programs.append("imap")
    traces = []
    try:
        for key, port in inst.ports.items():
            if ("imap" in programs or key not in DOVECOT_PORTS) and key not in FILTER_PORTS:  # no rspamd here
                wait_port(port, 60)
        box = inst.mailbox(ALICE)
        for i in range(5):
            code, text = inst.submit(ALICE, [ALICE], f"Subject: {i}\r\n\r\nhi\r\n".encode())
            assert code == 250, text
            traces.append(text.decode().rsplit(" ", 1)[-1])
        inst.wait_for(lambda: len(maildir_messages(box)) == 5, what="five deliveries")
        if not log_dir:
            inst.wait_for(lambda: all("qmgr[" in out.read_text() and f"{t}: delivered" in out.read_text()
                                      for t in traces), what="the deliveries' lines")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0
    text = out.read_text(errors="replace")
    assert "\0" not in text  # a writer past the end of the file leaves a hole of NULs
    for line in text.splitlines():
        assert START.match(line), f"a line cut or overwritten: {line!r}\n--- output ---\n{text[-4000:]}"
    # supervisord's own lines, for every program, from its start to its stop.
    for program in programs:
        for line in (rf"INFO spawned: '{program}' with pid \d+", rf"INFO success: {program} entered RUNNING state, ",
                     rf"INFO stopped: {program} \(exit status 0\)"):
            assert re.search(line, text), f"missing: {line}\n--- output ---\n{text[-4000:]}"
    # Started as root, nothing to alarm the operator at every start: supervisord is told it runs
    # as root and its socket has a password (no CRIT), Dovecot finds its folder as it wants it.
    assert " CRIT " not in text and "Warning: Fixing permissions" not in text, text[-4000:]
    if log_dir:
        # The daemons' lines are in their own files, not here.
        assert "not readable by" not in text
        assert not re.search(r"^\S+ \S+ (msa|mta|qmgr|mda)\[\d+\] ", text, re.M)
        assert all(f"{t}: queued from=<{ALICE}>" in inst.log("mta") for t in traces)
        return
    # Every daemon's lines as well: its start and stop, and each message's hops.
    for process in ("msa", "mta", "qmgr", "mda"):
        assert re.search(rf"^\S+ \S+ {process}\[\d+\] -: starting \(event loop: ", text, re.M), process
        assert re.search(rf"^\S+ \S+ {process}\[\d+\] -: stopped$", text, re.M), process
    for t in traces:
        for process, what in (("msa", "relayed from="), ("mta", "queued from="), ("mda", "delivered to="),
                              ("qmgr", "delivered to=")):
            assert re.search(rf"^\S+ \S+ {process}\[\d+\] {t}: {what}<{ALICE}>", text, re.M), (process, t)
