"""The web program: a small HTTP/1.1 server for what mail clients and operators fetch over HTTP.

It serves the autoconfig XML (web/autoconfig.py), Outlook's Autodiscover
(web/autodiscover.py) and an Apple profile (web/mobileconfig.py), and, over the shared
database, the live page at `/` and Prometheus metrics at `/metrics`
(web/live.py).  More pages are added by putting a handler in `ROUTES` (or
passing a table to `serve`).  It only reads the config and the database: it
never talks to the MSA, MTA or MDA, and never writes; the admin page, on a
listener of its own over TLS (web/admin.py), is the one part that changes things.

The HTTP exchange itself (request, response, limits) is web/http.py.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import logging
import os
import pwd
import signal
import socket
import ssl
import sys
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING

from common import clock, privileges
from common import config as configmod
from common import log as logmod
from common.config import Config
from common.daemon import bind_all
from common.endpoint import BindError
from web import autoconfig, autodiscover, mobileconfig
from web.http import MAX_HEAD, Handler, Request, Response, handle
from web.public import Public

if TYPE_CHECKING:
    from web.admin import AdminSite
    from web.live import Live

log = logging.getLogger("web")


def _domain(cfg: Config, request: Request, address: str, prefix: str) -> str:
    """The local domain of `address`, else of the Host (`prefix`DOMAIN), else the first local one."""
    domain = address.rsplit("@", 1)[1].lower() if "@" in address else ""
    if not cfg.is_local_domain(domain):
        host = request.headers.get("host", "").rsplit(":", 1)[0].lower().removeprefix(prefix)
        domain = host if cfg.is_local_domain(host) else cfg.mailroom.domains[0]
    return domain


def _address_asked(request: Request) -> str:
    return ((request.query.get("emailaddress") or request.query.get("email") or [""])[0]).strip().lower()


def autoconfig_xml(cfg: Config, request: Request) -> Response:
    """Mozilla autoconfig for the domain of ?emailaddress=, else of the Host (autoconfig.DOMAIN)."""
    domain = _domain(cfg, request, _address_asked(request), "autoconfig.")
    xml = autoconfig.render_xml(autoconfig.settings(cfg), domain)
    return Response(HTTPStatus.OK, xml.encode(), "application/xml; charset=utf-8")


def autodiscover_xml(cfg: Config, request: Request) -> Response:
    """Outlook's Autodiscover (POX): POSTed request, or GET ?emailaddress=; errors as Autodiscover errors."""
    if request.method == "POST":
        address, schema = autodiscover.read_request(request.body)
    else:
        address, schema = _address_asked(request), ""
    if schema and schema != autodiscover.OUTLOOK_SCHEMA:
        xml = autodiscover.render_error(autodiscover.SCHEMA_NOT_SERVED, "Only the Outlook schema (2006a) is served")
    elif request.method == "POST" and not address:
        xml = autodiscover.render_error(autodiscover.INVALID_REQUEST, "No EMailAddress in the request")
    elif address and ("@" not in address or not cfg.is_local_domain(address.rsplit("@", 1)[1])):
        xml = autodiscover.render_error(autodiscover.INVALID_REQUEST, "Not an address of this mail host")
    else:
        xml = autodiscover.render(autoconfig.settings(cfg), address)
    return Response(HTTPStatus.OK, xml.encode(), "application/xml; charset=utf-8")


def apple_profile(cfg: Config, request: Request) -> Response:
    """An unsigned Apple configuration profile for ?emailaddress= (or the Host's domain)."""
    address = _address_asked(request)
    domain = _domain(cfg, request, address, "autoconfig.")
    if not address.endswith("@" + domain):
        address = ""  # not ours: the device asks for it
    try:
        body = mobileconfig.render(autoconfig.settings(cfg), domain, address)
    except LookupError as exc:
        return Response(HTTPStatus.NOT_FOUND, f"{exc}\n".encode())
    return Response(HTTPStatus.OK, body, mobileconfig.CONTENT_TYPE,
                    headers={"Content-Disposition": f'attachment; filename="{domain}.mobileconfig"'})


