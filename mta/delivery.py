"""The two couriers (mta/courier.py): the MDA over LMTP, a remote host over SMTP.

Both return one reply per recipient (RFC 2033 for LMTP; for SMTP a refused
RCPT gets its own reply and the rest share the reply to DATA).  A hop that
cannot be reached yields 4xx replies, so the queue manager defers rather
than bounces.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import defaultdict
from dataclasses import dataclass

from common import counters, lmtp_ext
from common import reply as R
from common.dns import Resolver
from common.endpoint import Endpoint
from common.events import Hop
from common.reply import Reply
from common.smtp_client import Client, NextHopError
from common.tls import client_context
from mta import options, routing
from mta.courier import Attempt, Delivered
from mta.tlspolicy import Planner

log = logging.getLogger("delivery")

class LocalDelivery:
    """LMTP to the MDA, over a small pool of reused sessions.

    The MDA closes a session that stays idle longer than its idle timeout, so
    after a quiet spell every pooled session may be gone.  A pooled session
    that fails before its MAIL was accepted has taken on nothing: it is
    dropped and the message goes at once over the next one, or a new one,
    instead of waiting a whole retry interval.
    """

    local = True  # the last hop: see Courier.local

    def __init__(
        self, lmtp: Endpoint | str, *, hostname: str, sessions: int, timeout: float, tls: ssl.SSLContext | None = None,
    ) -> None:
        self.lmtp = lmtp if isinstance(lmtp, Endpoint) else Endpoint.parse(lmtp)  # the MDA's listener
        self.hostname = hostname
        # The MDA on another host: TLS from the first byte, with this node's certificate (common/hop_tls.py).
        self.tls = tls
        self.timeout = timeout
        self.slots = asyncio.Semaphore(sessions)
        self.idle: list[Client] = []

    async def deliver(self, attempt: Attempt) -> Delivered:
        """The MDA's replies, and whether it left recording its outcomes to us (XRECORD)."""
        # The body type and SMTPUTF8 are declared; our MDA takes them all.
        params = attempt.outbound.local_params(attempt.body)
        if attempt.retry:
            params = (*params, lmtp_ext.XRETRY)  # sent only where the MDA offers it
        async with self.slots:
            while self.idle:
                pooled = self.idle.pop()
                if not pooled.looks_alive():
                    pooled.close()
                    continue
                delivered = await self._send(pooled, attempt, params, reused=True)
                if delivered is not None:
                    return delivered
                log.info("a pooled LMTP session to %s was closed by the MDA; sending on another", pooled.peer)
            try:
                client = await Client.connect(self.lmtp, lmtp=True, helo=self.hostname, timeout=self.timeout,
                                              tls=self.tls, implicit_tls=self.tls is not None)
            except NextHopError as exc:
                return Delivered([exc.reply] * len(attempt.recipients))
            delivered = await self._send(client, attempt, params, reused=False)
            assert delivered is not None
            return delivered

    async def _send(
        self, client: Client, attempt: Attempt, params: tuple[str, ...], *, reused: bool,
    ) -> Delivered | None:
        """The replies (see deliver); None when a reused session turned out dead before taking anything on."""
        # XRECORD, where the MDA offers it: it writes no row of its own, and the
        # queue manager records its outcomes with the settle.
        ours = lmtp_ext.XRECORD in client.extensions
        if lmtp_ext.XRETRY not in client.extensions:
            params = tuple(p for p in params if p != lmtp_ext.XRETRY)
        mail_params = (f"XTRACE={attempt.trace}", *((lmtp_ext.XRECORD,) if ours else ()), *params)
        try:
            replies = await client.send(attempt.sender, attempt.recipients, attempt.body, mail_params=mail_params)
        except NextHopError as exc:
            client.close()
            if reused and not client.mail_accepted:
                return None
            return Delivered([exc.reply] * len(attempt.recipients), str(self.lmtp))
        if any(r.code == 421 for r in replies):  # RFC 5321 3.8: the server is closing this session
            client.close()
            if reused and not client.mail_accepted:
                return None
        else:
            self.idle.append(client)
        if not (ours and client.mail_accepted):
            return Delivered(replies, str(self.lmtp))
        # Each 250 names the mailbox file: taken out here, carried on as a value of its own.
        split = [lmtp_ext.split_path(r) for r in replies]
        return Delivered([r for r, _ in split], str(self.lmtp), ours_to_record=True, paths=[p for _, p in split])

    async def close(self) -> None:
        """Say QUIT on every pooled session (at shutdown)."""
        while self.idle:
            await self.idle.pop().quit()


