"""Running the daemons under supervisord: `mailroom run`, `status`, `stop`, `start`, `restart`."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

from common.config import Config

PROGRAMS = ("mda", "qmgr", "mta", "msa")
# Package data, so an installed Mailroom (a wheel, not a checkout) finds it too.
TEMPLATE = "supervisord.conf.in"

_COMMON = """\
directory = {base}
autostart = true
autorestart = true
startsecs = 1
startretries = 100
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
    template = resources.files("cli").joinpath(TEMPLATE).read_text()
    common = _COMMON.format(base=cfg.base, stdout=log_file)
    text = template.format(
        run_dir=run_dir, python=sys.executable, config=cfg.path, common=common
    )
    out = run_dir / "supervisord.conf"
    out.write_text(text)
    return out


def run(cfg: Config) -> None:
    """supervisord in the foreground; Ctrl-C stops every daemon."""
    conf = render(cfg)
    os.execvp(sys.executable, [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)])


def ctl(cfg: Config, *args: str) -> int:
    conf = cfg.run_dir.resolve() / "supervisord.conf"
    if not conf.exists():
        conf = render(cfg)
    # Its output is passed on through our own stdout, so that a reader that goes
    # away early (`mailroom status | head -1`) ends it quietly (cli/main.py).
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), *args],
        stdout=subprocess.PIPE, text=True, errors="replace",
    )
    sys.stdout.write(proc.stdout)
    return proc.returncode
