"""The lab's MX hosts: SMTP servers on Mailroom's own engine, each answering in one named way.

Each host keeps what it accepts in RUN_DIR/lab/HOSTNAME/ (one .eml file per
message) and logs every decision, so a learner can see both ends of a hop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
from pathlib import Path

from common.reply import Reply, SMTPError
from common.smtp.handler import Handler, MailEnvelope, MailSession
from common.smtp.serve import Limits, serve
from lab import scenarios
from lab.scenarios import Host

log = logging.getLogger("lab.mx")

# RFC 6647 4.2: a greylisting server answers a temporary failure to a triplet it
# has not seen; a real sender retries (RFC 5321 4.5.4.1), a spam cannon rarely does.
GREYLISTED = Reply(451, "4.7.1", "Greylisted: please try again later")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
_counter = itertools.count(1)


class LabMX(Handler):
    """One session at one lab MX host."""

    offers_chunking = False  # the lab hosts speak plain DATA, as most of the Internet does

    def __init__(self, host: Host, store: Path, seen: set[tuple[str, str, str]], slow: float) -> None:
        self.host = host
        self.store = store
        self.seen = seen  # greylisting triplets, shared by the host's sessions
        self.slow = slow

    async def _wait(self) -> None:
        if self.host.behaviour == scenarios.SLOW:
            await asyncio.sleep(self.slow)

    async def connect(self, session: MailSession) -> None:
        log.info("%s: connection from %s", self.host.name, session.client_ip)
        await self._wait()  # before the greeting

    async def mail(self, session: MailSession, envelope: MailEnvelope, sender: str) -> Reply | None:
        await self._wait()
        log.info("%s: MAIL FROM:<%s>%s", self.host.name, sender, " (over TLS)" if session.tls else "")
        return None

    async def rcpt(self, session: MailSession, envelope: MailEnvelope, recipient: str) -> Reply | None:
        await self._wait()
        sender = envelope.mail_from or ""
        if self.host.behaviour == scenarios.REFUSE:
            log.info("%s: RCPT TO:<%s> -> %s", self.host.name, recipient, NO_SUCH_USER)
            raise SMTPError(NO_SUCH_USER)
        if self.host.behaviour == scenarios.GREYLIST:
            triplet = (session.client_ip, sender.lower(), recipient.lower())
            if triplet not in self.seen:
                self.seen.add(triplet)
                log.info("%s: RCPT TO:<%s> -> %s (first try)", self.host.name, recipient, GREYLISTED)
                raise SMTPError(GREYLISTED)
        log.info("%s: RCPT TO:<%s> -> 250", self.host.name, recipient)
        return None

    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
        await self._wait()
        assert envelope.content is not None
        name = f"{os.getpid()}.{next(_counter)}.eml"
        self.store.mkdir(parents=True, exist_ok=True)
        tmp = self.store / f".{name}"
        head = f"X-Lab-Envelope-From: <{envelope.mail_from}>\r\nX-Lab-Envelope-To: " + ", ".join(
            f"<{r}>" for r in envelope.rcpt_tos
        ) + "\r\n"
        tmp.write_bytes(head.encode() + envelope.content)
        tmp.rename(self.store / name)
        log.info("%s: message from <%s> stored as %s", self.host.name, envelope.mail_from, self.store / name)
        return Reply(250, "2.0.0", f"Ok: stored as {name}")


async def serve_hosts(
    hosts: list[Host], *, port: int, run_dir: Path, tls: ssl.SSLContext, limits: Limits, slow: float,
    tls_of: dict[str, ssl.SSLContext] | None = None,
) -> list[asyncio.Server]:
    """Start every listening lab host on its own address at `port`; `tls_of` gives a
    host (by name) a certificate of its own instead of the installation's."""
    servers = []
    for host in hosts:
        seen: set[tuple[str, str, str]] = set()
        store = run_dir / "lab" / host.name

        def make(host: Host = host, store: Path = store, seen: set[tuple[str, str, str]] = seen) -> Handler:
            return LabMX(host, store, seen, slow)

        servers.append(await serve(
            f"{host.address}:{port}", make, hostname=host.name, limits=limits,
            tls_context=(tls_of or {}).get(host.name, tls), require_starttls=host.behaviour == scenarios.NEEDS_TLS,
        ))
        log.info("%s (%s) listening on %s:%d", host.name, host.behaviour, host.address, port)
    return servers