class RemoteDelivery:
    """SMTP to other mail hosts: route, connect (opportunistic STARTTLS), send.

    A connection is kept open for `reuse_time` seconds after a message and
    handed to the next message for the same destination (Postfix's
    connection cache), so a burst to one domain costs one TCP and TLS setup.
    Before reuse the session is probed with RSET; a dead one is replaced, and
    so is one that fails before its MAIL was accepted (the message goes again
    at once, on a new session).

    TLS with MX hosts is opportunistic (RFC 3207: unverified, still encrypted)
    unless `tls_policy` decides otherwise for the destination (mta/tlspolicy.py:
    the operator's per-destination table, DANE, MTA-STS).  The relayhost is
    different: we send it our password, so its certificate and name are
    verified (system CAs, or `relayhost_ca_file`) unless the operator turned
    that off by name (`relayhost_tls_verify = false`); a session that fails
    the check is not used, and AUTH is sent only over TLS.
    """

    local = False  # see Courier.local

    def __init__(
        self,
        *,
        hostname: str,
        resolver: Resolver,
        relayhost: str,
        relayhost_auth: tuple[str, str] | None,
        transport: dict[str, str],
        remote_port: int,
        per_destination: int,
        connect_timeout: float,
        timeout: float = 300.0,
        reuse_time: float = 5.0,
        reuse_limit: int = 100,
        listening: tuple[str, int] | None = None,
        relayhost_tls_verify: bool = True,
        relayhost_ca_file: str = "",
        remote_ca_file: str = "",
        tls_policy: Planner | None = None,
    ) -> None:
        self.hostname = hostname
        self.tls_policy = tls_policy
        self.resolver = resolver
        self.relayhost = relayhost
        self.relayhost_auth = relayhost_auth
        self.transport = transport
        self.remote_port = remote_port
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.reuse_time = reuse_time
        self.reuse_limit = reuse_limit
        self.limits: defaultdict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(per_destination)
        )
        self.idle: defaultdict[str, list[_Cached]] = defaultdict(list)
        self.closing: set[asyncio.Task[None]] = set()
        self.tls = client_context(verify=False)
        self.relay_tls = _relay_context(relayhost_tls_verify, relayhost_ca_file)
        # For REQUIRETLS mail (RFC 8689 4.2.1): the MX's certificate must name it.
        self.verified_tls = _relay_context(True, remote_ca_file)
        self.listening = listening
        self.connections = 0  # sessions opened so far (for logs and tests)

    async def deliver(self, attempt: Attempt) -> Delivered:
        """The replies, the host that gave them ('' if none answered), and whether it took DSN.

        The attempt's `outbound` carries what the sender asked (DSN, 8BITMIME,
        SMTPUTF8, REQUIRETLS): a hop that cannot honour it gets nothing and the
        recipients a permanent reply; one that can is told.
        """
        outbound = attempt.outbound
        replies, host = await self._route_and_send(
            attempt.domain, attempt.sender, attempt.recipients, attempt.body, outbound
        )
        return Delivered(replies, host, dsn_passed=outbound.dsn_passed)

    async def _route_and_send(
        self, domain: str, sender: str, recipients: list[str], body: bytes, outbound: options.Outbound,
    ) -> tuple[list[Reply], str]:
        """Find the route, then send over a cached session or a new one: (replies, host)."""
        requiretls = outbound.asked.requiretls
        r = await routing.route(
            domain, relayhost=self.relayhost, transport=self.transport, resolver=self.resolver,
            own_names={self.hostname.lower()}, port=self.remote_port, listening=self.listening,
        )
        if r.error is not None:
            return [r.error] * len(recipients), ""
        # The destination is what the concurrency limit and the connection cache
        # count by: the domain for MX routing, the fixed host otherwise.
        dest = domain if r.via == "mx" else f"{r.hosts[0][0]}:{r.hosts[0][1]}"
        if requiretls:
            dest += " requiretls"  # its sessions are verified ones, cached apart
        async with self.limits[dest]:
            cached = await self._reuse(dest)
            reused = cached is not None
            while True:
                if cached is None:
                    opened = await self._open(r, len(recipients), requiretls=requiretls, domain=domain)
                    if isinstance(opened, tuple):
                        return opened
                    cached = opened
                cached.uses += 1
                ext = cached.client.extensions
                refusal = outbound.refusal(ext, sender, recipients, body)
                if refusal is not None:
                    self._park(dest, cached)
                    return [refusal] * len(recipients), cached.host
                mail_params = tuple(outbound.mail_params(ext, body))
                rcpt_params = outbound.rcpt_params(ext)
                try:
                    replies = await cached.client.send(
                        sender, recipients, body, mail_params=mail_params, rcpt_params=rcpt_params
                    )
                except NextHopError as exc:
                    cached.client.close()
                    if reused and not cached.client.mail_accepted:
                        # Closed between the probe and MAIL: nothing was taken on; a new session.
                        cached, reused = None, False
                        continue
                    return [exc.reply] * len(recipients), cached.host
                counters.inc(counters.TLS_OUT, hop=Hop.QMGR, tls="yes" if cached.client.tls else "no")
                closing = any(x.code == 421 for x in replies)
                if closing or cached.uses >= self.reuse_limit:
                    await cached.client.quit()
                    if closing and reused and not cached.client.mail_accepted:
                        cached, reused = None, False
                        continue
                else:
                    self._park(dest, cached)
                return replies, cached.host

    async def _open(
        self, r: routing.Route, n: int, *, requiretls: bool = False, domain: str = ""
    ) -> _Cached | tuple[list[Reply], str]:
        """A new session with the first host of the route that answers, or the replies for all.

        With `requiretls` only a session whose certificate was verified will do
        (RFC 8689 4.2.1); when no host offers one the message bounces (5.7.10).
        Each host's TLS keeps the rule `tls_policy` gives it, if any.
        """
        last = R.NEXT_HOP_UNAVAILABLE.with_text("No reachable host")
        relay = r.via == "relayhost"
        tls = self.relay_tls if relay else self.verified_tls if requiretls else self.tls
        if requiretls and tls.verify_mode != ssl.CERT_REQUIRED:
            return [options.NEEDS_REQUIRETLS.with_text("REQUIRETLS needed: the relayhost is not verified")] * n, ""
        rules = {} if relay or self.tls_policy is None else await self.tls_policy.rules(
            domain, r, requiretls=requiretls)
        for host, port in r.hosts:

            async def connect(
                tls: ssl.SSLContext | None, require_tls: bool, host: str = host, port: int = port,
            ) -> Client:
                return await Client.connect(
                    host, port, helo=self.hostname, tls=tls,
                    timeout=self.timeout, connect_timeout=self.connect_timeout,
                    # Without TLS the password would cross the network in the clear.
                    require_tls=require_tls or (relay and self.relayhost_auth is not None),
                    tls_name=r.names.get(host, host),
                )

            rule = rules.get(r.names.get(host, host).lower())
            try:
                if rule is not None and self.tls_policy is not None:
                    client = await self.tls_policy.open(rule, host, connect)
                else:
                    client = await connect(tls, requiretls)
            except NextHopError as exc:
                log.info("%s:%d: %s", host, port, exc.reply)
                last = exc.reply
                if exc.reply.is_permanent:
                    return [exc.reply] * n, host
                if requiretls and exc.reply.status == "4.7.5":  # no STARTTLS, or not verified
                    last = options.NEEDS_REQUIRETLS.with_text(f"REQUIRETLS needed: {exc.reply.text}")
                continue
            self.connections += 1
            if relay and self.relayhost_auth:
                try:
                    auth = await client.auth_plain(*self.relayhost_auth)
                except NextHopError as exc:
                    client.close()
                    return [exc.reply] * n, host
                if auth.code != 235:
                    await client.quit()
                    return [_as_temporary(auth)] * n, host
            return _Cached(client, host)
        return [last] * n, ""

    async def _reuse(self, dest: str) -> _Cached | None:
        """An idle session to `dest` that still answers, if there is one."""
        idle = self.idle[dest]
        while idle:
            cached = idle.pop()
            if cached.expiry is not None:
                cached.expiry.cancel()
            try:
                probe = await asyncio.wait_for(cached.client.command("RSET"), 10)
            except (NextHopError, TimeoutError):
                cached.client.close()
                continue
            if probe.code == 250:
                log.debug("reusing the session with %s", cached.host)
                return cached
            cached.client.close()
        return None

    def _park(self, dest: str, cached: _Cached) -> None:
        loop = asyncio.get_running_loop()
        cached.expiry = loop.call_later(self.reuse_time, self._expire, dest, cached)
        self.idle[dest].append(cached)

    def _expire(self, dest: str, cached: _Cached) -> None:
        if cached in self.idle[dest]:
            self.idle[dest].remove(cached)
            task = asyncio.get_running_loop().create_task(cached.client.quit())
            self.closing.add(task)
            task.add_done_callback(self.closing.discard)

    async def close(self) -> None:
        """Say QUIT on every idle session (at shutdown)."""
        for dest in list(self.idle):
            while self.idle[dest]:
                cached = self.idle[dest].pop()
                if cached.expiry is not None:
                    cached.expiry.cancel()
                await cached.client.quit()
        if self.closing:
            await asyncio.gather(*self.closing, return_exceptions=True)


def _relay_context(verify: bool, ca_file: str) -> ssl.SSLContext:
    if not verify:
        return client_context(verify=False)
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@dataclass(eq=False)
class _Cached:
    client: Client
    host: str
    uses: int = 0
    expiry: asyncio.TimerHandle | None = None


def _as_temporary(reply: Reply) -> Reply:
    # Our own relayhost refusing our password is our misconfiguration: keep the
    # mail and let the operator fix it, rather than bouncing everything.
    return R.RELAY_AUTH_REFUSED.with_text(f"relayhost refused authentication: {reply}")
