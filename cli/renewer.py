"""The certificate renewer `mailroom run` supervises (the program `renew`) when `[acme] directory` is set.

`python -m cli.renewer --config FILE` sleeps until the ACME certificate has
lived two thirds of its lifetime (day 60 of 90), renews it, and has every
daemon reload it (`mailroom reload`): nobody has to remember, and no daemon
restarts.  A failed attempt (the ACME server down, refusing, or rate
limiting us with a 429) is one log line saying why; the current certificate
stays in place, and the next attempt waits `[acme] retry_schedule` (1 minute,
5, 30, 2 hours, then every 6 hours), or longer when the server's Retry-After
asks.  With a third of the lifetime left when renewal starts, that is weeks
of attempts before the certificate expires.

It renews only the certificate ACME gave us (cli/cert.py's issued.json), not
one the operator installed by hand, and it renews early when the certificate
no longer names every name it should (a domain was added).  SIGHUP (which
`mailroom reload` sends) makes it look again at once, with the config read
again; SIGTERM stops it.

Each attempt is a child process, `mailroom cert renew --no-reload`, so the
ACME library and its HTTP client are loaded only while an attempt runs, and
an attempt that crashes costs only itself.  The child runs as this process
does (root under supervisord, as certbot does): it cannot be the Mailroom
user, because a Python installation closed to that user (a pyenv under
/root) cannot even start for it, and the exchange loads modules as it goes,
so dropping root after loading, as the daemons do, is not enough either.  It
writes the certificate and keys owned by the Mailroom user, mode 0600, and
this process then tells every daemon to reload through supervisord, which
Dovecot's master (root's) needs anyway.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
import subprocess
import sys
import threading
from types import FrameType

from cli import cert, supervise
from common import config as configmod
from common import log as logmod
from common import privileges
from common.tls import read_certificate

log = logging.getLogger("renew")

# With nothing to renew (ACME off, or a certificate installed by hand), look again this often.
IDLE = 3600.0


class Renewer:
    def __init__(self, cfg: configmod.Config) -> None:
        self.cfg = cfg
        self.failures = 0
        self.wake = threading.Event()
        self.stopping = False
        self._said = ""  # the last "nothing to do" line, not repeated every hour

    def run(self) -> None:
        while not self.stopping:
            wait = self.step()
            self.wake.wait(wait)
            self.wake.clear()
            if not self.stopping:
                self.reread()

    def reread(self) -> None:
        try:
            self.cfg = configmod.load(self.cfg.path)
        except configmod.ConfigError as exc:
            log.error("config error, keeping the previous settings: %s", exc)

    def step(self) -> float:
        """Renew when due; the seconds to wait before the next look."""
        cfg = self.cfg
        if not cfg.acme.directory:
            return self._idle("ACME is off ([acme] directory is empty)")
        when, why = cert.due(cfg)
        if when is None:
            return self._idle(f"nothing to renew: {why}")
        now = dt.datetime.now(dt.UTC)
        if when > now:
            self._idle(f"next renewal at {when:%Y-%m-%d %H:%M} UTC: {why}")
            return min((when - now).total_seconds(), IDLE)
        self._said = ""
        log.info("renewing: %s", why)
        before = _fingerprint(cfg)
        if self.attempt():
            self.failures = 0
            if _fingerprint(cfg) != before:
                log.info("renewed; reloading the daemons")
                supervise.reload(cfg, skip=("renew",))
                return 0.0  # look again: the next due time comes from the new certificate
            # The child found nothing due (the files changed meanwhile): look again, not at once.
            return cfg.acme.retry_schedule[0]
        self.failures += 1
        schedule = cfg.acme.retry_schedule
        wait = schedule[min(self.failures, len(schedule)) - 1]
        last = cert.last_attempt(cert.Files.of(cfg))
        asked = last.get("retry_after")
        if isinstance(asked, int | float) and asked > wait:
            wait = float(asked)  # the server said how long (a 429's Retry-After)
        log.error("renewal attempt %d failed: %s; the current certificate stays (%s); next attempt in %.0f s",
                  self.failures, last.get("error") or "see the lines above", _expiry(cfg), wait)
        return wait

    def attempt(self) -> bool:
        """`mailroom cert renew --no-reload` in a child; its lines go to our log."""
        argv = [sys.executable, "-m", "cli.main", "--config", str(self.cfg.path), "cert", "renew", "--no-reload"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=600,
                                  cwd=str(self.cfg.base))
        except subprocess.TimeoutExpired:
            log.error("the renewal attempt took more than 10 minutes and was stopped")
            return False
        for line in (proc.stdout + proc.stderr).splitlines():
            if line.strip():
                log.info("%s", line)
        return proc.returncode == 0

    def _idle(self, line: str) -> float:
        if line != self._said:
            log.info("%s", line)
            self._said = line
        return IDLE

    def signal(self, signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGHUP:
            self.stopping = True
        self.wake.set()


def _fingerprint(cfg: configmod.Config) -> str:
    try:
        return read_certificate(cfg.resolve(cfg.tls.cert)).fingerprint
    except (OSError, ValueError):
        return ""


def _expiry(cfg: configmod.Config) -> str:
    try:
        return f"valid until {read_certificate(cfg.resolve(cfg.tls.cert)).not_after:%Y-%m-%d %H:%M} UTC"
    except (OSError, ValueError) as exc:
        return f"unreadable: {exc}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cli.renewer")
    parser.add_argument("--config", help="config file (default $MAILROOM_CONFIG or ./var/mailroom.toml)")
    args = parser.parse_args(argv)
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as exc:
        print(f"renew: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logmod.setup("renew", cfg.mailroom.log_level, cfg.mailroom.log_format)
    try:  # its own log file, as every daemon's
        privileges.open_helper_log(cfg, "renew")
    except privileges.StartError as exc:
        print(f"renew: {exc}", file=sys.stderr)
        raise SystemExit(78) from None
    renewer = Renewer(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, renewer.signal)
    log.info("starting (renewal at two thirds of the lifetime; retries %s)",
             ", ".join(f"{s:.0f}s" for s in cfg.acme.retry_schedule))
    renewer.run()
    log.info("stopped")


if __name__ == "__main__":
    main()
