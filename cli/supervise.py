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
autorestart = unexpected
; 2, 73 and 78: the daemon could not start (a port, the user, a folder) and said why in
; one line; starting it again cannot help, so the watcher below stops the suite.
exitcodes = 0,2,73,78
startsecs = 1
startretries = 10
stopsignal = TERM
stopwaitsecs = 15
redirect_stderr = true
stdout_logfile = {stdout}
stdout_logfile_maxbytes = 0
stdout_capture_maxbytes = 4096
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
    text += _WATCH.format(python=sys.executable, run_dir=run_dir)
    out = run_dir / "supervisord.conf"
    out.write_text(text)
    return out


_WATCH = """
[eventlistener:watch]
; A daemon that could not start stops the whole suite, and `mailroom run` says why.
command = {python} -m cli.supervise watch {run_dir}
events = PROCESS_STATE_EXITED,PROCESS_STATE_FATAL,PROCESS_COMMUNICATION_STDOUT
priority = 1
autorestart = true
stdout_logfile = NONE
stderr_logfile = NONE
"""


def failure_file(run_dir: Path, program: str) -> Path:
    """Where a daemon that could not start leaves its one line for `mailroom run`."""
    return run_dir / f"{program}.failed"


def watch(run_dir: Path) -> None:
    """supervisord event listener (its protocol on stdin/stdout): keeps the line each
    daemon that cannot start sends (RUN_DIR/PROGRAM.failed); when a daemon exits
    with a status that says it cannot start, or supervisord gives up on it, records
    which (RUN_DIR/stopped) and shuts supervisord down."""
    while True:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        header = dict(f.split(":", 1) for f in sys.stdin.readline().split())
        payload = sys.stdin.read(int(header["len"]))
        first, _, data = payload.partition("\n")
        fields = dict(f.split(":", 1) for f in first.split())
        event = header["eventname"]
        if event == "PROCESS_COMMUNICATION_STDOUT" and fields.get("processname") in PROGRAMS:
            failure_file(run_dir, fields["processname"]).write_text(data.strip() + "\n")
        gave_up = event == "PROCESS_STATE_FATAL" or (
            event == "PROCESS_STATE_EXITED" and fields.get("expected") == "1"
        )
        if gave_up and fields.get("processname") in PROGRAMS:
            program = fields["processname"]
            stop = run_dir / "stopped"
            if not stop.exists():
                stop.write_text(program + "\n")
                os.kill(os.getppid(), signal.SIGTERM)
        sys.stdout.write("RESULT 2\nOK")
        sys.stdout.flush()


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
    run_dir = cfg.run_dir.resolve()
    for old in (run_dir / "stopped", *(failure_file(run_dir, p) for p in PROGRAMS)):
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    argv = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)]
    status = _supervise(argv, relay=not _stdout_reopens())
    stop = run_dir / "stopped"
    if stop.exists():
        program = stop.read_text().strip()
        try:
            why = failure_file(run_dir, program).read_text().strip()
        except OSError:
            why = f"{program} stopped and could not be started again (its log above says why)"
        print(f"mailroom run: {why}", file=sys.stderr)
        return 1
    return status


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


def _supervise(argv: list[str], *, relay: bool) -> int:
    """Run supervisord until it stops, passing on the signals that stop it; with
    `relay`, its output goes through a pipe of ours to our standard output."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE if relay else None,
                            stderr=subprocess.STDOUT if relay else None)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    if proc.stdout is not None:
        out = sys.stdout.fileno()
        while chunk := os.read(proc.stdout.fileno(), 65536):
            with contextlib.suppress(BrokenPipeError):
                os.write(out, chunk)
    return proc.wait()


if __name__ == "__main__":
    # `python -m cli.supervise watch RUN_DIR`: the event listener in supervisord.conf.
    if sys.argv[1:2] == ["watch"] and len(sys.argv) == 3:
        watch(Path(sys.argv[2]))
    else:
        raise SystemExit("usage: python -m cli.supervise watch RUN_DIR")


def ctl(cfg: Config, *args: str) -> int:
    conf = cfg.run_dir.resolve() / "supervisord.conf"
    if not conf.exists():
        conf = render(cfg)
    proc = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), *args])
    return proc.returncode
