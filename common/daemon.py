"""The skeleton every daemon's main() hands its service to (Postfix's single_server_main).

One order for every daemon, so no daemon can get it wrong:

1. parse --config, load and validate the config, set up logging (to stderr);
2. decide the account to serve as (started as root with no `[mailroom] user`:
   refuse), open the daemon's log file (`[mailroom] log_dir`/PROCESS.log, the
   account's), make the run folder, mail root, database, config and key private;
3. parse each listener setting the daemon declares ONCE into its `Endpoint`s
   (a setting may hold several addresses) and bind them all (an address that
   cannot be bound: one line naming the setting);
4. load the TLS certificate and key (while the key may be root's);
5. drop privileges for good, umask 077;
6. open the database, check it is writable, bring its schema up to date; only
   then listen, so no client can even connect to a process that is still root,
   or that would answer before it can serve;
7. run the service (it serves on the bound sockets) until SIGTERM/SIGINT,
   then let it drain.  SIGHUP (`mailroom reload`) reads the certificate and
   the settings that can change safely again, without closing a listener
   (common/reload.py).

The event loop is uvloop's (libuv; transports, handles and the poller in C:
the listener's per-connection cost is mostly the loop's), unless the
environment says `MAILROOM_EVENT_LOOP=asyncio`: asyncio's own loop, for an
operator who needs to rule the loop out.

A failure in 1-6 is one line on stderr (and in the log file, once it is open)
and a non-zero exit, never a traceback: supervisord passes stderr on to
`mailroom run`'s output and its watcher (cli/watch.py), so the operator sees
why at once.  A daemon's __main__ is a few lines.

The web program runs on this skeleton too, as a *helper* (`main(helper=True)`):
it only reads what the daemons keep, so it leaves the schema to them (step 6's
creation and migration; until they have made it, its feed waits), writes no
heartbeat and no counters, and, started as root with no `[mailroom] user`, stays
root and logs to stderr (privileges.helper_account).  Its listeners are bound in
step 3 by a hook of its own (`bind`: see Binder).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from sqlalchemy.engine import make_url

from common import config as configmod
from common import counters, node, privileges
from common import log as logmod
from common import reload as reloadmod
from common.clock import Clock, for_lab
from common.clock import use as use_clock
from common.config import Config
from common.db import Database
from common.endpoint import BindError, Endpoint, overlapping, v6only
from common.hop_tls import HopTLS
from common.privileges import StartError
from common.tls import ServerTLS

if TYPE_CHECKING:
    # dnspython's resolver takes a tenth of a second to import: loaded by the daemons
    # that look something up (the MTA, the queue manager), when they first do.
    from common import dns as dnsmod

log = logging.getLogger("daemon")

# Exit statuses: sysexits.h's EX_CONFIG for a config that cannot work, EX_CANTCREAT
# for a listener that cannot be bound (supervisord and systemd show the number).
EXIT_CONFIG = 78
EXIT_BIND = 73

SUPERVISOR_STARTSECS = 1  # supervisord's `startsecs` for the daemons (cli/supervise.py)
_STARTED = time.monotonic()  # about when this process began: this module is among its first imports

# The event loop every daemon runs on (see the module docstring).
LOOP_VARIABLE = "MAILROOM_EVENT_LOOP"
LOOPS = ("uvloop", "asyncio")

T = TypeVar("T")


@dataclass
class Context:
    """What a service gets: the config, the database, a clock, a stop signal, the
    listeners and TLS context the skeleton prepared before the switch, and the
    process's one DNS resolver."""

    config: Config
    db: Database
    clock: Clock
    stop: asyncio.Event
    sockets: dict[str, list[socket.socket]] = field(default_factory=dict)
    server_tls: ServerTLS | None = None
    hop_tls: HopTLS | None = None
    dns_resolver: dnsmod.Resolver | None = None

    def resolver(self) -> dnsmod.Resolver:
        """The process's asynchronous, caching resolver (common/dns.py), built once, at
        the first lookup; every component of the process is handed this one."""
        if self.dns_resolver is None:
            from common import dns as dnsmod

            self.dns_resolver = dnsmod.from_settings(resolver_settings(self.config))
        return self.dns_resolver

    def socket(self, key: str) -> list[socket.socket]:
        """The bound sockets for listener setting `key` ("mta.smtp"), one per address,
        all served alike; in-process (tests), where the skeleton bound nothing, the
        addresses are bound now."""
        socks = self.sockets.get(key)
        return socks if socks is not None else bind_all({key: self.config.endpoints(key)})[key]

    def tls(self) -> ssl.SSLContext:
        """The server TLS context, loaded once; a reload changes the certificate it serves."""
        if self.server_tls is None:
            self.server_tls = ServerTLS(
                self.config.resolve(self.config.tls.cert), self.config.resolve(self.config.tls.key)
            )
        return self.server_tls.context

    def hops(self) -> HopTLS | None:
        """TLS for the hops between hosts (common/hop_tls.py), loaded once; None when `[cluster] ca` is off."""
        if self.hop_tls is None and self.config.cluster.ca:
            self.hop_tls = HopTLS.from_config(self.config)
        return self.hop_tls


