"""Production start: `python -m msa` started as root binds 587 and 465, then serves as `[mailroom] user`.

The real ports 587/465 are used, on a loopback address of their own
(127.x.y.z), so the test proves that binding privileged ports happens before
the switch; the MTA's listeners are on high ports.  What the operator must do
is what docs/operations.md says: the installation's folder belongs to that
user.  The TLS private key stays root-only: it is read before the switch.
"""

from __future__ import annotations

import os
import pwd
import random
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.models import Message
from tests.support import peers
from tests.support.suite import PASSWORD, Installation, tls_client_context, wait_port

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
ALICE = "alice@example.org"


def uids(pid: int) -> tuple[list[int], list[int], str]:
    """(real, effective, saved, fs) uids, the same for gids, and the supplementary groups."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return [int(x) for x in fields["Uid"].split()], [int(x) for x in fields["Gid"].split()], fields["Groups"].strip()


def wait_tcp(host: str, port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Daemons:
    def __init__(self, inst: Installation) -> None:
        self.inst = inst
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> subprocess.Popen[bytes]:
        log = open(self.inst.root / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen([sys.executable, "-m", name, "--config", str(self.inst.config_path)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.inst.root / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


@pytest.fixture
def production(tmp_path: Path) -> Iterator[tuple[Installation, Daemons, str]]:
    peers.require_root("the privilege-drop test")
    inst = Installation(tmp_path / "mailroom")
    inst.add_user(ALICE)  # as root, as an operator would
    host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    inst.set("msa", "submission", f'"{host}:587"')
    inst.set("msa", "submissions", f'"{host}:465"')
    inst.set("mailroom", "user", '"nobody"')
    peers.make_searchable(inst.root)  # pytest's tmp_path sits under root-only folders
    daemons = Daemons(inst)
    try:
        yield inst, daemons, host
    finally:
        daemons.stop()


def _give_to(user: str, root: Path) -> None:
    """`chown -R user: root`, except the TLS folder, which stays root's."""
    pw = pwd.getpwnam(user)
    for folder, dirs, files in os.walk(root):
        if Path(folder).name == "tls":
            dirs[:] = []
            continue
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        for f in files:
            os.chown(os.path.join(folder, f), pw.pw_uid, pw.pw_gid)


def test_started_as_root_it_binds_587_and_465_then_serves_as_the_configured_user(
    production: tuple[Installation, Daemons, str],
) -> None:
    inst, daemons, host = production
    nobody = pwd.getpwnam("nobody")
    _give_to("nobody", inst.root)
    key = inst.root / "tls" / "key.pem"
    assert key.stat().st_uid == 0 and key.stat().st_mode & 0o077 == 0  # only root can read the key

    mta = daemons.start("mta")
    wait_port(inst.ports["internal"])
    msa = daemons.start("msa")
    wait_tcp(host, 587)
    wait_tcp(host, 465)

    for proc in (msa, mta):
        uid, gid, groups = uids(proc.pid)
        assert uid == [nobody.pw_uid] * 4, (uid, daemons.log("msa"))
        assert gid == [nobody.pw_gid] * 4
        assert groups == ""  # root's supplementary groups are gone too
    assert "dropped privileges to nobody" in daemons.log("msa")

    # It serves as nobody: AUTH reads the database, the hand-off writes events.
    with smtplib.SMTP(host, 587, timeout=30) as s:
        s.starttls(context=tls_client_context())
        s.login(ALICE, PASSWORD)
        assert s.mail(ALICE)[0] == 250
        rcpt = s.rcpt(ALICE)
        assert rcpt[0] == 250, (rcpt, daemons.log("msa"), daemons.log("mta"))
        code, text = s.data(b"From: alice@example.org\r\nSubject: as nobody\r\n\r\nhi\r\n")
    assert code == 250, (text, daemons.log("msa"), daemons.log("mta"))
    with smtplib.SMTP_SSL(host, 465, timeout=30, context=tls_client_context()) as s:
        s.login(ALICE, PASSWORD)
        assert s.sendmail(ALICE, [ALICE], b"From: alice@example.org\r\nSubject: 465\r\n\r\nhi\r\n") == {}
    trace = text.decode().rsplit(" ", 1)[1]
    db = inst.db()
    try:
        with db.read() as session:
            assert session.get(Message, trace) is not None
    finally:
        db.close()


def test_without_access_to_the_database_it_stops_at_start_and_says_why(
    production: tuple[Installation, Daemons, str],
) -> None:
    inst, daemons, _ = production  # the folder still belongs to root
    msa = daemons.start("msa")
    assert msa.wait(30) == 1
    log = daemons.log("msa")
    assert "running as nobody, cannot create files in" in log and "chown -R nobody: " in log, log
