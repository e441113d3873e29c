"""Running the daemons under supervisord: `mailroom run`, `status`, `stop`, `start`, `restart`."""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import os
import re
import secrets
import socket
import stat
import subprocess
import sys
from importlib import resources
from pathlib import Path

from cli import dovecot, roles, rspamd, unbound
from cli.watch import failure_file
from common import config as configmod
from common import privileges
from common.config import Config
from common.daemon import SUPERVISOR_STARTSECS, bind_all
from common.db import Database
from common.endpoint import BindError

# Package data, so an installed Mailroom (a wheel, not a checkout) finds it too.
TEMPLATE = "supervisord.conf.in"

_COMMON = """\
directory = {base}
autostart = true
autorestart = unexpected
; 2, 73 and 78: the daemon could not start (a port, the user, a folder) and said why in
; one line; starting it again cannot help, so the watcher below stops the suite.
exitcodes = 0,2,73,78
startsecs = {startsecs}
startretries = 10
stopsignal = TERM
stopwaitsecs = 15
{output}
environment = PYTHONUNBUFFERED="1\""""

# What supervisord does with a program's output, the same for every program.  Each
# program writes its log to a file of its own ([mailroom] log_dir, PROGRAM.log), so
# its output is only what it prints when it cannot start or crashes: passed on to
# `mailroom run`'s output, and (as PROCESS_LOG events) to the watcher, which keeps
# each program's last line.  Capture mode stays off (capture_maxbytes 0): with it
# supervisord would obey tags in the output, and text from the network must never
# steer it.  With `log_dir = ""` the daemons log to stderr instead: every line then
# goes through here, and no events are sent (the watcher would read every line).
_OUTPUT = """\
redirect_stderr = true
stdout_logfile = {output}
stdout_logfile_maxbytes = 0
stdout_capture_maxbytes = 0
stdout_events_enabled = {events}"""


# Dovecot's master runs in the foreground (-F) and stops its children on TERM.
_IMAP = """\
[program:imap]
command = {dovecot} -F -c {conf}
priority = 40
{common}"""


# The certificate renewer (cli/renewer.py), when ACME is on.
_RENEW = """\
[program:renew]
command = {python} -m cli.renewer --config {config}
priority = 40
{common}"""


def _imap_program(cfg: Config, common: str, *, with_imap: bool) -> str:
    program = dovecot.find_dovecot(cfg)
    if not with_imap or program is None:
        return "; imap: Dovecot is not run (see the line `mailroom run` printed)"
    return _IMAP.format(dovecot=program, conf=dovecot.config_file(cfg), common=common)


def render(cfg: Config, *, output: str = "/dev/stdout", with_imap: bool = False, with_filter: bool = False) -> Path:
    """Write RUN_DIR/supervisord.conf for this config (owner-only: it holds the
    control socket's password); returns its path.  `output`: where supervisord
    writes what the programs print."""
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    template = resources.files("cli").joinpath(TEMPLATE).read_text()
    events = "true" if cfg.log_dir is not None else "false"
    common = _COMMON.format(base=cfg.base, startsecs=SUPERVISOR_STARTSECS,
                            output=_OUTPUT.format(output=output, events=events))
    text = template.format(
        run_dir=run_dir, python=sys.executable, config=cfg.path, common=common,
        password=secrets.token_urlsafe(24),
        # Run as root, supervisord stays root (it starts each daemon as root, to bind
        # its ports); said outright, so it does not warn about it (CRIT) at every start.
        supervisord_user="user = root" if os.geteuid() == 0 else "",
        imap=_imap_program(cfg, common, with_imap=with_imap), **_mta_processes(cfg.mta.processes),
        renew=_RENEW.format(python=sys.executable, config=cfg.path, common=common) if cfg.acme.directory
        else "; renew: no certificate renewer ([acme] directory is empty)",
    )
    if with_filter:  # rspamd and its Redis (cli/rspamd.py)
        text += rspamd.programs(cfg, common, _root_switch(cfg))
    if cfg.lab.enabled:
        text += _LAB.format(python=sys.executable, config=cfg.path, common=common)
    text += unbound.program(cfg, common)  # the local validating resolver, when chosen
    text += _WATCH.format(python=sys.executable, run_dir=run_dir)
    text = roles.keep(text, cfg.mailroom.roles)  # what this node runs (cli/roles.py)
    out = run_dir / "supervisord.conf"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(text)
    return out


