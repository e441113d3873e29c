"""The supervised unbound's configuration (cli/unbound.py) validates DNSSEC, seen through our resolver.

A test zone, signed here with ldnsutils (`ldns-keygen`, `ldns-signzone`), is
served by a first unbound as an authoritative `auth-zone`; a second unbound,
run with the configuration `mailroom run` writes (forwarding to the first,
the test's own key as its trust anchor), validates it.  Through it our
resolver (common/dns.py) sees the AD flag on good answers (TLSA included, as
DANE needs), a SERVFAIL for a record whose signature does not match, and
`validates()` tells the validating resolver from the one that is not.
Both are Debian's unbound; neither missing may pass.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import unbound
from common import config as configmod
from common.dns import DNSTempError, Wire, validates_now
from tests.support.peers import find
from tests.support.ports import free_port

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

ZONE = """\
$ORIGIN signed.test.
$TTL 300
@ IN SOA ns.signed.test. host.signed.test. 1 3600 600 86400 300
@ IN NS ns.signed.test.
ns IN A 127.0.0.1
@ IN TXT "v=spf1 ip4:127.0.0.1 -all"
www IN A 192.0.2.7
forged IN A 192.0.2.8
_25._tcp.mx IN TLSA 3 1 1 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
"""

AUTHORITATIVE = """\
server:
    interface: 127.0.0.1
    port: {port}
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
    local-zone: "test." nodefault
remote-control:
    control-enable: no
auth-zone:
    name: "signed.test."
    zonefile: "{zonefile}"
    for-downstream: yes
    for-upstream: no
    fallback-enabled: no
"""


def _tool(name: str) -> str:
    path = find(name)
    assert path, f"{name} is not installed (Debian packages unbound and ldnsutils, .ci/install-peers)"
    return path


def _start(conf: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([_tool("unbound"), "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"unbound exited: {log.read_text()}")
        try:
            asyncio.run(Wire([f"127.0.0.1:{port}"], 0.5).lookup("ns.signed.test", "A"))
            return proc
        except DNSTempError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"unbound did not answer: {log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def resolvers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(validating resolver, authoritative server) addresses."""
    d = tmp_path_factory.mktemp("dnssec")
    (d / "signed.test.zone").write_text(ZONE)
    ksk = subprocess.run([_tool("ldns-keygen"), "-a", "ECDSAP256SHA256", "-k", "signed.test"], cwd=d,
                         capture_output=True, text=True, check=True).stdout.strip()
    zsk = subprocess.run([_tool("ldns-keygen"), "-a", "ECDSAP256SHA256", "signed.test"], cwd=d,
                         capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([_tool("ldns-signzone"), "-n", "signed.test.zone", ksk, zsk], cwd=d, check=True)
    signed = d / "signed.test.zone.signed"
    # A record changed after signing: its signature no longer matches (what a forger would serve).
    text = signed.read_text()
    assert "192.0.2.8" in text
    signed.write_text(text.replace("192.0.2.8", "203.0.113.66"))

    auth_port, val_port = free_port(udp=True), free_port(udp=True)
    (d / "auth.conf").write_text(AUTHORITATIVE.format(port=auth_port, dir=d, zonefile=signed))
    cfg = configmod.from_dict({
        "mailroom": {"domains": ["example.org"], "run_dir": str(d / "run")},
        "dns": {"resolver": "unbound", "unbound_listen": f"127.0.0.1:{val_port}",
                "nameservers": [f"127.0.0.1:{auth_port}"], "trust_anchor": str(d / f"{ksk}.ds")},
    }, d / "mailroom.toml")
    assert unbound.prepare(cfg) is None  # written and accepted by unbound-checkconf
    auth = _start(d / "auth.conf", auth_port, d / "auth.log")
    try:
        validating = _start(unbound.config_file(cfg), val_port, d / "validating.log")
        try:
            yield f"127.0.0.1:{val_port}", f"127.0.0.1:{auth_port}"
        finally:
            _stop(validating)
    finally:
        _stop(auth)


def test_validated_answers_carry_the_ad_flag(resolvers: tuple[str, str]) -> None:
    validating, authoritative = resolvers

    async def go() -> None:
        wire = Wire([validating], 5)
        www = await wire.lookup("www.signed.test", "A")
        assert www.addresses() == ["192.0.2.7"] and www.secure
        tlsa = await wire.lookup("_25._tcp.mx.signed.test", "TLSA")
        assert tlsa.secure and [r.usage for r in tlsa.records] == [3]
        missing = await wire.lookup("nothing.signed.test", "A")
        assert missing.nxdomain and missing.secure  # a proven "no such name" (NSEC)
        # The same answers straight from the authoritative server: not validated, no AD.
        assert not (await Wire([authoritative], 5).lookup("www.signed.test", "A")).secure

    asyncio.run(go())


def test_a_forged_record_is_refused(resolvers: tuple[str, str]) -> None:
    validating, authoritative = resolvers

    async def go() -> None:
        with pytest.raises(DNSTempError):
            await Wire([validating], 5).lookup("forged.signed.test", "A")
        # Unchecked, it would have been taken.
        assert (await Wire([authoritative], 5).lookup("forged.signed.test", "A")).addresses() == ["203.0.113.66"]

    asyncio.run(go())


def test_validates_tells_a_validating_resolver_from_one_that_is_not(resolvers: tuple[str, str]) -> None:
    validating, authoritative = resolvers
    assert validates_now([validating], name="signed.test") is True
    assert validates_now([authoritative], name="signed.test") is False
    assert validates_now([f"127.0.0.1:{free_port(udp=True)}"], name="signed.test", timeout=1) is None