ROUTES: dict[str, Handler] = {
    "/.well-known/autoconfig/mail/config-v1.1.xml": autoconfig_xml,
    "/mail/config-v1.1.xml": autoconfig_xml,
    # Outlook asks for either spelling.
    "/autodiscover/autodiscover.xml": autodiscover_xml,
    "/Autodiscover/Autodiscover.xml": autodiscover_xml,
    "/mail.mobileconfig": apple_profile,
}
def bind(cfg: Config) -> list[socket.socket]:
    """Every address of `[web] listen` (one or a list, as the daemons' listener
    settings), bound alike; BindError names the one that cannot be."""
    socks = bind_all({"web.listen": cfg.endpoints("web.listen")})["web.listen"]
    for sock in socks:
        sock.setblocking(False)
    return socks


async def serve(cfg: Config, sock: socket.socket, routes: Mapping[str, Handler] = ROUTES) -> asyncio.Server:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle(cfg, routes, reader, writer)

    return await asyncio.start_server(client, sock=sock, limit=MAX_HEAD)


def drop_privileges(user: str) -> None:
    """After binding (port 80 perhaps) as root, become [mailroom] user, as every daemon does."""
    if os.getuid() != 0 or not user:
        return
    pw = pwd.getpwnam(user)
    codecs.lookup("idna")  # codecs load lazily, maybe from a folder the user cannot read
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    log.info("dropped privileges to %s", user)


async def run(cfg: Config, socks: list[socket.socket], live: Live, public: Public | None = None,
              admin: AdminSite | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    routes = {**ROUTES, **live.routes()}
    servers = [await serve(cfg, sock, routes) for sock in socks]
    # [web] http and https (the Internet's), and SIGHUP's reload (web/public.py).
    public = public or Public(cfg, [], [], None)
    servers += await public.serve(ROUTES)
    servers += await admin.serve() if admin is not None else []  # the admin page, TLS only (web/admin.py)

    def reload() -> None:  # `mailroom reload`: the MTA-STS policy, and the certificate for both TLS listeners
        public.reload()
        if admin is not None:
            admin.reload(public.config)

    loop.add_signal_handler(signal.SIGHUP, reload)
    tail = asyncio.create_task(live.feed.run(stop))
    log.info("http on %s%s", ", ".join(cfg.web.listen),
             f"; admin page (https) on {', '.join(cfg.web.admin)}" if admin is not None else "")
    await stop.wait()
    for server in servers:
        server.close()
    await tail  # ends the live pages' streams
    for server in servers:
        await server.wait_closed()
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    """`python -m web`: not the daemons' skeleton, which migrates the database at
    start (most of a daemon's start-up time); the web program only reads it."""
    parser = argparse.ArgumentParser(prog="python -m web")
    parser.add_argument("--config", help="config file (default $MAILROOM_CONFIG or ./var/mailroom.toml)")
    args = parser.parse_args(argv)
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as exc:
        print(f"web: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logmod.setup("web", cfg.mailroom.log_level, cfg.mailroom.log_format)
    try:  # its own log file, as every daemon's
        privileges.open_helper_log(cfg, "web")
    except privileges.StartError as exc:
        print(f"web: {exc}", file=sys.stderr)
        raise SystemExit(78) from None
    # The daemons' now (lab time in a lab): the queue's ages are measured against it.
    clock.use(clock.for_lab(cfg.lab.time_warp, cfg.lab.time_warp_since))
    try:
        socks = bind(cfg)
        public = Public.prepare(cfg)
    except BindError as exc:  # names the setting and the address: "[web] listen = 127.0.0.1:8025: ..."
        print(f"web: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    # Before dropping privileges: the imports behind it (sqlite3 and the rest of
    # the standard library) may live where only root can read.  Read only: the
    # daemons create and migrate the schema; until they have, the feed retries.
    from common.db import Database
    from web.admin import site
    from web.live import Live

    live = Live(Database(cfg.database_url, threads=2))
    try:
        admin = site(cfg, live.db)  # binds [web] admin and loads the TLS key, before the switch
    except BindError as exc:
        print(f"web: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except (OSError, ssl.SSLError) as exc:
        print(f"web: [web] admin needs TLS: [tls] cert = {cfg.tls.cert}, key = {cfg.tls.key}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    drop_privileges(cfg.mailroom.user)
    asyncio.run(run(cfg, socks, live, public, admin))
