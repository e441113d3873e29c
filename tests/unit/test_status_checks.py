"""The status checks (cli/checks.py): each compares what is published with what is expected.

DNS answers come from a dictionary (tests/harness/dns.py); the command itself,
over a real DNS server and an unreachable one, is in
tests/component/test_status_checks_cli.py.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cli import checks
from cli.dns import records, unreachable_host
from common import backupstatus
from common import config as configmod
from tests.harness.dns import FakeResolver
from web import mta_sts

HOST = "mail.example.org"


def _config(tmp_path: Path, extra: dict[str, Any] | None = None) -> configmod.Config:
    raw: dict[str, Any] = {"mailroom": {"hostname": HOST, "domains": ["example.org"]}}
    for section, values in (extra or {}).items():
        raw.setdefault(section, {}).update(values)
    return configmod.from_dict(raw, tmp_path / "mailroom.toml")


def _base() -> dict[str, Any]:
    return {
        "example.org": {"MX": [(10, HOST)], "TXT": ["v=spf1 mx -all"]},
        "_dmarc.example.org": {"TXT": ["v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org"]},
        "_mta-sts.example.org": {"TXT": ["v=STSv1; id=20261201"]},
        "_smtp._tls.example.org": {"TXT": ["v=TLSRPTv1; rua=mailto:tls@example.org"]},
        HOST: {"A": ["192.0.2.25"]},
        "25.2.0.192.in-addr.arpa": {"PTR": [HOST + "."]},
    }


def _by_kind(cfg: configmod.Config, recs: dict[str, Any]) -> dict[str, checks.Check]:
    report = checks.for_domain(cfg, "example.org", FakeResolver(recs))
    return {c.kind: c for c in report.checks}


def test_the_suggested_records_are_present(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    recs = _base()
    recs["_mta-sts.example.org"] = {"TXT": [mta_sts.txt_record(cfg)]}
    found = _by_kind(cfg, recs)
    for kind in ("MX", "SPF", "DMARC", "MTA-STS", "TLS-RPT", "A", "PTR", "FCDNS"):
        assert found[kind].level == checks.OK, found[kind]


def test_an_mta_sts_record_with_an_old_id_is_different(tmp_path: Path) -> None:
    """Senders fetch the policy again only when the id changes: an id that is not the
    current policy's keeps them on the old one."""
    cfg = _config(tmp_path)
    check = _by_kind(cfg, _base())["MTA-STS"]  # id=20261201, not the policy's
    assert check.state == "different" and mta_sts.txt_record(cfg) in check.fix


@pytest.mark.parametrize(("spf", "state"), [
    ("v=spf1 mx -all", "present"),
    ("v=spf1 mx include:_spf.provider.test -all", "present"),  # other senders may be added
    ("v=spf1 mx ~all", "weak"),
    ("v=spf1 ip4:192.0.2.25 -all", "different"),  # allows us, but not the mx the suggestion names
    ("v=spf1 ip4:127.0.0.1 -all", "different"),
    ("v=spf1 mx ?all", "different"),
    ("v=spf1 +all", "different"),
    ("v=spf1 mx", "different"),
])
def test_spf_is_compared_with_the_suggestion_not_just_found(tmp_path: Path, spf: str, state: str) -> None:
    recs = _base()
    recs["example.org"] = {"MX": [(10, HOST)], "TXT": [spf]}
    check = _by_kind(_config(tmp_path), recs)["SPF"]
    assert check.state == state, check
    assert check.found == spf


def test_a_different_spf_record_says_whether_this_host_still_passes(tmp_path: Path) -> None:
    recs = _base()
    recs["example.org"] = {"MX": [(10, HOST)], "TXT": ["v=spf1 ip4:127.0.0.1 -all"]}
    check = _by_kind(_config(tmp_path), recs)["SPF"]
    assert check.level == checks.FAIL and check.expected == "v=spf1 mx -all"
    assert "fails SPF" in check.note and "192.0.2.25" in check.note
    assert 'example.org. IN TXT "v=spf1 mx -all"' in check.fix
    recs["example.org"] = {"MX": [(10, HOST)], "TXT": ["v=spf1 ip4:192.0.2.25 -all"]}
    check = _by_kind(_config(tmp_path), recs)["SPF"]
    assert check.level == checks.FAIL and "lets this host's addresses pass" in check.note


