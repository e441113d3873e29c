"""Handing a message to its next hop: the MDA over LMTP, or a remote host over SMTP.

Both return one reply per recipient (RFC 2033 for LMTP; for SMTP a refused
RCPT gets its own reply and the rest share the reply to DATA).  A hop that
cannot be reached yields 4xx replies, so the queue manager defers rather
than bounces.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import dns.asyncresolver

from common.config import parse_hostport
from common.reply import Reply
from common.smtp_client import Client, NextHopError
from common.tls import client_context
from mta import routing

log = logging.getLogger("delivery")


class LocalDelivery:
    """LMTP to the MDA, over a small pool of reused sessions."""

    def __init__(self, lmtp: str, *, hostname: str, sessions: int, timeout: float) -> None:
        self.host, self.port = (lmtp, 0) if lmtp.startswith("unix:") else parse_hostport(lmtp)
        self.hostname = hostname
        self.timeout = timeout
        self.slots = asyncio.Semaphore(sessions)
        self.idle: list[Client] = []

    async def deliver(self, trace: str, sender: str, recipients: list[str], body: bytes) -> list[Reply]:
        async with self.slots:
            client = self.idle.pop() if self.idle else None
            try:
                if client is None:
                    client = await Client.connect(
                        self.host, self.port, lmtp=True, helo=self.hostname, timeout=self.timeout
                    )
                replies = await client.send(sender, recipients, body, mail_params=(f"XTRACE={trace}",))
            except NextHopError as exc:
                if client is not None:
                    client.close()
                return [exc.reply] * len(recipients)
            self.idle.append(client)
            return replies

    async def close(self) -> None:
        while self.idle:
            await self.idle.pop().quit()


class RemoteDelivery:
    """SMTP to other mail hosts: route, connect (opportunistic STARTTLS), send."""

    def __init__(
        self,
        *,
        hostname: str,
        resolver: dns.asyncresolver.Resolver,
        relayhost: str,
        relayhost_auth: tuple[str, str] | None,
        transport: dict[str, str],
        remote_port: int,
        per_destination: int,
        connect_timeout: float,
        timeout: float = 300.0,
    ) -> None:
        self.hostname = hostname
        self.resolver = resolver
        self.relayhost = relayhost
        self.relayhost_auth = relayhost_auth
        self.transport = transport
        self.remote_port = remote_port
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.limits: defaultdict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(per_destination)
        )
        self.tls = client_context(verify=False)

    async def deliver(
        self, domain: str, trace: str, sender: str, recipients: list[str], body: bytes
    ) -> tuple[list[Reply], str]:
        """Returns the replies and the host that gave them ('' if none answered)."""
        r = await routing.route(
            domain, relayhost=self.relayhost, transport=self.transport, resolver=self.resolver,
            own_names={self.hostname.lower()}, port=self.remote_port,
        )
        if r.error is not None:
            return [r.error] * len(recipients), ""
        last = Reply(451, "4.4.1", f"No reachable host for {domain}")
        async with self.limits[r.hosts[0][0] if r.via != "mx" else domain]:
            for host, port in r.hosts:
                try:
                    client = await Client.connect(
                        host, port, helo=self.hostname, tls=self.tls, timeout=self.timeout,
                        connect_timeout=self.connect_timeout,
                    )
                except NextHopError as exc:
                    log.info("%s:%d: %s", host, port, exc.reply)
                    last = exc.reply
                    if exc.reply.is_permanent:
                        return [exc.reply] * len(recipients), host
                    continue
                async with client:
                    try:
                        if r.via == "relayhost" and self.relayhost_auth:
                            auth = await client.auth_plain(*self.relayhost_auth)
                            if auth.code != 235:
                                return [_as_temporary(auth)] * len(recipients), host
                        return await client.send(sender, recipients, body), host
                    except NextHopError as exc:
                        return [exc.reply] * len(recipients), host
        return [last] * len(recipients), ""


def _as_temporary(reply: Reply) -> Reply:
    # Our own relayhost refusing our password is our misconfiguration: keep the
    # mail and let the operator fix it, rather than bouncing everything.
    return Reply(451, "4.7.0", f"relayhost refused authentication: {reply}")
