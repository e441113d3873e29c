"""`python -m cli.schedule`: the program that runs the daily jobs, cron's part of the suite.

supervisord runs it beside the daemons (the program `schedule`).  Each job is
a `mailroom` command run at a time of day from the config: the backup at
`[backup] at`, the DMARC aggregate reports at `[dmarc] report_at`.  A job is
the same command an operator would type, in a process of its own, so it does
what the command does (a backup, run as root, reads the keys and then becomes
the Mailroom user) and a job that fails or hangs costs only itself; its
outcome is one log line here, and the command records its own result
(RUN_DIR/backup.json for the backup: `mailroom status`, the status checks,
/metrics).

A job missed while the suite was stopped runs at its next time; the status
checks say when the last backup is too old.  With nothing to run it just waits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from common import config as configmod
from common import log as logmod
from common import privileges

log = logging.getLogger("schedule")

# A job still running after this long is stopped (a backup of a large installation takes minutes, not hours).
JOB_TIMEOUT = 6 * 3600.0


@dataclass(frozen=True)
class Job:
    name: str
    at: str  # HH:MM or HH:MM:SS, local time
    argv: tuple[str, ...]  # the `mailroom` command's arguments

    def next_run(self, after: dt.datetime) -> dt.datetime:
        """The first moment at `at` strictly after `after` (local, naive times)."""
        parts = [int(x) for x in self.at.split(":")]
        h, m, s = (parts + [0])[:3]
        candidate = after.replace(hour=h, minute=m, second=s, microsecond=0)
        if candidate <= after:
            candidate += dt.timedelta(days=1)
        return candidate


def jobs(cfg: configmod.Config) -> list[Job]:
    out = []
    if cfg.backup.at:
        out.append(Job("backup", cfg.backup.at, ("backup",)))
    if cfg.dmarc.reports and cfg.dmarc.report_at:
        out.append(Job("dmarc reports", cfg.dmarc.report_at, ("dmarc", "report")))
    return out


def run_job(config: Path, job: Job) -> int:
    cmd = [sys.executable, "-m", "cli.main", "--config", str(config), *job.argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.error("%s: still running after %.0f s; stopped", job.name, JOB_TIMEOUT)
        return 1
    said = " ".join((proc.stdout.strip().splitlines() or [""])[-1:] + proc.stderr.strip().splitlines()[-1:])
    if proc.returncode == 0:
        log.info("%s: done: %s", job.name, said)
    else:
        log.error("%s: failed (exit %d): %s", job.name, proc.returncode, said)
    return proc.returncode


def serve(config: Path, planned: list[Job], stop: threading.Event) -> None:
    if not planned:
        log.info("nothing scheduled ([backup] at and [dmarc] report_at are empty)")
    for job in planned:
        log.info("%s daily at %s", job.name, job.at)
    next_at = {job: job.next_run(dt.datetime.now()) for job in planned}
    while not stop.is_set():
        if not next_at:
            while not stop.wait(60.0):
                pass
            break
        job = min(next_at, key=lambda j: next_at[j])
        wait = (next_at[job] - dt.datetime.now()).total_seconds()
        if wait > 0:
            # In steps of a minute at most: a clock set forward (NTP, DST) is noticed soon.
            stop.wait(min(wait, 60.0))
            continue
        run_job(config, job)
        next_at[job] = job.next_run(dt.datetime.now())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cli.schedule")
    parser.add_argument("--config", help="config file (default $MAILROOM_CONFIG or ./var/mailroom.toml)")
    args = parser.parse_args(argv)
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as exc:
        print(f"schedule: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logmod.setup("schedule", cfg.mailroom.log_level, cfg.mailroom.log_format)
    try:  # its own log file, as every daemon's
        privileges.open_helper_log(cfg, "schedule")
    except privileges.StartError as exc:
        print(f"schedule: {exc}", file=sys.stderr)
        raise SystemExit(78) from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(cfg.path, jobs(cfg), stop)
    log.info("stopped")


if __name__ == "__main__":
    main()
