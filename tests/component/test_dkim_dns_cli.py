"""`mailroom dkim keygen`, the first key set of `mailroom init`, and `mailroom dns [--check]`."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from mta import dkim
from tests.support.dns_server import DNSServer
from tests.support.suite import Installation
from web import mta_sts

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    return Installation(tmp_path_factory.mktemp("cli") / "m")


def test_init_makes_a_first_key_pair_owner_only(inst: Installation) -> None:
    key_dir = inst.root / "dkim"
    names = sorted(p.name for p in key_dir.iterdir())
    assert len(names) == 2 and names[0].endswith(".ed25519.key") and names[1].endswith(".rsa.key")
    assert all(n.startswith("example.org.mr") for n in names)
    assert stat.S_IMODE(os.stat(key_dir).st_mode) == 0o700
    for n in names:
        assert stat.S_IMODE(os.stat(key_dir / n).st_mode) == 0o600


def test_keygen_prints_the_records_and_refuses_to_overwrite(inst: Installation) -> None:
    r = inst.cli("dkim", "keygen", "example.org", "--selector", "roll2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith('roll2-rsa._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=')
    assert lines[1].startswith('roll2-ed25519._domainkey.example.org. IN TXT ( "v=DKIM1; k=ed25519; p=')
    keys = {k.dns_selector: k for k in dkim.load_keys(inst.root / "dkim")}
    joined = "".join(re.findall(r'"([^"]*)"', lines[0]))
    assert joined == dkim.public_record(keys["roll2-rsa"])
    again = inst.cli("dkim", "keygen", "example.org", "--selector", "roll2")
    assert again.returncode == 1 and "exists" in again.stderr
    other = inst.cli("dkim", "keygen", "not-ours.test")
    assert other.returncode == 1 and "not a local domain" in other.stderr
    listing = inst.cli("dkim", "list").stdout
    assert "example.org roll2 rsa (signing)" in listing  # the newest set signs


def test_dns_prints_every_record(inst: Installation) -> None:
    r = inst.cli("dns", "example.org")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in ("example.org. IN MX 10 mail.test.", 'example.org. IN TXT "v=spf1 mx -all"',
                 '_dmarc.example.org. IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org"',
                 f'_mta-sts.example.org. IN TXT "v=STSv1; id={mta_sts.policy_id(inst.config)}"',
                 '_smtp._tls.example.org. IN TXT "v=TLSRPTv1; rua=mailto:postmaster@example.org"'):
        assert line in out, out
    assert out.count("._domainkey.example.org. IN TXT") == 4  # two key sets by now
    assert "PTR" in out


def _published(inst: Installation) -> dict[str, Any]:
    records: dict[str, Any] = {
        "example.org": {"MX": [(10, "mail.test")], "TXT": ['"v=spf1 mx -all"']},
        "_dmarc.example.org": {"TXT": ['"v=DMARC1; p=reject"']},
        "_mta-sts.example.org": {"TXT": [f'"v=STSv1; id={mta_sts.policy_id(inst.config)}"']},
        "_smtp._tls.example.org": {"TXT": ['"v=TLSRPTv1; rua=mailto:tls@example.org"']},
        "mail.test": {"A": ["192.0.2.25"]},
        "25.2.0.192.in-addr.arpa": {"PTR": ["mail.test."]},
    }
    for k in dkim.load_keys(inst.root / "dkim"):
        text = dkim.public_record(k)
        records[k.dns_name] = {"TXT": [" ".join(f'"{text[i:i + 200]}"' for i in range(0, len(text), 200))]}
    return records


def test_dns_check_all_present(inst: Installation, tmp_path: Path) -> None:
    with DNSServer(_published(inst)) as server:
        inst.set("dns", "nameservers", f'["{server.address}"]')
        r = inst.cli("dns", "example.org", "--check")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "all records present" in r.stdout
        assert r.stdout.count("present ") >= 9
        # Whether the resolver in use validates DNSSEC (the test server does not).
        assert re.search(rf"(?m)^DNSSEC\s+resolver {server.address} does not validate", r.stdout), r.stdout
        assert ("example.org", "MX") in [(n.rstrip("."), t) for n, t in server.queries()]


def test_dns_check_reports_missing_and_different(inst: Installation) -> None:
    records = _published(inst)
    del records["_dmarc.example.org"]
    records["example.org"] = {"MX": [(10, "mx.someone-else.test")], "TXT": ['"v=spf1 -all"']}
    [rsa_name] = [n for n in records if n.startswith("roll2-rsa.")]
    records[rsa_name] = {"TXT": ['"v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKC"']}
    records["25.2.0.192.in-addr.arpa"] = {"PTR": ["host-192-0-2-25.provider.test."]}
    with DNSServer(records) as server:
        inst.set("dns", "nameservers", f'["{server.address}"]')
        r = inst.cli("dns", "example.org", "--check")
    assert r.returncode == 1
    out = r.stdout
    assert re.search(r"(?m)^missing\s+DMARC\s+_dmarc\.example\.org", out), out
    assert re.search(r"(?m)^different\s+MX\s+example\.org", out), out
    assert re.search(r"(?m)^different\s+SPF\s+example\.org", out), out
    assert re.search(r"(?m)^different\s+DKIM\s+roll2-rsa\._domainkey", out), out
    assert re.search(r"(?m)^present\s+DKIM\s+roll2-ed25519\._domainkey", out), out
    assert re.search(r"(?m)^different\s+PTR\s+25\.2\.0\.192\.in-addr\.arpa", out), out
    assert "have: host-192-0-2-25.provider.test" in out
