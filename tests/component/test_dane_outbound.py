"""DANE for SMTP (RFC 7672) on the way out, with a real validating resolver.

unbound validates zones the test signed itself (ldns-signzone) against their
own keys; the queue manager believes its AD bit because it listens on
loopback.  MX hosts are aiosmtpd servers whose certificates the TLSA records
name, or do not (tests/harness/tls_world.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta import tlsrpt
from mta.tlsdns import DNSSECResolver
from tests.harness.tls_world import Rig, World, build, mx_hosts

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from build(tmp_path_factory.mktemp("world"))


def test_unbound_validates_the_signed_zone_and_not_the_others(world: World) -> None:
    assert world.dns.validated("_25._tcp.mx-ee.dane.test", "TLSA")
    assert not world.dns.validated("_25._tcp.mx-insecure.sts.test", "TLSA")


@pytest.mark.parametrize("domain, host", [("ee.dane.test", "ee"), ("ta.dane.test", "ta")])
def test_a_certificate_matching_the_tlsa_records_gets_the_mail(world: World, tmp_path: Path, domain: str,
                                                              host: str) -> None:
    """DANE-EE (3 1 1: a self-signed certificate no CA knows) and DANE-TA (2 0 1: the root it chains to)."""
    async def go() -> None:
        rig = Rig(world, tmp_path)
        async with mx_hosts(world) as mx:
            r = await rig.send(f"bob@{domain}")
            await rig.close()
        assert r.state == "delivered", r.last_reply
        assert [m.tls for m in mx[host].received] == [True]
        assert ("tlsa", domain, "ok", f"mx-{host}.dane.test") in rig.results()

    asyncio.run(go())


@pytest.mark.parametrize("domain, host, result, why", [
    ("eebad.dane.test", "eebad", tlsrpt.HOST_MISMATCH, "matches its DANE-EE TLSA records"),
    ("tabad.dane.test", "tabad", tlsrpt.HOST_MISMATCH, "does not chain to the DANE-TA trust anchor"),
])
def test_a_certificate_the_tlsa_records_do_not_name_gets_nothing(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture, domain: str, host: str, result: str, why: str,
) -> None:
    async def go() -> None:
        rig = Rig(world, tmp_path)
        async with mx_hosts(world) as mx:
            r = await rig.send(f"bob@{domain}")
            await rig.close()
        assert r.state == "queued", r.last_reply
        assert r.last_reply.startswith("451 4.7.5 DANE:") and why in r.last_reply, r.last_reply
        assert mx[host].connections == 1 and mx[host].received == []  # TLS was made, no MAIL sent
        assert ("tlsa", domain, result, f"mx-{host}.dane.test") in rig.results()

    caplog.set_level(logging.WARNING, logger="tlspolicy")
    asyncio.run(go())
    assert any("not delivering to DANE:" in r.getMessage() and domain.split(".")[0] in r.getMessage()
               for r in caplog.records)


def test_with_tlsa_records_there_is_no_fallback_to_cleartext(world: World, tmp_path: Path) -> None:
    async def go() -> None:
        rig = Rig(world, tmp_path)
        async with mx_hosts(world) as mx:
            r = await rig.send("bob@notls.dane.test")
            await rig.close()
        assert r.state == "queued" and "does not offer STARTTLS" in r.last_reply, r.last_reply
        assert mx["plain"].received == []
        assert ("tlsa", "notls.dane.test", tlsrpt.STARTTLS_NOT_SUPPORTED, "mx-notls.dane.test") in rig.results()

    asyncio.run(go())


def test_only_unusable_tlsa_records_still_require_tls_without_authentication(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Usage 4 and a 31-octet SHA-256: unusable (logged); RFC 7672 2.2: TLS is still
    mandatory, unauthenticated: delivered over TLS where offered, never in clear."""
    async def go() -> None:
        rig = Rig(world, tmp_path)
        async with mx_hosts(world) as mx:
            ok = await rig.send("bob@unusable.dane.test")
            refused = await rig.send("bob@unusable-notls.dane.test")
            await rig.close()
        assert ok.state == "delivered", ok.last_reply
        assert [m.tls for m in mx["good"].received] == [True]
        assert refused.state == "queued" and "does not offer STARTTLS" in refused.last_reply
        assert mx["plain"].received == []
        assert ("tlsa", "unusable.dane.test", tlsrpt.TLSA_INVALID, "mx-unusable.dane.test") in rig.results()

    caplog.set_level(logging.WARNING, logger="dane")
    asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records if r.name == "dane"]
    assert any("usage 4 (unknown)" in line for line in lines), lines
    assert any("malformed: certificate association data length inconsistent" in line for line in lines), lines


def test_a_tlsa_answer_with_a_broken_signature_keeps_the_mail(world: World, tmp_path: Path) -> None:
    """unbound answers SERVFAIL for the tampered record: nothing is concluded, the mail waits."""
    async def go() -> None:
        rig = Rig(world, tmp_path)
        async with mx_hosts(world) as mx:
            r = await rig.send("bob@bogus.test")
            await rig.close()
        assert r.state == "queued" and r.last_reply.startswith("451 4.7.5 DANE:"), r.last_reply
        assert "TLSA lookup" in r.last_reply and "failed" in r.last_reply
        assert mx["ee"].connections == 0
        assert ("tlsa", "bogus.test", tlsrpt.DNSSEC_INVALID, "mx.bogus.test") in rig.results()

    asyncio.run(go())


def test_tlsa_records_in_an_unsigned_zone_are_not_believed(world: World, tmp_path: Path) -> None:
    """mx-insecure.sts.test publishes a TLSA record its certificate does not match, in
    an unsigned zone: anyone could have written it, so it is not used."""
    async def go() -> None:
        rig = Rig(world, tmp_path)
        async with mx_hosts(world) as mx:
            r = await rig.send("bob@insecure.sts.test")
            await rig.close()
        assert r.state == "delivered", r.last_reply
        assert [m.tls for m in mx["eebad"].received] == [True]
        assert ("no-policy-found", "insecure.sts.test", "ok", "mx-insecure.sts.test") in rig.results()

    asyncio.run(go())


def test_dane_comes_before_mta_sts(world: World, tmp_path: Path) -> None:
    """both.dane.test has DANE and an MTA-STS enforce policy that lists another host:
    its MX host's TLSA records decide, and the mail goes."""
    async def go() -> None:
        rig = Rig(world, tmp_path)
        async with mx_hosts(world) as mx:
            r = await rig.send("bob@both.dane.test")
            await rig.close()
        assert r.state == "delivered", r.last_reply
        assert [m.tls for m in mx["ee"].received] == [True]
        assert rig.results() == [("tlsa", "both.dane.test", "ok", "mx-ee.dane.test")]

    asyncio.run(go())


def test_dane_off_or_a_resolver_not_on_this_host_means_no_dane(world: World, tmp_path: Path) -> None:
    """The AD bit is believed only from a resolver on loopback, and only with DANE on."""
    assert DNSSECResolver([world.dns.address], 1.0).trusted
    assert not DNSSECResolver(["192.0.2.53:53"], 1.0).trusted
    assert not DNSSECResolver(["127.0.0.1:53", "192.0.2.53:53"], 1.0).trusted

    async def go() -> None:
        rig = Rig(world, tmp_path, dane=False)
        async with mx_hosts(world) as mx:
            r = await rig.send("bob@eebad.dane.test")  # its TLSA records do not match: ignored here
            await rig.close()
        assert r.state == "delivered", r.last_reply
        assert len(mx["eebad"].received) == 1

    asyncio.run(go())
