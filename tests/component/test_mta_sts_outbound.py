"""MTA-STS (RFC 8461) on the way out: the queue manager fetches, caches and obeys recipient domains' policies.

Real peers: unbound answering the `_mta-sts` TXT records, an HTTPS policy
host with a certificate from the test's CA, aiosmtpd MX hosts with good,
wrong, self-signed or no certificates (tests/harness/tls_world.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta import mtasts, tlsrpt
from tests.harness.tls_world import Rig, World, build, mx_hosts
from tests.support.https_host import Page

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from build(tmp_path_factory.mktemp("world"))


def test_the_world_is_what_the_tests_assume(world: World) -> None:
    assert not world.dns.validated("enforce.sts.test", "MX")  # unsigned
    assert world.dns.validated("ee.dane.test", "MX")


def test_enforce_delivers_over_verified_tls_and_the_policy_is_fetched_once_and_cached(
    world: World, tmp_path: Path,
) -> None:
    async def go() -> None:
        rig = Rig(world, tmp_path)
        before = world.https.fetched("mta-sts.enforce.sts.test")
        async with mx_hosts(world) as mx:
            first = await rig.send("bob@enforce.sts.test")
            second = await rig.send("carol@enforce.sts.test")
            await rig.close()
        assert (first.state, second.state) == ("delivered", "delivered"), first.last_reply
        assert [m.tls for m in mx["good"].received] == [True, True]
        assert world.https.fetched("mta-sts.enforce.sts.test") == before + 1  # cached after the first
        cached = json.loads(rig.cache_file.read_text())["enforce.sts.test"]
        assert (cached["id"], cached["mode"], cached["mx"]) == ("1", "enforce", ["*.sts.test"])
        assert ("sts", "enforce.sts.test", "ok", "mx-good.sts.test") in rig.results()

    asyncio.run(go())


@pytest.mark.parametrize("domain, host, result, why", [
    ("wrongcert.sts.test", "wrong", tlsrpt.HOST_MISMATCH, "certificate verify failed"),
    ("selfsigned.sts.test", "self", tlsrpt.NOT_TRUSTED, "certificate verify failed"),
    ("notls.sts.test", "plain", tlsrpt.STARTTLS_NOT_SUPPORTED, "does not offer STARTTLS"),
])
def test_enforce_never_hands_mail_to_an_mx_without_a_verified_certificate(
    world: World, tmp_path: Path, domain: str, host: str, result: str, why: str,
) -> None:
    async def go() -> None:
        rig = Rig(world, tmp_path)
        async with mx_hosts(world) as mx:
            r = await rig.send(f"bob@{domain}")
            await rig.close()
        assert r.state == "queued", r.last_reply  # deferred: retried later, never bounced for this
        assert r.last_reply.startswith("451 4.7.5") and why in r.last_reply, r.last_reply
        assert mx[host].received == [] and mx[host].connections == 1
        assert ("sts", domain, result, f"mx-{host}.sts.test") in rig.results()

    asyncio.run(go())


def test_enforce_skips_an_mx_host_the_policy_does_not_list_without_connecting(world: World, tmp_path: Path) -> None:
    async def go() -> None:
        rig = Rig(world, tmp_path)
        async with mx_hosts(world) as mx:
            r = await rig.send("bob@unlisted.sts.test")
            await rig.close()
        assert r.state == "queued" and r.last_reply.startswith("451 4.7.5"), r.last_reply
        assert "not allowed by the MTA-STS policy of unlisted.sts.test" in r.last_reply
        assert mx["good"].connections == 0
        assert ("sts", "unlisted.sts.test", tlsrpt.VALIDATION_FAILURE, "mx-good.sts.test") in rig.results()

    asyncio.run(go())


def test_testing_mode_delivers_despite_a_bad_certificate_and_reports_it(world: World, tmp_path: Path) -> None:
    async def go() -> None:
        rig = Rig(world, tmp_path)
        async with mx_hosts(world) as mx:
            r = await rig.send("bob@testing.sts.test")
            await rig.close()
        assert r.state == "delivered", r.last_reply
        assert [m.tls for m in mx["self"].received] == [True]  # opportunistic TLS after the failed check
        assert ("sts", "testing.sts.test", tlsrpt.NOT_TRUSTED, "mx-self.sts.test") in rig.results()

    asyncio.run(go())


@pytest.mark.parametrize("domain, result, log_text", [
    ("big", mtasts.FETCH_ERROR, "larger than 65536 octets"),
    ("slow", mtasts.FETCH_ERROR, "within 1 s"),
    ("v2", mtasts.INVALID, "not STSv1"),
    ("http", mtasts.FETCH_ERROR, "TLS failed (is it HTTPS at all?)"),
    ("redirect", mtasts.FETCH_ERROR, "a redirect (not followed"),
    ("html", mtasts.INVALID, "not text/plain"),
    ("webpki", mtasts.WEBPKI_INVALID, "certificate not valid"),
    ("badmx", mtasts.INVALID, "no usable mx"),
])
def test_a_bad_policy_is_not_used_logged_and_reported(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture, domain: str, result: str, log_text: str,
) -> None:
    """No cached policy: the domain is treated as having none (RFC 8461 3.3), so the
    mail goes (opportunistic TLS), and the failure is logged and counted for TLS-RPT."""
    async def go() -> None:
        rig = Rig(world, tmp_path, sts_timeout=1.0)
        async with mx_hosts(world) as mx:
            r = await rig.send(f"bob@{domain}.sts.test")
            await rig.close()
        assert r.state == "delivered", r.last_reply
        assert mx["good"].received[0].tls
        assert ("sts", f"{domain}.sts.test", result, "mx-good.sts.test") in rig.results()
        assert not rig.cache_file.exists() or f"{domain}.sts.test" not in json.loads(rig.cache_file.read_text())

    caplog.set_level(logging.WARNING, logger="mtasts")
    asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records if r.name == "mtasts"]
    assert any(f"policy of {domain}.sts.test" in line and log_text in line for line in lines), lines


def test_a_cached_enforce_policy_stays_in_force_when_the_new_one_cannot_be_fetched(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The TXT id changed (2), the new policy is too big: the cached one (id 1, enforce)
    still holds, and its MX host offers no STARTTLS, so nothing goes in clear."""
    async def go() -> None:
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        (tmp_path / "mta-sts.json").write_text(json.dumps({"cached.sts.test": {
            "id": "1", "mode": "enforce", "max_age": 86400, "mx": ["mx-plain.sts.test"],
            "lines": ["version: STSv1", "mode: enforce", "mx: mx-plain.sts.test", "max_age: 86400"],
            "fetched": now.isoformat(), "expires": (now + dt.timedelta(days=1)).isoformat()}}))
        rig = Rig(world, tmp_path)  # reads the cache a previous run left: it survives restarts
        async with mx_hosts(world) as mx:
            r = await rig.send("bob@cached.sts.test")
            await rig.close()
        assert r.state == "queued" and "does not offer STARTTLS" in r.last_reply, r.last_reply
        assert mx["plain"].received == []
        results = rig.results()
        assert ("sts", "cached.sts.test", mtasts.FETCH_ERROR, "mx-plain.sts.test") not in results
        assert ("sts", "cached.sts.test", tlsrpt.STARTTLS_NOT_SUPPORTED, "mx-plain.sts.test") in results

    caplog.set_level(logging.WARNING, logger="mtasts")
    asyncio.run(go())
    assert any("keeping the cached policy of cached.sts.test" in r.getMessage() for r in caplog.records)


