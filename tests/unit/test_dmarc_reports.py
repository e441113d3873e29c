"""The parts of DMARC aggregate reports that decide (mta/dmarcreport.py): pct, where reports
go and how large, what each verdict records, and the XML of RFC 7489 appendix C."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import xml.etree.ElementTree as ET

import pytest

from common.models import DMARCVerdict
from mta import dmarcreport
from mta.checks import DKIMResult, SPFResult, Verdict
from mta.dmarc import DMARCResult, check_dmarc
from tests.harness.dns import FakeResolver


@pytest.mark.parametrize(("policy", "pct", "draw", "expected"), [
    ("reject", "100", 99, ("reject", False)),
    ("reject", "20", 19, ("reject", False)),  # in the sample
    ("reject", "20", 20, ("quarantine", True)),  # out of it: the next milder policy
    ("quarantine", "0", 0, ("none", True)),
    ("none", "0", 50, ("none", False)),
    ("reject", "lots", 99, ("reject", False)),  # an invalid pct is ignored
])
def test_pct_samples_failing_mail(policy: str, pct: str, draw: int, expected: tuple[str, bool]) -> None:
    assert dmarcreport.sample(policy, pct, lambda _n: draw) == expected


def test_check_dmarc_honours_pct() -> None:
    dns = FakeResolver({"_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject; pct=0"]}})
    result = asyncio.run(check_dmarc("sender.test", spf=("fail", "other.test"), dkim=[], resolver=dns))
    assert (result.result, result.policy, result.sampled_out) == ("fail", "quarantine", True)
    assert result.tags["pct"] == "0" and result.record_domain == "sender.test"


def test_destinations_and_their_limits() -> None:
    tags = {"rua": "mailto:a@example.net!10m, mailto:b@example.net!1k,https://x.test/r, mailto:c@example.net,"
                   " mailto:nonsense"}
    assert dmarcreport.destinations(tags) == [
        dmarcreport.Destination("a@example.net", 10 * 1024 * 1024), dmarcreport.Destination("b@example.net", 1024),
        dmarcreport.Destination("c@example.net", 0)]
    assert dmarcreport.destinations({}) == []


def _verdict(result: str, policy: str, *, sampled_out: bool = False) -> Verdict:
    return Verdict("mx.test", SPFResult("pass", "mailfrom", "bounce.sender.test"),
                   [DKIMResult("fail", "sender.test", "s1", "rsa-sha256", "abc")],
                   DMARCResult(result, "sender.test", policy, {"v": "DMARC1", "p": "reject"}, "sender.test",
                               sampled_out), "none", "x@bounce.sender.test", "mx.test", "192.0.2.9")


def test_each_verdict_records_what_was_done() -> None:
    now = dt.datetime(2026, 12, 1, 10)
    refused = dmarcreport.verdict_row(_verdict("fail", "reject"), refused=True, delivered_as_quarantine=True, now=now)
    assert (refused["disposition"], refused["reason"]) == ("reject", "")
    local = dmarcreport.verdict_row(_verdict("fail", "reject"), refused=False, delivered_as_quarantine=True, now=now)
    assert (local["disposition"], local["reason"]) == ("quarantine", "local_policy")
    sampled = dmarcreport.verdict_row(_verdict("fail", "quarantine", sampled_out=True), refused=False,
                                      delivered_as_quarantine=True, now=now)
    assert (sampled["disposition"], sampled["reason"]) == ("quarantine", "sampled_out")
    passed = dmarcreport.verdict_row(_verdict("pass", "reject"), refused=False, delivered_as_quarantine=True, now=now)
    assert passed["disposition"] == "none" and json.loads(passed["dkim"]) == [["sender.test", "s1", "fail"]]
    assert passed["envelope_from"] == "bounce.sender.test" and passed["record"] == "v=DMARC1; p=reject"


def test_the_feedback_xml_counts_alike_rows_once() -> None:
    rows = [DMARCVerdict(source_ip="192.0.2.9", header_from="sender.test", envelope_from="bounce.sender.test",
                         spf_domain="bounce.sender.test", spf_result="pass", dkim='[["sender.test", "s1", "pass"]]',
                         result="pass", disposition="none", reason="") for _ in range(3)]
    rows.append(DMARCVerdict(source_ip="198.51.100.1", header_from="sender.test", envelope_from="",
                             spf_domain="evil.test", spf_result="fail", dkim="[]", result="fail",
                             disposition="reject", reason=""))
    begin = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    xml = dmarcreport.feedback_xml(org_name="mail.test", email_address="postmaster@example.org", report_id="r1",
                                   begin=begin, end=begin + dt.timedelta(days=1), domain="sender.test",
                                   tags={"p": "reject", "adkim": "s"}, verdicts=rows)
    root = ET.fromstring(xml)
    assert root.findtext("report_metadata/date_range/begin") == str(int(begin.timestamp()))
    assert root.findtext("policy_published/adkim") == "s" and root.findtext("policy_published/sp") == "reject"
    records = root.findall("record")
    assert [(r.findtext("row/source_ip"), r.findtext("row/count"), r.findtext("row/policy_evaluated/dkim"),
             r.findtext("row/policy_evaluated/spf")) for r in records] == [
        ("192.0.2.9", "3", "pass", "pass"),  # relaxed SPF alignment: bounce.sender.test is sender.test's
        ("198.51.100.1", "1", "fail", "fail")]
    assert records[0].findtext("auth_results/dkim/selector") == "s1"
    assert records[1].find("auth_results/dkim") is None