def test_two_spf_records_are_wrong(tmp_path: Path) -> None:
    recs = _base()
    recs["example.org"] = {"MX": [(10, HOST)], "TXT": ["v=spf1 mx -all", "v=spf1 -all"]}
    assert _by_kind(_config(tmp_path), recs)["SPF"].state == "different"


@pytest.mark.parametrize(("dmarc", "state"), [
    ("v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org", "present"),
    ("v=DMARC1; p=reject", "present"),  # stronger than the suggestion: right
    ("v=DMARC1; p=none; rua=mailto:postmaster@example.org", "weak"),
    ("v=DMARC1; p=reject; pct=20", "weak"),
    ("v=DMARC1; p=bogus", "different"),
    ("v=DMARC1; rua=mailto:postmaster@example.org", "different"),  # no policy at all
])
def test_dmarc_is_judged_by_its_policy(tmp_path: Path, dmarc: str, state: str) -> None:
    recs = _base()
    recs["_dmarc.example.org"] = {"TXT": [dmarc]}
    check = _by_kind(_config(tmp_path), recs)["DMARC"]
    assert check.state == state, check
    if state == "weak":
        assert check.level == checks.WARN and check.note


def test_two_dmarc_records_are_wrong(tmp_path: Path) -> None:
    recs = _base()
    recs["_dmarc.example.org"] = {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]}
    assert _by_kind(_config(tmp_path), recs)["DMARC"].state == "different"


def test_mta_sts_and_tls_rpt_need_their_tags(tmp_path: Path) -> None:
    recs = _base()
    recs["_mta-sts.example.org"] = {"TXT": ["v=STSv1"]}
    recs["_smtp._tls.example.org"] = {"TXT": ["v=TLSRPTv1;"]}
    found = _by_kind(_config(tmp_path), recs)
    assert found["MTA-STS"].state == "different" and found["TLS-RPT"].state == "different"


def test_missing_records_say_what_to_publish(tmp_path: Path) -> None:
    recs = _base()
    del recs["_dmarc.example.org"]
    check = _by_kind(_config(tmp_path), recs)["DMARC"]
    assert check.state == "missing"
    assert check.fix == ('publish: _dmarc.example.org. IN TXT '
                         '"v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org"')


def test_fcdns_needs_the_ptr_name_to_lead_back(tmp_path: Path) -> None:
    recs = _base()
    recs["25.2.0.192.in-addr.arpa"] = {"PTR": ["host-25.provider.test."]}
    recs["host-25.provider.test"] = {"A": ["198.51.100.7"]}
    found = _by_kind(_config(tmp_path), recs)
    assert found["PTR"].state == "different" and "set its PTR to mail.example.org" in found["PTR"].fix
    assert found["FCDNS"].state == "different"
    assert found["FCDNS"].found == "host-25.provider.test -> 198.51.100.7"
    recs["host-25.provider.test"] = {"A": ["192.0.2.25"]}
    assert _by_kind(_config(tmp_path), recs)["FCDNS"].level == checks.OK


def _certificate(path: Path, *, days: float, name: str = HOST, self_signed: bool = True) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer = subject if self_signed else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    path.parent.mkdir(parents=True, exist_ok=True)
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize(("days", "self_signed", "name", "level", "state"), [
    (200, False, HOST, checks.OK, "ok"),
    (200, True, HOST, checks.WARN, "self-signed"),
    (200, False, "other.example.org", checks.WARN, "other name"),
    (15, False, HOST, checks.WARN, "expiring"),
    (3, False, HOST, checks.FAIL, "expiring"),
    (-1, False, HOST, checks.FAIL, "expired"),
])
def test_certificate_expiry(tmp_path: Path, days: float, self_signed: bool, name: str, level: str,
                            state: str) -> None:
    cfg = _config(tmp_path)
    _certificate(cfg.resolve(cfg.tls.cert), days=days, name=name, self_signed=self_signed)
    check = checks.cert_check(cfg)
    assert (check.level, check.state) == (level, state), check


