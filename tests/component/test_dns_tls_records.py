"""`mailroom dns DOMAIN`: the MTA-STS record whose id follows the policy, TLS-RPT, and DANE's TLSA records."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from common.tls import new_key
from tests.support.peers import require
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(120)


def _records(inst: Installation) -> str:
    r = inst.cli("dns", "example.org")
    assert r.returncode == 0, r.stderr
    return r.stdout


def _openssl_tlsa(key: Path) -> str:
    der = subprocess.run([require("openssl"), "pkey", "-in", str(key), "-pubout", "-outform", "DER"],
                         capture_output=True, check=True).stdout
    digest = subprocess.run([require("openssl"), "dgst", "-sha256", "-r"], input=der, capture_output=True, check=True)
    return "3 1 1 " + digest.stdout.split()[0].decode()


def test_the_mta_sts_id_changes_when_the_policy_does_and_tls_rpt_is_printed(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "m")
    first = _records(inst)
    [old_id] = re.findall(r'(?m)^_mta-sts\.example\.org\. IN TXT "v=STSv1; id=([A-Za-z0-9]{1,32})"$', first)
    assert '_smtp._tls.example.org. IN TXT "v=TLSRPTv1; rua=mailto:postmaster@example.org"' in first
    assert ";   mode: testing" in first and ";   mx: mail.test" in first
    assert _records(inst) == first  # the same policy: the same id
    inst.set("mta_sts", "mode", '"enforce"')
    second = _records(inst)
    [new_id] = re.findall(r'(?m)^_mta-sts\.example\.org\. IN TXT "v=STSv1; id=([A-Za-z0-9]{1,32})"$', second)
    assert new_id != old_id and ";   mode: enforce" in second
    inst.set("mta_sts", "mx", '["mail.test", "backup.example.org"]')
    third = _records(inst)
    assert ";   mx: backup.example.org" in third and f"id={new_id}" not in third


def test_tlsa_records_name_the_current_key_and_then_the_next(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "m")
    out = _records(inst)
    current = _openssl_tlsa(inst.root / "tls" / "key.pem")
    assert re.findall(r"(?m)^_25\._tcp\.mail\.test\. IN TLSA (.*)$", out) == [current]
    (inst.root / "acme").mkdir()
    (inst.root / "acme" / "next-key.pem").write_bytes(new_key("ecdsa-p256"))
    nxt = _openssl_tlsa(inst.root / "acme" / "next-key.pem")
    out = _records(inst)
    assert re.findall(r"(?m)^_25\._tcp\.mail\.test\. IN TLSA (.*)$", out) == [current, nxt]
    assert "DANE (in a DNSSEC-signed zone only): the MX host's current key and the next one" in out
