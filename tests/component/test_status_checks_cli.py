"""`mailroom dns --check` and `mailroom status-checks` as commands, over a real DNS server
(tests/support/dns_server.py) and over a resolver that never answers."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mta.auth import dkim
from tests.support.dns_server import DNSServer
from tests.support.suite import Installation
from web import mta_sts

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    return Installation(tmp_path_factory.mktemp("checks") / "m")


def _published(inst: Installation) -> dict[str, Any]:
    records: dict[str, Any] = {
        "example.org": {"MX": [(10, "mail.test")], "TXT": ['"v=spf1 mx -all"']},
        "_dmarc.example.org": {"TXT": ['"v=DMARC1; p=quarantine"']},
        "_mta-sts.example.org": {"TXT": [f'"v=STSv1; id={mta_sts.policy_id(inst.config)}"']},
        "_smtp._tls.example.org": {"TXT": ['"v=TLSRPTv1; rua=mailto:tls@example.org"']},
        "mail.test": {"A": ["192.0.2.25"]},
        "25.2.0.192.in-addr.arpa": {"PTR": ["mail.test."]},
    }
    for k in dkim.load_keys(inst.root / "dkim"):
        text = dkim.public_record(k)
        records[k.dns_name] = {"TXT": [" ".join(f'"{text[i:i + 200]}"' for i in range(0, len(text), 200))]}
    return records


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A UDP and TCP port on loopback where nothing ever answers (an unreachable resolver)."""
    # The kernel picks a free UDP port; the same TCP port may be taken: try another.
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket()
        try:
            tcp.bind(("127.0.0.1", udp.getsockname()[1]))
            break
        except OSError:
            udp.close()
            tcp.close()
    tcp.listen(1)
    yield f"127.0.0.1:{udp.getsockname()[1]}"
    udp.close()
    tcp.close()


def test_an_unreachable_resolver_is_one_line_after_one_timeout(inst: Installation, blackhole: str) -> None:
    inst.set("dns", "nameservers", f'["{blackhole}"]')
    inst.set("dns", "timeout", '"3s"')
    try:
        started = time.monotonic()
        r = inst.cli("dns", "example.org", "--check")
        took = time.monotonic() - started
    finally:
        inst.set("dns", "timeout", '"10s"')
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    assert lines[0].startswith(f"DNS cannot be reached: no answer from {blackhole} within 3 s"), lines
    assert r.stderr == ""
    # Nine records asked one after another would take 9 x 3 s; asked at once, one timeout
    # (and the command's own start).
    assert took < 15, took


def test_spf_and_dmarc_are_compared_with_what_is_expected(inst: Installation) -> None:
    records = _published(inst)
    records["example.org"] = {"MX": [(10, "mail.test")], "TXT": ['"v=spf1 ip4:127.0.0.1 -all"']}
    records["_dmarc.example.org"] = {"TXT": ['"v=DMARC1; p=bogus"']}
    with DNSServer(records) as server:
        inst.set("dns", "nameservers", f'["{server.address}"]')
        r = inst.cli("dns", "example.org", "--check")
    assert r.returncode == 1, r.stdout
    out = r.stdout
    assert re.search(r"(?m)^different SPF      example\.org\n          want: v=spf1 mx -all\n"
                     r"          have: v=spf1 ip4:127\.0\.0\.1 -all\n"
                     r"          note: with it, mail from this host \(192\.0\.2\.25\) fails SPF\n"
                     r'          fix:  replace it with: example\.org\. IN TXT "v=spf1 mx -all"', out), out
    assert re.search(r"(?m)^different DMARC    _dmarc\.example\.org", out), out
    assert out.rstrip().endswith("some records are missing or different")


def test_dmarc_p_none_is_weak_and_does_not_fail(inst: Installation) -> None:
    records = _published(inst)
    records["_dmarc.example.org"] = {"TXT": ['"v=DMARC1; p=none; rua=mailto:postmaster@example.org"']}
    with DNSServer(records) as server:
        inst.set("dns", "nameservers", f'["{server.address}"]')
        r = inst.cli("dns", "example.org", "--check")
        j = inst.cli("dns", "example.org", "--check", "--json")
    assert r.returncode == 0, r.stdout
    out = r.stdout
    assert re.search(r"(?m)^weak      DMARC    _dmarc\.example\.org\n.*\n.*\n          note: p=none", out), out
    assert re.search(r"(?m)^optional  TLSA     _25\._tcp\.mail\.test", out), out
    assert "all records present; 2 could be better (see above)" in out
    report = json.loads(j.stdout)
    assert report["ok"] is True
    [dmarc] = [c for c in report["checks"] if c["kind"] == "DMARC"]
    assert (dmarc["level"], dmarc["state"]) == ("warn", "weak")


def test_status_checks_cover_the_host_certificate_backup_and_blocklists(inst: Installation) -> None:
    records = _published(inst)
    records["25.2.0.192.bl.test"] = {"A": ["127.0.0.2"], "TXT": ['"listed: see bl.test"']}
    inst.set("filter", "dnsbl_zones", '["bl.test"]')
    try:
        with DNSServer(records) as server:
            inst.set("dns", "nameservers", f'["{server.address}"]')
            r = inst.cli("status-checks", "--json")
    finally:
        inst.set("filter", "dnsbl_zones", "[]")
    assert r.returncode == 1, r.stdout + r.stderr
    found = {(c["kind"], c["state"]) for c in json.loads(r.stdout)["checks"]}
    for expected in [("MX", "present"), ("SPF", "present"), ("DKIM", "present"), ("PTR", "present"),
                     ("FCDNS", "present"), ("TLSA", "optional"), ("DNSBL", "listed"), ("CERT", "self-signed"),
                     ("BACKUP", "none")]:
        assert expected in found, (expected, found)


def test_dns_warns_about_a_host_name_nobody_can_reach(tmp_path_factory: pytest.TempPathFactory) -> None:
    local = Installation(tmp_path_factory.mktemp("localhost") / "m")
    local.set("mailroom", "hostname", '"localhost"')
    r = local.cli("dns", "example.org")
    assert r.returncode == 0
    assert "warning: [mailroom] hostname = localhost is not a public name" in r.stderr
    assert "; WARNING: [mailroom] hostname = localhost" in r.stdout
    assert "example.org. IN MX 10 localhost." in r.stdout
