"""The resolver's cache (common/dns.py `Cache`) over answers from a dictionary, on a fake clock.

TTLs, RFC 2308 negative caching, the caps of `[dns]`, failures remembered a few
seconds, the LRU bound, and in-flight coalescing (many lookups of one name at
once make one query).  Over a real DNS server on loopback: test_dns_wire.py.
"""

from __future__ import annotations

import asyncio

import pytest

from common import counters
from common.dns import Answer, Cache, CacheLimits, DNSTempError
from tests.harness.dns import FakeResolver

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Gated(FakeResolver):
    """A FakeResolver whose answers wait until the test opens the gate."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.gate = asyncio.Event()

    async def lookup(self, name: str, rdtype: str) -> Answer:
        await self.gate.wait()
        return await super().lookup(name, rdtype)


RECORDS = {
    "example.test": {"TXT": ["v=spf1 -all"], "A": ["192.0.2.1"]},
    "down.test": "SERVFAIL",
}


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_an_answer_is_kept_for_its_ttl_then_asked_again() -> None:
    upstream, clock = FakeResolver(RECORDS, ttl=60), Clock()
    cache = Cache(upstream, now=clock)

    async def go() -> None:
        first = await cache.lookup("example.test", "TXT")
        assert first.texts() == [b"v=spf1 -all"]
        clock.t += 59
        assert (await cache.lookup("Example.Test.", "txt")).texts() == [b"v=spf1 -all"]  # same name, any case
        assert upstream.queries() == [("example.test", "TXT")]
        clock.t += 2  # past the TTL
        await cache.lookup("example.test", "TXT")
        assert upstream.queries() == [("example.test", "TXT")] * 2

    run(go())


def test_ttls_are_capped_by_the_settings() -> None:
    upstream, clock = FakeResolver(RECORDS, ttl=86_400), Clock()
    cache = Cache(upstream, CacheLimits(max_ttl=300, max_negative_ttl=30), now=clock)

    async def go() -> None:
        await cache.lookup("example.test", "A")
        nx = await cache.lookup("nowhere.test", "A")
        assert nx.nxdomain
        nodata = await cache.lookup("example.test", "MX")
        assert not nodata.records and not nodata.nxdomain
        clock.t += 29
        for name, rdtype in (("example.test", "A"), ("nowhere.test", "A"), ("example.test", "MX")):
            await cache.lookup(name, rdtype)
        assert len(upstream.queries()) == 3  # all three from the cache
        clock.t += 2  # 31 s: the negative answers are gone, the positive one stays (300 s)
        for name, rdtype in (("example.test", "A"), ("nowhere.test", "A"), ("example.test", "MX")):
            await cache.lookup(name, rdtype)
        assert upstream.queries()[3:] == [("nowhere.test", "A"), ("example.test", "MX")]
        clock.t += 270  # 301 s
        await cache.lookup("example.test", "A")
        assert upstream.queries()[-1] == ("example.test", "A")

    run(go())


def test_a_negative_answer_without_a_ttl_is_not_kept() -> None:
    # RFC 2308 5: no SOA in the answer, no negative caching (the wire layer says ttl 0).
    upstream, clock = FakeResolver(RECORDS, ttl=0), Clock()
    cache = Cache(upstream, now=clock)

    async def go() -> None:
        await cache.lookup("nowhere.test", "A")
        await cache.lookup("nowhere.test", "A")

    run(go())
    assert upstream.queries() == [("nowhere.test", "A")] * 2


def test_a_failure_is_remembered_a_few_seconds_only() -> None:
    upstream, clock = FakeResolver(RECORDS), Clock()
    cache = Cache(upstream, CacheLimits(failure_ttl=5), now=clock)

    async def go() -> None:
        for _ in range(3):
            with pytest.raises(DNSTempError):
                await cache.lookup("down.test", "TXT")
        assert upstream.queries() == [("down.test", "TXT")]  # a dead zone is not asked by every message
        clock.t += 6
        with pytest.raises(DNSTempError):
            await cache.lookup("down.test", "TXT")
        assert len(upstream.queries()) == 2

    run(go())


def test_the_cache_is_a_bounded_lru() -> None:
    records = {f"n{i}.test": {"A": ["192.0.2.1"]} for i in range(10)}
    upstream, clock = FakeResolver(records), Clock()
    cache = Cache(upstream, CacheLimits(entries=3), now=clock)

    async def go() -> None:
        for i in range(3):
            await cache.lookup(f"n{i}.test", "A")
        await cache.lookup("n0.test", "A")  # used again: now the most recent
        await cache.lookup("n3.test", "A")  # a fourth: the least recently used (n1) goes
        assert len(cache) == 3
        upstream.clear_queries()
        await cache.lookup("n0.test", "A")
        await cache.lookup("n3.test", "A")
        assert upstream.queries() == []
        await cache.lookup("n1.test", "A")
        assert upstream.queries() == [("n1.test", "A")]
        for i in range(10):
            await cache.lookup(f"n{i}.test", "A")
        assert len(cache) == 3  # memory stays bounded whatever is asked

    run(go())


def test_twenty_lookups_of_one_name_at_once_make_one_query() -> None:
    upstream = Gated(RECORDS)
    cache = Cache(upstream)
    before = counters.COUNTERS.value("dns_cache_hits", type="TXT", how="joined")

    async def go() -> None:
        waiting = [asyncio.ensure_future(cache.lookup("example.test", "TXT")) for _ in range(20)]
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in waiting)
        upstream.gate.set()
        answers = await asyncio.gather(*waiting)
        assert all(a.texts() == [b"v=spf1 -all"] for a in answers)

    run(go())
    assert upstream.queries() == [("example.test", "TXT")]
    assert counters.COUNTERS.value("dns_cache_hits", type="TXT", how="joined") - before == 19


def test_one_waiter_giving_up_leaves_the_query_to_the_others() -> None:
    upstream = Gated(RECORDS)
    cache = Cache(upstream)

    async def go() -> None:
        impatient = asyncio.ensure_future(cache.lookup("example.test", "A"))
        patient = asyncio.ensure_future(cache.lookup("example.test", "A"))
        await asyncio.sleep(0.01)
        impatient.cancel()  # its message ran out of time
        await asyncio.sleep(0.01)
        upstream.gate.set()
        assert (await patient).addresses() == ["192.0.2.1"]
        assert impatient.cancelled()
        # ... and the answer was kept for the next one.
        upstream.clear_queries()
        await cache.lookup("example.test", "A")
        assert upstream.queries() == []

    run(go())