Service = Callable[[Context], Awaitable[None]]


@dataclass(frozen=True)
class Bound:
    """What a program's `bind` hook prepared before the switch: its sockets by setting key
    (they join Context.sockets) and the certificate they serve (Context.server_tls)."""

    sockets: dict[str, list[socket.socket]]
    tls: ServerTLS | None = None


# A hook for a program whose listeners are more than listener settings, run as root in
# step 3: the web program's public http and https and its admin page are each on or
# off, share one certificate, and each has its own line (and exit status: cannot_start)
# when it cannot start, which the skeleton's one BindError line and status cannot say.
Binder = Callable[[Config], Bound]


def resolver_settings(cfg: Config) -> dnsmod.Settings:
    """What the resolver is built from: `[dns]`, pointed at the supervised unbound
    when `[dns] resolver = "unbound"` (cli/unbound.py starts it)."""
    from common import dns as dnsmod

    d = cfg.dns
    nameservers = (d.unbound_listen,) if d.resolver == "unbound" else tuple(d.nameservers)
    limits = dnsmod.CacheLimits(
        entries=d.cache_entries, max_ttl=d.max_ttl, max_negative_ttl=d.max_negative_ttl, failure_ttl=d.failure_ttl,
    )
    return dnsmod.Settings(nameservers=nameservers, timeout=d.timeout, limits=limits)


def setting_name(key: str) -> str:
    """'mta.smtp' -> '[mta] smtp', the way the operator reads it in the config file."""
    section, _, name = key.partition(".")
    return f"[{section}] {name}"


def bind_all(endpoints: dict[str, list[Endpoint]], *, reuse_port: bool = False) -> dict[str, list[socket.socket]]:
    """Bind every address of every listener (setting key -> endpoints); BindError (one
    line naming the setting and the address) if one cannot be, and none stays bound.
    `reuse_port`: TCP addresses are shared with the other processes of one daemon
    (SO_REUSEPORT), yet two settings of this process still may not overlap."""
    if reuse_port:
        _refuse_overlap(endpoints)
    bound: dict[str, list[socket.socket]] = {}
    try:
        for key, addresses in endpoints.items():
            bound[key] = []
            for endpoint in addresses:
                try:
                    bound[key].append(endpoint.bind(v6only=v6only(endpoint, addresses), reuse_port=reuse_port))
                except BindError as exc:
                    raise BindError(f"{setting_name(key)} = {exc}") from None
    except BaseException:
        for socks in bound.values():
            for s in socks:
                s.close()
        raise
    return bound


def _refuse_overlap(endpoints: dict[str, list[Endpoint]]) -> None:
    every = [(key, e, v6only(e, addresses)) for key, addresses in endpoints.items() for e in addresses]
    try:
        clash = overlapping([(e, only6) for _, e, only6 in every])
    except OSError as exc:
        raise BindError(f"cannot resolve a listener address: {exc}") from None
    if clash is not None:
        (first_key, first, _), (key, second, _) = every[clash[0]], every[clash[1]]
        raise BindError(
            f"{setting_name(key)} = {second}: address already in use (by {setting_name(first_key)} = {first})"
        )


