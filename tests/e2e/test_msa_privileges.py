"""Production start: `python -m msa` started as root binds 587 and 465, then serves as `[mailroom] user`.

The real ports 587/465 are used, on a loopback address of their own
(127.x.y.z), so the test proves that binding privileged ports happens before
the switch; the MTA's listeners are on high ports.  `mailroom init` as root
made the `mailroom` user and gave it the installation (docs/operations.md).
"""

from __future__ import annotations

import pwd
import random
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.models import Message
from tests.harness.users import add_user
from tests.support import peers
from tests.support.suite import PASSWORD, Daemons, Installation, ids, tls_client_context, wait_port

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
ALICE = "alice@example.org"


def wait_tcp(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def production(tmp_path: Path) -> Iterator[tuple[Installation, Daemons, str]]:
    peers.require_root("the privilege-drop test")
    inst = Installation(tmp_path / "mailroom")
    add_user(inst, ALICE)  # as root, as an operator would
    host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    inst.set("msa", "submission", f'"{host}:587"')
    inst.set("msa", "submissions", f'"{host}:465"')
    daemons = Daemons(inst)
    try:
        yield inst, daemons, host
    finally:
        daemons.stop()


def test_started_as_root_it_binds_587_and_465_then_serves_as_the_configured_user(
    production: tuple[Installation, Daemons, str],
) -> None:
    inst, daemons, host = production
    user = pwd.getpwnam("mailroom")  # `mailroom init` as root made it and wrote it into the config
    key = inst.root / "tls" / "key.pem"
    assert key.stat().st_uid == user.pw_uid and key.stat().st_mode & 0o077 == 0  # only mailroom reads the key

    mta = daemons.start("mta")
    wait_port(inst.internal_socket)
    msa = daemons.start("msa")
    wait_tcp(host, 587)
    wait_tcp(host, 465)

    for proc in (msa, mta):
        uid, gid, groups = ids(proc.pid)
        assert uid == [user.pw_uid] * 4, (uid, daemons.log("msa"))
        assert gid == [user.pw_gid] * 4
        assert groups == ""  # root's supplementary groups are gone too
    assert "dropped privileges to mailroom" in daemons.log("msa")

    # It serves as mailroom: AUTH reads the database, the hand-off writes events.
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
    inst, daemons, _ = production
    inst.set("mailroom", "user", '"nobody"')  # the folder belongs to mailroom, not to nobody
    msa = daemons.start("msa")
    assert msa.wait(30) == 78
    log = daemons.log("msa")
    assert "running as nobody, cannot create files in" in log and "chown -R nobody: " in log, log