def test_without_a_cached_policy_the_same_domain_gets_its_mail_in_clear(world: World, tmp_path: Path) -> None:
    """The other side of the test above: with no policy in force, the MX without STARTTLS gets it."""
    async def go() -> None:
        rig = Rig(world, tmp_path)
        async with mx_hosts(world) as mx:
            r = await rig.send("bob@cached.sts.test")
            await rig.close()
        assert r.state == "delivered", r.last_reply
        assert [m.tls for m in mx["plain"].received] == [False]

    asyncio.run(go())


def test_a_policy_is_refreshed_in_the_background_and_dropped_when_it_expires(world: World, tmp_path: Path) -> None:
    async def go() -> None:
        rig = Rig(world, tmp_path)
        host = "mta-sts.enforce.sts.test"
        async with mx_hosts(world):
            await rig.send("a@enforce.sts.test")
            fetched = world.https.fetched(host)
            rig.clock.advance(13 * 3600)  # past half its max_age (1 day): refreshed
            await rig.remote.close()  # no cached session: the next message looks at the policy again
            assert (await rig.send("b@enforce.sts.test")).state == "delivered"
            await asyncio.gather(*rig.policies.refreshing)
            assert world.https.fetched(host) == fetched + 1
            refreshed = rig.policies.cached["enforce.sts.test"]
            assert refreshed.fetched == rig.clock.now()
            # Expired, and the policy host now answers 404: the domain has no policy in force.
            world.https.pages[(host, mtasts.PATH)] = Page(b"gone", status=404)
            try:
                rig.clock.advance(2 * 86400)
                found = await rig.policies.find("enforce.sts.test")
            finally:
                world.https.pages[(host, mtasts.PATH)] = Page(
                    b"version: STSv1\nmode: enforce\nmx: *.sts.test\nmax_age: 86400\n")
            assert found.policy is None and found.failure is not None and "404" in found.failure[1]
            await rig.close()

    asyncio.run(go())


def test_a_cache_that_cannot_be_written_costs_no_mail(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    async def go() -> None:
        (tmp_path / "not-a-folder").write_text("")
        rig = Rig(world, tmp_path, cache_file=tmp_path / "not-a-folder" / "mta-sts.json")
        async with mx_hosts(world) as mx:
            first = await rig.send("bob@enforce.sts.test")
            await rig.close()
        assert first.state == "delivered", first.last_reply
        assert [m.tls for m in mx["good"].received] == [True]
        assert rig.policies.cached["enforce.sts.test"].mode == "enforce"  # in force, in memory

    caplog.set_level(logging.WARNING, logger="mtasts")
    asyncio.run(go())
    assert any("cannot write the cache" in r.getMessage() for r in caplog.records)