def main(
    process: str,
    service: Service,
    argv: list[str] | None = None,
    *,
    listeners: Sequence[str] = (),
    tls: bool = False,
    writes_mail: bool = False,
    preload: Sequence[str] = (),
    shares_listeners: bool = False,
    helper: bool = False,
    bind: Binder | None = None,
) -> None:
    """Run `service` as daemon `process`, serving on the listener settings `listeners`
    ("mta.smtp", ...); `tls` loads the certificate before the switch; `writes_mail`
    lets `[mailroom] mail_group` read what it writes; `preload` names modules the
    service imports late (on first use), loaded before the switch all the same;
    `shares_listeners`: several processes of this daemon may serve the same
    addresses, each started with `--instance K`; `helper`: a program beside the
    daemons (see the module docstring); `bind`: its own listeners (Binder)."""
    parser = argparse.ArgumentParser(prog=f"python -m {process}")
    parser.add_argument("--config", help="config file (default $MAILROOM_CONFIG or ./var/mailroom.toml)")
    if shares_listeners:
        parser.add_argument(
            "--instance", type=int, metavar="K",
            help="serve as process K of several sharing the TCP addresses (SO_REUSEPORT); "
            "Unix sockets are served by process 0 alone",
        )
    args = parser.parse_args(argv)
    instance: int | None = getattr(args, "instance", None)
    if instance is not None and instance < 0:
        parser.error("--instance: expected 0 or more")
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as exc:
        print(f"{process}: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logmod.setup(process, cfg.mailroom.log_level, cfg.mailroom.log_format)
    try:
        new_loop = loop_factory()
        ctx = _prepare(cfg, listeners, tls=tls, writes_mail=writes_mail, preload=preload, instance=instance,
                       process=process, helper=helper, bind=bind)
    except BindError as exc:
        cannot_start(str(exc), EXIT_BIND)
    except StartError as exc:
        cannot_start(f"{process}: {exc}", EXIT_CONFIG)
    try:
        # Each process of a shared daemon keeps its own counters file; the web program sums them.
        name = process if instance is None else f"{process}_{instance}"
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(_run(name, service, ctx, helper=helper))
    finally:
        ctx.db.close()


def loop_choice(environ: Mapping[str, str] = os.environ) -> str:
    """The event loop the daemons run on: "uvloop", or "asyncio" when
    MAILROOM_EVENT_LOOP=asyncio; StartError for any other value."""
    choice = environ.get(LOOP_VARIABLE, "") or "uvloop"
    if choice not in LOOPS:
        raise StartError(f"{LOOP_VARIABLE}={choice}: must be one of {', '.join(LOOPS)}")
    return choice


def loop_factory(environ: Mapping[str, str] = os.environ) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes the daemons' event loop (see loop_choice)."""
    if loop_choice(environ) == "asyncio":
        return asyncio.SelectorEventLoop  # asyncio's own, whatever event loop policy is set
    import uvloop  # only here: MAILROOM_EVENT_LOOP=asyncio does not need it importable

    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new_loop


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to its end on the loop the daemons use (for tools that serve the
    way a daemon does, such as the listener benchmark's engine sink)."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def cannot_start(line: str, status: int) -> NoReturn:
    """Say why in one line and exit: on stderr (under supervisord, `mailroom run`'s
    watcher keeps a program's last line of stderr), and in the log file if open."""
    if logmod.file_path() is not None:
        log.error("cannot start: %s", line)
    sys.stderr.write(line + "\n")  # one write: the watcher reads it as one piece
    sys.stderr.flush()
    if os.environ.get("SUPERVISOR_ENABLED"):
        # supervisord takes an exit within `startsecs` (1 s) of the start for a failed
        # start and tries ten more times, over a minute, before it gives up; an exit
        # after it, with a status it expects, is final, and the watcher stops the suite
        # at once.  So the daemon stays up to the end of that second.
        time.sleep(max(0.0, _STARTED + SUPERVISOR_STARTSECS + 0.1 - time.monotonic()))
    raise SystemExit(status)


def _prepare(
    cfg: Config, listeners: Sequence[str], *, tls: bool, writes_mail: bool, preload: Sequence[str],
    instance: int | None = None, process: str = "daemon", helper: bool = False, bind: Binder | None = None,
) -> Context:
    # None: a helper started as root with no [mailroom] user, which stays root.
    acct = privileges.helper_account(cfg) if helper else privileges.account(cfg)
    if acct is not None:
        privileges.open_log(cfg, acct, process)  # every process of one program appends to one file
        privileges.secure(cfg, acct)
    endpoints = {key: cfg.endpoints(key) for key in listeners}  # each setting parsed once
    if instance:
        # A Unix socket cannot be shared: process 0 serves it, the others TCP alone.
        endpoints = {key: [e for e in addresses if not e.is_unix] for key, addresses in endpoints.items()}
    sockets = bind_all(endpoints, reuse_port=instance is not None)
    for addresses in endpoints.values():
        for endpoint in addresses:
            if endpoint.is_unix and acct is not None:
                privileges.hand_over(endpoint.path, acct)
    own = bind(cfg) if bind is not None else Bound({})
    server_tls = own.tls
    if tls:
        try:
            server_tls = ServerTLS(cfg.resolve(cfg.tls.cert), cfg.resolve(cfg.tls.key))
        except (OSError, ssl.SSLError) as exc:
            raise StartError(f"[tls] cert = {cfg.tls.cert}, key = {cfg.tls.key}: {exc}") from None
    try:  # the hops between hosts (common/hop_tls.py), while the key may be root's
        hop_tls = HopTLS.from_config(cfg)
    except (OSError, ssl.SSLError) as exc:
        c = cfg.cluster
        raise StartError(f"[cluster] ca = {c.ca}, cert = {c.cert}, key = {c.key}: {exc}") from None
    # The database driver (sqlite3, psycopg) is loaded now: after the switch the
    # Python installation may be closed to the Mailroom user.
    make_url(cfg.database_url).get_dialect().import_dbapi()
    for name in preload:
        importlib.import_module(name)
    if not helper:
        from common import schema  # (alembic: loaded here, not by every command that imports this module)

        schema.scripts()  # the migration scripts, read while the code is surely readable
    if acct is not None:
        mail_group = writes_mail and acct.mail_gid is not None
        privileges.become(acct, umask=privileges.MAIL_UMASK if mail_group else privileges.UMASK)
    problem = privileges.writable_problem(cfg, acct) if acct is not None else None
    if problem:
        raise StartError(problem)
    db = Database(cfg.database_url)
    if not helper:
        db.create_schema()
    # Only now can a client connect: the first byte it sends reaches the Mailroom
    # user, and a process that answers can also serve (its tables exist).
    for key, socks in sockets.items():
        for endpoint, sock in zip(endpoints[key], socks, strict=True):
            try:
                endpoint.listen(sock)
            except BindError as exc:
                raise BindError(f"{setting_name(key)} = {exc}") from None
    clock = for_lab(cfg.lab.time_warp, cfg.lab.time_warp_since)
    use_clock(clock)  # for the times written without one (column defaults)
    return Context(
        config=cfg, db=db, clock=clock, stop=asyncio.Event(),
        sockets={**sockets, **own.sockets}, server_tls=server_tls, hop_tls=hop_tls,
    )


async def _run(process: str, service: Service, ctx: Context, *, helper: bool = False) -> None:
    # The Event was made outside the loop; asyncio binds it to the running loop at first use.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctx.stop.set)
    loop.add_signal_handler(signal.SIGHUP, hangup, ctx)
    log.info("starting (event loop: %s)", "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio")
    if helper:  # no heartbeat, no counters (see the module docstring)
        await service(ctx)
    else:
        await _serve_as_daemon(process, service, ctx)
    log.info("stopped")


async def _serve_as_daemon(process: str, service: Service, ctx: Context) -> None:
    cfg = ctx.config
    # This node's row for `mailroom status --cluster` (common/node.py).
    beating = asyncio.create_task(node.keep_beating(
        ctx.db, ctx.clock, cfg.node, cfg.mailroom.roles, cfg.queue.lease / 3, ctx.stop,
    ))
    try:
        # Counted in memory, saved for the web program's /metrics (common/counters.py).
        async with counters.saved(ctx.config.run_dir / "metrics" / f"{process}.json"):
            await service(ctx)
    finally:
        beating.cancel()


def hangup(ctx: Context) -> None:
    """`mailroom reload`: the settings that can change safely, and the certificate (common/reload.py)."""
    ctx.config = reloadmod.reread(ctx.config)
    if ctx.server_tls is not None:
        reloadmod.certificate(ctx.server_tls, ctx.config)


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
