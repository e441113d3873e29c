"""`[outbound_tls.policy]`: the operator's TLS rule per destination, over what DANE and MTA-STS say.

The same small Internet as the MTA-STS and DANE tests (tests/harness/tls_world.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta import tlsrpt
from mta.routing import Route
from mta.tlspolicy import Level, Planner, Table
from tests.harness.peers import MX, mx_server
from tests.harness.tls_world import Rig, World, build, mx_hosts
from tests.support.pki import self_signed
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from build(tmp_path_factory.mktemp("world"))


@pytest.mark.parametrize("domain, level, host, state, tls, why", [
    # none: no STARTTLS even where offered, and the MTA-STS policy is not even fetched.
    ("enforce.sts.test", "none", "good", "delivered", False, ""),
    # may: the MTA-STS enforce policy would refuse this certificate; the table says opportunistic.
    ("wrongcert.sts.test", "may", "wrong", "delivered", True, ""),
    # encrypt: TLS, certificate unchecked; none offered: the mail waits.
    ("selfsigned.sts.test", "encrypt", "self", "delivered", True, ""),
    ("cached.sts.test", "encrypt", "plain", "queued", False, "does not offer STARTTLS"),
    # verify: a CA and the MX host's name.
    ("enforce.sts.test", "verify", "good", "delivered", True, ""),
    ("selfsigned.sts.test", "verify", "self", "queued", False, "certificate verify failed"),
    ("insecure.sts.test", "verify", "eebad", "queued", False, "certificate verify failed"),
    # dane: DANE or nothing.
    ("ee.dane.test", "dane", "ee", "delivered", True, ""),
    ("none.dane.test", "dane", "good", "queued", False, "DANE required for none.dane.test"),
    ("enforce.sts.test", "dane", "good", "queued", False, "the MX records are not DNSSEC-validated"),
])
def test_the_table_decides_for_its_domain(
    world: World, tmp_path: Path, domain: str, level: str, host: str, state: str, tls: bool, why: str,
) -> None:
    async def go() -> None:
        rig = Rig(world, tmp_path, table={domain: level})
        fetched = world.https.fetched(f"mta-sts.{domain}")
        async with mx_hosts(world) as mx:
            r = await rig.send(f"bob@{domain}")
            await rig.close()
        assert r.state == state, r.last_reply
        if state == "delivered":
            assert [m.tls for m in mx[host].received] == [tls]
        else:
            assert r.last_reply.startswith("451 4.7.5") and why in r.last_reply, r.last_reply
            assert mx[host].received == []
        if level != "dane":
            assert world.https.fetched(f"mta-sts.{domain}") == fetched  # the table overrides discovery

    asyncio.run(go())


def test_a_dot_entry_covers_every_domain_under_it_and_an_exact_entry_wins(world: World, tmp_path: Path) -> None:
    async def go() -> None:
        rig = Rig(world, tmp_path, table={".sts.test": "none", "enforce.sts.test": "verify"})
        async with mx_hosts(world) as mx:
            plain = await rig.send("bob@testing.sts.test")
            verified = await rig.send("bob@enforce.sts.test")
            await rig.close()
        assert (plain.state, verified.state) == ("delivered", "delivered")
        assert [m.tls for m in mx["self"].received] == [False]
        assert [m.tls for m in mx["good"].received] == [True]

    asyncio.run(go())
    table = Table({".sts.test": "none", "enforce.sts.test": "verify"})
    assert table.lookup("a.b.sts.test") is Level.NONE and table.lookup("sts.test") is None
    assert table.lookup("ENFORCE.sts.test.") is Level.VERIFY


def test_the_relayhost_keeps_its_verified_tls_whatever_the_table_says(world: World, tmp_path: Path) -> None:
    """The table says `none` for the recipient's domain: the relayhost still gets TLS
    with its certificate verified, and one whose certificate is not verified gets nothing."""
    async def go() -> None:
        port = free_port("127.0.0.67")
        good = world.ca.issue("127.0.0.67", label="relay-good")
        bad = self_signed(tmp_path, "127.0.0.67")
        for cert, expected in ((good, "delivered"), (bad, "queued")):
            async with mx_server("127.0.0.67", port, MX(), tls=(cert.cert, cert.key)) as relay:
                rig = Rig(world, tmp_path / expected, table={"enforce.sts.test": "none"},
                          relayhost=f"127.0.0.67:{port}", relayhost_ca_file=str(world.ca.ca_file))
                try:
                    r = await rig.send("bob@enforce.sts.test")
                finally:
                    await rig.close()
            assert r.state == expected, r.last_reply
            assert [m.tls for m in relay.received] == ([True] if expected == "delivered" else [])
            assert rig.recorder.pending == {}  # the relayhost is no MX: nothing for TLS-RPT

    (tmp_path / "delivered").mkdir()
    (tmp_path / "queued").mkdir()
    asyncio.run(go())


def test_requiretls_raises_any_rule_to_verified(tmp_path: Path) -> None:
    """Mail that asked for REQUIRETLS (RFC 8689) needs a verified certificate even where
    the table says may; DANE already is one."""
    async def go() -> None:
        planner = Planner(table=Table({"x.test": "may", "y.test": "none"}))
        route = Route([("192.0.2.1", 25)], via="mx", names={"192.0.2.1": "mx.x.test"})
        plain = await planner.rules("x.test", route)
        asked = await planner.rules("x.test", route, requiretls=True)
        none_asked = await planner.rules("y.test", route, requiretls=True)
        assert plain["mx.x.test"].level is Level.MAY
        assert asked["mx.x.test"].level is Level.VERIFY and asked["mx.x.test"].enforce
        assert none_asked["mx.x.test"].level is Level.VERIFY

    asyncio.run(go())


def test_a_transport_map_host_follows_only_the_table(world: World, tmp_path: Path) -> None:
    """A transport-map next hop is no MX: no MTA-STS policy is fetched for it."""
    async def go() -> None:
        port = world.mx_port
        rig = Rig(world, tmp_path, transport={"enforce.sts.test": f"127.0.0.64:{port}"})
        fetched = world.https.fetched("mta-sts.enforce.sts.test")
        async with mx_hosts(world) as mx:
            r = await rig.send("bob@enforce.sts.test")  # the plain host: fine, no policy applies
            await rig.close()
        assert r.state == "delivered" and [m.tls for m in mx["plain"].received] == [False]
        assert world.https.fetched("mta-sts.enforce.sts.test") == fetched
        assert all(k.policy.type != tlsrpt.STS for k in rig.recorder.pending)

    asyncio.run(go())
