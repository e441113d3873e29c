"""What stays of `mailroom run` while the suite runs: supervisord's parent, and its event listener.

`python -m cli.watch run RUN_DIR relay|direct SUPERVISORD-ARGV...` (what
`mailroom run` becomes after its checks) runs supervisord, passes on the
signals that stop it, relays its output when supervisord could not reopen
ours, and exits with status 1 and a daemon's line when the listener below
stopped the suite.

`python -m cli.watch listen RUN_DIR` is the event listener.  A daemon that
cannot start (a folder it cannot write, a key that does not load) exits
with status 2, 73 or 78 after saying why in one line on its standard error.
The programs' logs are files of their own, so what a program prints reaches
supervisord only when it cannot start or crashes; supervisord passes each such
piece on as an event (PROCESS_LOG), and the listener keeps each program's last
line.  When a daemon exits with one of those statuses, or supervisord gives up
on it, the listener writes that line (RUN_DIR/PROGRAM.failed), records which
program (RUN_DIR/stopped) and shuts supervisord down, so `mailroom run` ends
with the line and status 1 instead of a loop of restarts.  Nothing a program
prints is taken for a command: supervisord's capture mode, which would obey
tags in the output, is off.  Both import nothing but the standard library:
they run for as long as the suite does, and should cost little memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

PROGRAMS = ("mda", "qmgr", "mta", "msa")


def failure_file(run_dir: Path, program: str) -> Path:
    """Where a daemon that could not start leaves its one line for `mailroom run`."""
    return run_dir / f"{program}.failed"


def last_line(text: str) -> str:
    """The last line of `text` that is not blank (what a program said last)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def watch(run_dir: Path) -> None:
    """supervisord event listener (its protocol on stdin/stdout): keeps the end of what
    each program printed (PROCESS_LOG events); when a daemon exits with a status that
    says it cannot start, or supervisord gives up on it, writes the daemon's last line
    (RUN_DIR/PROGRAM.failed), records which (RUN_DIR/stopped) and shuts supervisord down."""
    said: dict[str, str] = {}  # program -> the end of its output, a few KiB at most
    stdin = sys.stdin.buffer
    while True:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        header = dict(f.split(":", 1) for f in stdin.readline().decode().split())
        payload = stdin.read(int(header["len"])).decode("utf-8", "replace")
        first, _, data = payload.partition("\n")
        fields = dict(f.split(":", 1) for f in first.split() if ":" in f)
        event = header["eventname"]
        # By program (the group): with `[mta] processes` > 1 the processes are mta_0, mta_1, ...
        program = fields.get("groupname", "")
        if event.startswith("PROCESS_LOG") and program in PROGRAMS:
            said[program] = (said.get(program, "") + data)[-4096:]
        gave_up = event == "PROCESS_STATE_FATAL" or (
            event == "PROCESS_STATE_EXITED" and fields.get("expected") == "1"
        )
        if gave_up and program in PROGRAMS:
            stop = run_dir / "stopped"
            if not stop.exists():
                why = last_line(said.get(program, ""))
                if why:
                    failure_file(run_dir, program).write_text(why + "\n")
                stop.write_text(program + "\n")
                os.kill(os.getppid(), signal.SIGTERM)
        sys.stdout.write("RESULT 2\nOK")
        sys.stdout.flush()


def run(run_dir: Path, argv: list[str], *, relay: bool) -> int:
    """Run supervisord (`argv`) until it stops; 1 with the failed daemon's line when the
    listener stopped the suite, else supervisord's status."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE if relay else None,
                            stderr=subprocess.STDOUT if relay else None)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    if proc.stdout is not None:
        out = sys.stdout.fileno()
        while chunk := os.read(proc.stdout.fileno(), 65536):
            with contextlib.suppress(BrokenPipeError):
                os.write(out, chunk)
    status = proc.wait()
    stop = run_dir / "stopped"
    if not stop.exists():
        return status
    program = stop.read_text().strip()
    try:
        why = failure_file(run_dir, program).read_text().strip()
    except OSError:
        why = f"{program} stopped and could not be started again (its output above says why)"
    print(f"mailroom run: {why}", file=sys.stderr)
    return 1


def main(args: list[str]) -> int:
    if len(args) == 2 and args[0] == "listen":
        watch(Path(args[1]))
        return 0
    if len(args) > 3 and args[0] == "run" and args[2] in ("relay", "direct"):
        return run(Path(args[1]), args[3:], relay=args[2] == "relay")
    print("usage: python -m cli.watch listen RUN_DIR | run RUN_DIR relay|direct ARGV...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
