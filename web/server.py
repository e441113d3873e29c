"""The web program: a small HTTP/1.1 server for what mail clients and operators fetch over HTTP.

It serves the autoconfig XML (web/autoconfig.py), Outlook's Autodiscover
(web/autodiscover.py) and an Apple profile (web/mobileconfig.py), and, over the shared
database, the live page at `/` and Prometheus metrics at `/metrics`
(web/live.py).  More pages are added by putting a handler in `ROUTES` (or
passing a table to `serve`).  It only reads the config and the database: it
never talks to the MSA, MTA or MDA, and never writes; the admin page, on a
listener of its own over TLS (web/admin.py), is the one part that changes things.

It runs on the daemons' skeleton (common/daemon.py, web/__main__.py) as a helper
that leaves the schema to the daemons: `bind` prepares its listeners before the
switch to the Mailroom user, `run` serves on them.

The HTTP exchange itself (request, response, limits) is web/http.py.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Mapping
from http import HTTPStatus

from common.config import Config
from common.daemon import Bound, Context, bind_all, cannot_start, hangup
from common.endpoint import BindError
from common.tls import ServerTLS
from web import admin, autoconfig, autodiscover, live, mobileconfig, public
from web.http import MAX_HEAD, Handler, Request, Response, handle

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


# A listener that cannot be bound or a certificate that does not load: status 1, not
# the daemons' 73 or 78, which supervisord takes for "cannot start, do not retry"
# (cli/supervise.py) and which stop the whole suite for the four daemons
# (cli/watch.py); the web program is retried like any program beside them.
EXIT_LISTENER = 1


def bind(cfg: Config) -> Bound:
    """Before the switch (the skeleton's Binder, common/daemon.py): bind `[web] listen`, the
    public `[web] http` and `[web] https` (web/public.py) and the admin page's `[web] admin`
    (web/admin.py), load the certificate the two TLS listeners share, and read what is read
    late; a problem is one line naming the setting, and status 1."""
    try:
        sockets = bind_all({"web.listen": cfg.endpoints("web.listen")})
        sockets.update(public.bind(cfg))
        cert, key = cfg.resolve(cfg.tls.cert), cfg.resolve(cfg.tls.key)
        tls = _certificate(cfg, f"[web] https: cannot load {cert} with {key}") if cfg.web.https else None
        if cfg.web.admin:
            sockets.update({"web.admin": admin.bind(cfg)})
            tls = tls or _certificate(cfg, f"[web] admin needs TLS: [tls] cert = {cfg.tls.cert}, key = {cfg.tls.key}")
    except BindError as exc:  # names the setting and the address: "[web] listen = 127.0.0.1:8025: ..."
        cannot_start(f"web: {exc}", EXIT_LISTENER)
    for socks in sockets.values():
        for sock in socks:
            sock.setblocking(False)
    live.page()  # read now, as root perhaps: the package may not be readable later
    return Bound(sockets, tls)


def _certificate(cfg: Config, what: str) -> ServerTLS:
    """The `[tls]` certificate, replaceable while it serves (SIGHUP)."""
    try:
        return ServerTLS(cfg.resolve(cfg.tls.cert), cfg.resolve(cfg.tls.key))
    except OSError as exc:  # ssl.SSLError is an OSError
        cannot_start(f"web: {what}: {exc}", EXIT_LISTENER)


async def serve(cfg: Config, sock: socket.socket, routes: Mapping[str, Handler] = ROUTES) -> asyncio.Server:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle(cfg, routes, reader, writer)

    return await asyncio.start_server(client, sock=sock, limit=MAX_HEAD)


async def run(ctx: Context) -> None:
    """Serve on what `bind` prepared until the skeleton says stop.  Read only: the daemons
    create and migrate the schema; until they have, the live feed retries."""
    cfg = ctx.config
    pages = live.Live(ctx.db)
    routes = {**ROUTES, **pages.routes()}
    servers = [await serve(cfg, sock, routes) for sock in ctx.sockets["web.listen"]]
    # [web] http and https (the Internet's, web/public.py).
    internet = public.Public(cfg, ctx.sockets["web.http"], ctx.sockets["web.https"], ctx.server_tls)
    servers += await internet.serve(ROUTES)
    site = None
    if "web.admin" in ctx.sockets and ctx.server_tls is not None:  # the admin page, TLS only (web/admin.py)
        site = admin.AdminSite(cfg, ctx.db, ctx.sockets["web.admin"], ctx.server_tls)
        servers += await site.serve()

    def reload() -> None:
        # `mailroom reload`: the skeleton's (the config, and the certificate of both TLS
        # listeners), then the public listeners answer with that config (the MTA-STS policy).
        hangup(ctx)
        internet.reloaded(ctx.config)

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)  # in place of the skeleton's
    tail = asyncio.create_task(pages.feed.run(ctx.stop))
    log.info("http on %s%s", ", ".join(cfg.web.listen),
             f"; admin page (https) on {', '.join(cfg.web.admin)}" if site is not None else "")
    await ctx.stop.wait()
    for server in servers:
        server.close()
    await tail  # ends the live pages' streams
    for server in servers:
        await server.wait_closed()
