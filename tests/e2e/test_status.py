"""`mailroom status` (and stop/start/restart) says plainly whether the suite runs.

Running: supervisorctl's table, exit 0.  Not running (never started, stopped,
or killed, which leaves supervisord's socket file behind): one line on stdout
that says so and how to start it, exit 3 (LSB's "program is not running"),
never supervisorctl's "...supervisor.sock no such file".  `status` adds what
holds whether or not it runs: the certificate's expiry and the last backup.
"""

from __future__ import annotations

import os
import re
import socket

import pytest

from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(120)

NOT_RUNNING = re.compile(r"mailroom is not running \(nothing answers on (\S+)/supervisor\.sock\); "
                         r"`mailroom run` starts it\n")


def assert_not_running(inst: Installation, *args: str) -> None:
    r = inst.cli(*args)
    assert (r.returncode, r.stderr) == (3, ""), (args, r.returncode, r.stdout, r.stderr)
    first, _, rest = r.stdout.partition("\n")
    m = NOT_RUNNING.fullmatch(first + "\n")
    if args == ("status",):
        [cert, backup] = rest.splitlines()
        assert cert.startswith("certificate ") and backup.startswith("backup: "), r.stdout
    else:
        assert rest == "", r.stdout
    assert m and m.group(1) == str(inst.config.run_dir.resolve()), (args, r.stdout)


def test_a_suite_never_started_is_not_running(installation: Installation) -> None:
    for args in (("status",), ("stop", "msa"), ("start", "all"), ("restart", "mta")):
        assert_not_running(installation, *args)


def test_status_while_it_runs_and_after_it_stopped_or_was_killed(installation: Installation) -> None:
    inst = installation
    inst.start()
    try:
        r = inst.cli("status")
        assert r.returncode == 0, r.stdout + r.stderr
        for program in ("msa", "mta", "qmgr", "mda", "web"):
            assert re.search(rf"^{program}\s+RUNNING\s+pid \d+", r.stdout, re.M), r.stdout
        # One program stopped: supervisorctl's own answer, exit 3 as well.
        assert inst.cli("stop", "web").returncode == 0
        r = inst.cli("status")
        assert r.returncode == 3 and re.search(r"^web\s+STOPPED", r.stdout, re.M), r.stdout
    finally:
        inst.stop()
    assert_not_running(inst, "status")

    # supervisord killed outright: its socket file stays, and nothing answers on it.
    sock = inst.config.run_dir.resolve() / "supervisor.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(sock))  # a socket file with no listener, as SIGKILL leaves it
    assert sock.exists()
    assert_not_running(inst, "status")
    os.unlink(sock)
