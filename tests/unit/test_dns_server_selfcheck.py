"""Self-check of tests/support/dns_server.py, the DNS server the MX routing tests use.

Every case the MTA tests rely on is asked here through dnspython's async
resolver, exactly the way the MTA asks (a resolver with no system
configuration, pointed at 127.0.0.1 and the server's port).  The shared cases
run against both implementations: DNSServer (dnspython, always) and
DnsmasqServer (skipped when dnsmasq-base is not installed).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from tests.support import peers
from tests.support.dns_server import DnsmasqServer, DNSServer, normalize_records

REPO = Path(__file__).resolve().parents[2]

RECORDS: dict[str, Any] = {
    "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.4"], "AAAA": ["::2"]},
    "equal.test": {"MX": [(10, "a.equal.test"), (10, "b.equal.test")]},
    "nomx.test": {"A": ["127.0.0.3"], "AAAA": ["::1"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "alias.test": {"CNAME": "example.test"},
    "servfail.test": "SERVFAIL",
    "timeout.test": "TIMEOUT",
}

Server = DNSServer | DnsmasqServer

IMPLEMENTATIONS = [
    pytest.param(DNSServer, id="dnspython"),
    pytest.param(DnsmasqServer, id="dnsmasq", marks=pytest.mark.interop),
]


def _available(impl: type[Server]) -> type[Server]:
    # dnsmasq is a real peer from .ci/install-peers: missing means a broken
    # environment, so the test fails (peers.require) rather than skips.
    if impl is DnsmasqServer:
        peers.require("dnsmasq")
    return impl


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    # One server per implementation for the whole module: starting one is
    # cheap, but the cases below only read.
    with _available(request.param)(RECORDS) as srv:
        yield srv


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> type[Server]:
    return _available(request.param)


@pytest.fixture()
def fresh(server: Server) -> Server:
    server.clear_queries()
    return server


def make_resolver(server: Server, lifetime: float = 5.0) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    return resolver


def resolve(
    server: Server, name: str, rdtype: str, *, lifetime: float = 5.0, tcp: bool = False
) -> dns.resolver.Answer:
    async def go() -> dns.resolver.Answer:
        return await make_resolver(server, lifetime).resolve(name, rdtype, tcp=tcp)

    return asyncio.run(go())


def mx_list(answer: dns.resolver.Answer) -> list[tuple[int, str]]:
    return sorted((r.preference, r.exchange.to_text()) for r in answer)


# -- the cases the MX routing tests need, on both implementations -----------


@pytest.mark.timeout(30)
def test_address_is_host_colon_port(server: Server) -> None:
    assert server.host == "127.0.0.1"
    assert server.address == f"127.0.0.1:{server.port}"
    assert 0 < server.port < 65536


@pytest.mark.timeout(30)
def test_mx_records_by_preference(fresh: Server) -> None:
    answer = resolve(fresh, "example.test", "MX")
    assert mx_list(answer) == [(10, "mx1.example.test."), (20, "mx2.example.test.")]
    assert fresh.queries() == [("example.test", "MX")]


@pytest.mark.timeout(30)
def test_mx_equal_preferences(fresh: Server) -> None:
    answer = resolve(fresh, "equal.test", "MX")
    assert mx_list(answer) == [(10, "a.equal.test."), (10, "b.equal.test.")]


@pytest.mark.timeout(30)
def test_a_and_aaaa_for_a_domain_without_mx(fresh: Server) -> None:
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(fresh, "nomx.test", "MX")
    assert [r.address for r in resolve(fresh, "nomx.test", "A")] == ["127.0.0.3"]
    assert [r.address for r in resolve(fresh, "nomx.test", "AAAA")] == ["::1"]
    assert fresh.queries() == [("nomx.test", "MX"), ("nomx.test", "A"), ("nomx.test", "AAAA")]


@pytest.mark.timeout(30)
def test_addresses_of_the_exchanges(fresh: Server) -> None:
    assert [r.address for r in resolve(fresh, "mx2.example.test", "A")] == ["127.0.0.4"]
    assert [r.address for r in resolve(fresh, "mx2.example.test", "AAAA")] == ["::2"]
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(fresh, "mx1.example.test", "AAAA")


@pytest.mark.timeout(30)
def test_null_mx(fresh: Server) -> None:
    answer = resolve(fresh, "nullmx.test", "MX")
    (record,) = list(answer)
    assert record.preference == 0
    assert record.exchange == dns.name.root


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["unknown.test", "sub.nomx.test", "elsewhere.example"])
def test_unlisted_names_are_nxdomain(fresh: Server, name: str) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(fresh, name, "MX")
    assert fresh.queries() == [(name, "MX")]


@pytest.mark.timeout(30)
def test_servfail(fresh: Server) -> None:
    with pytest.raises(dns.resolver.NoNameservers) as caught:
        resolve(fresh, "servfail.test", "MX")
    assert "SERVFAIL" in str(caught.value)
    assert ("servfail.test", "MX") in fresh.queries()


@pytest.mark.timeout(30)
def test_timeout(fresh: Server) -> None:
    started = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolve(fresh, "timeout.test", "MX", lifetime=1.0)
    assert time.monotonic() - started < 5
    assert ("timeout.test", "MX") in fresh.queries()
    # The server is still fine afterwards.
    assert mx_list(resolve(fresh, "example.test", "MX"))[0] == (10, "mx1.example.test.")


@pytest.mark.timeout(30)
def test_tcp(fresh: Server) -> None:
    answer = resolve(fresh, "example.test", "MX", tcp=True)
    assert mx_list(answer) == [(10, "mx1.example.test."), (20, "mx2.example.test.")]
    assert [r.address for r in resolve(fresh, "nomx.test", "A", tcp=True)] == ["127.0.0.3"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(fresh, "unknown.test", "A", tcp=True)


@pytest.mark.timeout(30)
def test_cname_is_followed(fresh: Server) -> None:
    answer = resolve(fresh, "alias.test", "MX")
    assert answer.canonical_name == dns.name.from_text("example.test")
    assert mx_list(answer)[0] == (10, "mx1.example.test.")


@pytest.mark.timeout(30)
def test_names_are_case_insensitive(fresh: Server) -> None:
    answer = resolve(fresh, "EXAMPLE.Test", "MX")
    # Name compression may copy the question's case into the exchange
    # ("mx1.EXAMPLE.Test."), as real servers do: code under test must compare
    # names case-insensitively (dns.name.Name does).
    wanted = {dns.name.from_text("mx1.example.test"), dns.name.from_text("mx2.example.test")}
    assert {r.exchange for r in answer} == wanted
    assert sorted(r.exchange.to_text().lower() for r in answer) == [
        "mx1.example.test.",
        "mx2.example.test.",
    ]


@pytest.mark.timeout(30)
def test_set_records_changes_answers_while_running(impl: type[Server]) -> None:
    with impl({"move.test": {"MX": [(10, "old.move.test")]}}) as srv:
        port = srv.port
        assert mx_list(resolve(srv, "move.test", "MX")) == [(10, "old.move.test.")]
        srv.set_records({"move.test": {"MX": [(5, "new.move.test")]}, "gone.test": "NXDOMAIN"})
        assert srv.port == port
        assert mx_list(resolve(srv, "move.test", "MX")) == [(5, "new.move.test.")]
        srv.set_records({"move.test": "SERVFAIL"})
        with pytest.raises(dns.resolver.NoNameservers):
            resolve(srv, "move.test", "MX")
        srv.set_records({})
        with pytest.raises(dns.resolver.NXDOMAIN):
            resolve(srv, "move.test", "MX")


@pytest.mark.timeout(30)
def test_stop_terminates_and_reaps_the_process(impl: type[Server]) -> None:
    srv = impl({"a.test": {"A": "127.0.0.9"}})
    with srv:
        pid, port = srv.pid, srv.port
        server_pid = srv.dnsmasq_pid if isinstance(srv, DnsmasqServer) else pid
    # Reaped: it is no longer our child, and nothing answers on the port.
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert not _alive(server_pid)
    with pytest.raises((dns.exception.Timeout, OSError)):
        dns.query.tcp(dns.message.make_query("a.test", "A"), "127.0.0.1", port=port, timeout=1)


# -- details of the dnspython server ----------------------------------------


def ask(server: Server, name: str, rdtype: str, **kw: Any) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    return dns.query.udp(query, server.host, port=server.port, timeout=5)


@pytest.fixture(scope="module")
def own() -> Iterator[DNSServer]:
    with DNSServer(RECORDS) as srv:
        yield srv


@pytest.mark.timeout(30)
def test_negative_answers_are_authoritative_with_soa(own: DNSServer) -> None:
    nx = ask(own, "unknown.test", "MX")
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert nx.flags & dns.flags.AA
    assert [rrset.rdtype for rrset in nx.authority] == [dns.rdatatype.SOA]
    nodata = ask(own, "nomx.test", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR
    assert nodata.answer == []
    assert [rrset.rdtype for rrset in nodata.authority] == [dns.rdatatype.SOA]


@pytest.mark.timeout(30)
def test_empty_non_terminal_is_nodata(own: DNSServer) -> None:
    # "example.test" exists as the parent of "mx1.example.test" (RFC 8020).
    for name in ("example.test", "test"):
        answer = ask(own, name, "A")
        assert answer.rcode() == dns.rcode.NOERROR
        assert answer.answer == []


@pytest.mark.timeout(30)
def test_mx_answer_carries_the_exchanges_addresses(own: DNSServer) -> None:
    answer = ask(own, "example.test", "MX")
    glue = {(r.name.to_text(), r.rdtype) for r in answer.additional}
    assert glue == {
        ("mx1.example.test.", dns.rdatatype.A),
        ("mx2.example.test.", dns.rdatatype.A),
        ("mx2.example.test.", dns.rdatatype.AAAA),
    }


@pytest.mark.timeout(30)
def test_big_answer_is_truncated_over_udp_and_complete_over_tcp() -> None:
    many = {"big.test": {"A": [f"127.0.1.{i}" for i in range(1, 101)]}}
    with DNSServer(many) as srv:
        plain = ask(srv, "big.test", "A")  # no EDNS: at most 512 octets
        assert plain.flags & dns.flags.TC
        # The resolver retries over TCP by itself and gets all 100 addresses.
        assert len(resolve(srv, "big.test", "A")) == 100
        protos = [e["proto"] for e in srv.query_log()]
        assert protos[-2:] == ["udp", "tcp"]


@pytest.mark.timeout(30)
def test_udp_truncate_forces_tcp() -> None:
    with DNSServer(RECORDS, udp_truncate=True) as srv:
        assert mx_list(resolve(srv, "example.test", "MX"))[0] == (10, "mx1.example.test.")
        assert [e["proto"] for e in srv.query_log()] == ["udp", "tcp"]
        srv.set_records(RECORDS, udp_truncate=False)
        srv.clear_queries()
        resolve(srv, "example.test", "MX")
        assert [e["proto"] for e in srv.query_log()] == ["udp"]


@pytest.mark.timeout(30)
def test_nameserver_ports_mapping_works_too(own: DNSServer) -> None:
    async def go() -> dns.resolver.Answer:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.nameserver_ports = {"127.0.0.1": own.port}
        resolver.lifetime = 5
        return await resolver.resolve("nullmx.test", "MX")

    assert [r.exchange for r in asyncio.run(go())] == [dns.name.root]


@pytest.mark.timeout(30)
def test_address_as_a_do53_nameserver(own: DNSServer) -> None:
    # The MTA turns each "host:port" of [dns] nameservers into one of these.
    host, _, port = own.address.rpartition(":")

    async def go() -> dns.resolver.Answer:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, int(port))]
        resolver.lifetime = 5
        return await resolver.resolve("example.test", "MX")

    assert mx_list(asyncio.run(go()))[0] == (10, "mx1.example.test.")


@pytest.mark.timeout(30)
def test_records_are_validated_in_the_test_process() -> None:
    with pytest.raises(ValueError):
        normalize_records({"bad.test": "MAYBE"})
    with pytest.raises(ValueError):
        normalize_records({"bad.test": {"A": ["not-an-address"]}})
    with pytest.raises(ValueError):
        DnsmasqServer({"srv.test": {"SRV": ["0 0 25 mx.test"]}})
    assert normalize_records({"X.Test": {"MX": (10, "Mx.X.Test")}}) == {
        "x.test.": {"MX": ["10 Mx.X.Test."]}
    }


@pytest.mark.timeout(30)
def test_server_exits_when_its_parent_dies(impl: type[Server]) -> None:
    # A test process killed with -9 must not leave a server on a port.
    pid_attr = "dnsmasq_pid" if impl is DnsmasqServer else "pid"
    code = (
        "import sys, time\n"
        f"from tests.support.dns_server import {impl.__name__}\n"
        f"s = {impl.__name__}({{}}).start()\n"
        f"print(s.{pid_attr}, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "DNS server outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def _alive(pid: int) -> bool:
    # An exited but unreaped orphan is a zombie ("Z"): gone for our purpose.
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # FileNotFoundError, or ESRCH if it vanishes while read
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "Z" not in state.split()[1]


@pytest.mark.timeout(30)
def test_standalone_command_line(tmp_path: Path) -> None:
    zone = tmp_path / "zone.json"
    zone.write_text(json.dumps({"records": {"cli.test": {"MX": [[10, "mx.cli.test"]]}}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.dns_server", "--port", "0", "--zone-file", str(zone)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        word, host, port = proc.stdout.readline().split()
        assert (word, host) == ("READY", "127.0.0.1")
        answer = dns.query.tcp(
            dns.message.make_query("cli.test", "MX"), host, port=int(port), timeout=5
        )
        assert answer.answer[0][0].exchange.to_text() == "mx.cli.test."
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
