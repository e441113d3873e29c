"""The skeleton every daemon's main() hands its service to (Postfix's single_server_main).

It parses --config, loads and validates the config, sets up logging with the
trace id, opens the shared database, runs the service until SIGTERM/SIGINT and
then lets it finish cleanly.  A daemon's __main__ is three lines.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import logging
import os
import pwd
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common import config as configmod
from common import log as logmod
from common.clock import Clock, SystemClock
from common.config import Config
from common.db import Database

log = logging.getLogger("daemon")


@dataclass
class Context:
    """What a service gets: the config, the database, a clock, and a stop signal."""

    config: Config
    db: Database
    clock: Clock
    stop: asyncio.Event

    def drop_privileges(self) -> None:
        """After binding privileged ports as root, become the configured user."""
        name = self.config.mailroom.user
        if os.getuid() != 0 or not name:
            return
        pw = pwd.getpwnam(name)
        # Codecs load lazily from the Python installation, which the new user
        # may not be able to read (e.g. a pyenv under /root): load them now.
        codecs.lookup("idna")
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        log.info("dropped privileges to %s", name)


Service = Callable[[Context], Awaitable[None]]


def main(process: str, service: Service, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {process}")
    parser.add_argument("--config", help="config file (default $MAILROOM_CONFIG or ./var/mailroom.toml)")
    args = parser.parse_args(argv)
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as exc:
        print(f"{process}: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logmod.setup(process, cfg.mailroom.log_level)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    db = Database(cfg.database_url)
    db.create_schema()
    try:
        asyncio.run(_run(service, cfg, db))
    finally:
        db.close()


async def _run(service: Service, cfg: Config, db: Database) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("starting")
    await service(Context(config=cfg, db=db, clock=SystemClock(), stop=stop))
    log.info("stopped")


async def serve_until_stopped(ctx: Context, servers: list[asyncio.Server], grace: float = 10.0) -> None:
    """Serve until told to stop; then close listeners and give sessions `grace` seconds."""
    await ctx.stop.wait()
    for s in servers:
        s.close()
    for s in servers:
        try:
            await asyncio.wait_for(s.wait_closed(), grace)
        except TimeoutError:
            log.warning("sessions still open after %.0fs; stopping anyway", grace)
