"""The web program's listeners for the Internet: `[web] http` (the port 80 role) and `[web] https` (443).

`[web] listen` stays the operator's (the live page, /metrics; loopback by
default).  These two answer the world, and only with what the world needs:

- `[web] http`: the ACME server's HTTP-01 validation requests,
  `/.well-known/acme-challenge/TOKEN`, answered from the files `mailroom cert`
  or the renewer write in `[acme] dir`/challenges (RFC 8555 8.3); and mail
  client autoconfig, which clients still fetch over plain HTTP.
- `[web] https`, with the `[tls]` certificate: the MTA-STS policy
  (web/mta_sts.py) for a Host of `mta-sts.DOMAIN` (RFC 8461 3.3: over HTTPS
  only, and senders verify the certificate for that name, so the ACME
  certificate names it), and mail client autoconfig.

SIGHUP (`mailroom reload`) makes the web program read again the settings that
can change safely (common/reload.py; here: the MTA-STS policy, `[acme] dir`)
and the certificate, for the next connections; the listeners stay open.  The
web program answers SIGHUP whether or not these listeners are on, since
`mailroom reload` signals it either way.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from http import HTTPStatus

from common.config import Config
from common.daemon import bind_all
from common.endpoint import Endpoint
from common.tls import ServerTLS
from web import mta_sts
from web.http import MAX_HEAD, Handler, Request, Response, handle

log = logging.getLogger("web")

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
# The TLS handshake, like the request head, gets a short time (web/http.py TIMEOUT).
HANDSHAKE_TIMEOUT = 10.0


def challenge(cfg: Config, request: Request) -> Response:
    """An HTTP-01 answer: the key authorization for the token, as written by `mailroom cert`."""
    token = request.path[len(CHALLENGE_PREFIX):]
    if not _is_token(token):
        return Response(HTTPStatus.NOT_FOUND, b"not found\n")
    path = cfg.resolve(cfg.acme.dir) / "challenges" / token
    try:
        body = path.read_bytes()
    except OSError:
        return Response(HTTPStatus.NOT_FOUND, b"not found\n")
    log.info("ACME challenge %s answered", token[:12])
    return Response(HTTPStatus.OK, body, "application/octet-stream")


def _is_token(token: str) -> bool:
    # base64url only (RFC 8555 8.3): never a path, never a dot.
    return 16 <= len(token) <= 256 and all(c.isascii() and (c.isalnum() or c in "-_") for c in token)


def mta_sts_policy(cfg: Config, request: Request) -> Response:
    """The policy file, for a Host of mta-sts.DOMAIN with DOMAIN local; 404 for any other."""
    if mta_sts.domain_of_host(cfg, request.headers.get("host", "")) is None:
        return Response(HTTPStatus.NOT_FOUND, b"not found\n")
    return Response(HTTPStatus.OK, mta_sts.policy(cfg).encode(), "text/plain; charset=utf-8")


class Routes(Mapping[str, "Handler"]):
    """Exact paths, and with `challenges` every path under /.well-known/acme-challenge/."""

    def __init__(self, exact: Mapping[str, Handler], *, challenges: bool = False) -> None:
        self.exact = dict(exact)
        self.challenges = challenges

    def __getitem__(self, path: str) -> Handler:
        if self.challenges and path.startswith(CHALLENGE_PREFIX):
            return challenge
        return self.exact[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self.exact)

    def __len__(self) -> int:
        return len(self.exact)


def bind(cfg: Config) -> dict[str, list[socket.socket]]:
    """Bind `[web] http` and `[web] https`, each when on (before the web program drops root);
    BindError names the setting.  Their certificate is the web program's (web/server.py)."""
    wanted = {key: [Endpoint.parse(value)] for key, value in
              (("web.http", cfg.web.http), ("web.https", cfg.web.https)) if value}
    bound = bind_all(wanted)
    return {key: bound.get(key, []) for key in ("web.http", "web.https")}


class Public:
    """The http and https listeners (bound and with the certificate loaded before the web
    program drops root), and the config they answer with."""

    def __init__(self, cfg: Config, http: list[socket.socket], https: list[socket.socket],
                 tls: ServerTLS | None) -> None:
        self.config = cfg
        self.http, self.https, self.tls = http, https, tls

    async def serve(self, base: Mapping[str, Handler]) -> list[asyncio.Server]:
        """Start serving (with `base`, the program's public routes: autoconfig); after a
        SIGHUP, `reloaded` (web/server.py)."""
        plain = Routes(base, challenges=True)
        secure = Routes({**base, mta_sts.PATH: mta_sts_policy})

        def client(routes: Routes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
            async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                # The config of the moment: a reload may have changed the policy.
                await handle(self.config, routes, reader, writer)
            return answer

        servers = [await asyncio.start_server(client(plain), sock=s, limit=MAX_HEAD) for s in self.http]
        if self.tls is not None:
            servers += [await asyncio.start_server(
                client(secure), sock=s, limit=MAX_HEAD, ssl=self.tls.context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            ) for s in self.https]
        if servers:
            log.info("public http on %s, https on %s", self.config.web.http or "-", self.config.web.https or "-")
        return servers

    def reloaded(self, cfg: Config) -> None:
        """After SIGHUP's reload (common/daemon.py hangup): answer with `cfg` from now on."""
        self.config = cfg
        log.info("reloaded (MTA-STS policy id %s)", mta_sts.policy_id(cfg))
