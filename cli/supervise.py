"""Running the daemons under supervisord: `mailroom run`, `status`, `stop`, `start`, `restart`."""

from __future__ import annotations

import contextlib
import os
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
    os.execvp(sys.executable, [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)])


def ctl(cfg: Config, *args: str) -> int:
    conf = cfg.run_dir.resolve() / "supervisord.conf"
    if not conf.exists():
        conf = render(cfg)
    proc = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), *args])
    return proc.returncode
