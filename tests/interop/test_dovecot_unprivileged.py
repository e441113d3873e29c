"""Development form: the Dovecot configuration Mailroom generates for a normal user
runs entirely as that user (no root anywhere) and serves that user's mailboxes.

`mailroom run` started by a normal user writes this form (cli/dovecot.py: no
chroot, every service as the invoking user).  Python here lives in a root-only
folder, so the test writes the files as root, gives them to `nobody`, and runs
only Dovecot itself as `nobody` (runuser), the way a developer's Dovecot runs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import dovecot
from common import config
from common.db import Database
from common.models import User
from common.tls import make_self_signed
from common.users import hash_password
from mda import maildir
from tests.support import peers
from tests.support.dovecot import imaps
from tests.support.suite import PASSWORD

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


@pytest.fixture
def unprivileged(tmp_path: Path) -> Iterator[tuple[config.Config, subprocess.Popen[bytes]]]:
    peers.require_root("running Dovecot as another user")
    runuser, program = peers.require("runuser"), peers.require("dovecot")
    nobody = pwd.getpwnam("nobody")
    root = tmp_path / "dev"
    root.mkdir()
    port = peers.free_port()
    (root / "mailroom.toml").write_text(
        '[mailroom]\ndomains = ["example.org"]\n'
        f'[imap]\nenabled = true\nimap = ""\nimaps = "127.0.0.1:{port}"\npop3s = ""\n'
    )
    cfg = config.load(root / "mailroom.toml")
    make_self_signed(cfg.resolve(cfg.tls.cert), cfg.resolve(cfg.tls.key), "mail.test")
    db = Database(cfg.database_url, threads=1)
    db.create_schema()
    with db.write() as s:
        s.add(User(address="dev@example.org", password_hash=hash_password(PASSWORD), store="maildir",
                   mailbox="example.org/dev", quota=0))
        s.commit()
    maildir.deliver(cfg.mail_root / "example.org" / "dev", b"Subject: developer mail\r\n\r\nhi\r\n", "1.M1R1.dev")
    dovecot.write_users(cfg, db)
    db.close()
    conf = dovecot.render_config(cfg, dovecot.MailIds(nobody.pw_uid, nobody.pw_gid, "nobody", as_root=False))
    # The socket folder may be outside `root` (a short path under /tmp): it is the developer's too.
    base_dir = Path(next(line for line in conf.read_text().splitlines() if line.startswith("base_dir = "))[11:])
    os.chown(base_dir, nobody.pw_uid, nobody.pw_gid)
    for folder, _, files in os.walk(root):
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        for name in files:
            os.chown(os.path.join(folder, name), nobody.pw_uid, nobody.pw_gid)
    peers.make_searchable(root)
    log = open(root / "dovecot.log", "wb")  # noqa: SIM115 -- Dovecot keeps it
    proc = subprocess.Popen([runuser, "-u", "nobody", "--", program, "-F", "-c", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        peers.wait_for_port(port, timeout=20)
        yield cfg, proc
    finally:
        proc.terminate()
        proc.wait(20)
        peers.reap_session(proc.pid, 10)
        shutil.rmtree(base_dir, ignore_errors=True)


def test_dovecot_runs_as_the_developer_and_serves_their_mail(
    unprivileged: tuple[config.Config, subprocess.Popen[bytes]],
) -> None:
    cfg, proc = unprivileged
    nobody = pwd.getpwnam("nobody")
    port = int(cfg.imap.imaps.rsplit(":", 1)[1])
    client = imaps(port)
    try:
        assert client.login("dev@example.org", PASSWORD)[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
        typ, data = client.fetch("1", "(BODY[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and b"developer mail" in data[0][1]
        # Every process of this Dovecot (master, login, auth, imap) runs as the
        # developer; looked at while the session is open, so its imap process is there.
        uids = _uids(peers.session_members(proc.pid))
    finally:
        client.logout()
    assert len(uids) >= 4, uids
    for pid, uid_line in uids.items():
        assert set(uid_line.split()[1:]) == {str(nobody.pw_uid)}, (pid, uid_line)


def _uids(pids: list[int]) -> dict[int, str]:
    """The `Uid:` line of each Dovecot process (not runuser) among `pids` that still
    exists: a short-lived helper process may end between the listing and the read."""
    found: dict[int, str] = {}
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "runuser":
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        found[pid] = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return found
