"""A small Internet for the outbound TLS tests: signed and unsigned DNS, MX hosts with certificates, policy hosts.

- DNS: one unbound (tests/support/unbound.py) serving three zones and
  validating them against their own keys: `sts.test` (unsigned: MTA-STS
  domains, and a host with TLSA records no one signed), `dane.test` (signed:
  DANE domains), `bogus.test` (signed, one TLSA record altered afterwards).
  The queue manager uses it for routing and as its trusted validating resolver.
- MX hosts: aiosmtpd servers on 127.0.0.6x/7x, all on one port (`[mta]
  remote_port`), each with a certificate from the test's CA (tests/support/pki.py)
  or a wrong one, or no STARTTLS at all (tests/harness/peers.py's `MX`; started
  inside the test's event loop with `mx_hosts()`).
- Policy hosts: one HTTPS server (tests/support/https_host.py) on 127.0.0.60
  answering for every `mta-sts.<domain>`, and one speaking plain HTTP on
  127.0.0.65, both on one port (`[outbound_tls] mta_sts_port`).

The domains (each with its MX host and what it shows):

| domain | MX host (address) | policy |
|---|---|---|
| enforce.sts.test | mx-good.sts.test (.61, CA cert) | MTA-STS enforce `*.sts.test`; TLS-RPT rua mailto + https |
| wrongcert.sts.test | mx-wrong.sts.test (.62, CA cert for another name) | enforce; TLS-RPT rua mailto |
| selfsigned.sts.test | mx-self.sts.test (.63, self-signed) | enforce |
| testing.sts.test | mx-self.sts.test (.63) | testing |
| unlisted.sts.test | mx-good.sts.test (.61) | enforce, mx: mx9.sts.test only |
| notls.sts.test | mx-plain.sts.test (.64, no STARTTLS) | enforce |
| big, slow, v2, http, redirect, html, webpki, badmx, .sts.test | mx-good.sts.test | a bad policy each |
| cached.sts.test | mx-plain.sts.test (.64) | TXT id 2, policy file too big |
| insecure.sts.test | mx-insecure.sts.test (.72) | TLSA 3 1 1 not matching, in an unsigned zone |
| reports.sts.test | mx-reports.sts.test (.66, no STARTTLS) | none: TLS-RPT reports land here |
| ee.dane.test | mx-ee.dane.test (.70) | TLSA 3 1 1 of its key |
| ta.dane.test | mx-ta.dane.test (.71, sends the root) | TLSA 2 0 1 of the root |
| eebad.dane.test | mx-eebad.dane.test (.72, another key) | TLSA 3 1 1 not matching |
| tabad.dane.test | mx-tabad.dane.test (.73, cert for another name) | TLSA 2 0 1 of the root |
| notls.dane.test | mx-notls.dane.test (.64) | TLSA 3 1 1, no STARTTLS |
| unusable.dane.test | mx-unusable.dane.test (.61) | TLSA usage 4 and a bad length only |
| unusable-notls.dane.test | mx-unusable-notls.dane.test (.64) | the same, no STARTTLS |
| both.dane.test | mx-ee.dane.test (.70) | TLSA 3 1 1 and MTA-STS enforce naming another host |
| none.dane.test | mx-none.dane.test (.61) | signed, no TLSA |
| bogus.test | mx.bogus.test (.70) | TLSA 3 1 1, signature broken |
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from common.clock import FakeClock
from common.db import Database
from common.log import new_trace_id
from common.models import Recipient
from mta import mtasts, tlsrpt
from mta.delivery import LocalDelivery, RemoteDelivery
from mta.qmgr import Policy, QueueManager
from mta.routing import make_resolver
from mta.tlsdns import DNSSECResolver
from mta.tlspolicy import Planner, Table
from tests.harness.peers import MX, mx_server
from tests.harness.qmgr import queue_message
from tests.support.https_host import HTTPSHost, Page
from tests.support.pki import Issued, TestCA, self_signed
from tests.support.ports import free_port
from tests.support.unbound import ValidatingResolver, Zone

HTTPS_IP, PLAIN_HTTP_IP = "127.0.0.60", "127.0.0.65"
MX_IPS = {
    "good": "127.0.0.61", "wrong": "127.0.0.62", "self": "127.0.0.63", "plain": "127.0.0.64",
    "reports": "127.0.0.66", "ee": "127.0.0.70", "ta": "127.0.0.71", "eebad": "127.0.0.72", "tabad": "127.0.0.73",
}
ENFORCE_ALL = "version: STSv1\nmode: enforce\nmx: *.sts.test\nmax_age: 86400\n"
BAD_POLICIES = {
    "big": Page(b"version: STSv1\nmode: enforce\nmx: *.sts.test\nmax_age: 86400\n" + b"#" * 70000),
    "slow": Page(ENFORCE_ALL.encode(), dribble=0.2),
    "v2": Page(b"version: STSv2\nmode: enforce\nmx: *.sts.test\nmax_age: 86400\n"),
    "http": Page(ENFORCE_ALL.encode()),  # served over plain HTTP (PLAIN_HTTP_IP)
    "redirect": Page(b"", status=301, location="https://elsewhere.sts.test/.well-known/mta-sts.txt"),
    "html": Page(ENFORCE_ALL.encode(), media_type="text/html"),
    "webpki": Page(ENFORCE_ALL.encode()),  # the host's certificate does not name mta-sts.webpki.sts.test
    "badmx": Page(b"version: STSv1\nmode: enforce\nmx: mx*.sts.test\nmx: *.*.sts.test\nmax_age: 86400\n"),
}
REPORT_PATH = "/tlsrpt"


@dataclass
class World:
    folder: Path
    ca: TestCA
    dns: ValidatingResolver
    https: HTTPSHost
    plain_http: HTTPSHost
    mx_port: int
    https_port: int
    certs: dict[str, Issued | None]  # MX key -> certificate (None: no STARTTLS)
    hosts: dict[str, MX] = field(default_factory=dict)

    def policy_url(self, domain: str) -> str:
        return f"https://mta-sts.{domain}:{self.https_port}{REPORT_PATH}"


def _common_port(ips: list[str]) -> int:
    for _ in range(50):
        with contextlib.ExitStack() as stack:
            port = free_port(ips[0])
            try:
                for ip in ips:
                    s = stack.enter_context(socket.socket())
                    s.bind((ip, port))
                return port
            except OSError:
                continue
    raise AssertionError("no port free on every address")


def build(folder: Path) -> Iterator[World]:
    """The world, for a module-scoped fixture (`yield from build(tmp)`)."""
    ca = TestCA(folder / "ca")
    certs: dict[str, Issued | None] = {
        "good": ca.issue("mx-good.sts.test", "mx-none.dane.test", "mx-unusable.dane.test"),
        "wrong": ca.issue("mx.elsewhere.test"),
        "self": self_signed(folder / "ca", "mx-self.sts.test"),
        "plain": None,
        "reports": None,
        "ee": self_signed(folder / "ca", "mx-ee.dane.test"),  # DANE-EE: no CA needed
        "ta": ca.issue("mx-ta.dane.test", with_root=True),
        "eebad": self_signed(folder / "ca", "mx-eebad.dane.test"),
        "tabad": ca.issue("mx.elsewhere.test", with_root=True, label="tabad"),
    }
    ee, eebad = certs["ee"], certs["eebad"]
    assert ee is not None and eebad is not None
    unpublished = self_signed(folder / "ca", "unpublished.dane.test")
    bad_domains = list(BAD_POLICIES)
    policy_domains = ["enforce", "wrongcert", "selfsigned", "testing", "unlisted", "notls", "cached", *bad_domains]
    https_names = [f"mta-sts.{d}.sts.test" for d in policy_domains if d != "webpki"] + ["mta-sts.both.dane.test"]
    https_cert = ca.issue(*https_names, label="policy-host")
    https_port = _common_port([HTTPS_IP, PLAIN_HTTP_IP])
    mx_port = _common_port(list(MX_IPS.values()))

    sts = [
        *(f"mx-{k} A {MX_IPS[k]}" for k in ("good", "wrong", "self", "plain", "reports")),
        f"mx-insecure A {MX_IPS['eebad']}",
        f"_25._tcp.mx-insecure TLSA {unpublished.tlsa(3, 1, 1)}",
        "enforce MX 10 mx-good", "wrongcert MX 10 mx-wrong", "selfsigned MX 10 mx-self", "testing MX 10 mx-self",
        "unlisted MX 10 mx-good", "notls MX 10 mx-plain", "cached MX 10 mx-plain", "insecure MX 10 mx-insecure",
        "reports MX 10 mx-reports",
        *(f"{d} MX 10 mx-good" for d in bad_domains),
        *(f'_mta-sts.{d} TXT "v=STSv1; id=1"' for d in policy_domains if d != "cached"),
        '_mta-sts.cached TXT "v=STSv1; id=2"',
        *(f"mta-sts.{d} A {PLAIN_HTTP_IP if d == 'http' else HTTPS_IP}" for d in policy_domains),
        '_smtp._tls.enforce TXT "v=TLSRPTv1; rua=mailto:tlsrpt@reports.sts.test,'
        f'https://mta-sts.enforce.sts.test:{https_port}{REPORT_PATH}"',
        '_smtp._tls.wrongcert TXT "v=TLSRPTv1; rua=mailto:tls%2Breports@reports.sts.test?subject=x"',
        '_smtp._tls.testing TXT "v=TLSRPTv1; ruf=mailto:nobody@reports.sts.test"',  # no rua: no reports
    ]
    dane_zone = [
        f"mx-ee A {MX_IPS['ee']}", f"mx-ta A {MX_IPS['ta']}", f"mx-eebad A {MX_IPS['eebad']}",
        f"mx-tabad A {MX_IPS['tabad']}", f"mx-notls A {MX_IPS['plain']}", f"mx-unusable A {MX_IPS['good']}",
        f"mx-unusable-notls A {MX_IPS['plain']}", f"mx-none A {MX_IPS['good']}",
        "ee MX 10 mx-ee", "ta MX 10 mx-ta", "eebad MX 10 mx-eebad", "tabad MX 10 mx-tabad", "notls MX 10 mx-notls",
        "unusable MX 10 mx-unusable", "unusable-notls MX 10 mx-unusable-notls", "both MX 10 mx-ee",
        "none MX 10 mx-none",
        f"_25._tcp.mx-ee TLSA {ee.tlsa(3, 1, 1)}",
        f"_25._tcp.mx-ta TLSA 2 0 1 {hashlib.sha256(ca.root_der).hexdigest()}",
        f"_25._tcp.mx-eebad TLSA {unpublished.tlsa(3, 1, 1)}",
        f"_25._tcp.mx-tabad TLSA 2 0 1 {hashlib.sha256(ca.root_der).hexdigest()}",
        f"_25._tcp.mx-notls TLSA {unpublished.tlsa(3, 1, 1)}",
        f"_25._tcp.mx-unusable TLSA 4 1 1 {'ab' * 32}", f"_25._tcp.mx-unusable TLSA 3 1 1 {'ab' * 31}",
        f"_25._tcp.mx-unusable-notls TLSA 4 1 1 {'ab' * 32}",
        '_mta-sts.both TXT "v=STSv1; id=1"', f"mta-sts.both A {HTTPS_IP}",
    ]
    ee_record = ee.tlsa(3, 1, 1)
    bogus = [f"mx A {MX_IPS['ee']}", "@ MX 10 mx", f"_25._tcp.mx TLSA {ee_record}"]
    tampered = ee_record.split()[-1]
    zones = [
        Zone("sts.test", sts),
        Zone("dane.test", dane_zone, signed=True),
        Zone("bogus.test", bogus, signed=True, bogus=(tampered, "00" * 32)),
    ]
    with ValidatingResolver(folder / "dns", zones) as dns, \
            HTTPSHost(HTTPS_IP, https_port, https_cert.cert, https_cert.key) as https, \
            HTTPSHost(PLAIN_HTTP_IP, https_port, None, None, tls=False) as plain_http:
        for d in policy_domains:
            host = plain_http if d == "http" else https
            host.pages[(f"mta-sts.{d}.sts.test", mtasts.PATH)] = BAD_POLICIES.get(d, Page(ENFORCE_ALL.encode()))
        https.pages[("mta-sts.testing.sts.test", mtasts.PATH)] = Page(
            ENFORCE_ALL.replace("enforce", "testing").encode())
        https.pages[("mta-sts.unlisted.sts.test", mtasts.PATH)] = Page(
            b"version: STSv1\nmode: enforce\nmx: mx9.sts.test\nmax_age: 86400\n")
        https.pages[("mta-sts.both.dane.test", mtasts.PATH)] = Page(
            b"version: STSv1\nmode: enforce\nmx: mx-other.dane.test\nmax_age: 86400\n")
        https.pages[("mta-sts.cached.sts.test", mtasts.PATH)] = BAD_POLICIES["big"]
        yield World(folder, ca, dns, https, plain_http, mx_port, https_port, certs)


@contextlib.asynccontextmanager
async def mx_hosts(world: World) -> AsyncIterator[dict[str, MX]]:
    """Every MX host of the world listening, in the running event loop."""
    hosts: dict[str, MX] = {}
    async with contextlib.AsyncExitStack() as servers:
        for key, ip in MX_IPS.items():
            cert = world.certs[key]
            tls = (cert.cert, cert.key) if cert is not None else None
            hosts[key] = await servers.enter_async_context(mx_server(ip, world.mx_port, MX(), tls=tls))
        world.hosts = hosts
        yield hosts


class Rig:
    """The queue manager with outbound TLS policy, on a temporary database, against the world."""

    def __init__(self, world: World, tmp: Path, *, table: dict[str, str] | None = None, dane: bool = True,
                 sts_timeout: float = 10.0, sts_max_size: int = 64 * 1024, cache_file: Path | None = None,
                 **remote: Any) -> None:
        self.world = world
        self.db = Database(f"sqlite:///{tmp / 'q.db'}", threads=2)
        self.db.create_schema()
        self.clock = FakeClock(dt.datetime.now(dt.UTC).replace(tzinfo=None))
        self.resolver = DNSSECResolver([world.dns.address], 5.0)
        self.cache_file = cache_file or tmp / "mta-sts.json"
        self.policies = mtasts.Policies(
            resolver=self.resolver, clock=self.clock, cache_file=self.cache_file, port=world.https_port,
            ca_file=str(world.ca.ca_file), timeout=sts_timeout, max_size=sts_max_size,
        )
        self.recorder = tlsrpt.Recorder(self.clock)
        self.planner = Planner(table=Table(table or {}), resolver=self.resolver, policies=self.policies,
                               use_dane=dane, ca_file=str(world.ca.ca_file), recorder=self.recorder)
        args: dict[str, Any] = {
            "hostname": "mail.example.org", "resolver": make_resolver([world.dns.address], 2.0), "relayhost": "",
            "relayhost_auth": None, "transport": {}, "remote_port": world.mx_port, "per_destination": 10,
            "connect_timeout": 2.0, "timeout": 5.0, "tls_policy": self.planner,
        }
        args.update(remote)
        self.remote = RemoteDelivery(**args)
        self.local = LocalDelivery("127.0.0.1:9", hostname="mail.example.org", sessions=1, timeout=2)
        self.qm = QueueManager(
            db=self.db, clock=self.clock, policy=Policy([300.0], 5 * 86400.0, 0.0), local_domains=["example.org"],
            hostname="mail.example.org", local=self.local, remote=self.remote,
        )

    def enqueue(self, *recipients: str, sender: str = "alice@example.org") -> str:
        trace = new_trace_id()
        body = (b"From: alice@example.org\r\nSubject: over TLS\r\nMessage-ID: <" + trace.encode()
                + b"@example.org>\r\n\r\nhello\r\n")
        return queue_message(self.db, self.clock, list(recipients), sender, body, trace)

    async def run(self) -> int:
        n = await self.qm.run_once()
        await self.qm.drain()
        return n

    async def send(self, recipient: str) -> Recipient:
        """Queue one message to `recipient`, run one round, and return its recipient row."""
        trace = self.enqueue(recipient)
        await self.run()
        return self.recipient(trace)

    def recipient(self, trace: str) -> Recipient:
        with self.db.read() as s:
            return s.scalars(select(Recipient).where(Recipient.message_id == trace)).one()

    def results(self) -> list[tuple[str, str, str, str]]:
        """The TLS-RPT counts so far: (policy type, policy domain, result or "ok", MX host), once each."""
        return sorted({(k.policy.type, k.policy.domain, k.result or "ok", k.mx) for k in self.recorder.pending})

    async def close(self) -> None:
        await self.remote.close()
        await self.local.close()
        await self.policies.close()
        self.db.close()