def program_log(cfg: Config, program: str) -> Path | None:
    """Where supervised program `program` writes its log (`[mailroom] log_dir`/PROGRAM.log),
    or None when the programs log to standard error (`log_dir = ""`)."""
    return None if cfg.log_dir is None else cfg.log_dir / f"{program}.log"


def _mta_processes(n: int) -> dict[str, str]:
    """The MTA program's placeholders: one process as before, or `n` that supervisord
    starts, stops and restarts one by one (mta:mta_0, mta:mta_1, ...), each binding
    the shared ports with SO_REUSEPORT (`--instance K`)."""
    if n == 1:
        return {"mta_instance": "", "mta_processes": ""}
    return {
        "mta_instance": " --instance %(process_num)d",
        "mta_processes": f"numprocs = {n}\nprocess_name = %(program_name)s_%(process_num)d\n",
    }


def program_spec(cfg: Config, program: str) -> str:
    """What supervisorctl calls `program`: with several MTA processes, the group of them."""
    return f"{program}:*" if program == "mta" and cfg.mta.processes > 1 else program


# The lab Internet (docs/lab.md) starts first: the MX hosts and the DNS server are
# there before the queue manager looks for them.
_LAB = """
[program:lab]
command = {python} -m lab --config {config}
priority = 5
{common}
"""

_WATCH = """
[eventlistener:watch]
; A daemon that could not start stops the whole suite, and `mailroom run` says why
; (the last line the daemon printed: PROCESS_LOG events).
command = {python} -m cli.watch listen {run_dir}
events = PROCESS_STATE_EXITED,PROCESS_STATE_FATAL,PROCESS_LOG
buffer_size = 100
priority = 1
autorestart = true
stdout_logfile = NONE
stderr_logfile = NONE
"""


def preflight(cfg: Config) -> str | None:
    """What would stop a daemon at its start, as the one line it would print, or None.

    Checked here, before supervisord starts anything, because supervisord
    would restart a daemon that cannot start again and again: no serving as
    root without `[mailroom] user`, Mailroom's code readable by that user (the
    daemons read some of it after the switch), and every listener's address
    free and permitted (bound once and let go, as the daemon will bind it).
    """
    try:
        acct = privileges.account(cfg)
    except privileges.StartError as exc:
        return str(exc)
    # As root: each daemon becomes the Mailroom user and still reads code after that.
    closed = privileges.code_problem(acct)
    if closed:
        return closed
    # All at once, as the daemons hold them: two addresses of one setting that
    # overlap ([::]:25 and 0.0.0.0:25) are found here too.
    endpoints = {key: cfg.endpoints(key) for key in configmod.listener_keys() if roles.binds(key, cfg.mailroom.roles)}
    # The web program's optional listeners for the Internet (the 80 and 443 roles), when on.
    endpoints.update({key: cfg.endpoints(key) for key, on in (("web.http", cfg.web.http), ("web.https", cfg.web.https))
                      if on and roles.binds(key, cfg.mailroom.roles)})
    try:
        bound = bind_all(endpoints)
    except BindError as exc:
        return str(exc)
    for key, socks in bound.items():
        for endpoint, sock in zip(endpoints[key], socks, strict=True):
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
    acct = privileges.account(cfg)
    if cfg.log_dir is not None:
        # Made now, the Mailroom user's: the web program and Dovecot write there too.
        privileges.private_dir(cfg.log_dir, acct)
    db = Database(cfg.database_url, threads=1)
    try:
        db.create_schema()
        why_not = dovecot.prepare(cfg, db) if "imap" in cfg.mailroom.roles else "imap: not a role of this node"
    finally:
        db.close()
    if why_not and "imap" in cfg.mailroom.roles:
        print(f"mailroom: {why_not}", file=sys.stderr, flush=True)
    if cfg.dns.resolver == "unbound" and (problem := unbound.prepare(cfg, user=_unbound_user(cfg))):
        print(f"mailroom run: {problem}", file=sys.stderr)
        return 1
    runs_filter = cfg.filter.supervised and "mta" in cfg.mailroom.roles
    filter_down = rspamd.prepare(cfg, _root_switch(cfg)) if runs_filter else "off"
    if filter_down and runs_filter:
        print(f"mailroom: {filter_down}", file=sys.stderr, flush=True)
    if cfg.log_dir is not None:
        print(f"mailroom: each program logs to {cfg.log_dir}/PROGRAM.log; here: supervisord, "
              "and what a program prints when it cannot start or crashes", flush=True)
    conf = render(cfg, with_imap=why_not is None, with_filter=filter_down is None)
    run_dir = cfg.run_dir.resolve()
    for old in (run_dir / "stopped", *(failure_file(run_dir, p) for p in roles.SUPERVISED)):
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    _append_only_output()
    # The rest of `mailroom run`'s life is spent waiting: a small process of the standard
    # library only (cli/watch.py) stays as supervisord's parent, not this one.
    argv = [sys.executable, "-m", "cli.watch", "run", str(run_dir), "relay" if not _stdout_reopens() else "direct",
            sys.executable, "-m", "cli.supervisord", "-n", "-c", str(conf)]
    os.execv(sys.executable, argv)


