"""Running the daemons under supervisord: `mailroom run`, `status`, `stop`, `start`, `restart`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from common import config as configmod
from common import privileges
from common.config import Config
from common.daemon import setting_name
from common.endpoint import BindError

PROGRAMS = ("mda", "qmgr", "mta", "msa")
TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "supervisord.conf.in"

_COMMON = """\
directory = {base}
autostart = true
autorestart = true
startsecs = 1
startretries = 10
stopsignal = TERM
stopwaitsecs = 15
redirect_stderr = true
stdout_logfile = {stdout}
stdout_logfile_maxbytes = 0
environment = PYTHONUNBUFFERED="1\""""


def render(cfg: Config, *, log_file: str = "/dev/stdout") -> Path:
    """Write RUN_DIR/supervisord.conf for this config; returns its path."""
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    template = TEMPLATE.read_text()
    common = _COMMON.format(base=cfg.base, stdout=log_file)
    text = template.format(
        run_dir=run_dir, python=sys.executable, config=cfg.path, common=common
    )
    out = run_dir / "supervisord.conf"
    out.write_text(text)
    return out


def preflight(cfg: Config) -> str | None:
    """What would stop a daemon at its start, as the one line it would print, or None.

    Checked here, before supervisord starts anything, because supervisord
    would restart a daemon that cannot start again and again: no serving as
    root without `[mailroom] user`, and every listener's address free and
    permitted (bound once and let go, as the daemon will bind it).
    """
    try:
        privileges.account(cfg)
    except privileges.StartError as exc:
        return str(exc)
    for key in configmod.listener_keys():
        endpoint = cfg.endpoint(key)
        try:
            sock = endpoint.bind()
        except BindError as exc:
            return f"{setting_name(key)} = {exc}"
        sock.close()
        if endpoint.is_unix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(endpoint.path)
    return None


def run(cfg: Config) -> int:
    """supervisord in the foreground; Ctrl-C stops every daemon.  A problem found before
    the start is one line on stderr and exit status 1."""
    problem = preflight(cfg)
    if problem:
        print(f"mailroom run: {problem}", file=sys.stderr)
        return 1
    os.umask(privileges.UMASK)
    conf = render(cfg)
    argv = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)]
    if _stdout_reopens():
        os.execvp(argv[0], argv)
    return _relay(argv)


def _stdout_reopens() -> bool:
    """Can supervisord reopen our standard output by name (its `/dev/stdout` log)?

    Not when it is a terminal or file of another user: `runuser`/`su` from a
    root shell leave the terminal root's, and the daemons' output would be
    refused (EACCES) at every start.
    """
    try:
        os.close(os.open("/dev/stdout", os.O_WRONLY | os.O_APPEND))
    except OSError:
        return False
    return True


def _relay(argv: list[str]) -> int:
    """Run supervisord with its output on a pipe of ours, copied to our standard
    output, passing on the signals that stop it."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    assert proc.stdout is not None
    out = sys.stdout.fileno()
    while chunk := os.read(proc.stdout.fileno(), 65536):
        with contextlib.suppress(BrokenPipeError):
            os.write(out, chunk)
    return proc.wait()


def ctl(cfg: Config, *args: str) -> int:
    conf = cfg.run_dir.resolve() / "supervisord.conf"
    if not conf.exists():
        conf = render(cfg)
    proc = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), *args])
    return proc.returncode
