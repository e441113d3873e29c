"""MX routing, each test twice: against a real DNS server on a loopback port
(tests/support/dns_server.py) and against the in-memory fake (tests/harness/dns.py)
with the same records.

Through the server every lookup crosses a UDP socket, exactly as the queue
manager's do when `[dns] nameservers` names a lab server; the fake answering
the same shows it is fit to stand in for DNS in other unit tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from common.dns import Resolver, Wire
from mta.routing import Route, route
from tests.harness.dns import FakeResolver
from tests.support.dns_server import DNSServer

pytestmark = pytest.mark.timeout(30)

RECORDS = {
    "example.test": {"MX": [(10, "mx1.example.test"), (10, "mx2.example.test"), (20, "mx3.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.11"]},
    "mx2.example.test": {"A": ["127.0.0.12"]},
    "mx3.example.test": {"A": ["127.0.0.13"], "AAAA": ["::1"]},
    "nomx.test": {"A": ["127.0.0.3"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "servfail.test": "SERVFAIL",
    "timeout.test": "TIMEOUT",
    "loop.test": {"MX": [(10, "mail.test")]},
    "backup.test": {"MX": [(10, "mx1.example.test"), (20, "mail.test"), (30, "mx3.example.test")]},
    "mail.test": {"A": ["127.0.0.1"]},
    "noaddr.test": {"MX": [(10, "gone.noaddr.test")]},
}


@pytest.fixture(scope="module", params=["server", "fake"])
def dns_server(request: pytest.FixtureRequest) -> Iterator[DNSServer | FakeResolver]:
    if request.param == "fake":
        yield FakeResolver(RECORDS)
        return
    with DNSServer(RECORDS) as server:
        yield server


def _route(server: DNSServer | FakeResolver, domain: str, **kw: object) -> Route:
    async def go() -> Route:
        resolver: Resolver = server if isinstance(server, FakeResolver) else Wire([server.address], 1.5)
        args: dict[str, object] = {"relayhost": "", "transport": {}, "own_names": {"mail.test"}, "port": 2600}
        args.update(kw)
        return await route(domain, resolver=resolver, **args)  # type: ignore[arg-type]

    return asyncio.run(go())


def test_mx_by_preference_shuffled_among_equals(dns_server: DNSServer | FakeResolver) -> None:
    firsts = set()
    for _ in range(30):
        r = _route(dns_server, "example.test")
        assert r.error is None and r.via == "mx"
        hosts = [h for h, _ in r.hosts]
        assert set(hosts[:2]) == {"127.0.0.11", "127.0.0.12"}  # preference 10 first
        assert hosts[2:] == ["::1", "127.0.0.13"]  # then preference 20 (AAAA before A)
        assert all(p == 2600 for _, p in r.hosts)  # [mta] remote_port
        firsts.add(hosts[0])
    assert firsts == {"127.0.0.11", "127.0.0.12"}  # equal preferences really are shuffled
    assert ("example.test", "MX") in dns_server.queries()


def test_a_record_when_there_is_no_mx(dns_server: DNSServer | FakeResolver) -> None:
    r = _route(dns_server, "nomx.test")
    assert r.error is None and r.hosts == [("127.0.0.3", 2600)]


def test_null_mx_is_a_permanent_5_1_10(dns_server: DNSServer | FakeResolver) -> None:
    r = _route(dns_server, "nullmx.test")
    assert r.error is not None and (r.error.code, r.error.status) == (556, "5.1.10")


def test_nxdomain_is_a_permanent_5_1_2(dns_server: DNSServer | FakeResolver) -> None:
    r = _route(dns_server, "no-such-domain.test")
    assert r.error is not None and (r.error.code, r.error.status) == (550, "5.1.2")


def test_servfail_and_timeout_defer(dns_server: DNSServer | FakeResolver) -> None:
    for domain in ("servfail.test", "timeout.test"):
        r = _route(dns_server, domain)
        assert r.error is not None and r.error.is_temporary, (domain, r)
        assert r.error.status == "4.4.3"


def test_mx_that_is_this_host_is_a_loop(dns_server: DNSServer | FakeResolver) -> None:
    r = _route(dns_server, "loop.test")
    assert r.error is not None and (r.error.code, r.error.status) == (554, "5.4.6")


def test_mx_whose_address_is_our_listener_is_a_loop(dns_server: DNSServer | FakeResolver) -> None:
    # Named anything at all, an MX that leads back to our own public listener is us.
    r = _route(dns_server, "example.test", listening=("127.0.0.13", 2600))  # we are the backup (20)
    assert r.error is None and sorted(h for h, _ in r.hosts) == ["127.0.0.11", "127.0.0.12"]
    r = _route(dns_server, "example.test", listening=("127.0.0.12", 2600))  # we are among the best
    assert r.error is not None and (r.error.code, r.error.status) == (554, "5.4.6")
    r = _route(dns_server, "example.test", listening=("0.0.0.0", 2600))  # every local address is us
    assert r.error is not None and (r.error.code, r.error.status) == (554, "5.4.6")
    r = _route(dns_server, "example.test", listening=("127.0.0.12", 2525))  # another port: not us
    assert r.error is None and len(r.hosts) == 4


def test_as_backup_mx_only_better_hosts_are_tried(dns_server: DNSServer | FakeResolver) -> None:
    r = _route(dns_server, "backup.test")
    assert r.error is None and r.hosts == [("127.0.0.11", 2600)]


def test_mx_without_any_address_bounces(dns_server: DNSServer | FakeResolver) -> None:
    r = _route(dns_server, "noaddr.test")
    assert r.error is not None and r.error.is_permanent


def test_transport_map_and_relayhost_override_mx(dns_server: DNSServer | FakeResolver) -> None:
    r = _route(dns_server, "example.test", transport={"example.test": "127.0.0.9:2626"})
    assert r.hosts == [("127.0.0.9", 2626)] and r.via == "transport"
    r = _route(dns_server, "nullmx.test", relayhost="127.0.0.8:2727")
    assert r.hosts == [("127.0.0.8", 2727)] and r.via == "relayhost"
    dns_server.clear_queries()
    _route(dns_server, "example.test", relayhost="127.0.0.8:2727")
    assert dns_server.queries() == []  # the smart host takes everything: no lookup at all