def _root_switch(cfg: Config) -> privileges.Account | None:
    """Whom supervisord starts a program as that cannot drop root itself: the Mailroom
    user when we are root (preflight checked it), else nobody (we are not root)."""
    return privileges.account(cfg) if os.getuid() == 0 else None


def _unbound_user(cfg: Config) -> str | None:
    """Whom unbound becomes after binding: the Mailroom user, when started as root."""
    return cfg.mailroom.user or None if os.geteuid() == 0 else None


def _append_only_output() -> None:
    """Make our standard output and error append-only (O_APPEND) when they are files.

    Several writers share them: supervisord writes its own lines through the
    descriptor it inherits, and each program's output through its own open of
    /dev/stdout (supervisord opens it O_APPEND).  A file the shell opened with `>`
    is not O_APPEND: the inherited descriptor keeps its own offset, and
    supervisord's lines would land over what the programs appended meanwhile.
    With O_APPEND on it too, every write lands at the end, whole.
    """
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.fstat(fd).st_mode):
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)


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


# What `mailroom reload` signals (SIGHUP): the daemons and the web program (common/reload.py,
# web/public.py), the certificate renewer (it looks again at once: cli/renewer.py), and
# Dovecot's master, which reads its configuration and certificate again and keeps its pid.
RELOADED = ("mda", "qmgr", "mta", "msa", "web", "renew", "imap")


def reload(cfg: Config, *, skip: tuple[str, ...] = ()) -> int:
    """SIGHUP to every running program that reloads; one line when the suite is not running."""
    run_dir = cfg.run_dir.resolve()
    conf = run_dir / "supervisord.conf"
    if not (run_dir / "supervisor.sock").exists() or not conf.exists():
        print("not running: the daemons read the certificate and the settings when they start")
        return 0
    present = set(re.findall(r"(?m)^\[program:([^\]]+)\]", conf.read_text()))
    specs = [program_spec(cfg, p) for p in RELOADED if p in present and p not in skip]
    return ctl(cfg, "signal", "HUP", *specs)


def credentials(cfg: Config) -> tuple[str, str]:
    """The user name and password of the running supervisord's control socket (from
    RUN_DIR/supervisord.conf, where `mailroom run` wrote them), for an XML-RPC client."""
    parser = configparser.RawConfigParser(strict=False)
    parser.read(cfg.run_dir.resolve() / "supervisord.conf")
    return parser.get("supervisorctl", "username", fallback=""), parser.get("supervisorctl", "password", fallback="")


# `mailroom status|stop|start|restart` when no supervisord answers: LSB's "program is
# not running" (supervisorctl's status uses it too, for a program that is not running).
EXIT_NOT_RUNNING = 3


def _supervisord_answers(sock: Path) -> bool | None:
    """Does a supervisord listen on its control socket?  None when we may not ask."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(sock))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return False  # never started, or stopped (or killed, leaving the socket file)
        except PermissionError:
            return None
    return True


def ctl(cfg: Config, *args: str) -> int:
    """supervisorctl with `args` against this installation's supervisord; when none is
    running, one line that says so on stdout and EXIT_NOT_RUNNING."""
    sock = cfg.run_dir.resolve() / "supervisor.sock"
    if _supervisord_answers(sock) is False:
        print(f"mailroom is not running (nothing answers on {sock}); `mailroom run` starts it")
        return EXIT_NOT_RUNNING
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
