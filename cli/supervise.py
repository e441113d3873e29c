"""Running the daemons under supervisord: `mailroom run`, `status`, `stop`, `start`, `restart`."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

from cli import dovecot
from common.config import Config
from common.db import Database

PROGRAMS = ("mda", "qmgr", "mta", "msa", "web", "imap")
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


# Dovecot's master runs in the foreground (-F) and stops its children on TERM.
_IMAP = """\
[program:imap]
command = {dovecot} -F -c {conf}
priority = 5
{common}"""


def _imap_program(cfg: Config, common: str, *, with_imap: bool) -> str:
    program = dovecot.find_dovecot(cfg)
    if not with_imap or program is None:
        return "; imap: Dovecot is not run (see the line `mailroom run` printed)"
    return _IMAP.format(dovecot=program, conf=dovecot.config_file(cfg), common=common)


def render(cfg: Config, *, log_file: str = "/dev/stdout", with_imap: bool = False) -> Path:
    """Write RUN_DIR/supervisord.conf for this config; returns its path."""
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    template = resources.files("cli").joinpath(TEMPLATE).read_text()
    common = _COMMON.format(base=cfg.base, stdout=log_file)
    text = template.format(
        run_dir=run_dir, python=sys.executable, config=cfg.path, common=common,
        imap=_imap_program(cfg, common, with_imap=with_imap),
    )
    out = run_dir / "supervisord.conf"
    out.write_text(text)
    return out


def run(cfg: Config) -> None:
    """supervisord in the foreground; Ctrl-C stops every daemon."""
    db = Database(cfg.database_url, threads=1)
    try:
        db.create_schema()
        why_not = dovecot.prepare(cfg, db)
    finally:
        db.close()
    if why_not:
        print(f"mailroom: {why_not}", file=sys.stderr, flush=True)
    conf = render(cfg, with_imap=why_not is None)
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
