"""The process resolver (common/dns.py) against a real DNS server on a loopback port.

Every lookup crosses a UDP (or TCP) socket to tests/support/dns_server.py,
which can be told to delay or drop chosen names, to truncate every UDP answer
and to answer for a name other than the one asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from common.dns import Cache, CacheLimits, DNSTempError, Settings, Wire, from_settings
from tests.support.dns_server import DNSServer

pytestmark = pytest.mark.timeout(60)

BIG = "v=spf1 " + " ".join(f"ip4:198.51.{i // 250}.{i % 250}" for i in range(150)) + " -all"
RECORDS = {
    "example.test": {"A": ["192.0.2.1"], "TXT": ['"v=spf1 -all"'], "MX": [(10, "mx.example.test")]},
    "mx.example.test": {"A": ["192.0.2.2"]},
    "big.test": {"TXT": [" ".join(f'"{BIG[i:i + 250]}"' for i in range(0, len(BIG), 250))]},
    "c1.test": {"CNAME": "c2.test"},
    "c2.test": {"CNAME": "c3.test"},
    "c3.test": {"CNAME": "example.test"},
    "loop1.test": {"CNAME": "loop2.test"},
    "loop2.test": {"CNAME": "loop1.test"},
    "asked.test": {"A": ["192.0.2.9"]},
    "other.test": {"A": ["203.0.113.66"], "TXT": ['"v=spf1 +all"']},
    "dropped.test": "TIMEOUT",
    "soa.test": {"SOA": ["ns.soa.test. host.soa.test. 1 3600 600 86400 30"], "A": ["192.0.2.3"]},
}


@pytest.fixture(scope="module")
def server() -> Iterator[DNSServer]:
    with DNSServer(RECORDS, ttl=300, delays={"slow.test": 1.0}, misdirect={"asked.test": "other.test"}) as s:
        yield s


def test_answers_carry_their_ttl_and_negative_ones_the_soa_minimum(server: DNSServer) -> None:
    async def go() -> None:
        wire = Wire([server.address], 3)
        ok = await wire.lookup("example.test", "A")
        assert ok.addresses() == ["192.0.2.1"] and ok.ttl == 300
        nx = await wire.lookup("nowhere.soa.test", "A")
        assert nx.nxdomain and nx.ttl == 30  # RFC 2308 5: min(SOA TTL 300, minimum 30)
        nodata = await wire.lookup("soa.test", "MX")
        assert not nodata.records and not nodata.nxdomain and nodata.ttl == 30
        assert not ok.secure  # the test server does not validate: no AD flag

    asyncio.run(go())


def test_a_truncated_udp_answer_is_asked_again_over_tcp(server: DNSServer) -> None:
    server.set_records(RECORDS, udp_truncate=True)
    try:
        server.clear_queries()
        answer = asyncio.run(Wire([server.address], 3).lookup("example.test", "MX"))
        assert answer.mx() == [(10, "mx.example.test")]
        assert [e["proto"] for e in server.query_log()] == ["udp", "tcp"]
    finally:
        server.set_records(RECORDS, udp_truncate=False)


def test_an_oversized_txt_record_comes_whole_over_tcp(server: DNSServer) -> None:
    server.clear_queries()
    answer = asyncio.run(Wire([server.address], 3).lookup("big.test", "TXT"))
    assert answer.texts() == [BIG.encode()] and len(BIG) > 1232  # more than a UDP answer may carry
    assert [e["proto"] for e in server.query_log()] == ["udp", "tcp"]


def test_cname_chains_are_followed_and_loops_fail(server: DNSServer) -> None:
    async def go() -> None:
        wire = Wire([server.address], 3)
        assert (await wire.lookup("c1.test", "TXT")).texts() == [b"v=spf1 -all"]
        with pytest.raises(DNSTempError):
            await wire.lookup("loop1.test", "A")

    asyncio.run(go())


def test_an_answer_for_another_name_is_not_taken(server: DNSServer) -> None:
    # The server answers "asked.test A" with other.test's record, under other.test's name.
    async def go() -> None:
        answer = await Wire([server.address], 3).lookup("asked.test", "A")
        assert answer.records == () and not answer.nxdomain  # nothing for the name we asked
        txt = await Wire([server.address], 3).lookup("asked.test", "TXT")
        assert txt.texts() == []

    asyncio.run(go())


def test_a_name_that_never_answers_is_a_timeout_within_the_lifetime(server: DNSServer) -> None:
    async def go() -> None:
        started = time.monotonic()
        with pytest.raises(DNSTempError) as caught:
            await Wire([server.address], 1.5).lookup("dropped.test", "TXT")
        assert caught.value.timeout
        assert 1.4 < time.monotonic() - started < 2.5

    asyncio.run(go())


def test_a_slow_name_costs_only_its_own_lookups(server: DNSServer) -> None:
    async def go() -> None:
        resolver = from_settings(Settings((server.address,), timeout=5.0))
        slow = [asyncio.ensure_future(resolver.lookup("slow.test", "A")) for _ in range(5)]
        started = time.monotonic()
        for i in range(50):
            answer = await resolver.lookup("example.test" if i % 2 else "mx.example.test", "A")
            assert answer.addresses()
            await resolver.lookup(f"n{i}.nowhere.test", "TXT")  # each a real query
        fast = time.monotonic() - started
        assert not any(s.done() for s in slow), "the slow name answered early"
        assert fast < 2.0, f"other names waited {fast:.2f}s behind the slow one"
        answers = await asyncio.gather(*slow, return_exceptions=True)
        assert all(isinstance(a, Exception) or a.nxdomain for a in answers)

    asyncio.run(go())


def test_twenty_sessions_asking_one_slow_name_make_one_query(server: DNSServer) -> None:
    server.set_records({**RECORDS, "slow.test": {"TXT": ['"v=spf1 -all"']}})
    try:
        server.clear_queries()

        async def go() -> None:
            resolver = Cache(Wire([server.address], 5.0), CacheLimits())
            answers = await asyncio.gather(*(resolver.lookup("slow.test", "TXT") for _ in range(20)))
            assert all(a.texts() == [b"v=spf1 -all"] for a in answers)
            await resolver.lookup("slow.test", "TXT")  # and then from the cache

        asyncio.run(go())
        assert server.queries() == [("slow.test", "TXT")]
    finally:
        server.set_records(RECORDS)