def test_tlsa_matches_the_certificate(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    _certificate(cfg.resolve(cfg.tls.cert), days=200, self_signed=False)
    want = checks.tlsa_value(cfg)
    assert want.startswith("3 1 1 ") and len(want) == 6 + 64
    recs = _base()
    missing = checks.tlsa_check(cfg, HOST, FakeResolver(recs))
    assert (missing.level, missing.state) == (checks.WARN, "optional")  # optional without DNSSEC
    recs["_25._tcp." + HOST] = {"TLSA": ["3 1 1 " + "00" * 32]}
    wrong = checks.tlsa_check(cfg, HOST, FakeResolver(recs))
    assert (wrong.level, wrong.state) == (checks.FAIL, "different")
    recs["_25._tcp." + HOST] = {"TLSA": [want.upper().replace("3 1 1 ", "3 1 1 ")]}
    assert checks.tlsa_check(cfg, HOST, FakeResolver(recs)).level == checks.OK


def test_dnsbl_listing_of_our_address(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"filter": {"dnsbl_zones": ["bl.test"]}})
    recs = _base()
    clean = {c.kind: c for c in checks.host_checks(cfg, FakeResolver(recs))}
    assert (clean["DNSBL"].level, clean["DNSBL"].state) == (checks.OK, "clean")
    recs["25.2.0.192.bl.test"] = {"A": ["127.0.0.2"], "TXT": ["listed for spam"]}
    listed = {c.kind: c for c in checks.host_checks(cfg, FakeResolver(recs))}["DNSBL"]
    assert (listed.level, listed.state) == (checks.FAIL, "listed")
    assert listed.found == "127.0.0.2 (listed for spam)" and listed.name == "192.0.2.25 at bl.test"


def test_backup_age_and_outcome(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert checks.backup_check(cfg).state == "none"
    now = time.time()
    backupstatus.write(cfg.run_dir, backupstatus.Outcome(now - 60, now - 50, True, "s1", last_ok=now - 50))
    assert checks.backup_check(cfg, now).level == checks.OK
    assert checks.backup_check(cfg, now + 2 * 86400).state == "old"
    backupstatus.write(cfg.run_dir, backupstatus.Outcome(now - 10, now - 5, False, error="No space left on device",
                                                         last_ok=now - 50))
    failed = checks.backup_check(cfg, now)
    assert (failed.level, failed.state) == (checks.FAIL, "failed") and "No space left" in failed.found


def test_whether_rspamd_scans_and_its_blocklists_count(tmp_path: Path) -> None:
    off = checks.spam_check(_config(tmp_path))
    assert (off.level, off.state) == (checks.WARN, "off")
    supervised = {"filter": {"rspamd": "supervised"}}
    public = checks.spam_check(_config(tmp_path, supervised | {"dns": {"nameservers": ["9.9.9.9"]}}))
    # rspamd and redis-server are installed (.ci/install-peers), so the filter can run.
    assert (public.level, public.state) == (checks.WARN, "no lists") and "9.9.9.9:53" in public.found, public
    own = checks.spam_check(_config(tmp_path, supervised | {"dns": {"resolver": "unbound"}}))
    assert (own.level, own.state) == (checks.OK, "ok") and "127.0.0.1:2053" in own.found
    elsewhere = checks.spam_check(_config(tmp_path, {"filter": {"rspamd": "192.0.2.9:11333"}}))
    assert (elsewhere.level, elsewhere.state) == (checks.OK, "elsewhere")


def test_no_answer_at_all_is_one_line_not_one_error_per_record(tmp_path: Path) -> None:
    everything_times_out = {name: "TIMEOUT" for name in _base()} | {"org": "TIMEOUT"}

    class Dead(FakeResolver):
        def query(self, name: str, rdtype: str) -> list[Any]:
            return super().query("timeout.example.org", rdtype)

    report = checks.for_domain(_config(tmp_path), "example.org",
                               Dead(everything_times_out | {"timeout.example.org": "TIMEOUT"}))
    assert not report.ok
    assert report.unreachable.startswith("DNS cannot be reached")
    assert checks.render(report) == [report.unreachable]
    # One name timing out is that record's error, not an unreachable DNS.
    recs = _base()
    recs["_dmarc.example.org"] = "TIMEOUT"
    partly = checks.for_domain(_config(tmp_path), "example.org", FakeResolver(recs))
    assert not partly.unreachable
    assert {c.kind: c.state for c in partly.checks}["DMARC"] == "error"


@pytest.mark.parametrize(("host", "warned"), [
    ("localhost", True), ("mail.localhost", True), ("mail", True), ("mail.test", True), ("127.0.0.1", True),
    ("mail.example.org", False),
])
def test_a_host_name_the_internet_cannot_reach_is_warned_about(host: str, warned: bool) -> None:
    assert bool(unreachable_host(host)) is warned


def test_records_suggest_the_host_as_mx(tmp_path: Path) -> None:
    [mx] = [r for r in records(_config(tmp_path), "example.org") if r.kind == "MX"]
    assert mx.value == f"10 {HOST}."
