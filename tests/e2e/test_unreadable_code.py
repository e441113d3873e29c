"""A copy of Mailroom the Mailroom user cannot read (a clone under /root, or `mktemp -d`).

Run as root, every daemon imports as root, becomes the Mailroom user, and then
still reads code: the schema migrations at its first database upgrade,
modules loaded on first use.  From such a copy the daemons used to die with
alembic's "Path doesn't exist: .../common/migrations", and supervisord
restarted them again and again.  `mailroom run` now refuses before starting
anything, with one line; a daemon started alone reads what it needs while it
is still root, and serves.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.users import add_user
from tests.support import peers
from tests.support.suite import Installation, maildir_messages, wait_port

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def closed_copy() -> Iterator[Path]:
    """The source files git knows, copied under a fresh folder of mode 0700, root's."""
    peers.require_root("running Mailroom as root from a folder only root can read")
    closed = Path(tempfile.mkdtemp(prefix="mailroom-closed-"))
    assert (closed.stat().st_mode & 0o777) == 0o700
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    copy = closed / "mailroom"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    try:
        yield copy
    finally:
        shutil.rmtree(closed, ignore_errors=True)


def from_copy(copy: Path) -> dict[str, str]:
    """The environment that makes Python import Mailroom from `copy`, not from this checkout."""
    return {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}


def run_from(copy: Path, inst: Installation) -> subprocess.CompletedProcess[str]:
    """`mailroom run` from `copy`; whatever it started is stopped if it is still running after a minute."""
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--config", str(inst.config_path), "run"],
                            cwd=copy, env=from_copy(copy), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # supervisord stops what it started
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"mailroom run kept running:\n{out[-3000:]}{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_mailroom_run_from_a_copy_the_mailroom_user_cannot_read_stops_with_one_line(
    installation: Installation, closed_copy: Path
) -> None:
    inst = installation
    started = time.monotonic()
    r = run_from(closed_copy, inst)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    closed = closed_copy.parent
    assert r.stderr == (
        f"mailroom run: mailroom cannot read Mailroom's code in {closed_copy}/common: {closed} is closed to it "
        "(mode 0700), and the daemons read the code after they become mailroom; put the code where every user "
        "can read it (a clone, or a venv with `pip install .`, under /opt or /usr/local)\n"
    ), r.stderr
    assert time.monotonic() - started < 30
    assert not (inst.config.run_dir / "supervisord.pid").exists()  # nothing was started

    # Open the way, but leave the migrations closed: named, one line again.
    closed.chmod(0o711)
    (closed_copy / "common" / "migrations" / "versions").chmod(0o700)
    r = run_from(closed_copy, inst)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"mailroom run: mailroom cannot read Mailroom's code: "
                               f"{closed_copy}/common/migrations/versions is closed to it (mode 0700)"), r.stderr


def test_a_daemon_started_alone_from_such_a_copy_reads_its_migrations_before_the_switch(
    installation: Installation, closed_copy: Path
) -> None:
    inst = installation
    for f in inst.root.glob("mailroom.db*"):
        f.unlink()  # the MDA creates the schema itself, as the Mailroom user, from the migrations
    out = open(inst.root.parent / "mda-closed.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "mda", "--config", str(inst.config_path)], cwd=closed_copy,
                            env=from_copy(closed_copy), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(inst.ports["lmtp"], 60)
        import smtplib

        add_user(inst, "alice@example.org")
        with smtplib.LMTP("127.0.0.1", inst.ports["lmtp"], timeout=30) as lmtp:
            assert lmtp.sendmail("bob@example.net", ["alice@example.org"], b"Subject: closed\r\n\r\nhi\r\n") == {}
        assert len(maildir_messages(inst.mailbox("alice@example.org"))) == 1
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        out.close()
    printed = (inst.root.parent / "mda-closed.out").read_text()
    assert "Traceback" not in printed and "Path doesn't exist" not in printed, printed
    log = inst.log("mda")
    assert "dropped privileges to mailroom" in log
    assert f"mailroom cannot read Mailroom's code in {closed_copy}/common" in log  # said, once, in its log
    assert "modules were loaded and the schema migrations read before the switch" in log
